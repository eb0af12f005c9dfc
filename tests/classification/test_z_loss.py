import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

from lossbook.classification.z_loss import (FactoredSphericalLinear, ZLoss, log_spherical_softmax_loss,
                                            log_taylor_softmax_loss, spherical_softmax, spherical_stats,
                                            taylor_softmax, z_loss, z_loss_from_stats)


def reference_z(o, c, a, b):
    """Loop-based float64 transcription: mean, population sd, z-score, (1/a) log(1 + exp(a (b - z)))."""
    out = []
    for row, t in zip(o.tolist(), c.tolist()):
        D = len(row)
        mu = sum(row) / D
        sd = math.sqrt(sum((v - mu) ** 2 for v in row) / D)
        z = (row[t] - mu) / sd
        out.append(math.log1p(math.exp(a * (b - z))) / a)
    return torch.tensor(out, dtype=torch.float64)


def reference_competitors(o, c, eps):
    sph, tay = [], []
    for row, t in zip(o.tolist(), c.tolist()):
        sph.append(-math.log((row[t] ** 2 + eps) / sum(v * v + eps for v in row)))
        f = lambda v: 1 + v + v * v / 2  # noqa: E731
        tay.append(-math.log(f(row[t]) / sum(f(v) for v in row)))
    return torch.tensor(sph, dtype=torch.float64), torch.tensor(tay, dtype=torch.float64)


@pytest.mark.parametrize("a,b", [(1.0, 0.0), (0.1, 5.0), (3.0, -1.0), (1.0, 20.0)])
def test_z_loss_matches_loop_reference(a, b):
    gen = torch.Generator().manual_seed(0)
    o = 3 * torch.randn(40, 17, generator=gen, dtype=torch.float64)
    c = torch.randint(0, 17, (40,), generator=gen)
    ref = reference_z(o, c, a, b)
    torch.testing.assert_close(z_loss(o, c, a=a, b=b, reduction="none"), ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(z_loss(o, c, a=a, b=b), ref.mean(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(z_loss(o, c, a=a, b=b, reduction="sum"), ref.sum(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(z_loss_from_stats(*spherical_stats(o, c), 17, a=a, b=b, reduction="none"), ref,
                               rtol=1e-10, atol=1e-10)


def test_competitors_match_loop_reference():
    gen = torch.Generator().manual_seed(1)
    o = 2 * torch.randn(30, 9, generator=gen, dtype=torch.float64)
    c = torch.randint(0, 9, (30,), generator=gen)
    sph, tay = reference_competitors(o, c, 0.01)
    torch.testing.assert_close(log_spherical_softmax_loss(o, c, eps=0.01, reduction="none"), sph)
    torch.testing.assert_close(log_taylor_softmax_loss(o, c, reduction="none"), tay)
    # the losses are -log of the probabilities the helpers return
    torch.testing.assert_close(-spherical_softmax(o, eps=0.01).gather(1, c[:, None]).log().squeeze(1), sph)
    torch.testing.assert_close(-taylor_softmax(o).gather(1, c[:, None]).log().squeeze(1), tay)


def test_z_score_bound_and_equality_case():
    """|z_c| <= sqrt(D - 1), with equality when the other scores are all equal: the loss's floor."""
    gen = torch.Generator().manual_seed(2)
    for D in (2, 10, 1000):
        o = torch.randn(500, D, generator=gen, dtype=torch.float64) ** 3
        c = torch.randint(0, D, (500,), generator=gen)
        floor = F.softplus(torch.tensor(1.0 * (3.0 - math.sqrt(D - 1)), dtype=torch.float64))
        assert bool((z_loss(o, c, a=1.0, b=3.0, reduction="none") >= floor - 1e-12).all())
        one_hot = torch.zeros(1, D, dtype=torch.float64)
        one_hot[0, 0] = 5.0
        torch.testing.assert_close(z_loss(one_hot, torch.tensor([0]), a=1.0, b=3.0), floor)


def test_special_cases_of_a_and_b():
    gen = torch.Generator().manual_seed(3)
    o = torch.randn(50, 8, generator=gen, dtype=torch.float64)
    c = torch.randint(0, 8, (50,), generator=gen)
    var, mu = torch.var_mean(o, dim=1, correction=0)
    z = (o.gather(1, c[:, None]).squeeze(1) - mu) / var.sqrt()
    # large a: the hinge on the z-score
    torch.testing.assert_close(z_loss(o, c, a=1e4, b=1.0, reduction="none"), torch.relu(1.0 - z), atol=1e-4, rtol=0)
    # b far above the bound: (b - z_c) + log(1 + e^{-a(b - z_c)}) / a, i.e. linear in z_c
    torch.testing.assert_close(z_loss(o, c, a=1.0, b=50.0, reduction="none"), 50.0 - z, atol=1e-10, rtol=0)
    # a = 1, b = 0: the authors' example code, softplus((mu - o_c) / sigma)
    torch.testing.assert_close(z_loss(o, c, reduction="none"), F.softplus(-z))


def test_gradient_formula():
    """dL/do_k = -sig(a (b - z_c)) / sigma * (delta_kc - (1 + z_c z_k) / D)."""
    gen = torch.Generator().manual_seed(4)
    o = torch.randn(6, 11, generator=gen, dtype=torch.float64).requires_grad_()
    c = torch.randint(0, 11, (6,), generator=gen)
    a, b = 0.7, 1.5
    (g,) = torch.autograd.grad(z_loss(o, c, a=a, b=b, reduction="sum"), o)
    var, mu = torch.var_mean(o.detach(), dim=1, correction=0)
    sd = var.sqrt()[:, None]
    z = (o.detach() - mu[:, None]) / sd
    zc = z.gather(1, c[:, None])
    expected = -torch.sigmoid(a * (b - zc)) / sd * (F.one_hot(c, 11).double() - (1 + zc * z) / 11)
    torch.testing.assert_close(g, expected, rtol=1e-10, atol=1e-12)


def test_gradcheck():
    gen = torch.Generator().manual_seed(5)
    o = torch.randn(4, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    c = torch.tensor([0, 3, 5, 1])
    assert torch.autograd.gradcheck(lambda x: z_loss(x, c, a=0.5, b=2.0), (o,))
    assert torch.autograd.gradcheck(lambda x: log_spherical_softmax_loss(x, c), (o,))
    assert torch.autograd.gradcheck(lambda x: log_taylor_softmax_loss(x, c), (o,))
    assert torch.autograd.gradcheck(lambda x: z_loss_from_stats(*spherical_stats(x, c), 6, a=2.0, b=1.0), (o,))


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), D=st.integers(2, 60), alpha=st.floats(1e-3, 1e3),
       beta=st.floats(-1e3, 1e3), a=st.floats(0.05, 5.0), b=st.floats(-5.0, 30.0))
def test_property_shift_scale_invariance(seed, D, alpha, beta, a, b):
    gen = torch.Generator().manual_seed(seed)
    o = torch.randn(8, D, generator=gen, dtype=torch.float64)
    c = torch.randint(0, D, (8,), generator=gen)
    base = z_loss(o, c, a=a, b=b, reduction="none")
    torch.testing.assert_close(z_loss(alpha * o + beta, c, a=a, b=b, reduction="none"), base, rtol=1e-9, atol=1e-9)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), D=st.integers(2, 40))
def test_property_gradient_orthogonal_to_ones_and_scores(seed, D):
    gen = torch.Generator().manual_seed(seed)
    o = (2 * torch.randn(5, D, generator=gen, dtype=torch.float64)).requires_grad_()
    c = torch.randint(0, D, (5,), generator=gen)
    (g,) = torch.autograd.grad(z_loss(o, c, a=1.3, b=2.0, reduction="sum"), o)
    # the gradient's terms are of size 1/sigma and cancel: the residual is rounding of that size
    # (hypothesis finds rows of two nearly equal scores, sigma ~ 1e-6)
    tol = 1e-13 * (1 + 1 / o.detach().std(1, correction=0)) * (1 + o.detach().abs().max(1).values)
    assert (g.sum(1).abs() <= tol).all()
    assert ((g * o.detach()).sum(1).abs() <= tol * (1 + o.detach().abs().max(1).values)).all()


def _naive_sgd(W, H, c, loss_fn, lr):
    Hh = H.clone().requires_grad_()
    loss = loss_fn(Hh @ W.T, c)
    gW, gH = torch.autograd.grad(loss, (W, Hh))
    with torch.no_grad():
        W -= lr * gW
    return loss.detach(), gH


@pytest.mark.parametrize("kind", ["z", "mse"])
@pytest.mark.parametrize("renorm_every", [0, 3])
def test_factored_step_equals_plain_sgd(kind, renorm_every):
    """The O(d^2) step must be plain SGD on W = V U + 1 omega^T, exactly, over many steps
    (batches with repeated targets included)."""
    gen = torch.Generator().manual_seed(6)
    D, d, m, lr = 40, 5, 7, 0.3
    W0 = 0.3 * torch.randn(D, d, generator=gen, dtype=torch.float64)
    if kind == "z":
        stats_loss = lambda oc, s, q, n: z_loss_from_stats(oc, s, q, n, a=0.5, b=2.0, reduction="none")  # noqa: E731
        dense_loss = lambda o, t: z_loss(o, t, a=0.5, b=2.0)  # noqa: E731
    else:  # squared error to the one-hot target: another spherical loss, with alpha = 0
        stats_loss = lambda oc, s, q, n: q - 2 * oc + 1  # noqa: E731
        dense_loss = lambda o, t: (o - F.one_hot(t, o.shape[1]).to(o.dtype)).square().sum(1).mean()  # noqa: E731
    layer = FactoredSphericalLinear(W0, stats_loss, lr=lr, renorm_every=renorm_every)
    W = W0.clone().requires_grad_()
    for _ in range(10):
        H = torch.randn(m, d, generator=gen, dtype=torch.float64)
        c = torch.randint(0, D, (m,), generator=gen)
        c[1] = c[0]
        loss_f, gh_f = layer.step(H, c)
        loss_n, gh_n = _naive_sgd(W, H, c, dense_loss, lr)
        torch.testing.assert_close(loss_f, loss_n, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(gh_f, gh_n, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(layer.weight, W.detach(), rtol=1e-10, atol=1e-12)
    Q, w_bar = layer.gram()
    torch.testing.assert_close(Q, W.detach().T @ W.detach(), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(w_bar, W.detach().sum(0), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(layer.U @ layer.U_inv, torch.eye(d, dtype=torch.float64), rtol=0, atol=1e-10)


def test_factored_stats_match_dense():
    gen = torch.Generator().manual_seed(7)
    W = torch.randn(30, 4, generator=gen, dtype=torch.float64)
    layer = FactoredSphericalLinear(W, lambda oc, s, q, n: q, lr=0.1)
    h = torch.randn(9, 4, generator=gen, dtype=torch.float64)
    c = torch.randint(0, 30, (9,), generator=gen)
    for got, want in zip(layer.stats(h, c), spherical_stats(h @ W.T, c)):
        torch.testing.assert_close(got, want)


def test_module_and_half_precision():
    o, c = torch.randn(8, 5), torch.randint(0, 5, (8,))
    assert torch.equal(ZLoss(a=0.5, b=1.0, reduction="sum")(o, c), z_loss(o, c, a=0.5, b=1.0, reduction="sum"))
    assert "a=0.5" in repr(ZLoss(a=0.5))
    for dtype in (torch.float16, torch.bfloat16):
        x = (50 * torch.randn(16, 1000)).to(dtype).requires_grad_()
        t = torch.randint(0, 1000, (16,))
        loss = z_loss(x, t, a=1.0, b=3.0)
        (g,) = torch.autograd.grad(loss, x)
        assert loss.dtype == torch.float32 and bool(torch.isfinite(loss)) and bool(torch.isfinite(g).all())
        torch.testing.assert_close(loss, z_loss(x.detach().float(), t, a=1.0, b=3.0))


def test_constant_scores_stay_finite():
    o = torch.zeros(3, 4, requires_grad=True)
    loss = z_loss(o, torch.tensor([0, 1, 2]), a=1.0, b=2.0)
    (g,) = torch.autograd.grad(loss, o)
    assert bool(torch.isfinite(loss)) and bool(torch.isfinite(g).all())


def test_bad_input_names_the_argument():
    o, c = torch.randn(4, 3), torch.tensor([0, 1, 2, 0])
    with pytest.raises(ValueError, match="logits"):
        z_loss(torch.randn(4), c)
    with pytest.raises(ValueError, match="logits"):
        z_loss(torch.randn(4, 1), c)
    with pytest.raises(ValueError, match="logits"):
        z_loss(torch.ones(4, 3, dtype=torch.int64), c)
    with pytest.raises(ValueError, match="target"):
        z_loss(o, c.float())
    with pytest.raises(ValueError, match="target"):
        z_loss(o, torch.tensor([0, 1, 3, 0]))
    with pytest.raises(ValueError, match="target"):
        z_loss(o, c[:3])
    for bad in (0.0, -1.0, math.nan, math.inf, True, "1"):
        with pytest.raises(ValueError, match="a must"):
            z_loss(o, c, a=bad)
    for bad in (math.nan, math.inf, None):
        with pytest.raises(ValueError, match="b must"):
            z_loss(o, c, b=bad)
    with pytest.raises(ValueError, match="reduction"):
        z_loss(o, c, reduction="avg")
    with pytest.raises(ValueError, match="reduction"):
        ZLoss(reduction="avg")
    with pytest.raises(ValueError, match="eps"):
        log_spherical_softmax_loss(o, c, eps=0.0)
    with pytest.raises(ValueError, match="n_classes"):
        z_loss_from_stats(torch.zeros(2), torch.zeros(2), torch.ones(2), 1)
    with pytest.raises(ValueError, match="weight"):
        FactoredSphericalLinear(torch.randn(5), lambda *x: x[0])
    with pytest.raises(ValueError, match="lr"):
        FactoredSphericalLinear(torch.randn(5, 2), lambda *x: x[0], lr=-1.0)
    with pytest.raises(ValueError, match="renorm_every"):
        FactoredSphericalLinear(torch.randn(5, 2), lambda *x: x[0], renorm_every=-1)
    layer = FactoredSphericalLinear(torch.randn(5, 2), lambda *x: x[0])
    with pytest.raises(ValueError, match="h must"):
        layer.step(torch.randn(3, 4), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="target"):
        layer.step(torch.randn(3, 2), torch.tensor([0, 1, 5]))


def test_tiny_training_learns_with_factored_layer():
    """A linear classifier on 20 separated classes, trained only through the O(d^2) step."""
    gen = torch.Generator().manual_seed(8)
    D, d = 20, 8
    means = 6 * torch.randn(D, d, generator=gen)
    y = torch.randint(0, D, (2000,), generator=gen)
    x = means[y] + torch.randn(2000, d, generator=gen)
    x = torch.cat([x, torch.ones(2000, 1)], 1)                         # a bias through a constant input
    layer = FactoredSphericalLinear(0.01 * torch.randn(D, d + 1, generator=gen),
                                    lambda oc, s, q, n: z_loss_from_stats(oc, s, q, n, a=1.0, b=2.0, reduction="none"),
                                    lr=0.2, renorm_every=50)
    before = ((x @ layer.weight.T).argmax(1) == y).float().mean()
    for _ in range(600):
        idx = torch.randint(0, 2000, (32,), generator=gen)
        layer.step(x[idx], y[idx])
    after = ((x @ layer.weight.T).argmax(1) == y).float().mean()
    assert after > 0.95 and after > before + 0.5


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    gen = torch.Generator().manual_seed(9)
    o = 3 * torch.randn(64, 500, generator=gen)
    c = torch.randint(0, 500, (64,), generator=gen)
    for fn in (lambda x, t: z_loss(x, t, a=0.5, b=4.0, reduction="none"), log_spherical_softmax_loss,
               log_taylor_softmax_loss):
        torch.testing.assert_close(fn(o.cuda(), c.cuda()).cpu(), fn(o, c), rtol=1e-5, atol=1e-5)
    # no host sync in the loss on a training step
    x = o.cuda().requires_grad_()
    tc = c.cuda()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        z_loss(x, tc, a=1.0, b=2.0).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert bool(torch.isfinite(x.grad).all())
    # the factored step on CUDA equals plain SGD (float64)
    W0 = 0.3 * torch.randn(1000, 16, generator=gen, dtype=torch.float64)
    f = lambda oc, s, q, n: z_loss_from_stats(oc, s, q, n, a=1.0, b=2.0, reduction="none")  # noqa: E731
    layer = FactoredSphericalLinear(W0.cuda(), f, lr=0.2, renorm_every=4)
    W = W0.cuda().requires_grad_()
    for _ in range(6):
        H = torch.randn(32, 16, generator=gen, dtype=torch.float64).cuda()
        t = torch.randint(0, 1000, (32,), generator=gen).cuda()
        layer.step(H, t)
        _naive_sgd(W, H, t, lambda oo, tt: z_loss(oo, tt, a=1.0, b=2.0), 0.2)
    torch.testing.assert_close(layer.weight, W.detach(), rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("scale,shift", [(1.0, 0.0), (0.01, 5.0), (30.0, -3.0)])
def test_z_loss_closed_form_gradient_matches_autograd_of_the_definition(scale, shift):
    from lossbook.classification.z_loss import z_loss
    g = torch.Generator().manual_seed(3)
    o = (scale * torch.randn(7, 5, generator=g, dtype=torch.float64) + shift).requires_grad_()
    c = torch.randint(0, 5, (7,), generator=g)
    w = torch.rand(7, dtype=torch.float64, generator=g)

    def definition(o):
        mu = o.mean(1, keepdim=True)
        sd = (o - mu).square().mean(1).sqrt()
        z = (o.gather(1, c[:, None]).squeeze(1) - mu.squeeze(1)) / sd
        return torch.nn.functional.softplus(1.5 * (0.3 - z)) / 1.5
    got, = torch.autograd.grad((w * z_loss(o, c, a=1.5, b=0.3, reduction="none")).sum(), o)
    ref, = torch.autograd.grad((w * definition(o)).sum(), o)
    torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-12)
    assert torch.autograd.gradcheck(lambda x: z_loss(x, c, a=1.5, b=0.3), (o,))
