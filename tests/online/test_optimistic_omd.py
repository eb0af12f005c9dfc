import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from lossbook.online.optimistic_omd import (OnlineGradientDescent, OptimisticOMD, adaptive_step_size,
                                            optimistic_omd_step)
from lossbook.regret import SEAQuadratic, play


def proj(v, r):
    n = math.sqrt(sum(a * a for a in v))
    return list(v) if n <= r else [a * r / n for a in v]


def reference_oomd(grad_fn, T, d, radius=1.0, L=1.0, delta=1.0):
    """Loop transcription of Euclidean optimistic OMD with the convex-smooth step size, plain floats."""
    D = 2 * radius
    x_hat, hint, V, xs = [0.0] * d, [0.0] * d, 0.0, []
    for t in range(1, T + 1):
        eta = min(D / math.sqrt(delta + V), 1 / (4 * L))
        x = proj([x_hat[i] - eta * hint[i] for i in range(d)], radius)
        xs.append(x)
        g = grad_fn(t, x)
        V += sum((g[i] - hint[i]) ** 2 for i in range(d))
        x_hat = proj([x_hat[i] - eta * g[i] for i in range(d)], radius)
        hint = g
    return torch.tensor(xs, dtype=torch.float64)


def test_matches_loop_reference():
    runs, d, T = 3, 4, 60
    env = SEAQuadratic(runs, d, sigma=torch.tensor([0.0, 0.5, 0.2]), adversarial=torch.tensor([0.0, 0.0, 0.6]),
                       switch_every=torch.tensor([1.0, 1.0, 5.0]), center_norm=0.9, generator=0)
    losses = [env.loss(t) for t in range(1, T + 1)]
    learner = OptimisticOMD(runs, d, smoothness=1.0, delta=0.5)
    xs = []
    for loss in losses:
        x = learner.predict()
        xs.append(x)
        learner.update(loss.grad(x))
    xs = torch.stack(xs, 1)
    for r in range(runs):
        def grad_fn(t, x, r=r):
            loss = losses[t - 1]
            return [float(loss.h[r, i] * x[i] - loss.b[r, i]) for i in range(d)]
        torch.testing.assert_close(xs[r], reference_oomd(grad_fn, T, d, delta=0.5), rtol=1e-12, atol=1e-12)


def test_step_size_formula():
    V = torch.tensor([0.0, 15.0, 1e6], dtype=torch.float64)
    eta = adaptive_step_size(V, diameter=2.0, smoothness=0.25, delta=1.0)     # cap 1 / (4L) = 1
    torch.testing.assert_close(eta, torch.tensor([1.0, 0.5, 2 / math.sqrt(1e6 + 1)], dtype=torch.float64))


def test_exact_hint_plays_one_step_ahead():
    """A constant linear loss: from round 2 the hint equals the gradient, so x_t = x_hat_{t+1}."""
    g = torch.tensor([[0.3, -0.1]], dtype=torch.float64)
    learner = OptimisticOMD(1, 2)
    learner.update(g)
    for _ in range(5):
        x = learner.predict().clone()
        learner.update(g)
        torch.testing.assert_close(x, learner.x_hat)
    assert float(learner.cum_sq_dev) == pytest.approx(float((g ** 2).sum()))   # only the first round deviated


def test_zero_hint_is_adaptive_projected_gradient_descent():
    gen = torch.Generator().manual_seed(1)
    grads = torch.randn(30, 2, 3, generator=gen, dtype=torch.float64)
    learner = OptimisticOMD(2, 3, hint="zero", delta=2.0)
    x, V = torch.zeros(2, 3, dtype=torch.float64), torch.zeros(2, dtype=torch.float64)
    for g in grads:
        torch.testing.assert_close(learner.predict(), x)
        eta = torch.clamp(2.0 / torch.sqrt(2.0 + V), max=0.25)
        learner.update(g)
        V = V + (g ** 2).sum(-1)
        n = (x - eta.unsqueeze(-1) * g).norm(dim=-1, keepdim=True)
        x = (x - eta.unsqueeze(-1) * g) * torch.clamp(1 / n, max=1.0)


def test_ogd_step():
    g = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    ogd = OnlineGradientDescent(1, 2, radius=1.0, lipschitz=4.0)
    ogd.update(g)
    torch.testing.assert_close(ogd.predict(), torch.tensor([[-0.5, 0.0]], dtype=torch.float64))   # eta_1 = D / G
    ogd.update(g)
    torch.testing.assert_close(ogd.predict(), torch.tensor([[-0.5 - 0.5 / math.sqrt(2), 0.0]], dtype=torch.float64))


def test_strongly_convex_step():
    learner = OptimisticOMD(2, 2, step="strongly_convex", strong_convexity=0.5, smoothness=1.0)
    assert float(learner.eta[0]) == pytest.approx(1 / (0.5 + 4))
    learner.update(torch.zeros(2, 2, dtype=torch.float64))
    assert float(learner.eta[0]) == pytest.approx(1 / (1.0 + 4))


def test_gradcheck_of_the_step():
    gen = torch.Generator().manual_seed(2)
    x_hat = (0.3 * torch.randn(4, 3, generator=gen, dtype=torch.float64)).requires_grad_()
    grad = torch.randn(4, 3, generator=gen, dtype=torch.float64).requires_grad_()
    hint = torch.randn(4, 3, generator=gen, dtype=torch.float64).requires_grad_()
    eta = torch.tensor([[0.1, 0.2, 0.9, 0.05], [0.1, 0.15, 0.8, 0.05]], dtype=torch.float64)  # some rows hit the boundary
    assert torch.autograd.gradcheck(lambda a, b, c: optimistic_omd_step(a, b, c, eta, 1.0), (x_hat, grad, hint))


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), radius=st.floats(0.1, 3.0), scale=st.floats(0.01, 50.0))
def test_property_feasible_and_steps_shrink(seed, radius, scale):
    gen = torch.Generator().manual_seed(seed)
    learner = OptimisticOMD(5, 3, radius=radius, smoothness=2.0)
    etas = [learner.eta.clone()]
    for _ in range(15):
        x = learner.predict()
        assert bool((x.norm(dim=-1) <= radius * (1 + 1e-12)).all())
        learner.update(scale * torch.randn(5, 3, generator=gen, dtype=torch.float64))
        etas.append(learner.eta.clone())
    e = torch.stack(etas)
    assert bool((e.diff(dim=0) <= 1e-15).all()) and bool((e <= 1 / 8 + 1e-15).all())


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**31 - 1))
def test_property_runs_are_independent(seed):
    gen = torch.Generator().manual_seed(seed)
    grads = torch.randn(10, 4, 2, generator=gen, dtype=torch.float64)
    perm = torch.randperm(4, generator=gen)
    a, b = OptimisticOMD(4, 2), OptimisticOMD(4, 2)
    for g in grads:
        a.update(g)
        b.update(g[perm])
    torch.testing.assert_close(b.predict(), a.predict()[perm], rtol=0, atol=0)


def test_bad_input():
    with pytest.raises(ValueError, match="step"):
        OptimisticOMD(2, 2, step="constant")
    with pytest.raises(ValueError, match="hint"):
        OptimisticOMD(2, 2, hint="future")
    with pytest.raises(ValueError, match="strong_convexity"):
        OptimisticOMD(2, 2, step="strongly_convex")
    with pytest.raises(ValueError, match="positive"):
        OptimisticOMD(2, 2, radius=-1.0)
    with pytest.raises(ValueError, match="shape"):
        OptimisticOMD(2, 2).update(torch.zeros(3, 2, dtype=torch.float64))
    with pytest.raises(ValueError, match="positive"):
        adaptive_step_size(torch.zeros(1), diameter=1.0, smoothness=0.0)
    with pytest.raises(ValueError, match="lipschitz"):
        OnlineGradientDescent(2, 2, lipschitz=0.0)
    with pytest.raises(ValueError, match="shape"):
        OnlineGradientDescent(2, 2).update(torch.zeros(2, 3, dtype=torch.float64))


def test_learns_a_fixed_loss_with_bounded_regret():
    """Noise-free stationary stream: optimistic OMD converges to the minimiser, and its regret stops growing."""
    env = SEAQuadratic(4, 5, lam_min=0.05, generator=3)
    res = play(OptimisticOMD(4, 5), env, 800, checkpoints=[400, 800])
    assert bool((res.regret[:, 1] - res.regret[:, 0] < 1e-3).all()) and bool((res.regret[:, 1] < 1.0).all())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    out = {}
    for dev in ("cpu", "cuda"):
        env = SEAQuadratic(8, 6, sigma=0.3, adversarial=0.2, generator=torch.Generator().manual_seed(7), device=dev)
        res = play(OptimisticOMD(8, 6, device=dev), env, 200, checkpoints=[50, 200])
        out[dev] = res.regret
    assert out["cuda"].device.type == "cuda"
    torch.testing.assert_close(out["cuda"].cpu(), out["cpu"])
