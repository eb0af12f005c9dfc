import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

from lossbook.classification.ensloss import (EnsLoss, ensloss, is_calibrated_derivative, margin_loss, margins,
                                             sample_calibrated_derivatives)


def reference(s, z, lam):
    """Loop-based float64 transcription of the sampler, given the normal draws z."""
    s, z = s.tolist(), z.tolist()
    g = sorted(-(math.exp(v) if lam == 0 else max(1 + lam * v, 0.0) ** (1 / lam)) for v in z)
    g = [max(v, -1.0) for v in g]
    order = sorted(range(len(s)), key=lambda i: s[i])
    out = [0.0] * len(s)
    for rank, i in enumerate(order):
        out[i] = g[rank]
    out = [v / s[i] if s[i] > 1 else v for i, v in enumerate(out)]
    return torch.tensor([v - 1e-6 for v in out], dtype=torch.float64)


@pytest.mark.parametrize("lam", [0.0, 0.5, 1.0])
def test_sampler_matches_reference(lam):
    g = torch.Generator().manual_seed(0)
    s = 2 * torch.randn(50, generator=g, dtype=torch.float64)
    z = torch.randn(50, generator=g, dtype=torch.float64)
    torch.testing.assert_close(sample_calibrated_derivatives(s, boxcox_lambda=lam, z=z), reference(s, z, lam))


def test_convex_calibrated_over_many_batches():
    g = torch.Generator().manual_seed(1)
    s = 3 * torch.randn(2000, 64, generator=g)
    gs = torch.stack([sample_calibrated_derivatives(row, generator=g) for row in s])
    ok = is_calibrated_derivative(s, gs)
    assert ok.shape == (2000,) and ok.all()
    assert (gs >= -1 - 1e-6).all()


def test_checker_rejects_non_monotone_or_nonnegative():
    s = torch.tensor([0.0, 1.0, 2.0])
    assert not is_calibrated_derivative(s, torch.tensor([-0.1, -0.5, -0.01]))
    assert not is_calibrated_derivative(s, torch.tensor([-0.5, -0.1, 0.0]))
    assert is_calibrated_derivative(s, torch.tensor([-0.5, -0.1, -0.01]))


@settings(max_examples=50, deadline=None)
@given(seed=st.integers(0, 2**16), b=st.integers(1, 40), lam=st.sampled_from([0.0, 0.3, 1.0]))
def test_property_cc_for_any_batch(seed, b, lam):
    g = torch.Generator().manual_seed(seed)
    s = 5 * torch.randn(b, generator=g, dtype=torch.float64)
    assert is_calibrated_derivative(s, sample_calibrated_derivatives(s, boxcox_lambda=lam, generator=g))


def test_surrogate_gradient_is_g_over_b():
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    f = torch.randn(16, dtype=torch.float64, requires_grad=True)
    y = (torch.arange(16) % 2).double()
    ensloss(f, y, generator=g1).backward()
    s = margins(f.detach(), y)
    expected = sample_calibrated_derivatives(s, generator=g2) * (2 * y - 1) / 16
    torch.testing.assert_close(f.grad, expected)


def test_module_and_reductions():
    f, y = torch.randn(8, 1), torch.randint(0, 2, (8,))
    a = EnsLoss(generator=torch.Generator().manual_seed(0), reduction="sum")(f, y)
    b = ensloss(f, y, generator=torch.Generator().manual_seed(0), reduction="sum")
    assert torch.equal(a, b)
    assert ensloss(f, y, reduction="none").shape == (8,)


def test_margin_losses_match_definitions():
    f = torch.randn(32, dtype=torch.float64)
    y = torch.randint(0, 2, (32,)).double()
    s = f * (2 * y - 1)
    torch.testing.assert_close(margin_loss(f, y, "logistic"), F.binary_cross_entropy_with_logits(f, y))
    torch.testing.assert_close(margin_loss(f, y, "hinge", reduction="none"), (1 - s).clamp(min=0))
    torch.testing.assert_close(margin_loss(f, y, "squared_hinge", reduction="none"), (1 - s).clamp(min=0) ** 2)
    torch.testing.assert_close(margin_loss(f, y, "exponential", reduction="none"), torch.exp(-s))


@pytest.mark.parametrize("kind", ["logistic", "squared_hinge", "exponential"])
def test_gradcheck(kind):
    f = torch.randn(6, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 1, 1, 0, 1, 0.0], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda t: margin_loss(t, y, kind), (f,))


@pytest.mark.parametrize("fn", [lambda f, y: ensloss(f, y), lambda f, y: margin_loss(f, y, "logistic"),
                                lambda f, y: margin_loss(f, y, "exponential"), lambda f, y: margin_loss(f, y, "hinge")])
def test_extreme_scores_stay_finite(fn):
    f = (1e4 * torch.randn(64)).requires_grad_()
    y = torch.randint(0, 2, (64,))
    loss = fn(f, y)
    (grad,) = torch.autograd.grad(loss, f)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()


def test_bad_input():
    with pytest.raises(ValueError, match="logits"):
        ensloss(torch.zeros(4, 2), torch.zeros(4))
    with pytest.raises(ValueError, match="target"):
        ensloss(torch.zeros(4), torch.zeros(3))
    with pytest.raises(ValueError, match="binary"):
        ensloss(torch.zeros(3), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="kind"):
        margin_loss(torch.zeros(2), torch.zeros(2), "savage")
    with pytest.raises(ValueError, match="reduction"):
        margin_loss(torch.zeros(2), torch.zeros(2), reduction="avg")
    with pytest.raises(ValueError, match="boxcox_lambda"):
        sample_calibrated_derivatives(torch.zeros(3), boxcox_lambda=-1.0)
    with pytest.raises(ValueError, match="z must"):
        sample_calibrated_derivatives(torch.zeros(3), z=torch.zeros(4))


def test_tiny_training_learns():
    torch.manual_seed(0)
    x = torch.randn(256, 2)
    y = (x[:, 0] - 0.5 * x[:, 1] > 0).long()
    model = torch.nn.Sequential(torch.nn.Linear(2, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    loss_fn = EnsLoss(generator=torch.Generator().manual_seed(0))
    for _ in range(150):
        idx = torch.randint(0, 256, (32,))
        loss = loss_fn(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert ((model(x).squeeze(1) > 0).long() == y).float().mean() > 0.95


@pytest.mark.gpu
def test_cuda_matches_cpu_given_the_same_draws():
    s = 2 * torch.randn(1000, dtype=torch.float64)
    z = torch.randn(1000, dtype=torch.float64)
    got = sample_calibrated_derivatives(s.cuda(), z=z.cuda())
    torch.testing.assert_close(got.cpu(), sample_calibrated_derivatives(s, z=z))
    f = torch.randn(64, 1, device="cuda", requires_grad=True)
    ensloss(f, torch.randint(0, 2, (64,), device="cuda"), generator=torch.Generator("cuda").manual_seed(0)).backward()
    assert f.grad.device.type == "cuda" and torch.isfinite(f.grad).all()
