import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from lossbook.regret import (QuadraticLoss, RegretTracker, SEAQuadratic, ball_quadratic_argmin, mean_ci, play,
                             project_ball)


def test_project_ball():
    x = torch.tensor([[3.0, 4.0], [0.3, 0.4], [0.0, 0.0]], dtype=torch.float64)
    p = project_ball(x, 1.0)
    torch.testing.assert_close(p, torch.tensor([[0.6, 0.8], [0.3, 0.4], [0.0, 0.0]], dtype=torch.float64))
    torch.testing.assert_close(project_ball(x, torch.tensor([10.0, 0.1, 1.0], dtype=torch.float64))[1],
                               torch.tensor([0.06, 0.08], dtype=torch.float64))
    with pytest.raises(ValueError, match="radius"):
        project_ball(x, 0.0)


def brute_force_argmin(h, b, radius, n=400_000, seed=0):
    """Float64 reference: best of many random points of the 2-D ball (and its boundary)."""
    g = torch.Generator().manual_seed(seed)
    ang = torch.rand(n, generator=g, dtype=torch.float64) * 2 * math.pi
    r = radius * torch.sqrt(torch.rand(n, generator=g, dtype=torch.float64))
    r[: n // 2] = radius
    u = torch.stack([r * torch.cos(ang), r * torch.sin(ang)], -1)
    f = 0.5 * (h * u * u).sum(-1) - (b * u).sum(-1)
    return u[f.argmin()], f.min()


@pytest.mark.parametrize("h,b", [([2.0, 1.0], [0.5, 0.3]),      # interior minimiser
                                 ([2.0, 1.0], [3.0, -2.0]),     # outside: on the boundary
                                 ([0.0, 0.0], [1.0, 2.0]),      # linear loss: R b / |b|
                                 ([0.0, 1.0], [0.2, 0.1])])     # flat direction with a linear term
def test_ball_argmin_matches_brute_force(h, b):
    h, b = torch.tensor(h, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
    u = ball_quadratic_argmin(h.unsqueeze(0), b.unsqueeze(0), 1.0)[0]
    _, fbest = brute_force_argmin(h, b, 1.0)
    f = 0.5 * (h * u * u).sum() - (b * u).sum()
    assert u.norm() <= 1 + 1e-12
    assert f <= fbest + 1e-9 and f >= fbest - 1e-4


def test_linear_comparator_closed_form():
    b = torch.randn(50, 7, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    u = ball_quadratic_argmin(torch.zeros(7, dtype=torch.float64), b, 2.0)
    torch.testing.assert_close(u, 2.0 * b / b.norm(dim=-1, keepdim=True))


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), radius=st.floats(0.1, 5.0), scale=st.floats(0.01, 100.0))
def test_property_argmin_is_kkt_point(seed, radius, scale):
    g = torch.Generator().manual_seed(seed)
    h = torch.rand(6, 5, generator=g, dtype=torch.float64) * torch.randint(0, 2, (6, 5), generator=g)
    b = scale * torch.randn(6, 5, generator=g, dtype=torch.float64)
    u = ball_quadratic_argmin(h, b, radius)
    assert bool((u.norm(dim=-1) <= radius * (1 + 1e-10)).all())
    # no feasible random perturbation improves the objective (first-order optimality on the ball)
    f = lambda v: 0.5 * (h * v * v).sum(-1) - (b * v).sum(-1)  # noqa: E731
    for _ in range(20):
        w = project_ball(u + 0.05 * radius * torch.randn(6, 5, generator=g, dtype=torch.float64), radius)
        assert bool((f(w) >= f(u) - 1e-7 * (1 + f(u).abs())).all())


def test_tracker_matches_loop_reference():
    """Regret by the tracker vs a float64 loop that sums the losses and minimises their sum."""
    env = SEAQuadratic(3, 4, sigma=0.3, adversarial=torch.tensor([0.0, 0.5, 0.5]),
                       switch_every=torch.tensor([1.0, 1.0, 3.0]), generator=2)
    g = torch.Generator().manual_seed(3)
    tracker = RegretTracker(3, 4, radius=1.0)
    rounds, xs = [], []
    for t in range(1, 26):
        x = project_ball(torch.randn(3, 4, generator=g, dtype=torch.float64), 1.0)
        loss = env.loss(t)
        tracker.update(x, loss)
        rounds.append(loss)
        xs.append(x)
    for r in range(3):
        learner = sum(0.5 * sum(l.h[r, i] * x[r, i] ** 2 for i in range(4)) - sum(l.b[r, i] * x[r, i] for i in range(4))
                      + l.c[r] for l, x in zip(rounds, xs))
        H = sum(l.h[r] for l in rounds)
        B = sum(l.b[r] for l in rounds)
        C = sum(l.c[r] for l in rounds)
        u = ball_quadratic_argmin(H.unsqueeze(0), B.unsqueeze(0), 1.0)[0]
        best = 0.5 * (H * u * u).sum() - (B * u).sum() + C
        # the comparator beats every point the learner played, held fixed over all rounds
        for x in xs:
            fixed = sum(l.value(x)[r] for l in rounds)
            assert best <= fixed + 1e-9
        torch.testing.assert_close(tracker.regret()[r], learner - best)


def test_sea_quantities():
    env = SEAQuadratic(2, 5, sigma=torch.tensor([0.0, 0.7]), adversarial=0.3, switch_every=torch.tensor([1.0, 2.0]))
    assert torch.equal(env.sign(1), torch.tensor([1.0, 1.0], dtype=torch.float64))
    assert torch.equal(env.sign(2), torch.tensor([-1.0, 1.0], dtype=torch.float64))
    assert torch.equal(env.sign(3), torch.tensor([1.0, -1.0], dtype=torch.float64))
    torch.testing.assert_close(env.adversarial_variation(2), torch.tensor([4 * 0.09, 0.0], dtype=torch.float64))
    torch.testing.assert_close(env.adversarial_variation(1), torch.zeros(2, dtype=torch.float64))
    # the expected loss is the mean of the drawn losses; the noise has E||eps||^2 = sigma^2
    draws = torch.stack([env.loss(1).b for _ in range(5000)])
    torch.testing.assert_close(draws.mean(0), env.mean_loss(1).b, atol=0.03, rtol=0)
    var = ((draws - env.mean_loss(1).b) ** 2).sum(-1).mean(0)
    torch.testing.assert_close(var, torch.tensor([0.0, 0.49], dtype=torch.float64), atol=0.04, rtol=0)
    # Sigma_t^2 = sup_x ||grad F_t(x) - grad F_{t-1}(x)||^2 (the difference does not depend on x)
    x = torch.randn(2, 5, dtype=torch.float64)
    diff = env.mean_loss(2).grad(x) - env.mean_loss(1).grad(x)
    torch.testing.assert_close((diff ** 2).sum(-1), env.adversarial_variation(2))
    assert env.gradient_bound().shape == (2,) and bool((env.gradient_bound() > 1.0).all())


def test_stationary_noise_free_stream_is_one_loss():
    env = SEAQuadratic(4, 6, generator=0)
    a, b = env.loss(1), env.loss(57)
    assert torch.equal(a.b, b.b) and torch.equal(a.c, b.c)


def test_play_records_checkpoints_and_sea_sums():
    class Still:                       # a learner that never moves: plays 0
        def predict(self):
            return torch.zeros(5, 3, dtype=torch.float64)

        def update(self, grad):
            pass

    env = SEAQuadratic(5, 3, sigma=0.2, adversarial=0.1, switch_every=1.0, generator=4)
    res = play(Still(), env, 40, checkpoints=[10, 40])
    assert res.regret.shape == (5, 2) and res.checkpoints == [10, 40]
    torch.testing.assert_close(res.sigma2[:, 1], torch.full((5,), 40 * 0.04, dtype=torch.float64))
    torch.testing.assert_close(res.Sigma2[:, 1], torch.full((5,), 39 * 4 * 0.01, dtype=torch.float64))
    assert bool((res.regret >= -1e-12).all())   # regret against the best fixed point: playing a fixed point is >= 0
    with pytest.raises(ValueError, match="checkpoints"):
        play(Still(), env, 10, checkpoints=[11])


def test_mean_ci():
    x = torch.tensor([[1.0, 2.0], [3.0, 2.0], [5.0, 2.0]], dtype=torch.float64)
    m, lo, hi = mean_ci(x)
    torch.testing.assert_close(m, torch.tensor([3.0, 2.0], dtype=torch.float64))
    half = 1.959963984540054 * 2.0 / math.sqrt(3)
    torch.testing.assert_close(hi - m, torch.tensor([half, 0.0], dtype=torch.float64))
    assert torch.allclose(m - lo, hi - m)
    m2, _, _ = mean_ci(np.array([[1.0], [2.0]]))
    assert float(m2) == 1.5
    with pytest.raises(ValueError, match="at least 2"):
        mean_ci(torch.ones(1, 3))
    with pytest.raises(ValueError, match="level"):
        mean_ci(x, level=1.5)


def test_bad_input():
    with pytest.raises(ValueError, match="sigma"):
        SEAQuadratic(3, 2, sigma=-1.0)
    with pytest.raises(ValueError, match="sigma"):
        SEAQuadratic(3, 2, sigma=torch.ones(4))
    with pytest.raises(ValueError, match="switch_every"):
        SEAQuadratic(3, 2, switch_every=0.5)
    with pytest.raises(ValueError, match="adversarial"):
        SEAQuadratic(3, 2, adversarial=float("nan"))
    with pytest.raises(ValueError, match="runs"):
        SEAQuadratic(0, 2)
    with pytest.raises(ValueError, match="rounds start"):
        SEAQuadratic(1, 2).sign(0)
    with pytest.raises(ValueError, match="shape"):
        RegretTracker(2, 3).update(torch.zeros(3, 2, dtype=torch.float64),
                                   QuadraticLoss(torch.zeros(3), torch.zeros(2, 3), torch.zeros(2)))
    with pytest.raises(ValueError, match="no round"):
        RegretTracker(2, 3).regret()
    with pytest.raises(ValueError, match="non-negative"):
        ball_quadratic_argmin(-torch.ones(1, 2), torch.ones(1, 2))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    res = {}
    for dev in ("cpu", "cuda"):
        env = SEAQuadratic(6, 4, sigma=0.3, adversarial=0.2, generator=torch.Generator().manual_seed(5), device=dev)
        tracker = RegretTracker(6, 4, device=dev)
        x = torch.zeros(6, 4, dtype=torch.float64, device=dev)
        for t in range(1, 30):
            loss = env.loss(t)
            tracker.update(x, loss)
            x = project_ball(x - 0.2 * loss.grad(x), 1.0)
        res[dev] = tracker.regret()
    assert res["cuda"].device.type == "cuda"
    torch.testing.assert_close(res["cuda"].cpu(), res["cpu"])
