import copy
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from lossbook.objectives import Quadratic, log_spectrum
from lossbook.optimizers.m_fac import MFAC, SlidingWindowIHVP, StaticIHVP, empirical_fisher, paper_coefficients

F64 = torch.float64


def woodbury_loop(grads, damp):
    """Dense float64 reference: the paper's Sherman-Morrison recursion on the explicit d x d inverse,
    one gradient at a time (as the authors' HInvSlow test does)."""
    m, d = grads.shape
    h = torch.eye(d, dtype=F64) / damp
    for i in range(m):
        hg = h @ grads[i]
        h = h - torch.outer(hg, hg) / (m + grads[i] @ hg)
    return h


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("damp", [1e-5, 1e-2, 1.0, 100.0])
def test_static_and_dynamic_match_dense_woodbury(damp):
    gen = torch.Generator().manual_seed(0)
    grads = torch.randn(12, 80, generator=gen, dtype=F64)
    x = torch.randn(3, 80, generator=gen, dtype=F64)
    dense = woodbury_loop(grads, damp)
    torch.testing.assert_close(dense, torch.linalg.inv(empirical_fisher(grads, damp)), rtol=1e-7, atol=1e-7 / damp)
    ref = x @ dense
    static = StaticIHVP(grads, damp)
    assert rel(static.mul(x), ref) < 1e-9
    assert rel(static.diag(), dense.diagonal()) < 1e-9
    idx = torch.tensor([0, 17, 79])
    assert rel(static.diag(idx), dense.diagonal()[idx]) < 1e-9
    assert rel(SlidingWindowIHVP.from_grads(grads, damp).mul(x), ref) < 1e-9


def test_coefficients_match_the_papers_recursion():
    gen = torch.Generator().manual_seed(1)
    grads = torch.randn(10, 40, generator=gen, dtype=F64)
    D, B, denom = paper_coefficients(grads, 0.1)
    h = SlidingWindowIHVP.from_grads(grads, 0.1)
    torch.testing.assert_close(h.coef, B, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(h.denom, denom, rtol=1e-12, atol=0)
    # v_i = sum_j B_ij g_j are the static algorithm's vectors, and D_ij = g_i^T v_j... = v_i^T g_j
    static = StaticIHVP(grads, 0.1)
    torch.testing.assert_close(B @ grads, static.v, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(torch.triu(static.v @ grads.T), D, rtol=1e-10, atol=1e-10)


def test_sliding_window_after_many_updates():
    gen = torch.Generator().manual_seed(2)
    m, d, damp = 8, 60, 1e-3
    h = SlidingWindowIHVP(d, m, damp, dtype=F64)
    stream = torch.randn(3 * m + 3, d, generator=gen, dtype=F64)
    for t, g in enumerate(stream):
        out = h.update_mul(g)
        seen = stream[max(0, t + 1 - m): t + 1]
        window = torch.cat([seen, torch.zeros(m - len(seen), d, dtype=F64)])   # unfilled slots are zero
        assert rel(out, woodbury_loop(window, damp) @ g) < 1e-9
    assert h.last == (3 * m + 3) % m


def test_order_of_the_window_does_not_matter():
    gen = torch.Generator().manual_seed(3)
    grads = torch.randn(6, 30, generator=gen, dtype=F64)
    x = torch.randn(30, generator=gen, dtype=F64)
    a = StaticIHVP(grads, 0.5).mul(x)
    b = StaticIHVP(grads[torch.randperm(6, generator=gen)], 0.5).mul(x)
    torch.testing.assert_close(a, b)


def test_special_cases():
    # one gradient: Sherman-Morrison in closed form
    g = torch.tensor([3.0, 4.0], dtype=F64)
    h = StaticIHVP(g[None], 2.0)
    # F = 2 I + g g^T (m = 1); F^-1 g = g / (2 + |g|^2)
    torch.testing.assert_close(h.mul(g), g / (2 + 25))
    # zero gradients: F = lambda I
    z = SlidingWindowIHVP(5, 3, 0.25, dtype=F64)
    x = torch.arange(5, dtype=F64)
    torch.testing.assert_close(z.mul(x), 4 * x)
    # huge damping: F^-1 -> I / lambda
    big = StaticIHVP(torch.randn(4, 10, dtype=F64), 1e8)
    torch.testing.assert_close(big.mul(x.repeat(2)), x.repeat(2) / 1e8, rtol=1e-6, atol=1e-14)


@settings(max_examples=30, deadline=None)
@given(m=st.integers(1, 10), d=st.integers(1, 30), log_damp=st.floats(-3, 2), seed=st.integers(0, 2**31 - 1))
def test_property_inverse_is_symmetric_positive_and_inverts(m, d, log_damp, seed):
    gen = torch.Generator().manual_seed(seed)
    damp = 10.0**log_damp
    grads = torch.randn(m, d, generator=gen, dtype=F64)
    h = StaticIHVP(grads, damp)
    inv = h.mul(torch.eye(d, dtype=F64))
    torch.testing.assert_close(inv, inv.T, rtol=1e-8, atol=1e-8 / damp)
    assert bool((torch.linalg.eigvalsh(inv) > 0).all())
    # F (F^-1 x) = x
    x = torch.randn(d, generator=gen, dtype=F64)
    torch.testing.assert_close(empirical_fisher(grads, damp) @ h.mul(x), x, rtol=1e-7, atol=1e-7 * x.abs().max().item())
    assert bool((h.diag() <= 1 / damp + 1e-9).all())          # the rank-m term only lowers the diagonal


def test_ihvp_gradcheck():
    gen = torch.Generator().manual_seed(4)
    grads = torch.randn(5, 7, generator=gen, dtype=F64)
    x = torch.randn(7, generator=gen, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda v: StaticIHVP(grads, 0.3).mul(v), (x,))
    assert torch.autograd.gradcheck(lambda v: SlidingWindowIHVP.from_grads(grads, 0.3).mul(v), (x,))


def _model_and_data(seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 2)).to(dtype)
    x = torch.randn(64, 4, generator=gen, dtype=dtype)
    y = (x[:, 0] + x[:, 1] > 0).long()
    return model, x, y


def _flat_grad(model):
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])


def test_optimizer_matches_sliding_window_reference():
    """MFAC's steps equal theta -= lr * F^-1 g with the window kept by SlidingWindowIHVP (float64)."""
    model, x, y = _model_and_data(dtype=F64)
    ref_model = copy.deepcopy(model)
    lr, m, damp, wd, beta = 0.05, 4, 1e-2, 1e-3, 0.5
    opt = MFAC(model.parameters(), lr=lr, ngrads=m, damp=damp, weight_decay=wd, momentum=beta)
    d = sum(p.numel() for p in model.parameters())
    h = SlidingWindowIHVP(d, m, damp, dtype=F64)
    buf = torch.zeros(d, dtype=F64)
    for step in range(3 * m + 1):
        for mdl in (model, ref_model):
            mdl.zero_grad()
            torch.nn.functional.cross_entropy(mdl(x[step::7]), y[step::7]).backward()
        opt.step()
        with torch.no_grad():
            theta = torch.cat([p.reshape(-1) for p in ref_model.parameters()])
            u = h.update_mul(_flat_grad(ref_model) + wd * theta)
            buf = beta * buf + (1 - beta) * u
            torch.nn.utils.vector_to_parameters(theta - lr * buf, ref_model.parameters())
        for p, q in zip(model.parameters(), ref_model.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-11)


def test_state_dict_round_trip():
    model, x, y = _model_and_data()
    opt = MFAC(model.parameters(), lr=1e-2, ngrads=4, damp=1e-3, momentum=0.9)

    def step(mdl, o):
        o.zero_grad()
        torch.nn.functional.cross_entropy(mdl(x), y).backward()
        o.step()

    for _ in range(6):                                   # more than a window: the ring buffer has wrapped
        step(model, opt)
    clone = copy.deepcopy(model)
    opt2 = MFAC(clone.parameters(), lr=1e-2, ngrads=4, damp=1e-3, momentum=0.9)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    for _ in range(3):
        step(model, opt)
        step(clone, opt2)
    for p, q in zip(model.parameters(), clone.parameters()):
        assert torch.equal(p, q)
    sd = opt.state_dict()
    assert sd["state"][0]["step"] == 9 and sd["param_groups"][0]["ngrads"] == 4


def test_param_groups_and_missing_grads():
    a = torch.nn.Parameter(torch.ones(3))
    b = torch.nn.Parameter(torch.ones(2))
    frozen = torch.nn.Parameter(torch.ones(4))
    opt = MFAC([{"params": [a], "lr": 0.1}, {"params": [b, frozen], "lr": 0.0}], ngrads=2, damp=1.0)
    (a.sum() + 2 * b.sum()).backward()
    opt.step()
    assert not torch.equal(a, torch.ones(3))
    assert torch.equal(b, torch.ones(2)) and torch.equal(frozen, torch.ones(4))   # lr 0; no grad
    # first step, F = I + g g^T / 2: a moves by 0.1 * (F^-1 g)_a
    g = torch.tensor([1, 1, 1, 2, 2, 0, 0, 0, 0], dtype=torch.float32)
    u = torch.linalg.solve(torch.eye(9) + torch.outer(g, g) / 2, g)
    torch.testing.assert_close(a.detach(), 1 - 0.1 * u[:3])


def test_no_host_sync_in_step_on_cpu_tensors():
    """step() never calls .item() / bool() on a tensor (checked by making them raise)."""
    model, x, y = _model_and_data()
    opt = MFAC(model.parameters(), lr=1e-2, ngrads=4, damp=1e-3)
    torch.nn.functional.cross_entropy(model(x), y).backward()
    names = ("item", "__bool__", "tolist", "__float__", "__int__")
    originals = {n: getattr(torch.Tensor, n) for n in names}

    def boom(*_a, **_k):
        raise AssertionError("host sync in MFAC.step")

    for n in names:
        setattr(torch.Tensor, n, boom)
    try:
        for _ in range(6):          # past a full window: the ring buffer wraps
            opt.step()
    finally:
        for n, f in originals.items():
            setattr(torch.Tensor, n, f)


def test_bad_input():
    p = [torch.nn.Parameter(torch.zeros(3))]
    for kw, name in [({"lr": -1.0}, "lr"), ({"ngrads": 0}, "ngrads"), ({"damp": 0.0}, "damp"),
                     ({"damp": math.nan}, "damp"), ({"momentum": 1.0}, "momentum"), ({"weight_decay": -1.0}, "weight_decay")]:
        with pytest.raises(ValueError, match=name):
            MFAC(p, **kw)
    with pytest.raises(ValueError, match="same in every parameter group"):
        MFAC([{"params": p}, {"params": [torch.nn.Parameter(torch.zeros(2))], "damp": 1.0}])
    with pytest.raises(ValueError, match="complex"):
        MFAC([torch.nn.Parameter(torch.zeros(2, dtype=torch.complex64))])
    with pytest.raises(ValueError, match="grads"):
        StaticIHVP(torch.zeros(5), 1.0)
    with pytest.raises(ValueError, match="grads"):
        StaticIHVP(torch.zeros(2, 3, dtype=torch.int64), 1.0)
    with pytest.raises(ValueError, match="damp"):
        StaticIHVP(torch.zeros(2, 3), -1.0)
    with pytest.raises(ValueError, match="x must"):
        StaticIHVP(torch.ones(2, 3), 1.0).mul(torch.zeros(4))
    with pytest.raises(ValueError, match="g must"):
        SlidingWindowIHVP(3, 2).update(torch.zeros(4))
    with pytest.raises(ValueError, match="m must"):
        SlidingWindowIHVP(3, 0)


def test_float32_agrees_with_float64_at_moderate_damping():
    gen = torch.Generator().manual_seed(5)
    grads = torch.randn(16, 500, generator=gen, dtype=F64)
    x = grads[3] + 0.1 * torch.randn(500, generator=gen, dtype=F64)
    ref = SlidingWindowIHVP.from_grads(grads, 1e-2).mul(x)
    got = SlidingWindowIHVP.from_grads(grads.float(), 1e-2).mul(x.float())
    assert rel(got.double(), ref) < 1e-4


def test_bf16_autocast_step_is_finite():
    """Under bf16 autocast the parameters and their gradients stay float32: the step is as in float32."""
    model, x, y = _model_and_data(10)
    opt = MFAC(model.parameters(), lr=1e-2, ngrads=4, damp=1e-3)
    for _ in range(6):
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
    assert all(bool(torch.isfinite(p).all()) and p.dtype == torch.float32 for p in model.parameters())


def test_tiny_training_learns():
    obj = Quadratic(log_spectrum(20, 100.0), generator=torch.Generator().manual_seed(6))
    gen = torch.Generator().manual_seed(7)
    opt = MFAC(obj.parameters(), lr=0.05, ngrads=8, damp=1e-2)
    start = obj.gap()
    for _ in range(300):
        opt.zero_grad()
        (obj() + obj.x @ (0.01 * torch.randn(20, generator=gen))).backward()   # noisy gradients
        opt.step()
    assert obj.gap() < 1e-2 * start
    model, x, y = _model_and_data(8)
    opt = MFAC(model.parameters(), lr=0.05, ngrads=16, damp=1e-2)
    for _ in range(150):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    assert (model(x).argmax(1) == y).float().mean() > 0.95


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu_and_never_syncs():
    gen = torch.Generator().manual_seed(9)
    grads = torch.randn(16, 300, generator=gen, dtype=F64)
    x = torch.randn(300, generator=gen, dtype=F64)
    torch.testing.assert_close(SlidingWindowIHVP.from_grads(grads.cuda(), 1e-3).mul(x.cuda()).cpu(),
                               SlidingWindowIHVP.from_grads(grads, 1e-3).mul(x))
    torch.testing.assert_close(StaticIHVP(grads.cuda(), 1e-3).diag().cpu(), StaticIHVP(grads, 1e-3).diag())
    model, xb, yb = _model_and_data(dtype=F64)
    cuda_model = copy.deepcopy(model).cuda()
    opts = [MFAC(mdl.parameters(), lr=1e-2, ngrads=4, damp=1e-3, momentum=0.5) for mdl in (model, cuda_model)]
    for step in range(6):
        for mdl, opt, dev in ((model, opts[0], "cpu"), (cuda_model, opts[1], "cuda")):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(mdl(xb.to(dev)), yb.to(dev)).backward()
            if dev == "cuda":
                torch.cuda.synchronize()
                torch.cuda.set_sync_debug_mode("error")
            try:
                opt.step()
            finally:
                torch.cuda.set_sync_debug_mode("default")
    for p, q in zip(model.parameters(), cuda_model.parameters()):
        torch.testing.assert_close(p, q.cpu())
