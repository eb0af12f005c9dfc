import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from lossbook.dynamics.large_step_logistic import (batch_perceptron, logistic_grad, logistic_hessian, logistic_loss,
                                                   logistic_minimizer, lr_gd, margins, separable_data,
                                                   steps_to_separate)

F64 = torch.float64


def small_sets(n_sets=3, n=40, d=3, flip=0.0, seed=0):
    return separable_data(n, d, 0.05, n_sets=n_sets, flip=flip, generator=torch.Generator().manual_seed(seed))


def reference_run(A, y, gamma, iters, rule):
    """Loop transcription, float64, one data set and one step size: LR+GD, the two normalised rules
    and the batch perceptron, written point by point from the equations."""
    n, d = len(A), len(A[0])
    w = [0.0] * d
    out = [list(w)]
    for _ in range(iters):
        m = [y[i] * sum(A[i][j] * w[j] for j in range(d)) for i in range(n)]
        if rule == "perceptron":
            c = [1.0 if mi < 0 else 0.5 if mi == 0 else 0.0 for mi in m]
            step = [sum(c[i] * y[i] * A[i][j] for i in range(n)) / n for j in range(d)]
        else:
            s = [1 / (1 + math.exp(mi)) if mi > -700 else 1.0 for mi in m]       # sigma(-m)
            g = [sum(s[i] * y[i] * A[i][j] for i in range(n)) / n for j in range(d)]   # -grad f
            if rule is None:
                scale = 1.0
            elif rule == "loss":
                scale = 1.0 / (sum(math.log1p(math.exp(-mi)) if mi > -700 else -mi for mi in m) / n)
            else:
                scale = 1.0 / math.sqrt(sum(v * v for v in g))
            step = [gamma * scale * v for v in g]
        w = [w[j] + step[j] for j in range(d)]
        out.append(list(w))
    return torch.tensor(out, dtype=F64)


@pytest.mark.parametrize("rule", [None, "loss", "grad_norm"])
def test_lr_gd_matches_loop_reference(rule):
    data = small_sets(n_sets=2, n=12, d=3)
    gammas = torch.tensor([0.3, 4.0, 50.0], dtype=F64)
    tr = lr_gd(data.A, data.y, gammas, iters=6, normalize=rule, keep_w=True)     # (7, 2, 3, d)
    assert tr.w.shape == (7, 2, 3, 3) and tr.loss.shape == (7, 2, 3)
    for s in range(2):
        for k, gam in enumerate(gammas.tolist()):
            ref = reference_run(data.A[s].tolist(), data.y[s].tolist(), gam, 6, rule)
            torch.testing.assert_close(tr.w[:, s, k], ref, rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(tr.loss[:, s, k], logistic_loss(ref, data.A[s], data.y[s]), rtol=1e-12, atol=1e-14)
            torch.testing.assert_close(tr.errors[:, s, k], (margins(ref, data.A[s], data.y[s]) <= 0).sum(-1))


def test_perceptron_matches_loop_reference_and_stops():
    data = small_sets(n_sets=2, n=15, d=4)
    tr = batch_perceptron(data.A, data.y, iters=30, keep_w=True)
    for s in range(2):
        torch.testing.assert_close(tr.w[:, s], reference_run(data.A[s].tolist(), data.y[s].tolist(), 1.0, 30, "perceptron"),
                                   rtol=1e-12, atol=1e-14)
    t = steps_to_separate(tr.errors)
    assert bool(torch.isfinite(t).all())
    for s in range(2):      # once separated, the perceptron never moves again
        assert torch.equal(tr.w[int(t[s]):, s], tr.w[int(t[s]), s].expand_as(tr.w[int(t[s]):, s]))


def test_huge_step_is_the_perceptron():
    """Theorem (limit): w_t / gamma -> p_t; at gamma = 1e9 they agree to rounding on these sets."""
    data = small_sets(n_sets=4, n=50, d=5)
    iters = 15
    w = lr_gd(data.A, data.y, 1e9, iters=iters, keep_w=True).w / 1e9
    p = batch_perceptron(data.A, data.y, iters=iters, keep_w=True).w
    torch.testing.assert_close(w, p, rtol=1e-6, atol=1e-9)
    # the first step is exactly the perceptron's at every step size: sigma(0) = 1/2
    for gam in (1e-3, 1.0, 1e3):
        torch.testing.assert_close(lr_gd(data.A, data.y, gam, iters=1).w / gam, p[1], rtol=1e-12, atol=1e-15)


def test_normalized_rules_first_step_and_step_length():
    data = small_sets(n_sets=2, n=30, d=3)
    g0 = -logistic_grad(torch.zeros(2, 3, dtype=F64), data.A, data.y)
    w1 = lr_gd(data.A, data.y, 2.0, iters=1, normalize="loss").w
    torch.testing.assert_close(w1, 2.0 * g0 / math.log(2.0))                  # f(0) = log 2
    tr = lr_gd(data.A, data.y, torch.tensor([0.5, 7.0], dtype=F64), iters=5, normalize="grad_norm", keep_w=True)
    lengths = tr.w.diff(dim=0).norm(dim=-1)                                   # every step has length gamma
    torch.testing.assert_close(lengths, torch.tensor([0.5, 7.0], dtype=F64).expand_as(lengths))


def test_gradient_and_hessian_match_autograd():
    data = small_sets(n_sets=1, n=20, d=3)
    A, y = data.A[0], data.y[0]
    w = torch.randn(3, dtype=F64, generator=torch.Generator().manual_seed(1), requires_grad=True)
    assert torch.autograd.gradcheck(lambda v: logistic_loss(v, A, y), (w,))
    (g,) = torch.autograd.grad(logistic_loss(w, A, y), w)
    torch.testing.assert_close(logistic_grad(w.detach(), A, y), g)
    H = torch.autograd.functional.hessian(lambda v: logistic_loss(v, A, y), w.detach())
    torch.testing.assert_close(logistic_hessian(w.detach(), A, y), H)


def test_steps_to_separate():
    errors = torch.tensor([[3, 2, 5], [1, 2, 0], [0, 2, 0], [0, 1, 0]])
    assert steps_to_separate(errors).tolist() == [2.0, math.inf, 1.0]


def test_extreme_margins_stay_finite():
    data = small_sets(n_sets=1, n=30, d=3)
    for rule in (None, "loss", "grad_norm"):
        tr = lr_gd(data.A, data.y, torch.tensor([1e12], dtype=F64), iters=30, normalize=rule)
        assert bool(torch.isfinite(tr.w).all() & torch.isfinite(tr.loss).all() & torch.isfinite(tr.grad_norm).all())
    # the loss-normalised direction when f underflows to 0 (all margins ~ 1e4): softmin weights, not 0/0
    w0 = 1e5 * data.u
    tr = lr_gd(data.A, data.y, 1.0, iters=1, normalize="loss", w0=w0)
    assert float(tr.loss[0]) == 0.0 and bool(torch.isfinite(tr.w).all()) and not torch.equal(tr.w, w0)


def test_batched_equals_one_at_a_time():
    data = small_sets(n_sets=3, n=25, d=4)
    gammas = torch.tensor([0.5, 20.0, 1e4], dtype=F64)
    whole = lr_gd(data.A, data.y, gammas, iters=20)
    for s in range(3):
        for k in range(3):
            one = lr_gd(data.A[s], data.y[s], float(gammas[k]), iters=20)
            torch.testing.assert_close(whole.w[s, k], one.w, rtol=1e-12, atol=1e-12)
            assert torch.equal(whole.errors[:, s, k], one.errors)


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 10_000), d=st.integers(2, 6), margin=st.floats(0.02, 0.2))
def test_property_perceptron_mistake_bound(seed, d, margin):
    """Theorem (Novikoff-type): sum_t k_t <= R^2 / rho^2 on separable data."""
    data = separable_data(40, d, margin, n_sets=2, generator=torch.Generator().manual_seed(seed))
    tr = batch_perceptron(data.A, data.y, iters=250)
    k_sum = tr.errors.sum(0).to(F64) / 40
    R = data.A.norm(dim=-1).amax(-1)
    assert bool((data.margin > 0).all())
    assert bool((k_sum <= R**2 / data.margin**2).all())
    assert bool(torch.isfinite(steps_to_separate(tr.errors)).all())


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), c=st.floats(0.1, 10.0), gamma=st.floats(0.01, 100.0))
def test_property_rescaling_and_permutation(seed, c, gamma):
    """GD on c*A with step gamma is GD on A with step c^2 gamma, in the variable c*w; the order of the points is irrelevant."""
    data = separable_data(20, 3, 0.05, generator=torch.Generator().manual_seed(seed))
    A, y = data.A[0], data.y[0]
    a = lr_gd(c * A, y, gamma, iters=10, keep_w=True)
    b = lr_gd(A, y, c * c * gamma, iters=10, keep_w=True)
    torch.testing.assert_close(c * a.w, b.w, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(a.loss, b.loss, rtol=1e-9, atol=1e-12)
    perm = torch.randperm(20, generator=torch.Generator().manual_seed(seed))
    torch.testing.assert_close(lr_gd(A[perm], y[perm], gamma, iters=10).w, lr_gd(A, y, gamma, iters=10).w,
                               rtol=1e-9, atol=1e-9)


def test_threshold_on_non_separable_data():
    """Theorem (threshold): below 2/lambda_max(H*) GD converges to w*, above it does not."""
    data = small_sets(n_sets=2, n=60, d=3, flip=0.15, seed=4)
    star = logistic_minimizer(data.A, data.y)
    assert bool((star.grad_norm < 1e-10).all() & (star.last_step < 1e-8).all())
    gamma_c = 2 / torch.linalg.eigvalsh(logistic_hessian(star.w, data.A, data.y))[..., -1]
    tr = lr_gd(data.A, data.y, gamma_c[:, None] * torch.tensor([0.7, 1.5], dtype=F64), iters=1500, keep_w=True)
    dist = (tr.w[-1] - star.w[:, None]).norm(dim=-1)
    assert bool((dist[:, 0] < 1e-6).all()) and bool((dist[:, 1] > 1e-2).all())
    assert bool(torch.isinf(steps_to_separate(tr.errors)).all())


def test_separable_minimizer_runs_off():
    data = small_sets(n_sets=2, n=40, d=3)
    star = logistic_minimizer(data.A, data.y, iters=30)
    assert bool((star.last_step > 1.0).all())      # no finite minimiser: Newton keeps taking capped steps


def test_separable_data_generator():
    gen = torch.Generator().manual_seed(5)
    data = separable_data(100, 6, 0.05, n_sets=4, generator=gen)
    assert data.A.shape == (4, 100, 6) and data.y.shape == (4, 100) and data.u.shape == (4, 6)
    torch.testing.assert_close(data.A.norm(dim=-1).amax(-1), torch.ones(4, dtype=F64))
    torch.testing.assert_close(data.u.norm(dim=-1), torch.ones(4, dtype=F64))
    assert bool((data.margin > 0.05 / 2).all())             # rescaling by max |a| <= ~1.2 keeps most of the margin
    assert set(data.y.unique().tolist()) == {-1.0, 1.0}
    again = separable_data(100, 6, 0.05, n_sets=4, generator=torch.Generator().manual_seed(5))
    assert torch.equal(again.A, data.A)
    flipped = separable_data(100, 6, 0.05, n_sets=4, flip=0.1, generator=torch.Generator().manual_seed(5))
    assert bool((flipped.margin < 0).all())


def test_tiny_learns():
    """LR+GD with a moderate step separates a separable set; LR+GD with a huge step does so in the perceptron's count."""
    data = small_sets(n_sets=2, n=80, d=4, seed=6)
    tr = lr_gd(data.A, data.y, torch.tensor([10.0, 1e7], dtype=F64), iters=800)
    t = steps_to_separate(tr.errors)
    assert bool(torch.isfinite(t).all()) and bool((tr.errors[-1] == 0).all())
    t_perc = steps_to_separate(batch_perceptron(data.A, data.y, iters=800).errors)
    assert torch.equal(t[:, 1], t_perc)


def test_bad_input_names_the_argument():
    A, y = torch.randn(5, 2, dtype=F64), torch.tensor([1.0, -1.0, 1.0, 1.0, -1.0], dtype=F64)
    with pytest.raises(ValueError, match="A must"):
        lr_gd(torch.randn(5), y, 1.0, iters=1)
    with pytest.raises(ValueError, match="A must"):
        lr_gd(torch.zeros(5, 2, dtype=torch.int64), y, 1.0, iters=1)
    with pytest.raises(ValueError, match="y must have shape"):
        lr_gd(A, y[:4], 1.0, iters=1)
    with pytest.raises(ValueError, match="y must hold labels"):
        lr_gd(A, torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0]), 1.0, iters=1)
    for bad in (0.0, -1.0, math.inf, "1", True, torch.tensor([1.0, -2.0])):
        with pytest.raises(ValueError, match="gamma"):
            lr_gd(A, y, bad, iters=1)
    for bad in (-1, 2.5, True):
        with pytest.raises(ValueError, match="iters"):
            lr_gd(A, y, 1.0, iters=bad)
    with pytest.raises(ValueError, match="normalize"):
        lr_gd(A, y, 1.0, iters=1, normalize="adam")
    with pytest.raises(ValueError, match="w must"):
        lr_gd(A, y, 1.0, iters=1, w0=torch.zeros(3, dtype=F64))
    with pytest.raises(ValueError, match="w must"):
        logistic_loss(torch.zeros(3, dtype=F64), A, y)
    with pytest.raises(ValueError, match="errors must"):
        steps_to_separate(torch.tensor(3))
    with pytest.raises(ValueError, match="d must be at least 2"):
        separable_data(10, 1, 0.05)
    with pytest.raises(ValueError, match="margin"):
        separable_data(10, 3, 0.0)
    with pytest.raises(ValueError, match="flip"):
        separable_data(10, 3, 0.05, flip=0.6)
    with pytest.raises(ValueError, match="n must"):
        separable_data(0, 3, 0.05)
    with pytest.raises(ValueError, match="rejects too many"):
        separable_data(10, 3, 1.1)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu_without_host_sync():
    data = small_sets(n_sets=3, n=64, d=5)
    gammas = torch.tensor([0.5, 30.0, 1e6], dtype=F64)
    for rule in (None, "loss", "grad_norm"):
        cpu = lr_gd(data.A, data.y, gammas, iters=40, normalize=rule)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            gpu = lr_gd(data.A.cuda(), data.y.cuda(), gammas.cuda(), iters=40, normalize=rule)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert gpu.w.device.type == "cuda"
        torch.testing.assert_close(gpu.w.cpu(), cpu.w, rtol=1e-9, atol=1e-9)
        assert torch.equal(gpu.errors.cpu(), cpu.errors)
    p_cpu = batch_perceptron(data.A, data.y, iters=30)
    p_gpu = batch_perceptron(data.A.cuda(), data.y.cuda(), iters=30)
    torch.testing.assert_close(p_gpu.w.cpu(), p_cpu.w)
    star = logistic_minimizer(data.A.cuda(), data.y.cuda())
    assert star.w.device.type == "cuda"
