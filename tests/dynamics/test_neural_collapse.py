import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from lossbook.dynamics.neural_collapse import (class_means, deep_ufm_grads, deep_ufm_loss, gram_distance,
                                               init_deep_ufm, nc1, nc3, simplex_etf_gram, train_deep_ufm,
                                               ufm_geometry)


# ----------------------------------------------------------------------------- references
def nc1_reference(H, y, K):
    """Loop transcription of Papyan et al.'s NC1 in float64 NumPy: Sigma_W, Sigma_B, pinv."""
    H, y = H.double().numpy(), y.numpy()
    N, d = H.shape
    mu = [H[y == k].mean(0) for k in range(K)]
    mu_g = H.mean(0)
    sw = np.zeros((d, d))
    for i in range(N):
        v = H[i] - mu[y[i]]
        sw += np.outer(v, v) / N
    sb = np.zeros((d, d))
    for k in range(K):
        v = mu[k] - mu_g
        sb += np.outer(v, v) / K
    return np.trace(sw @ np.linalg.pinv(sb, rcond=1e-10)) / K


def scalar_minimiser(n_k, N, M, lam_w, lam_h):
    """Brute force over a fine grid of the per-class objective in the layers' singular value s:
    n_k lam_h / (2 (s^(2M) + N lam_h)) + M lam_w s^2 / 2, returning s^(2M)."""
    s = np.linspace(0, 4, 400_001)
    f = n_k * lam_h / (2 * (s ** (2 * M) + N * lam_h)) + M * lam_w * s ** 2 / 2
    return s[f.argmin()] ** (2 * M)


def random_problem(seed=0, n=(7, 5, 3), d=6, depth=2):
    g = torch.Generator().manual_seed(seed)
    return init_deep_ufm(list(n), d, depth, n_runs=3, generator=g)


# ----------------------------------------------------------------------------- NC measures
def test_nc1_matches_loop_reference():
    g = torch.Generator().manual_seed(0)
    y = torch.tensor([0] * 9 + [1] * 6 + [2] * 4 + [3] * 11)
    centres = 3 * torch.randn(4, 8, generator=g, dtype=torch.float64)
    H = torch.randn(30, 8, generator=g, dtype=torch.float64) + centres[y]
    assert abs(float(nc1(H, y)) - nc1_reference(H, y, 4)) < 1e-10 * max(1.0, nc1_reference(H, y, 4))


def test_nc1_batched_equals_loop_over_batch():
    g = torch.Generator().manual_seed(1)
    y = torch.arange(20) % 3
    H = torch.randn(4, 20, 5, generator=g, dtype=torch.float64)
    whole = nc1(H, y, 3)
    assert whole.shape == (4,)
    for b in range(4):
        assert abs(float(whole[b]) - nc1_reference(H[b], y, 3)) < 1e-9


def test_nc1_zero_for_collapsed_features_and_positive_otherwise():
    y = torch.tensor([0, 0, 1, 1, 1, 2])
    mu = torch.eye(3, 5, dtype=torch.float64) * torch.tensor([[2.0], [1.0], [0.5]], dtype=torch.float64)
    assert float(nc1(mu[y], y)) < 1e-28
    assert float(nc1(mu[y] + 0.1 * torch.randn(6, 5, dtype=torch.float64), y)) > 1e-4


def test_class_means_and_counts():
    H = torch.arange(12.0).reshape(6, 2)
    y = torch.tensor([1, 0, 1, 1, 0, 1])
    means, counts = class_means(H, y, 3)
    torch.testing.assert_close(counts, torch.tensor([2.0, 4.0, 0.0]))
    torch.testing.assert_close(means[0], H[[1, 4]].mean(0))
    torch.testing.assert_close(means[1], H[[0, 2, 3, 5]].mean(0))
    torch.testing.assert_close(means[2], torch.zeros(2))        # empty class: zero mean, no NaN


def test_gram_distance_special_cases():
    K = 4
    eye = torch.eye(K, dtype=torch.float64)
    assert float(gram_distance(3 * eye, eye)) < 1e-15                  # scale-free
    Q, _ = torch.linalg.qr(torch.randn(7, 7, dtype=torch.float64))
    assert float(gram_distance(eye @ torch.eye(K, 7, dtype=torch.float64) @ Q, eye)) < 1e-14   # rotation-free
    etf = simplex_etf_gram(K)
    # the two balanced geometries differ: orthogonal frame vs simplex ETF
    expected = math.sqrt(2 - 2 * (K - 1) / math.sqrt(K * (K - 1)))
    assert abs(float(gram_distance(eye, etf)) - expected) < 1e-12
    # a simplex ETF realised as centred basis vectors has the ETF Gram
    assert float(gram_distance(eye - 1 / K, etf)) < 1e-14


def test_nc3_self_duality():
    g = torch.Generator().manual_seed(2)
    M = torch.randn(4, 6, generator=g, dtype=torch.float64)
    assert float(nc3(5 * M, M)) < 1e-15
    assert float(nc3(torch.diag(torch.tensor([1.0, 2, 3, 4], dtype=torch.float64)) @ M, M)) > 0.1


@settings(max_examples=40, deadline=None)
@given(scale=st.floats(0.01, 100), seed=st.integers(0, 10_000))
def test_nc_measures_invariant_to_scale_and_rotation(scale, seed):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(24) % 4
    centres = 2 * torch.randn(4, 6, generator=g, dtype=torch.float64)
    H = torch.randn(24, 6, generator=g, dtype=torch.float64) + centres[y]
    W = torch.randn(4, 6, generator=g, dtype=torch.float64)
    Q, _ = torch.linalg.qr(torch.randn(6, 6, generator=g, dtype=torch.float64))
    base = nc1(H, y)
    assert abs(float(nc1(scale * H @ Q, y)) - float(base)) < 1e-7 * (1 + float(base))
    mu, _ = class_means(H, y)
    target = torch.diag(torch.tensor([1.0, 2, 3, 4], dtype=torch.float64))
    assert abs(float(gram_distance(scale * mu @ Q, target)) - float(gram_distance(mu, target))) < 1e-9
    assert abs(float(nc3(W @ Q, mu @ Q)) - float(nc3(W, mu))) < 1e-9
    assert 0 <= float(gram_distance(mu, target)) <= 2 + 1e-12


# ----------------------------------------------------------------------------- closed form
@pytest.mark.parametrize("depth", [1, 2, 3, 5])
@pytest.mark.parametrize("n", [(200, 100, 50, 10), (30, 30, 30), (80, 40, 20, 5)])
def test_geometry_matches_brute_force_scalar_problem(depth, n):
    lam = 1e-2
    geo = ufm_geometry(n, depth, lam, lam)
    N = sum(n)
    for k, n_k in enumerate(n):
        ref = scalar_minimiser(n_k, N, depth, lam, lam)
        assert abs(float(geo.classifier_norms_sq[k]) - ref) < 1e-3 * (1 + ref), (k, ref)


def test_depth_one_closed_form_and_threshold():
    n, lam_w, lam_h = torch.tensor([200.0, 100, 50, 10], dtype=torch.float64), 1e-2, 1e-2
    N = float(n.sum())
    geo = ufm_geometry(n, 1, lam_w, lam_h)
    p = (1 - N * (lam_w * lam_h / n).sqrt()).clamp(min=0)
    torch.testing.assert_close(geo.classifier_norms_sq, p * (lam_h * n / lam_w).sqrt())
    torch.testing.assert_close(geo.mean_norms_sq, p * (lam_w / (lam_h * n)).sqrt())
    assert geo.collapsed.tolist() == (n <= N ** 2 * lam_w * lam_h).tolist() == [False, False, False, True]


def test_balanced_classes_give_equal_norms():
    geo = ufm_geometry([50] * 4, 3, 5e-4, 5e-4)
    assert float(gram_distance(torch.diag(geo.mean_norms_sq.sqrt()), torch.eye(4))) < 1e-12
    assert not bool(geo.collapsed.any())


def test_global_minimum_beats_local_root_in_the_band():
    """For M >= 2 a root of the stationarity equation can exist while x = 0 is better: the geometry
    must report the global minimiser (collapse), which the brute force confirms."""
    M, lam = 3, 1e-2
    n_major = 400
    g = lambda x: M * x ** (M - 1) / (x ** M + 1) ** 2  # noqa: E731
    # b / n_k between g at x^M = M - 1 and the peak of g: a root exists, but zero is global.
    # b depends on n_k through N: a fixed-point iteration settles both.
    n_k = 10.0
    for _ in range(50):
        N = n_major + n_k
        b = M * N * (N * lam ** M * lam) ** (1 / M)
        lo, hi = b / g(((M - 1) / (M + 1)) ** (1 / M)), b / g((M - 1) ** (1 / M))
        n_k = 0.5 * (lo + hi)
    assert lo < n_k < hi
    geo = ufm_geometry(torch.tensor([n_major, n_k], dtype=torch.float64), M, lam, lam)
    N = n_major + n_k
    assert bool(geo.collapsed[1])
    assert scalar_minimiser(n_k, N, M, lam, lam) < 1e-12
    largest = ufm_geometry(torch.tensor([n_major, n_k], dtype=torch.float64), M, lam, lam, root="largest")
    assert not bool(largest.collapsed[1]) and float(largest.loss) > float(geo.loss)


def test_loss_of_constructed_minimiser_equals_reported_minimum():
    n, M, lam_w, lam_h = [80, 40, 20, 5], 3, 1e-2, 2e-2
    geo = ufm_geometry(n, M, lam_w, lam_h)
    K = len(n)
    s = geo.layer_sv
    weights = [torch.diag(s) for _ in range(M)]
    mean_len = torch.where(geo.collapsed, torch.zeros_like(s), geo.logit_diag / s.clamp(min=1e-300) ** M)
    y = torch.repeat_interleave(torch.arange(K), torch.tensor(n))
    H = torch.diag(mean_len)[y]
    assert abs(float(deep_ufm_loss(H, weights, y, lam_w, lam_h)) - float(geo.loss)) < 1e-12
    torch.testing.assert_close(torch.diagonal(geo.mean_gram), mean_len ** 2)


# ----------------------------------------------------------------------------- gradients, training
def test_closed_form_gradients_match_autograd():
    H, W, y = random_problem()
    H.requires_grad_(True)
    for w in W:
        w.requires_grad_(True)
    loss = deep_ufm_loss(H, W, y, 0.03, 0.07).sum()
    auto = torch.autograd.grad(loss, [H] + W)
    gh, gw = deep_ufm_grads(H.detach(), [w.detach() for w in W], y, 0.03, 0.07)
    for a, b in zip(auto, [gh] + gw):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_gradcheck_loss():
    H, W, y = random_problem(n=(3, 2), d=3, depth=2)
    H, W = H[:1], [w[:1] for w in W]
    f = lambda h, w1, w2: deep_ufm_loss(h, [w1, w2], y, 0.1, 0.2)  # noqa: E731
    assert torch.autograd.gradcheck(f, (H.requires_grad_(), W[0].requires_grad_(), W[1].requires_grad_()))


def test_nc1_gradcheck():
    g = torch.Generator().manual_seed(3)
    y = torch.tensor([0, 0, 1, 1, 2, 2, 2])
    H = torch.randn(7, 4, generator=g, dtype=torch.float64) + 2 * torch.eye(3, 4, dtype=torch.float64)[y]
    assert torch.autograd.gradcheck(lambda h: nc1(h, y), (H.requires_grad_(),))


@pytest.mark.parametrize("depth", [1, 3])
def test_tiny_training_reaches_predicted_geometry(depth):
    n, lam = [12, 6, 3], 2e-2
    g = torch.Generator().manual_seed(0)
    H, W, y = init_deep_ufm(n, 5, depth, n_runs=2, generator=g, scale=1.5)
    start = deep_ufm_loss(H, W, y, lam, lam)
    H, W, _ = train_deep_ufm(H, W, y, lam_w=lam, lam_h=lam, steps=3000, lr=0.02)
    geo = ufm_geometry(n, depth, lam, lam)
    means, _ = class_means(H, y)
    prod = W[0]
    for w in W[1:]:
        prod = w @ prod
    assert bool((deep_ufm_loss(H, W, y, lam, lam) < start).all())
    assert float((deep_ufm_loss(H, W, y, lam, lam) - geo.loss).abs().max()) < 1e-8
    assert float(nc1(H, y).max()) < 1e-10
    assert float(gram_distance(means, geo.mean_gram).max()) < 1e-4
    assert float(gram_distance(prod, geo.classifier_gram).max()) < 1e-4


def test_training_records_and_does_not_modify_inputs():
    H, W, y = random_problem()
    H0 = H.clone()
    _, _, rec = train_deep_ufm(H, W, y, lam_w=0.01, lam_h=0.01, steps=10, lr=0.01, record_every=4,
                               record=lambda step, h, w: step)
    assert rec == [0, 4, 8, 10]
    assert torch.equal(H, H0)


# ----------------------------------------------------------------------------- bad input
def test_bad_inputs():
    y = torch.tensor([0, 1, 2])
    H = torch.randn(3, 4)
    with pytest.raises(ValueError, match="labels"):
        nc1(H, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="labels must lie"):
        nc1(H, torch.tensor([0, 1, 5]), 3)
    with pytest.raises(ValueError, match="integers"):
        nc1(H, y.float())
    with pytest.raises(ValueError, match="features"):
        nc1(torch.randn(3), y)
    with pytest.raises(ValueError, match="target"):
        gram_distance(torch.randn(3, 4), torch.eye(4))
    assert float(gram_distance(torch.randn(3, 4), torch.zeros(3, 3))) == pytest.approx(1.0)   # all collapsed
    assert float(gram_distance(torch.zeros(3, 4), torch.zeros(3, 3))) == 0.0
    with pytest.raises(ValueError, match="same"):
        nc3(torch.randn(3, 4), torch.randn(3, 5))
    with pytest.raises(ValueError, match="n_per_class"):
        ufm_geometry([10, 0], 1, 0.1, 0.1)
    with pytest.raises(ValueError, match="depth"):
        ufm_geometry([10, 5], 0, 0.1, 0.1)
    with pytest.raises(ValueError, match="lam_h"):
        ufm_geometry([10, 5], 2, 0.1, -1.0)
    with pytest.raises(ValueError, match="n_classes"):
        simplex_etf_gram(1)
    with pytest.raises(ValueError, match="at least the number of classes"):
        init_deep_ufm([3, 3, 3], 2, 1)
    Hb, Wb, yb = random_problem()
    with pytest.raises(ValueError, match="W_2"):
        deep_ufm_loss(Hb, [Wb[0], torch.randn(3, 3, 4)], yb, 0.1, 0.1)
    with pytest.raises(ValueError, match="lr"):
        train_deep_ufm(Hb, Wb, yb, lam_w=0.1, lam_h=0.1, steps=1, lr=-1.0)


@pytest.mark.gpu
def test_cuda_matches_cpu():
    H, W, y = random_problem()
    cpu = train_deep_ufm(H, W, y, lam_w=0.02, lam_h=0.02, steps=50, lr=0.1)
    gpu = train_deep_ufm(H.cuda(), [w.cuda() for w in W], y.cuda(), lam_w=0.02, lam_h=0.02, steps=50, lr=0.1)
    torch.testing.assert_close(gpu[0].cpu(), cpu[0], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(nc1(gpu[0], y.cuda()).cpu(), nc1(cpu[0], y), rtol=1e-6, atol=1e-12)
    geo = ufm_geometry([7, 5, 3], 2, 0.02, 0.02)
    means, _ = class_means(gpu[0], y.cuda())
    assert gram_distance(means, geo.mean_gram.cuda()).device.type == "cuda"


def test_largest_root_rule_differs_only_in_the_band():
    n, M, lam = [80, 40, 20, 5], 3, 2e-2          # the class of 20 sits in the band at these settings
    glob, largest = ufm_geometry(n, M, lam, lam), ufm_geometry(n, M, lam, lam, root="largest")
    assert glob.collapsed.tolist() == [False, False, True, True]
    assert largest.collapsed.tolist() == [False, False, False, True]
    torch.testing.assert_close(glob.classifier_norms_sq[:2], largest.classifier_norms_sq[:2])
    assert float(largest.loss) > float(glob.loss)
    for depth in (1, 2):                          # M = 1: every root is global; no band at these sizes for M = 2
        torch.testing.assert_close(ufm_geometry(n, depth, 1e-2, 1e-2).x,
                                   ufm_geometry(n, depth, 1e-2, 1e-2, root="largest").x)
    with pytest.raises(ValueError, match="root"):
        ufm_geometry(n, M, lam, lam, root="smallest")
