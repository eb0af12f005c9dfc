import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from lossbook.classification.dis_vs_gen import (LinearHead, bayes_error_collinear, error_rate, gaussian_nb_fit,
                                                gaussian_nb_params, linear_logits, logistic_regression_fit,
                                                paper_gaussian_mixture, samples_to_reach)


def nb_reference(x, y, K, eps=1e-9):
    """Loop transcription in float64: priors, class means, pooled within-class variance (the prior-weighted
    average of per-class population variances, as in the authors' code) plus eps * largest total variance;
    scores log pi_k - sum_j (x_j - mu_kj)^2 / (2 sigma_j^2)."""
    x, y = x.tolist(), y.tolist()
    m, n = len(x), len(x[0])
    counts = [sum(1 for t in y if t == k) for k in range(K)]
    mu = [[sum(x[i][j] for i in range(m) if y[i] == k) / counts[k] for j in range(n)] for k in range(K)]
    var = []
    for j in range(n):
        per_class = [sum((x[i][j] - mu[k][j]) ** 2 for i in range(m) if y[i] == k) / counts[k] for k in range(K)]
        var.append(sum(counts[k] / m * per_class[k] for k in range(K)))
    total = [sum((x[i][j] - sum(x[t][j] for t in range(m)) / m) ** 2 for i in range(m)) / m for j in range(n)]
    var = [v + eps * max(total) for v in var]

    def scores(point):
        return [math.log(counts[k] / m) - sum((point[j] - mu[k][j]) ** 2 / (2 * var[j]) for j in range(n))
                for k in range(K)]
    return mu, var, [c / m for c in counts], scores


def test_nb_matches_loop_reference():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(30, 5, generator=gen, dtype=torch.float64) * torch.tensor([1.0, 2.0, 0.5, 3.0, 1.0], dtype=torch.float64)
    y = torch.tensor([0] * 8 + [1] * 12 + [2] * 10)
    x = x + y[:, None].double()
    mu, var, prior, scores = nb_reference(x, y, 3)
    p = gaussian_nb_params(x, y, 3)
    torch.testing.assert_close(p.mean, torch.tensor(mu, dtype=torch.float64))
    torch.testing.assert_close(p.var, torch.tensor(var, dtype=torch.float64))
    torch.testing.assert_close(p.prior, torch.tensor(prior, dtype=torch.float64))
    # the linear head differs from the log-posterior scores by a class-independent term only
    test = torch.randn(20, 5, generator=gen, dtype=torch.float64)
    ref = torch.tensor([scores(row) for row in test.tolist()], dtype=torch.float64)
    diff = linear_logits(gaussian_nb_fit(x, y, 3), test) - ref
    torch.testing.assert_close(diff - diff[:, :1], torch.zeros_like(diff), atol=1e-9, rtol=0)


def test_nb_shared_variance_is_prior_weighted_class_variances():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(40, 3, generator=gen, dtype=torch.float64)
    y = torch.arange(40) % 4
    p = gaussian_nb_params(x, y, 4, var_smoothing=0.0)
    per_class = torch.stack([x[y == k].var(0, unbiased=False) for k in range(4)])
    torch.testing.assert_close(p.var, (p.prior[:, None] * per_class).sum(0))


def test_nb_batched_and_weights_equal_separate_fits():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(3, 24, 4, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (3, 24), generator=gen)
    y[:, :3] = torch.arange(3)
    w = torch.ones(3, 24, dtype=torch.float64)
    w[:, 18:] = 0                                      # padding: the last 6 points do not exist
    whole = gaussian_nb_fit(x, y, 3, weight=w)
    for b in range(3):
        alone = gaussian_nb_fit(x[b, :18], y[b, :18], 3)
        torch.testing.assert_close(whole.weight[b], alone.weight)
        torch.testing.assert_close(whole.bias[b], alone.bias)


def test_nb_one_shot_is_nearest_class_mean():
    """With one point per class all within-class variances are 0; the floor is the same for every feature,
    so naive Bayes predicts the class whose single example is nearest (equal priors)."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(4, 6, generator=gen, dtype=torch.float64)
    y = torch.arange(4)
    test = torch.randn(50, 6, generator=gen, dtype=torch.float64)
    pred = linear_logits(gaussian_nb_fit(x, y, 4), test).argmax(-1)
    assert torch.equal(pred, torch.cdist(test, x).argmin(-1))


def test_nb_absent_class_is_never_predicted():
    x = torch.randn(20, 3, dtype=torch.float64)
    y = torch.arange(20) % 2                           # class 2 of 3 absent
    pred = linear_logits(gaussian_nb_fit(x, y, 3), torch.randn(100, 3, dtype=torch.float64)).argmax(-1)
    assert bool((pred != 2).all())


@pytest.mark.parametrize("C", [0.1, 1.0, 10.0])
def test_lr_matches_sklearn(C):
    sklearn = pytest.importorskip("sklearn.linear_model")
    gen = torch.Generator().manual_seed(4)
    x, y = paper_gaussian_mixture(10, 3, 15, batch=2, generator=gen, dtype=torch.float64)
    head = logistic_regression_fit(x, y, 3, C=C, tol=1e-9)
    for b in range(2):
        sk = sklearn.LogisticRegression(C=C, tol=1e-10, max_iter=10_000).fit(x[b].numpy(), y[b].numpy())
        probs = torch.softmax(linear_logits(LinearHead(head.weight[b], head.bias[b]), x[b]), -1).numpy()
        np.testing.assert_allclose(probs, sk.predict_proba(x[b].numpy()), atol=1e-5)


def test_lr_stationary_point_and_constant_feature():
    """The gradient of the objective vanishes at the fit; a feature constant in the data gets weight 0."""
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(40, 4, generator=gen, dtype=torch.float64) * torch.tensor([1.0, 30.0, 0.1, 1.0], dtype=torch.float64)
    x[:, 3] = 2.5
    y = (x[:, 0] + x[:, 1] / 30 > 0).long() + (x[:, 2] > 0.1).long()
    head = logistic_regression_fit(x, y, 3, C=2.0, tol=1e-10)
    W = head.weight.clone().requires_grad_()
    b = head.bias.clone().requires_grad_()
    obj = torch.nn.functional.cross_entropy(x @ W + b, y) + (W ** 2).sum() / (2 * 2.0 * len(y))
    gW, gb = torch.autograd.grad(obj, (W, b))
    assert float(gW.abs().max()) < 1e-8 and float(gb.abs().max()) < 1e-8
    assert float(head.weight[3].abs().max()) == 0.0


def test_lr_batched_and_weights_equal_separate_fits():
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(2, 30, 5, generator=gen, dtype=torch.float64)
    y = (x[..., 0] > 0).long() + (x[..., 1] > 0.5).long()
    w = torch.ones(2, 30, dtype=torch.float64)
    w[1, 20:] = 0
    whole = logistic_regression_fit(x, y, 3, weight=w, tol=1e-10)
    alone = logistic_regression_fit(x[1, :20], y[1, :20], 3, tol=1e-10)
    full0 = logistic_regression_fit(x[0], y[0], 3, tol=1e-10)
    p = lambda h, xx: torch.softmax(linear_logits(h, xx), -1)       # noqa: E731 (logits are defined up to a shift)
    torch.testing.assert_close(p(LinearHead(whole.weight[1], whole.bias[1]), x[1]), p(alone, x[1]), atol=1e-7, rtol=0)
    torch.testing.assert_close(p(LinearHead(whole.weight[0], whole.bias[0]), x[0]), p(full0, x[0]), atol=1e-7, rtol=0)


def test_lr_gradcheck_of_the_objective_it_minimises():
    """The objective the solver minimises, as a function of (W, b), has the autograd gradient it uses."""
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(12, 3, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (12,), generator=gen)
    W = torch.randn(3, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, generator=gen, dtype=torch.float64, requires_grad=True)
    f = lambda W, b: torch.nn.functional.cross_entropy(x @ W + b, y) + (W ** 2).sum() / (2 * 12)  # noqa: E731
    assert torch.autograd.gradcheck(f, (W, b))


def test_bayes_error_closed_form_against_monte_carlo():
    gen = torch.Generator().manual_seed(8)
    for n, K in ((8, 2), (16, 3), (12, 4)):
        x, y = paper_gaussian_mixture(n, K, 60_000, generator=gen, dtype=torch.float64)
        # the Bayes classifier with the true parameters: NB fitted on a huge sample is within sampling error of it
        mc = float(error_rate(gaussian_nb_fit(x, y, K), x, y))
        assert abs(mc - bayes_error_collinear(n, K)) < 0.004, (n, K, mc, bayes_error_collinear(n, K))
    assert bayes_error_collinear(256, 3) < 1e-6


def test_mixture_shapes_and_moments():
    x, y = paper_gaussian_mixture(6, 2, 50_000, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    assert x.shape == (1, 100_000, 6) and y.shape == (1, 100_000)
    x0 = x[0, y[0] == 0]
    torch.testing.assert_close(x0.mean(0), -torch.ones(6, dtype=torch.float64), atol=0.05, rtol=0)
    torch.testing.assert_close(x0.var(0), torch.tensor([6.0, 6, 6, 1, 1, 1], dtype=torch.float64), atol=0.15, rtol=0)


def test_samples_to_reach():
    sizes = [10, 20, 40, 80]
    assert samples_to_reach(sizes, [0.5, 0.3, 0.1, 0.05], 0.6) == 10
    assert samples_to_reach(sizes, [0.5, 0.3, 0.2, 0.15], 0.1) == math.inf
    # halfway in error between 20 (0.3) and 40 (0.1) -> geometric midpoint
    assert samples_to_reach(sizes, [0.5, 0.3, 0.1, 0.05], 0.2) == pytest.approx(math.sqrt(20 * 40))
    # a curve that dips below and comes back up only counts from where it stays below
    assert samples_to_reach(sizes, [0.5, 0.05, 0.3, 0.05], 0.1) > 40


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), shift=st.floats(-5, 5), scale=st.floats(0.2, 5.0))
def test_property_nb_invariant_to_feature_affine_maps(seed, shift, scale):
    """NB predictions do not change when every feature is shifted and rescaled (each by its own factor)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(30, 4, generator=gen, dtype=torch.float64)
    y = torch.arange(30) % 3
    x = x + y[:, None].double()
    a = scale * torch.rand(4, generator=gen, dtype=torch.float64) + 0.1
    test = torch.randn(40, 4, generator=gen, dtype=torch.float64)
    p1 = linear_logits(gaussian_nb_fit(x, y, 3), test).argmax(-1)
    p2 = linear_logits(gaussian_nb_fit(x * a + shift, y, 3), test * a + shift).argmax(-1)
    assert torch.equal(p1, p2)


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), m=st.integers(6, 40), C=st.floats(0.05, 20.0))
def test_property_lr_fit_is_a_minimum(seed, m, C):
    """Perturbing the fitted head never lowers the objective (it is the minimiser)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, 3, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (m,), generator=gen)
    head = logistic_regression_fit(x, y, 3, C=C, tol=1e-7)
    f = lambda W, b: float(torch.nn.functional.cross_entropy(x @ W + b, y) + (W ** 2).sum() / (2 * C * m))  # noqa: E731
    best = f(head.weight, head.bias)
    for _ in range(5):
        dW = 1e-2 * torch.randn(3, 3, generator=gen, dtype=torch.float64)
        db = 1e-2 * torch.randn(3, generator=gen, dtype=torch.float64)
        assert f(head.weight + dW, head.bias + db) >= best - 1e-10


def test_bad_input_names_the_argument():
    x, y = torch.randn(10, 3), torch.arange(10) % 2
    with pytest.raises(ValueError, match="n_classes"):
        gaussian_nb_fit(x, y, 1)
    with pytest.raises(ValueError, match="x must"):
        gaussian_nb_fit(x.long(), y, 2)
    with pytest.raises(ValueError, match="y must have shape"):
        gaussian_nb_fit(x, y[:5], 2)
    with pytest.raises(ValueError, match="labels in"):
        gaussian_nb_fit(x, y + 5, 2)
    with pytest.raises(ValueError, match="integer class labels"):
        gaussian_nb_fit(x, y.float(), 2)
    with pytest.raises(ValueError, match="weight"):
        gaussian_nb_fit(x, y, 2, weight=torch.ones(4))
    with pytest.raises(ValueError, match="weight"):
        logistic_regression_fit(x, y, 2, weight=-torch.ones(10))
    with pytest.raises(ValueError, match="var_smoothing"):
        gaussian_nb_fit(x, y, 2, var_smoothing=-1.0)
    for bad in (0.0, -1.0, math.nan, True):
        with pytest.raises(ValueError, match="C must"):
            logistic_regression_fit(x, y, 2, C=bad)
    with pytest.raises(ValueError, match="max_iter"):
        logistic_regression_fit(x, y, 2, max_iter=0)
    with pytest.raises(ValueError, match="positive weight"):
        logistic_regression_fit(x, y, 2, weight=torch.zeros(10))
    with pytest.raises(ValueError, match="features"):
        linear_logits(gaussian_nb_fit(x, y, 2), torch.randn(4, 5))
    with pytest.raises(ValueError, match="sizes"):
        samples_to_reach([10, 5], [0.1, 0.2], 0.1)
    with pytest.raises(ValueError, match="need n"):
        paper_gaussian_mixture(1, 3, 5)
    with pytest.raises(ValueError, match="need n"):
        bayes_error_collinear(16, 1)


def test_tiny_learning_curves_nb_converges_faster():
    """The chapter's claim in miniature: with few samples in many (informative) dimensions NB is near its
    asymptote while LR is not; with many samples both are."""
    gen = torch.Generator().manual_seed(10)
    n, K = 64, 3
    xt, yt = paper_gaussian_mixture(n, K, 1000, generator=gen, dtype=torch.float64)
    small = paper_gaussian_mixture(n, K, 10, batch=3, generator=gen, dtype=torch.float64)
    large = paper_gaussian_mixture(n, K, 300, batch=3, generator=gen, dtype=torch.float64)
    nb_small = error_rate(gaussian_nb_fit(*small, K), xt[0], yt[0])
    lr_small = error_rate(logistic_regression_fit(*small, K), xt[0], yt[0])
    lr_large = error_rate(logistic_regression_fit(*large, K), xt[0], yt[0])
    assert float(nb_small.max()) < 0.05 < float(lr_small.min())
    assert float(lr_large.max()) < 0.03


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    gen = torch.Generator().manual_seed(11)
    x, y = paper_gaussian_mixture(32, 3, 40, batch=4, generator=gen, dtype=torch.float64)
    w = torch.ones(4, 120, dtype=torch.float64)
    w[:, 90:] = 0
    for fit in (gaussian_nb_fit, logistic_regression_fit):
        cpu = fit(x, y, 3, weight=w)
        gpu = fit(x.cuda(), y.cuda(), 3, weight=w.cuda())
        assert gpu.weight.device.type == "cuda"
        p_cpu = torch.softmax(linear_logits(cpu, x), -1)
        p_gpu = torch.softmax(linear_logits(gpu, x.cuda()), -1).cpu()
        torch.testing.assert_close(p_gpu, p_cpu, atol=1e-6, rtol=0)
    xg, yg = paper_gaussian_mixture(16, 3, 10, generator=torch.Generator("cuda").manual_seed(0), device="cuda")
    assert xg.device.type == "cuda" and yg.device.type == "cuda"
