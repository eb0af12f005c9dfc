import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

from lossbook.classification.ldr import (ALDRKLLoss, LDRKLLoss, aldr_kl_lambda, aldr_kl_loss, ldr_kl_loss,
                                         ldr_kl_weights, normalize_scores)


def ref_scores(f, normalize):
    """Loop transcription of the authors' score normalisations, float64."""
    out = []
    for row in f.tolist():
        K = len(row)
        if normalize == "softplus":
            sp = [math.log1p(math.exp(-abs(v))) + max(v, 0.0) for v in row]
            m = sum(sp) / K
            out.append([v / m for v in sp])
        elif normalize == "l1":
            m = sum(abs(v) for v in row) / K
            out.append([v / m for v in row])
        else:
            out.append(list(row))
    return out


def ref_ldr(f, y, lam, margin, normalize=None):
    """lam * log( (1/K) sum_k exp((c 1[k != y] + f_k - f_y) / lam) ), one row at a time, float64."""
    losses = []
    lams = lam.tolist() if isinstance(lam, torch.Tensor) else [lam] * len(y)
    for row, yi, li in zip(ref_scores(f, normalize), y.tolist(), lams):
        K = len(row)
        a = [(margin if k != yi else 0.0) + row[k] - row[yi] for k in range(K)]
        if math.isinf(li):
            losses.append(sum(a) / K)
            continue
        m = max(a)
        losses.append(li * (math.log(sum(math.exp((v - m) / li) for v in a) / K)) + m)
    return torch.tensor(losses, dtype=torch.float64)


def ref_lambda(f, y, lam0, alpha, margin, n_iter, normalize=None):
    """The closed-form lambda update, iterated from lam0, one row at a time."""
    out = []
    for row, yi in zip(ref_scores(f, normalize), y.tolist()):
        K = len(row)
        a = [(margin if k != yi else 0.0) + row[k] - row[yi] for k in range(K)]
        lam = lam0
        for _ in range(n_iter):
            m = max(a)
            w = [math.exp((v - m) / lam) for v in a]
            p = [v / sum(w) for v in w]
            kl = sum(pk * math.log(K * pk) for pk in p if pk > 0)
            lam = lam0 * (1 - kl / (alpha * math.log(K)))
        out.append(lam)
    return torch.tensor(out, dtype=torch.float64)


def batch(seed=0, B=12, K=7, scale=3.0):
    gen = torch.Generator().manual_seed(seed)
    f = scale * torch.randn(B, K, generator=gen, dtype=torch.float64)
    y = torch.randint(0, K, (B,), generator=gen)
    return f, y


@pytest.mark.parametrize("normalize", [None, "softplus", "l1"])
@pytest.mark.parametrize("lam,margin", [(1.0, 0.0), (0.1, 1.0), (10.0, 0.1), (3.0, 2.0), (math.inf, 1.0)])
def test_ldr_matches_loop_reference(lam, margin, normalize):
    f, y = batch()
    got = ldr_kl_loss(f, y, lam=lam, margin=margin, normalize=normalize, reduction="none")
    torch.testing.assert_close(got, ref_ldr(f, y, lam, margin, normalize), rtol=1e-10, atol=1e-11)


def test_per_instance_lambda_matches_reference():
    f, y = batch(1)
    lam = torch.linspace(0.2, 5.0, len(y), dtype=torch.float64)
    torch.testing.assert_close(ldr_kl_loss(f, y, lam=lam, margin=0.5, reduction="none"), ref_ldr(f, y, lam, 0.5))


def test_cross_entropy_special_cases():
    f, y = batch(2)
    K = f.shape[1]
    ce = F.cross_entropy(f, y, reduction="none")
    torch.testing.assert_close(ldr_kl_loss(f, y, lam=1.0, margin=0.0, reduction="none"), ce - math.log(K))
    for lam in (0.3, 4.0):   # margin 0: lam times cross-entropy at temperature lam
        torch.testing.assert_close(ldr_kl_loss(f, y, lam=lam, margin=0.0, reduction="none"),
                                   lam * (F.cross_entropy(f / lam, y, reduction="none") - math.log(K)))


def test_limits_hinge_and_mean():
    f, y = batch(3)
    K = f.shape[1]
    a = f - f.gather(1, y[:, None]) + (torch.arange(K) != y[:, None]).double()
    hinge, mean = a.max(1).values, a.mean(1)
    for lam in (1e-1, 1e-2, 1e-3):      # max - lam log K <= loss <= max
        loss = ldr_kl_loss(f, y, lam=lam, margin=1.0, reduction="none")
        assert bool((loss <= hinge + 1e-12).all()) and bool((loss >= hinge - lam * math.log(K) - 1e-12).all())
    torch.testing.assert_close(ldr_kl_loss(f, y, lam=1e-4, margin=1.0, reduction="none"), hinge, atol=1e-3, rtol=0)
    # large lam: loss = mean + Var_u(a) / (2 lam) + O(lam^-2)
    var = a.var(1, unbiased=False)
    for lam in (1e3, 1e4):
        loss = ldr_kl_loss(f, y, lam=lam, margin=1.0, reduction="none")
        torch.testing.assert_close(lam * (loss - mean), var / 2, rtol=5e-2, atol=0)
    torch.testing.assert_close(ldr_kl_loss(f, y, lam=math.inf, margin=1.0, reduction="none"), mean)


@pytest.mark.parametrize("lam", [0.5, 2.0, math.inf])
def test_weights_are_the_gradient(lam):
    f, y = batch(4)
    f.requires_grad_()
    (g,) = torch.autograd.grad(ldr_kl_loss(f, y, lam=lam, margin=0.7, reduction="sum"), f)
    p = ldr_kl_weights(f, y, lam=lam, margin=0.7)
    torch.testing.assert_close(g, p - F.one_hot(y, f.shape[1]).double())
    torch.testing.assert_close(p.sum(1), torch.ones(len(y), dtype=torch.float64))


@pytest.mark.parametrize("normalize", [None, "softplus", "l1"])
def test_gradcheck(normalize):
    f, y = batch(5, B=4, K=5, scale=1.0)
    f.requires_grad_()
    assert torch.autograd.gradcheck(lambda x: ldr_kl_loss(x, y, lam=0.7, margin=0.3, normalize=normalize), (f,))
    # ALDR-KL holds lambda fixed: its gradient is the true one at the fixed point of the update (envelope theorem)
    assert torch.autograd.gradcheck(
        lambda x: aldr_kl_loss(x, y, lam0=2.0, alpha=2.0, margin=0.3, normalize=normalize, n_iter=100), (f,))


@pytest.mark.parametrize("normalize", [None, "l1"])
def test_lambda_update_matches_loop_reference(normalize):
    f, y = batch(6)
    for n_iter in (1, 4):
        got = aldr_kl_lambda(f, y, lam0=2.0, alpha=2.0, margin=0.1, normalize=normalize, n_iter=n_iter)
        torch.testing.assert_close(got, ref_lambda(f, y, 2.0, 2.0, 0.1, n_iter, normalize), rtol=1e-10, atol=1e-10)


def test_lambda_iteration_decreases_to_a_stationary_point():
    f, y = batch(7)
    lam0, alpha, K = 1.5, 2.0, f.shape[1]
    lams = [aldr_kl_lambda(f, y, lam0=lam0, alpha=alpha, n_iter=n) for n in range(1, 40)]
    for a, b in zip(lams[:-1], lams[1:]):           # monotone from lam0 downwards
        assert bool((b <= a + 1e-12).all())
    lo = lam0 * (1 - 1 / alpha)
    assert bool((lams[-1] >= lo).all()) and bool((lams[0] <= lam0).all())
    # the limit is stationary for phi(lam) = ell_lam - alpha log K / (2 lam0) (lam - lam0)^2
    phi = lambda lam: (ldr_kl_loss(f, y, lam=lam, reduction="none")
                       - alpha * math.log(K) / (2 * lam0) * (lam - lam0) ** 2)
    star, h = lams[-1], 1e-6
    dphi = (phi(star + h) - phi(star - h)) / (2 * h)
    torch.testing.assert_close(dphi, torch.zeros_like(dphi), atol=1e-6, rtol=0)
    # and the iteration climbed: phi(star) >= phi(lam0)
    assert bool((phi(star) >= phi(torch.full_like(star, lam0)) - 1e-12).all())


def test_aldr_gradient_is_the_envelope_gradient():
    """With lambda at its fixed point, the gradient of the loss with lambda held fixed equals the total
    derivative of max_lambda phi(lambda, f) (finite differences through the re-solved lambda)."""
    f, y = batch(8, B=3, K=4, scale=1.5)
    kw = dict(lam0=1.0, alpha=2.0, margin=0.5, n_iter=200)
    f.requires_grad_()
    (g,) = torch.autograd.grad(aldr_kl_loss(f, y, reduction="sum", **kw), f)
    num = torch.zeros_like(f)
    h = 1e-6
    with torch.no_grad():
        for i in range(f.shape[0]):
            for k in range(f.shape[1]):
                e = torch.zeros_like(f)
                e[i, k] = h
                num[i, k] = (aldr_kl_loss(f + e, y, reduction="sum", **kw) - aldr_kl_loss(f - e, y, reduction="sum", **kw)) / (2 * h)
    torch.testing.assert_close(g, num, atol=1e-6, rtol=1e-5)


def test_aldr_value_and_penalty():
    f, y = batch(9)
    lam = aldr_kl_lambda(f, y, lam0=3.0, alpha=2.0, margin=0.2, n_iter=2)
    K = f.shape[1]
    expect = ref_ldr(f, y, lam, 0.2) - 2.0 * math.log(K) / (2 * 3.0) * (lam - 3.0) ** 2
    torch.testing.assert_close(aldr_kl_loss(f, y, lam0=3.0, alpha=2.0, margin=0.2, n_iter=2, reduction="none"), expect)


def test_aldr_module_warm_start_matches_more_iterations():
    f, y = batch(10)
    idx = torch.arange(len(y))
    loss_fn = ALDRKLLoss(lam0=2.0, alpha=2.0, margin=0.1, n_iter=1, n_samples=50)
    for _ in range(3):                                   # three visits = three iterations from lam0
        loss_fn(f, y, idx)
    torch.testing.assert_close(loss_fn.lambdas[:len(y)].double(), aldr_kl_lambda(f, y, lam0=2.0, alpha=2.0, margin=0.1, n_iter=3),
                               rtol=1e-6, atol=1e-6)
    assert bool((loss_fn.lambdas[len(y):] == 2.0).all())
    cold = ALDRKLLoss(lam0=2.0, alpha=2.0, margin=0.1, n_iter=3)
    torch.testing.assert_close(cold(f, y), aldr_kl_loss(f, y, lam0=2.0, alpha=2.0, margin=0.1, n_iter=3))
    assert cold.last_lambda.shape == (len(y),)
    assert "lam0=2.0" in repr(cold) and "normalize" in repr(LDRKLLoss())


def test_module_matches_function():
    f, y = batch(11)
    torch.testing.assert_close(LDRKLLoss(lam=10.0, margin=0.1, normalize="softplus", reduction="sum")(f, y),
                               ldr_kl_loss(f, y, lam=10.0, margin=0.1, normalize="softplus", reduction="sum"))
    assert ldr_kl_loss(f, y, reduction="none").shape == (len(y),)


def test_normalized_scores_are_bounded():
    f = 1e3 * torch.randn(64, 10, dtype=torch.float64)
    for mode in ("softplus", "l1"):
        s = normalize_scores(f, mode)
        assert bool((s.abs() <= 10 + 1e-9).all())
    assert torch.equal(normalize_scores(f, None), f)
    # bounded scores make a bounded loss: scaling the logits up cannot drive it below -lam log K + ...
    y = torch.zeros(64, dtype=torch.int64)
    low = ldr_kl_loss(1e6 * F.one_hot(y, 10).double(), y, lam=10.0, margin=0.1, normalize="softplus")
    assert low > -10.0 - 1e-9


logit_rows = st.lists(st.floats(-50, 50, allow_nan=False, width=64), min_size=2, max_size=9)


@settings(max_examples=60, deadline=None)
@given(row=logit_rows, data=st.data(), lam1=st.floats(0.01, 100.0), lam2=st.floats(0.01, 100.0),
       margin=st.floats(0.0, 3.0), shift=st.floats(-100, 100))
def test_property_bounds_monotone_shift(row, data, lam1, lam2, margin, shift):
    f = torch.tensor([row], dtype=torch.float64)
    K = f.shape[1]
    y = torch.tensor([data.draw(st.integers(0, K - 1))])
    a = f - f[0, y] + margin * (torch.arange(K) != y).double()
    l1 = ldr_kl_loss(f, y, lam=lam1, margin=margin)
    l2 = ldr_kl_loss(f, y, lam=lam2, margin=margin)
    lo, hi = min(lam1, lam2), max(lam1, lam2)
    l_lo, l_hi = (l1, l2) if lam1 <= lam2 else (l2, l1)
    assert a.mean() - 1e-9 <= l_hi <= l_lo + 1e-9 <= a.max() + 2e-9     # mean <= loss, non-increasing in lam
    assert l_lo >= a.max() - lo * math.log(K) - 1e-9
    torch.testing.assert_close(ldr_kl_loss(f + shift, y, lam=lam1, margin=margin), l1)   # shift-invariant
    lam = aldr_kl_lambda(f, y, lam0=lam1, alpha=2.0, margin=margin, n_iter=3)
    assert lam1 * 0.5 - 1e-12 <= float(lam) <= lam1 + 1e-12


@pytest.mark.parametrize("normalize", [None, "softplus", "l1"])
def test_extreme_logits_finite_float32_and_bf16(normalize):
    gen = torch.Generator().manual_seed(12)
    for dtype in (torch.float32, torch.bfloat16):
        f = (1e4 * torch.randn(32, 10, generator=gen)).to(dtype).requires_grad_()
        y = torch.randint(0, 10, (32,), generator=gen)
        for loss in (ldr_kl_loss(f, y, lam=0.05, normalize=normalize),
                     aldr_kl_loss(f, y, lam0=0.05, n_iter=3, normalize=normalize)):
            (g,) = torch.autograd.grad(loss, f)
            assert bool(torch.isfinite(loss)) and bool(torch.isfinite(g).all())


def test_bad_input_names_the_argument():
    f, y = torch.zeros(4, 3), torch.zeros(4, dtype=torch.int64)
    with pytest.raises(ValueError, match="logits"):
        ldr_kl_loss(torch.zeros(4), y)
    with pytest.raises(ValueError, match="logits"):
        ldr_kl_loss(torch.zeros(4, 1), y)
    with pytest.raises(ValueError, match="logits"):
        ldr_kl_loss(torch.zeros(4, 3, dtype=torch.int64), y)
    with pytest.raises(ValueError, match="target"):
        ldr_kl_loss(f, torch.zeros(3, dtype=torch.int64))
    with pytest.raises(ValueError, match="target"):
        ldr_kl_loss(f, torch.zeros(4))
    with pytest.raises(ValueError, match="target"):
        ldr_kl_loss(f, torch.tensor([0, 1, 2, 3]))
    for bad in (0.0, -1.0, math.nan, "1", True):
        with pytest.raises(ValueError, match="lam"):
            ldr_kl_loss(f, y, lam=bad)
    with pytest.raises(ValueError, match="lam"):
        ldr_kl_loss(f, y, lam=torch.tensor([1.0, 0.0, 1.0, 1.0]))
    with pytest.raises(ValueError, match="lam"):
        ldr_kl_loss(f, y, lam=torch.ones(3))
    with pytest.raises(ValueError, match="margin"):
        ldr_kl_loss(f, y, margin=-0.1)
    with pytest.raises(ValueError, match="normalize"):
        ldr_kl_loss(f, y, normalize="softmax")
    with pytest.raises(ValueError, match="reduction"):
        ldr_kl_loss(f, y, reduction="avg")
    with pytest.raises(ValueError, match="alpha"):
        aldr_kl_loss(f, y, alpha=1.0)
    with pytest.raises(ValueError, match="lam0"):
        aldr_kl_loss(f, y, lam0=math.inf)
    with pytest.raises(ValueError, match="n_iter"):
        aldr_kl_lambda(f, y, n_iter=0)
    with pytest.raises(ValueError, match="n_samples"):
        ALDRKLLoss(n_samples=0)
    with pytest.raises(ValueError, match="index"):
        ALDRKLLoss()(f, y, torch.arange(4))
    with pytest.raises(ValueError, match="reduction"):
        LDRKLLoss(reduction="avg")


def test_tiny_training_learns():
    torch.manual_seed(0)
    x = torch.randn(300, 2)
    t = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()           # three classes
    for loss_fn in (LDRKLLoss(lam=1.0, margin=1.0), ALDRKLLoss(lam0=10.0, alpha=2.0, margin=0.1, normalize="l1", n_iter=3)):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(2, 32), torch.nn.ReLU(), torch.nn.Linear(32, 3))
        opt = torch.optim.Adam(model.parameters(), lr=0.02)
        for _ in range(200):
            idx = torch.randint(0, 300, (64,))
            loss = loss_fn(model(x[idx]), t[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        acc = (model(x).argmax(1) == t).float().mean()
        assert acc > 0.9


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu_without_sync():
    f, y = batch(13, B=256, K=10)
    for normalize in (None, "softplus", "l1"):
        torch.testing.assert_close(ldr_kl_loss(f.cuda(), y.cuda(), lam=2.0, normalize=normalize).cpu(),
                                   ldr_kl_loss(f, y, lam=2.0, normalize=normalize))
        torch.testing.assert_close(aldr_kl_loss(f.cuda(), y.cuda(), lam0=2.0, n_iter=3, normalize=normalize).cpu(),
                                   aldr_kl_loss(f, y, lam0=2.0, n_iter=3, normalize=normalize))
    fc = f.float().cuda().requires_grad_()
    yc = y.cuda()
    loss_fn = ALDRKLLoss(lam0=10.0, alpha=2.0, margin=0.1, normalize="l1", n_iter=2, n_samples=256).cuda()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        ldr_kl_loss(fc, yc, lam=10.0, margin=0.1, normalize="softplus").backward()
        loss_fn(fc, yc, torch.arange(256, device="cuda")).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert loss_fn.lambdas.device.type == "cuda" and bool(torch.isfinite(fc.grad).all())


@pytest.mark.parametrize("lam", [0.05, 1.0, 3.0, "rows"])
@pytest.mark.parametrize("margin", [0.0, 0.5, 2.0])
def test_fast_rows_match_the_gap_definition_and_its_gradient(lam, margin):
    """The library computes the loss without the (B, K) gap matrix, with a hand-written backward:
    value and gradient against the definition on the gaps (autograd), and gradcheck."""
    from lossbook.classification.ldr import _gaps, _ldr_rows

    def gap_definition(f, y, lam, margin):   # the closed form on the (B, K) matrix of gaps, through autograd
        a = _gaps(f, y, margin)
        lam_t = lam if isinstance(lam, torch.Tensor) else torch.full((len(y), 1), float(lam), dtype=f.dtype)
        inf = torch.isinf(lam_t)
        safe = torch.where(inf, torch.ones_like(lam_t), lam_t)
        soft = safe.squeeze(1) * (torch.logsumexp(a / safe, dim=1) - math.log(a.shape[1]))
        return torch.where(inf.squeeze(1), a.mean(dim=1), soft)
    f, y = batch(4)
    f = f.requires_grad_()
    if lam == "rows":
        lam = torch.linspace(0.1, 4.0, len(y), dtype=torch.float64)[:, None]
        lam[1] = math.inf
    fast = _ldr_rows(f, y, lam, margin)
    ref = gap_definition(f, y, lam, margin)
    torch.testing.assert_close(fast, ref, rtol=1e-10, atol=1e-11)
    w = torch.rand(len(y), dtype=torch.float64)
    g_fast, = torch.autograd.grad((w * fast).sum(), f)
    g_ref, = torch.autograd.grad((w * ref).sum(), f)
    torch.testing.assert_close(g_fast, g_ref, rtol=1e-10, atol=1e-11)
    assert torch.autograd.gradcheck(lambda x: _ldr_rows(x, y, lam, margin), (f.detach().requires_grad_(),))
