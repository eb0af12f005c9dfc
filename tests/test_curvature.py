import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st
from torch.func import functional_call

from lossbook.curvature import PassCounter, hvp, loss_top_eigenvalue, top_hessian_eigenvalue


def small_net(seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3)).to(dtype)


def dense_hessian(model, x, y):
    """The full Hessian of the cross-entropy over the flattened parameters, by torch.autograd.functional."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    flat = torch.cat([p.detach().flatten() for p in model.parameters()])

    def f(w):
        parts, i = {}, 0
        for n, s in zip(names, shapes):
            parts[n] = w[i:i + s.numel()].view(s)
            i += s.numel()
        return F.cross_entropy(functional_call(model, parts, (x,)), y)

    return torch.autograd.functional.hessian(f, flat)


def flat(ts):
    return torch.cat([t.flatten() for t in ts])


def test_hvp_matches_dense_hessian_float64():
    model = small_net()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(16, 4, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (16,), generator=gen)
    H = dense_hessian(model, x, y)
    loss = F.cross_entropy(model(x), y)
    for _ in range(3):    # several products from one forward pass
        v = [torch.randn(p.shape, generator=gen, dtype=torch.float64) for p in model.parameters()]
        torch.testing.assert_close(flat(hvp(loss, model, v)), H @ flat(v), rtol=1e-10, atol=1e-12)


def test_hvp_loop_reference_on_a_polynomial():
    """f(a, b) = a^2 b + sin(a) b^3 by hand: the Hessian entries written out one by one."""
    a = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    b = torch.tensor(-1.3, dtype=torch.float64, requires_grad=True)
    f = a ** 2 * b + torch.sin(a) * b ** 3
    A, B = a.item(), b.item()
    import math
    H = [[2 * B - math.sin(A) * B ** 3, 2 * A + 3 * math.cos(A) * B ** 2],
         [2 * A + 3 * math.cos(A) * B ** 2, 6 * math.sin(A) * B]]
    v = [0.4, -2.0]
    expected = [sum(H[i][j] * v[j] for j in range(2)) for i in range(2)]
    got = hvp(f, [a, b], [torch.tensor(v[0], dtype=torch.float64), torch.tensor(v[1], dtype=torch.float64)])
    assert [round(float(g), 12) for g in got] == [round(e, 12) for e in expected]


def test_top_eigenvalue_of_a_quadratic_matches_eigvalsh():
    gen = torch.Generator().manual_seed(2)
    Q = torch.randn(12, 12, generator=gen, dtype=torch.float64)
    A = Q @ Q.T / 12 + torch.diag(torch.linspace(0, 3, 12, dtype=torch.float64))   # PSD, distinct top
    w = torch.randn(12, generator=gen, dtype=torch.float64, requires_grad=True)
    loss = 0.5 * w @ A @ w + w.sum()          # Hessian = A everywhere
    eig, vec = top_hessian_eigenvalue(loss, [w], iters=300, generator=gen)
    top = torch.linalg.eigvalsh(A)[-1]
    torch.testing.assert_close(eig, top, rtol=1e-8, atol=0)
    torch.testing.assert_close(float(flat(vec).norm()), 1.0)
    torch.testing.assert_close((A @ vec[0]).abs(), (top * vec[0]).abs(), rtol=1e-5, atol=1e-6)


def test_top_eigenvalue_with_tolerance_stops_early_and_agrees():
    A = torch.diag(torch.tensor([5.0, 1.0, 0.5], dtype=torch.float64))
    w = torch.ones(3, dtype=torch.float64, requires_grad=True)
    eig, _ = top_hessian_eigenvalue(0.5 * w @ A @ w, [w], iters=1000, tol=1e-12,
                                    generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(eig, torch.tensor(5.0, dtype=torch.float64))


def test_top_eigenvalue_of_a_network_matches_dense():
    model = small_net(3)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(32, 4, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (32,), generator=gen)
    evals = torch.linalg.eigvalsh(dense_hessian(model, x, y))
    top = evals[evals.abs().argmax()]            # power iteration finds the largest in magnitude
    got = loss_top_eigenvalue(lambda: F.cross_entropy(model(x), y), model, iters=500, generator=gen)
    torch.testing.assert_close(got, top, rtol=1e-6, atol=1e-9)


def test_linear_loss_has_zero_hessian_and_unused_parameters_are_fine():
    w = torch.randn(3, requires_grad=True)
    unused = torch.randn(2, requires_grad=True)
    hv = hvp((2 * w).sum(), [w, unused], [torch.ones(3), torch.ones(2)])
    assert all(bool((h == 0).all()) for h in hv)


def test_eval_mode_is_restored():
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Dropout(0.5), torch.nn.Linear(3, 2))
    model.train()
    x, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
    a = loss_top_eigenvalue(lambda: F.cross_entropy(model(x), y), model, iters=5,
                            generator=torch.Generator().manual_seed(0))
    b = loss_top_eigenvalue(lambda: F.cross_entropy(model(x), y), model, iters=5,
                            generator=torch.Generator().manual_seed(0))
    assert model.training and torch.equal(a, b)      # measured without dropout, deterministic


@settings(max_examples=15, deadline=None)
@given(scale=st.floats(0.1, 10.0), seed=st.integers(0, 2**31 - 1))
def test_property_eigenvalue_scales_with_the_loss(scale, seed):
    gen = torch.Generator().manual_seed(seed)
    A = torch.randn(5, 5, generator=gen, dtype=torch.float64)
    A = A @ A.T + torch.eye(5, dtype=torch.float64)
    w = torch.randn(5, generator=gen, dtype=torch.float64, requires_grad=True)
    e1, _ = top_hessian_eigenvalue(0.5 * w @ A @ w, [w], iters=200, generator=torch.Generator().manual_seed(seed))
    e2, _ = top_hessian_eigenvalue(scale * 0.5 * w @ A @ w, [w], iters=200, generator=torch.Generator().manual_seed(seed))
    torch.testing.assert_close(e2, scale * e1, rtol=1e-6, atol=1e-9)
    assert float(e1) <= float(torch.linalg.eigvalsh(A)[-1]) * (1 + 1e-9)   # a Rayleigh quotient never overshoots


def test_pass_counter_counts_forward_backward_and_samples():
    model = small_net(dtype=torch.float32)
    other = torch.nn.Linear(4, 3)
    x = torch.randn(7, 4)
    with PassCounter(model, other) as c:
        out = model(x)
        (F.cross_entropy(out, torch.zeros(7, dtype=torch.int64)) + out.square().mean()).backward()  # two terms, one backward
        with torch.no_grad():
            other(x[:3])                                # a forward with no backward (an EMA teacher's)
        model(x[:2]).sum().backward()
    assert (c.forward, c.backward, c.forward_samples, c.backward_samples) == (3, 2, 12, 9)
    model(x).sum().backward()                           # detached on exit: not counted
    assert c.forward == 3
    c.reset()
    assert (c.forward, c.backward) == (0, 0) and "forward=0" in repr(c)


def test_pass_counter_sees_the_hvp_backward_passes():
    model = small_net()
    x, y = torch.randn(5, 4, dtype=torch.float64), torch.randint(0, 3, (5,))
    with PassCounter(model) as c:
        top_hessian_eigenvalue(F.cross_entropy(model(x), y), model, iters=4)
    assert c.forward == 1 and c.backward == 5          # the gradient, then one per product


def test_bad_input_names_the_argument():
    w = torch.randn(3, requires_grad=True)
    with pytest.raises(ValueError, match="loss must be a scalar"):
        hvp(w * 2, [w], [torch.ones(3)])
    with pytest.raises(ValueError, match="loss must depend"):
        hvp(torch.tensor(1.0), [w], [torch.ones(3)])
    with pytest.raises(ValueError, match="vec must have one tensor"):
        hvp(w.sum(), [w], [])
    with pytest.raises(ValueError, match="vec must match"):
        hvp(w.sum(), [w], [torch.ones(4)])
    with pytest.raises(ValueError, match="params must contain"):
        hvp(w.sum(), [torch.ones(3)], [torch.ones(3)])
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="iters"):
            top_hessian_eigenvalue((w ** 2).sum(), [w], iters=bad)
    with pytest.raises(ValueError, match="tol"):
        top_hessian_eigenvalue((w ** 2).sum(), [w], tol=-1.0)
    with pytest.raises(ValueError, match="init must match"):
        top_hessian_eigenvalue((w ** 2).sum(), [w], init=[torch.ones(2)])
    with pytest.raises(ValueError, match="nn.Module"):
        PassCounter()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu_and_hvp_never_syncs():
    model = small_net(dtype=torch.float64)
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(16, 4, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (16,), generator=gen)
    v = [torch.randn(p.shape, generator=gen, dtype=torch.float64) for p in model.parameters()]
    cpu = hvp(F.cross_entropy(model(x), y), model, v)
    model_c = model.cuda()
    xc, yc, vc = x.cuda(), y.cuda(), [t.cuda() for t in v]
    loss = F.cross_entropy(model_c(xc), yc)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = hvp(loss, model_c, vc)
        eig, _ = top_hessian_eigenvalue(F.cross_entropy(model_c(xc), yc), model_c, iters=5, init=vc)
        with PassCounter(model_c) as c:
            model_c(xc).sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.testing.assert_close(flat([g.cpu() for g in got]), flat(cpu))
    assert eig.device.type == "cuda" and (c.forward, c.backward) == (1, 1)
