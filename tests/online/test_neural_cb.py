import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from lossbook.online.neural_cb import (ClassificationBandit, LinUCB, NeuralCB, fastcb_probs, igw_probs,
                                       load_bandit_data, run_bandit, sample_actions)


def igw_reference(yhat, gamma):
    """Loop transcription of SquareCB's inverse-gap weighting (rewards), plain floats."""
    K = len(yhat)
    b = max(range(K), key=lambda a: yhat[a])
    p = [0.0 if a == b else 1.0 / (K + gamma * (yhat[b] - yhat[a])) for a in range(K)]
    p[b] = 1.0 - sum(p)
    return p


def fastcb_reference(lhat, gamma):
    """Loop transcription of FastCB's weighting (losses), plain floats."""
    K = len(lhat)
    b = min(range(K), key=lambda a: lhat[a])
    p = [0.0 if a == b else lhat[b] / (K * lhat[b] + gamma * (lhat[a] - lhat[b])) for a in range(K)]
    p[b] = 1.0 - sum(p)
    return p


def test_probs_match_loop_reference():
    g = torch.Generator().manual_seed(0)
    preds = torch.rand(20, 7, generator=g, dtype=torch.float64)
    gammas = torch.rand(20, generator=g, dtype=torch.float64) * 50
    ref_igw = torch.tensor([igw_reference(p.tolist(), float(c)) for p, c in zip(preds, gammas)], dtype=torch.float64)
    ref_fast = torch.tensor([fastcb_reference(p.tolist(), float(c)) for p, c in zip(preds, gammas)], dtype=torch.float64)
    torch.testing.assert_close(igw_probs(preds, gammas), ref_igw, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(fastcb_probs(preds, gammas), ref_fast, rtol=1e-12, atol=1e-14)


def test_special_cases():
    y = torch.tensor([[0.2, 0.9, 0.5]], dtype=torch.float64)
    torch.testing.assert_close(igw_probs(y, 0.0), torch.full((1, 3), 1 / 3, dtype=torch.float64))   # gamma 0: uniform
    torch.testing.assert_close(igw_probs(y, 1e12), torch.tensor([[0.0, 1.0, 0.0]], dtype=torch.float64), atol=1e-10, rtol=0)
    eq = torch.full((2, 4), 0.3, dtype=torch.float64)                                              # ties: uniform
    torch.testing.assert_close(fastcb_probs(eq, 100.0), torch.full((2, 4), 0.25, dtype=torch.float64))
    # a perfect best arm (loss 0): FastCB stops exploring, whatever gamma
    p = fastcb_probs(torch.tensor([[0.0, 0.5, 1.0]], dtype=torch.float64), 1.0, floor=1e-12)
    assert float(p[0, 0]) > 1 - 1e-10


def test_gradcheck_of_probs():
    y = torch.tensor([[0.1, 0.7, 0.4], [0.9, 0.2, 0.3]], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: igw_probs(t, 5.0), (y,))
    assert torch.autograd.gradcheck(lambda t: fastcb_probs(t, 5.0), (y,))


def test_manual_backprop_matches_autograd():
    agent = NeuralCB(3, 5, 4, width=7, generator=1, dtype=torch.float64)
    x = torch.randn(3, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    a = torch.tensor([0, 3, 1])
    W, c, v = (t.clone().requires_grad_() for t in (agent.W, agent.c, agent.v))
    pre = torch.einsum("rkdm,rd->rkm", W, x) + c.unsqueeze(1)
    f = torch.einsum("rkm,rm->rk", pre.relu(), v) / math.sqrt(agent.m)
    f[torch.arange(3), a].sum().backward()
    gW, gc, gv = agent.gradients(x, agent.forward(x)[1], a)
    torch.testing.assert_close(gW, W.grad[torch.arange(3), a])
    torch.testing.assert_close(gc, c.grad)
    torch.testing.assert_close(gv, v.grad)


@pytest.mark.parametrize("loss", ["square", "kl"])
def test_update_is_a_gradient_step_on_the_chosen_arm(loss):
    agent = NeuralCB(2, 3, 3, width=5, loss=loss, explore="igw", lr=1e-3, generator=0, dtype=torch.float64)
    x = torch.randn(2, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    a, r = torch.tensor([2, 0]), torch.tensor([1.0, 0.0], dtype=torch.float64)
    agent.probs(x)
    before = agent.update(a, r)
    f = agent.forward(x)[0][torch.arange(2), a]
    after = 0.5 * (f - r) ** 2 if loss == "square" else torch.nn.functional.binary_cross_entropy_with_logits(f, r, reduction="none")
    assert bool((after < before).all())
    other = [1, 2]                                       # arms not chosen keep their first-layer block
    W0 = NeuralCB(2, 3, 3, width=5, loss=loss, generator=0, dtype=torch.float64).W
    torch.testing.assert_close(agent.W[0, :2], W0[0, :2])
    torch.testing.assert_close(agent.W[1, other], W0[1, other])


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(0, 1), min_size=2, max_size=8), st.floats(0, 1e4))
def test_probs_are_distributions_favouring_the_greedy_arm(vals, gamma):
    y = torch.tensor([vals], dtype=torch.float64)
    for p, best in ((igw_probs(y, gamma), y.argmax()), (fastcb_probs(y, gamma), y.argmin())):
        assert bool((p >= -1e-12).all()) and abs(float(p.sum()) - 1) < 1e-9
        assert float(p[0, best]) >= float(p.max()) - 1e-12


def test_sampling_follows_probs():
    p = torch.tensor([[0.2, 0.5, 0.3]]).expand(20000, 3)
    a = sample_actions(p, torch.Generator().manual_seed(0))
    freq = torch.bincount(a, minlength=3).float() / len(a)
    torch.testing.assert_close(freq, torch.tensor([0.2, 0.5, 0.3]), atol=0.015, rtol=0)


def test_linucb_ridge_inverse():
    agent = LinUCB(1, 3, 2, ridge=0.5, dtype=torch.float64)
    xs = torch.randn(6, 1, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    A = 0.5 * torch.eye(3, dtype=torch.float64)
    for x in xs:
        agent.probs(x)
        agent.update(torch.tensor([1]), torch.tensor([1.0]))
        A = A + x.T @ x
    torch.testing.assert_close(agent.Ainv[0, 1], torch.linalg.inv(A))
    torch.testing.assert_close(agent.b[0, 1], xs.sum(0)[0])


def test_bad_input():
    with pytest.raises(ValueError, match="gamma"):
        igw_probs(torch.rand(2, 3), -1.0)
    with pytest.raises(ValueError, match="finite"):
        igw_probs(torch.tensor([[0.0, float("nan")]]), 1.0)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        fastcb_probs(torch.tensor([[0.2, 1.5]]), 1.0)
    with pytest.raises(ValueError, match="loss"):
        NeuralCB(2, 3, 2, loss="hinge")
    with pytest.raises(ValueError, match="fastcb"):
        NeuralCB(2, 3, 2, loss="square", explore="fastcb")
    with pytest.raises(ValueError, match="eps"):
        NeuralCB(2, 3, 2, explore="eps_greedy", eps=1.5)
    with pytest.raises(ValueError, match="gamma"):
        NeuralCB(2, 3, 2, gamma=torch.ones(3))
    with pytest.raises(ValueError, match="probs"):
        NeuralCB(2, 3, 2).update(torch.zeros(2, dtype=torch.long), torch.zeros(2))
    with pytest.raises(ValueError, match="X must be"):
        ClassificationBandit(torch.zeros(5, 2), torch.zeros(4, dtype=torch.long), runs=2, horizon=3)
    with pytest.raises(ValueError, match="name"):
        load_bandit_data("mnist")


def test_learns_on_iris():
    """Three arms: random play makes 2/3 mistakes; NeuFastCB makes far fewer in its last 200 rounds."""
    X, y = load_bandit_data("iris")
    env = ClassificationBandit(X, y, runs=8, horizon=600, generator=0)
    agent = NeuralCB(8, X.shape[1], 3, width=32, loss="kl", explore="fastcb", gamma=10.0, perturb=0.1, lr=1.0, generator=0)
    mistakes = run_bandit(env, agent, generator=1)
    assert float(mistakes[:, -200:].mean()) < 0.2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_runs_and_learns():
    X, y = load_bandit_data("iris")
    X, y = X.cuda(), y.cuda()
    env = ClassificationBandit(X, y, runs=16, horizon=600, generator=0)
    agent = NeuralCB(16, X.shape[1], 3, width=32, loss="kl", explore="fastcb", gamma=10.0, perturb=0.1, lr=1.0,
                     generator=torch.Generator("cuda").manual_seed(0), device="cuda")
    mistakes = run_bandit(env, agent, generator=torch.Generator("cuda").manual_seed(1))
    assert mistakes.device.type == "cuda" and float(mistakes[:, -200:].mean()) < 0.2
    lin = LinUCB(16, X.shape[1], 3, device="cuda")
    assert float(run_bandit(env, lin, generator=torch.Generator("cuda").manual_seed(1))[:, -200:].mean()) < 0.3


def test_repeats_pair_configurations_by_seed():
    X, y = load_bandit_data("iris")
    env = ClassificationBandit(X, y, runs=6, horizon=20, repeats=3, generator=0)
    torch.testing.assert_close(env.order[:2], env.order[2:4])
    torch.testing.assert_close(env.order[:2], env.order[4:])
    agent = NeuralCB(6, 4, 3, width=5, repeats=3, generator=0)
    torch.testing.assert_close(agent.W[:2], agent.W[4:])
    assert not torch.equal(agent.W[0], agent.W[1])
    with pytest.raises(ValueError, match="repeats"):
        NeuralCB(6, 4, 3, repeats=4)


def test_exploration_probability_is_recorded():
    X, y = load_bandit_data("iris")
    env = ClassificationBandit(X, y, runs=4, horizon=30, generator=0)
    agent = NeuralCB(4, 4, 3, width=8, explore="eps_greedy", eps=0.3, generator=0)
    mistakes, explore = run_bandit(env, agent, return_exploration=True)
    assert mistakes.shape == explore.shape == (4, 30)
    torch.testing.assert_close(explore, torch.full_like(explore, 0.3 * 2 / 3))
