import pytest
import torch
from hypothesis import given, settings, strategies as st

from lossbook.online.adv_linear_mdp import (LayeredMDP, best_fixed_policy_loss, exp_weights, logbarrier_ftrl,
                                            occupancy, q_estimate, run_policy_optimization)


def test_logbarrier_matches_closed_form_and_is_optimal():
    L = torch.tensor([[0.0, 1.0, -3.0, 2.0]], dtype=torch.float64)
    p = logbarrier_ftrl(L, 0.7)
    assert torch.allclose(p.sum(-1), torch.ones(1, dtype=torch.float64))
    lam = 1 / (0.7 * p) - L                      # KKT: 1/(eta p_a) - L_a is the same for every a
    assert torch.allclose(lam, lam[:, :1].expand_as(lam), atol=1e-9)


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 10_000), st.floats(0.01, 10.0))
def test_property_logbarrier_on_simplex_and_orders_losses(seed, eta):
    L = torch.randn(5, 6, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 50
    p = logbarrier_ftrl(L, eta)
    assert bool((p > 0).all()) and torch.allclose(p.sum(-1), torch.ones(5, dtype=torch.float64))
    i = L.argsort(-1)
    assert bool((p.gather(-1, i).diff(dim=-1) <= 1e-12).all())   # smaller loss -> larger probability


def test_exp_weights_special_cases():
    L = torch.randn(3, 4, dtype=torch.float64)
    assert torch.allclose(exp_weights(L, 1.0, 1.0), torch.full((3, 4), 0.25, dtype=torch.float64))
    assert torch.allclose(exp_weights(L, 1.0), torch.softmax(-L, -1))


def test_occupancy_and_best_policy_against_loop_reference():
    mdp = LayeredMDP(3, 2, 2, seed=1)
    loss = mdp.losses(5).sum(0)
    best = float("inf")
    for code in range(2 ** (3 * 2)):             # every deterministic policy, float64 loop
        pi = torch.zeros(3, 2, 2, dtype=torch.float64)
        for h in range(3):
            for s in range(2):
                pi[h, s, (code >> (2 * h + s)) & 1] = 1.0
        best = min(best, float((occupancy(mdp, pi) * loss).sum()))
    assert abs(float(best_fixed_policy_loss(mdp, loss)) - best) < 1e-10
    q = occupancy(mdp, torch.full((3, 2, 2), 0.5, dtype=torch.float64))
    assert torch.allclose(q.sum((-2, -1)), torch.ones(3, dtype=torch.float64))


def test_estimator_is_unbiased():
    mdp = LayeredMDP(3, 2, 3, seed=2)
    pi = torch.softmax(torch.randn(3, 2, 3, dtype=torch.float64), -1)
    loss = mdp.losses(1)[0]
    q = occupancy(mdp, pi)
    R = 40_000
    Qh = q_estimate(mdp, pi.expand(R, 3, 2, 3).contiguous(), loss, q.expand(R, 3, 2, 3), torch.Generator().manual_seed(0))
    Q = torch.zeros(3, 2, 3, dtype=torch.float64)              # true Q by backward recursion
    V = torch.zeros(2, dtype=torch.float64)
    for h in reversed(range(3)):
        Q[h] = loss[h] + mdp.P[h] @ V
        V = (pi[h] * Q[h]).sum(-1)
    assert torch.allclose(Qh.mean(0), Q, atol=0.15)


def test_bad_input():
    with pytest.raises(ValueError):
        logbarrier_ftrl(torch.zeros(2, 3), -1.0)
    with pytest.raises(ValueError):
        exp_weights(torch.zeros(2, 3), 1.0, 2.0)
    with pytest.raises(ValueError):
        LayeredMDP(3, 2, 1)
    with pytest.raises(ValueError):
        run_policy_optimization(LayeredMDP(2, 2, 2), [10], method="sgd")
    with pytest.raises(ValueError):
        run_policy_optimization(LayeredMDP(2, 2, 2), [0])


def test_learns_sublinear_regret():
    mdp = LayeredMDP(3, 2, 3, seed=0)
    r = run_policy_optimization(mdp, [50, 400], seeds=2)
    assert bool((r[:, 1] / 400 < r[:, 0] / 50).all())          # average regret falls


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    L = torch.randn(4, 5, dtype=torch.float64)
    assert torch.allclose(logbarrier_ftrl(L.cuda(), 0.5).cpu(), logbarrier_ftrl(L, 0.5))


def test_batched_methods_match_single_method_shapes_and_regret_is_nonnegative_on_average():
    mdp = LayeredMDP(3, 2, 3, seed=0)
    both = run_policy_optimization(mdp, [20, 40], method=("logbarrier", "expweights"), seeds=3)
    assert both.shape == (2, 3, 2)
    one = run_policy_optimization(mdp, [20, 40], method="expweights", seeds=3)
    assert one.shape == (3, 2)
    assert float(both.mean()) > -1.0      # the comparator is the best policy in hindsight


def test_common_random_numbers_shape_checked():
    mdp = LayeredMDP(2, 2, 2)
    pi = torch.full((3, 2, 2, 2), 0.5, dtype=torch.float64)
    q = occupancy(mdp, pi)
    with pytest.raises(ValueError):
        q_estimate(mdp, pi, mdp.losses(1)[0], q, u=torch.rand(3, 2, 1, dtype=torch.float64))
