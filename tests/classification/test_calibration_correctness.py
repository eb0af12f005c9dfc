import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

from lossbook.classification.calibration_correctness import (CorrectnessAwareCalibrator, brier_loss, ca_loss,
                                                             calibrator_loss, correctness, correctness_auroc,
                                                             fit_calibrator, fit_temperature, image_views, rotate,
                                                             view_features)


def reference_ca(logits, correct, balanced=True):
    """Loop-based float64 transcription of the weighted squared error between top-label confidence and
    correctness, with the authors' balancing weights (1 - acc for correct, acc for wrong)."""
    rows, c = logits.tolist(), [int(v) for v in correct.tolist()]
    conf = []
    for r in rows:
        m = max(r)
        e = [math.exp(v - m) for v in r]
        conf.append(max(e) / sum(e))
    a = sum(c) / len(c)
    if balanced and 0 < a < 1:
        w = [(1 - a) if ci else a for ci in c]
    else:
        w = [1.0] * len(c)
    return sum(wi * (ci - p) ** 2 for wi, ci, p in zip(w, c, conf)) / sum(w)


@pytest.mark.parametrize("balanced", [True, False])
def test_ca_loss_matches_loop_reference(balanced):
    g = torch.Generator().manual_seed(0)
    z = 3 * torch.randn(50, 7, generator=g, dtype=torch.float64)
    c = torch.rand(50, generator=g) < 0.7
    want = torch.tensor(reference_ca(z, c, balanced), dtype=torch.float64)
    torch.testing.assert_close(ca_loss(z, c, balanced=balanced), want, rtol=1e-12, atol=1e-12)
    # "sum" and "none" are consistent with "mean"
    torch.testing.assert_close(ca_loss(z, c, balanced=balanced, reduction="sum") / 50, want)
    torch.testing.assert_close(ca_loss(z, c, balanced=balanced, reduction="none").mean(), want)


def test_balanced_is_mean_of_the_two_groups():
    g = torch.Generator().manual_seed(1)
    z = torch.randn(40, 5, generator=g, dtype=torch.float64)
    c = torch.arange(40) % 3 == 0
    p = z.softmax(1).amax(1)
    halves = 0.5 * ((1 - p[c]) ** 2).mean() + 0.5 * (p[~c] ** 2).mean()
    torch.testing.assert_close(ca_loss(z, c), halves)


def test_single_kind_batch_falls_back_to_equal_weights():
    z = torch.randn(6, 4, dtype=torch.float64)
    for c in (torch.ones(6, dtype=torch.bool), torch.zeros(6, dtype=torch.bool)):
        got = ca_loss(z, c)
        assert torch.isfinite(got)
        torch.testing.assert_close(got, ca_loss(z, c, balanced=False))


def test_special_cases():
    # a confident correct prediction costs ~0, a confident wrong one ~1; the uniform vector costs (c - 1/C)^2
    big = torch.tensor([[50.0, 0.0, 0.0]], dtype=torch.float64)
    assert float(ca_loss(big, torch.tensor([True]))) < 1e-20
    assert abs(float(ca_loss(big, torch.tensor([False]))) - 1) < 1e-12
    uni = torch.zeros(1, 4, dtype=torch.float64)
    assert abs(float(ca_loss(uni, torch.tensor([0]), balanced=False)) - 1 / 16) < 1e-15
    # the unweighted CA loss is the Brier score of the binary event "prediction correct"
    z = torch.randn(30, 3, dtype=torch.float64)
    c = torch.rand(30) < 0.5
    torch.testing.assert_close(ca_loss(z, c, balanced=False), ((c.double() - z.softmax(1).amax(1)) ** 2).mean())
    # float 0/1 correctness is accepted
    torch.testing.assert_close(ca_loss(z, c.double()), ca_loss(z, c))


def test_balanced_minimiser_is_reweighted_odds():
    """Theorem: with weights (1-a, a) the minimiser over a constant confidence p of a group with
    correctness rate q is (1-a) q / ((1-a) q + a (1-q)); for a > 1/2 it lies below q."""
    a, q = 0.9, 0.95
    # fixed batch-level accuracy a; a group of 100 samples with rate q inside a batch with rate a
    c_group = torch.tensor([1] * 95 + [0] * 5)
    w = torch.where(c_group == 1, 1 - a, a).double()
    ps = torch.linspace(0.01, 0.99, 9801, dtype=torch.float64)
    risk = (w[None] * (c_group[None].double() - ps[:, None]) ** 2).sum(1)
    p_star = (1 - a) * q / ((1 - a) * q + a * (1 - q))
    assert abs(float(ps[risk.argmin()]) - p_star) < 1e-4 and p_star < q


def test_gradcheck_ca_and_brier():
    z = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    c = torch.tensor([1, 0, 1, 1, 0, 1])
    y = torch.tensor([0, 1, 2, 3, 0, 1])
    assert torch.autograd.gradcheck(lambda t: ca_loss(t, c), (z,))
    assert torch.autograd.gradcheck(lambda t: ca_loss(t, c, balanced=False), (z,))
    assert torch.autograd.gradcheck(lambda t: brier_loss(t, y), (z,))


def test_gradcheck_calibrator():
    torch.manual_seed(0)
    cal = CorrectnessAwareCalibrator(6, hidden=4).double()
    for p in cal.parameters():
        torch.nn.init.normal_(p, std=0.5)
    z = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    u = torch.rand(5, 6, dtype=torch.float64, requires_grad=True)
    c = torch.tensor([1, 0, 1, 1, 0])
    assert torch.autograd.gradcheck(lambda a, b: ca_loss(cal(a, b), c), (z, u))


def test_temperature_gradient_formula():
    """d/dT [-log softmax(z/T)_y] = (z_y - zbar_T) / T^2 and d p̂/dT = -p̂ (z_max - zbar_T) / T^2."""
    z = torch.tensor([2.0, 1.8, 0.0, -0.5], dtype=torch.float64)
    T = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    y = 1
    (g_ce,) = torch.autograd.grad(-torch.log_softmax(z / T, 0)[y], T)
    (g_p,) = torch.autograd.grad(torch.softmax(z / T, 0).max(), T)
    p = torch.softmax(z / T.detach(), 0)
    zbar = (p * z).sum()
    torch.testing.assert_close(g_ce, (z[y] - zbar) / T.detach() ** 2)
    torch.testing.assert_close(g_p, -p.max() * (z.max() - zbar) / T.detach() ** 2)


@settings(max_examples=50, deadline=None)
@given(n=st.integers(1, 30), c=st.integers(2, 12), scale=st.floats(0.01, 50.0), seed=st.integers(0, 2**31 - 1))
def test_property_calibrator_never_changes_the_prediction(n, c, scale, seed):
    g = torch.Generator().manual_seed(seed)
    z = scale * torch.randn(n, c, generator=g)
    u = torch.rand(n, 8, generator=g)
    cal = CorrectnessAwareCalibrator(8)
    for p in cal.parameters():
        with torch.no_grad():
            p.copy_(3 * torch.randn(p.shape, generator=g))
    with torch.no_grad():
        t = cal.temperature(u)
        out = cal(z, u)
    assert bool((t > 0.1 - 1e-6).all()) and bool((t < 10 + 1e-4).all())
    assert torch.equal(out.argmax(1), z.argmax(1))
    loss = ca_loss(out, torch.rand(n, generator=g) < 0.5)
    assert 0 <= float(loss) <= 1


@settings(max_examples=40, deadline=None)
@given(n=st.integers(2, 40), seed=st.integers(0, 2**31 - 1))
def test_property_auroc_matches_pairwise_count(n, seed):
    g = torch.Generator().manual_seed(seed)
    conf = torch.randint(0, 5, (n,), generator=g).double() / 4     # ties on purpose
    correct = torch.rand(n, generator=g) < 0.5
    got = correctness_auroc(conf, correct)
    pos, neg = conf[correct].tolist(), conf[~correct].tolist()
    if not pos or not neg:
        assert math.isnan(float(got))
        return
    want = sum((p > q) + 0.5 * (p == q) for p in pos for q in neg) / (len(pos) * len(neg))
    assert abs(float(got) - want) < 1e-12


def test_fit_temperature_is_the_nll_minimum():
    g = torch.Generator().manual_seed(2)
    y = torch.randint(0, 5, (400,), generator=g)
    z = 6 * F.one_hot(y, 5).double() + 2.5 * torch.randn(400, 5, generator=g, dtype=torch.float64)  # overconfident
    t = fit_temperature(z, y)
    grid = torch.linspace(0.2, 5, 4801, dtype=torch.float64)
    logp = torch.log_softmax(z[None] / grid[:, None, None], dim=2)          # (grid, N, C) at once
    nll = -logp.gather(2, y.expand(len(grid), -1)[..., None]).squeeze(2).mean(1)
    assert abs(float(t) - float(grid[nll.argmin()])) < 2e-3
    assert t.dtype == z.dtype and t.dim() == 0


def test_view_features():
    z = torch.tensor([[3.0, 1.0, 2.0, 0.0]])
    v1 = torch.tensor([[0.0, 0.0, 0.0, 0.0]])                 # uniform view
    v2 = torch.tensor([[0.0, 5.0, 0.0, 0.0]])                 # a view that prefers class 1
    u = view_features(z, [v1, v2], k=2)                        # top-2 of z: classes 0, 2
    p2 = torch.softmax(v2[0], 0)
    torch.testing.assert_close(u, torch.tensor([[0.25, 0.25, float(p2[0]), float(p2[2])]]))


def test_image_views_and_rotate():
    x = torch.rand(3, 1, 8, 8)
    vs = image_views(x, ("rotate", "blur", "contrast", "hflip"))
    assert [v.shape for v in vs] == [x.shape] * 4
    torch.testing.assert_close(rotate(x, 0.0), x, atol=1e-5, rtol=0)
    torch.testing.assert_close(rotate(rotate(x, 90.0), -90.0), x, atol=1e-5, rtol=0)
    c = image_views(x, ("contrast",), contrast=0.5)[0]
    torch.testing.assert_close(c.mean(dim=(1, 2, 3)), x.mean(dim=(1, 2, 3)))
    const = torch.full((2, 3, 8, 8), 0.3)
    torch.testing.assert_close(image_views(const, ("blur", "grey"))[0], const)
    torch.testing.assert_close(image_views(const, ("grey",))[0], const, atol=1e-6, rtol=0)


def test_calibrator_loss_kinds():
    z = torch.randn(10, 4, dtype=torch.float64)
    y = torch.randint(0, 4, (10,))
    c = correctness(z, y)
    torch.testing.assert_close(calibrator_loss(z, y, c, "ce"), F.cross_entropy(z, y))
    torch.testing.assert_close(calibrator_loss(z, y, c, "ca"), ca_loss(z, c))
    torch.testing.assert_close(calibrator_loss(z, y, c, "ca_unweighted"), ca_loss(z, c, balanced=False))
    torch.testing.assert_close(calibrator_loss(z, y, c, "mse"),
                               ((z.softmax(1) - F.one_hot(y, 4)) ** 2).sum(1).mean())


def test_bad_input_names_the_argument():
    z = torch.randn(4, 3)
    with pytest.raises(ValueError, match="logits"):
        ca_loss(torch.randn(4), torch.ones(4))
    with pytest.raises(ValueError, match="logits"):
        ca_loss(torch.randn(4, 1), torch.ones(4))
    with pytest.raises(ValueError, match="correct"):
        ca_loss(z, torch.ones(3))
    with pytest.raises(ValueError, match="correct"):
        ca_loss(z, torch.tensor([0.5, 1.0, 0.0, 1.0]))
    with pytest.raises(ValueError, match="reduction"):
        ca_loss(z, torch.ones(4), reduction="avg")
    with pytest.raises(ValueError, match="labels"):
        fit_temperature(z, torch.zeros(4))                    # float labels
    with pytest.raises(ValueError, match="kind"):
        calibrator_loss(z, torch.zeros(4, dtype=torch.int64), torch.ones(4), "focal")
    with pytest.raises(ValueError, match="k must"):
        view_features(z, [z], k=4)
    with pytest.raises(ValueError, match="view_logits"):
        view_features(z, [torch.randn(4, 2)], k=2)
    with pytest.raises(ValueError, match="view_logits"):
        view_features(z, [], k=2)
    with pytest.raises(ValueError, match="t_max"):
        CorrectnessAwareCalibrator(4, t_max=1.0)
    with pytest.raises(ValueError, match="features"):
        CorrectnessAwareCalibrator(4)(z, torch.rand(4, 5))
    with pytest.raises(ValueError, match="x must"):
        image_views(torch.rand(8, 8))
    with pytest.raises(ValueError, match="grey"):
        image_views(torch.rand(2, 1, 8, 8), ("grey",))
    with pytest.raises(ValueError, match="view kind"):
        image_views(torch.rand(2, 1, 8, 8), ("solarize",))
    with pytest.raises(ValueError, match="steps"):
        fit_calibrator(CorrectnessAwareCalibrator(3), z, torch.rand(4, 3), torch.zeros(4, dtype=torch.int64), steps=0)
    with pytest.raises(ValueError, match="same shape"):
        correctness_auroc(torch.rand(4), torch.ones(3))


def test_tiny_calibrator_learns_correctness():
    """A feature that flags wrong predictions: the CA-trained calibrator uses it, lowering confidence on
    wrong predictions and raising the AUROC of confidence for correctness above the raw one."""
    g = torch.Generator().manual_seed(0)
    n = 600
    y = torch.randint(0, 5, (n,), generator=g)
    wrong = torch.rand(n, generator=g) < 0.3
    pred = torch.where(wrong, (y + 1) % 5, y)
    z = 4 * F.one_hot(pred, 5).float() + 0.5 * torch.randn(n, 5, generator=g)   # equally confident either way
    u = torch.stack([(~wrong).float() * 0.8 + 0.2 * torch.rand(n, generator=g),
                     torch.rand(n, generator=g)], 1)
    cal = CorrectnessAwareCalibrator(2)
    torch.manual_seed(0)
    losses = fit_calibrator(cal, z, u, y, kind="ca_unweighted", steps=300, lr=3e-2)
    with torch.no_grad():
        p = cal(z, u).softmax(1).amax(1)
    c = ~wrong
    assert losses[-1] < 0.5 * losses[0]
    assert float(p[wrong].mean()) < 0.4 < float(p[c].mean())
    assert float(correctness_auroc(p, c)) > 0.95 > float(correctness_auroc(z.softmax(1).amax(1), c)) + 0.2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    g = torch.Generator().manual_seed(3)
    z = 3 * torch.randn(64, 10, generator=g)
    y = torch.randint(0, 10, (64,), generator=g)
    c = correctness(z, y)
    torch.testing.assert_close(ca_loss(z.cuda(), c.cuda()).cpu(), ca_loss(z, c))
    torch.testing.assert_close(fit_temperature(z.cuda(), y.cuda()).cpu(), fit_temperature(z, y), rtol=1e-4, atol=1e-5)
    view = z + torch.randn(z.shape, generator=g)
    u = view_features(z, [view])
    torch.testing.assert_close(view_features(z.cuda(), [view.cuda()]).cpu(), u)
    torch.manual_seed(0)
    cal = CorrectnessAwareCalibrator(u.shape[1])
    cal_gpu = CorrectnessAwareCalibrator(u.shape[1]).cuda()
    cal_gpu.load_state_dict(cal.state_dict())
    torch.testing.assert_close(cal_gpu(z.cuda(), u.cuda()).cpu(), cal(z, u))
    fit_calibrator(cal_gpu, z.cuda(), u.cuda(), y.cuda(), steps=5)
    x = torch.rand(4, 3, 32, 32)
    for a, b in zip(image_views(x.cuda(), ("rotate", "blur", "contrast", "grey")), image_views(x, ("rotate", "blur", "contrast", "grey"))):
        torch.testing.assert_close(a.cpu(), b, atol=1e-5, rtol=1e-5)
    auc = correctness_auroc(torch.rand(50).cuda(), torch.rand(50).cuda() < 0.5)
    assert auc.device.type == "cuda"
    # a calibrator step never syncs with the host
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss = ca_loss(cal_gpu(z.cuda(), u.cuda()), c.cuda())
        loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
