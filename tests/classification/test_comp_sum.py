import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

from lossbook.classification.comp_sum import (CompSumLoss, adv_comp_sum_loss, comp_sum_gamma, comp_sum_loss,
                                              comp_sum_T, conditional_regret, pgd_linf, trades_loss,
                                              zero_one_regret)

TAUS = [0.0, 0.5, 1.0, 1.5, 2.0]


def reference(logits, target, tau):
    """Loop-based float64 transcription: Phi_tau(sum_{y' != y} exp(h_y' - h_y))."""
    out = []
    for h, y in zip(logits.tolist(), target.tolist()):
        u = sum(math.exp(h[k] - h[y]) for k in range(len(h)) if k != y)
        out.append(math.log1p(u) if tau == 1.0 else ((1 + u) ** (1 - tau) - 1) / (1 - tau))
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("tau", TAUS + [0.9, 1.1, 1.99])
def test_matches_the_equation(tau):
    g = torch.Generator().manual_seed(0)
    z = 3 * torch.randn(32, 7, generator=g, dtype=torch.float64)
    y = torch.randint(0, 7, (32,), generator=g)
    got = comp_sum_loss(z, y, tau=tau, reduction="none")
    torch.testing.assert_close(got, reference(z, y, tau), rtol=1e-10, atol=1e-12)


def test_special_members():
    g = torch.Generator().manual_seed(1)
    z = torch.randn(64, 10, generator=g, dtype=torch.float64)
    y = torch.randint(0, 10, (64,), generator=g)
    p_y = z.softmax(1).gather(1, y[:, None]).squeeze(1)
    torch.testing.assert_close(comp_sum_loss(z, y, tau=1.0), F.cross_entropy(z, y))
    sum_exp = (z - z.gather(1, y[:, None])).exp().sum(1) - 1
    torch.testing.assert_close(comp_sum_loss(z, y, tau=0.0, reduction="none"), sum_exp)
    torch.testing.assert_close(comp_sum_loss(z, y, tau=1.5, reduction="none"), (1 - p_y.sqrt()) / 0.5)  # GCE q=.5
    torch.testing.assert_close(comp_sum_loss(z, y, tau=2.0, reduction="none"), 1 - p_y)  # MAE
    assert torch.equal(CompSumLoss(1.5, "sum")(z, y), comp_sum_loss(z, y, tau=1.5, reduction="sum"))


@pytest.mark.parametrize("tau", TAUS)
def test_gradcheck(tau):
    g = torch.Generator().manual_seed(2)
    z = torch.randn(5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 4, (5,), generator=g)
    assert torch.autograd.gradcheck(lambda t: comp_sum_loss(t, y, tau=tau), (z,))


@settings(max_examples=40, deadline=None)
@given(tau=st.floats(0, 2), shift=st.floats(-50, 50), seed=st.integers(0, 2**16))
def test_shift_invariant_and_nonnegative(tau, shift, seed):
    g = torch.Generator().manual_seed(seed)
    z = 2 * torch.randn(6, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 5, (6,), generator=g)
    a = comp_sum_loss(z, y, tau=tau, reduction="none")
    torch.testing.assert_close(comp_sum_loss(z + shift, y, tau=tau, reduction="none"), a, rtol=1e-8, atol=1e-10)
    assert (a >= 0).all()


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**16))
def test_loss_decreases_in_tau(seed):
    # Phi^tau(u) is non-increasing in tau for every u >= 0
    g = torch.Generator().manual_seed(seed)
    z = 2 * torch.randn(8, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 4, (8,), generator=g)
    vals = torch.stack([comp_sum_loss(z, y, tau=t, reduction="none") for t in (0.0, 0.5, 1.0, 1.5, 2.0)])
    assert (vals[:-1] >= vals[1:] - 1e-12).all()


@pytest.mark.parametrize("tau", TAUS)
@pytest.mark.parametrize("n", [2, 5, 10])
def test_bound_holds_on_random_draws(tau, n):
    g = torch.Generator().manual_seed(n)
    p = torch.distributions.Dirichlet(torch.full((n,), 0.3, dtype=torch.float64)).sample((4000,))
    h = 3 * torch.randn(4000, n, generator=g, dtype=torch.float64)
    d01, dl = zero_one_regret(p, h), conditional_regret(p, h, tau)
    assert (d01 <= comp_sum_gamma(dl, tau, n) + 1e-9).all()


@pytest.mark.parametrize("tau", [0.0, 0.5, 1.0])
def test_bound_is_attained_on_the_two_class_worst_case(tau):
    t = torch.linspace(0.05, 0.95, 19, dtype=torch.float64)
    p = torch.zeros(19, 5, dtype=torch.float64)
    p[:, 0], p[:, 1] = (1 + t) / 2, (1 - t) / 2
    h = torch.full((19, 5), -60.0, dtype=torch.float64)
    h[:, 0], h[:, 1] = 0.0, 1e-9  # a near tie, decided for the wrong class
    torch.testing.assert_close(conditional_regret(p, h, tau), comp_sum_T(t, tau, 5), atol=1e-7, rtol=1e-6)


def test_gamma_inverts_T_and_known_values():
    eps = torch.linspace(0, 0.3, 31, dtype=torch.float64)
    for tau in TAUS:
        n = 4
        t = comp_sum_gamma(eps, tau, n)
        inside = eps < comp_sum_T(torch.tensor(1.0), tau, n)
        torch.testing.assert_close(comp_sum_T(t, tau, n)[inside], eps[inside], atol=1e-12, rtol=0)
    # cross-entropy: T_1(t) ~ t^2 / 2 near 0, so Gamma_1(eps) ~ sqrt(2 eps)
    assert comp_sum_gamma(torch.tensor(1e-6), 1.0, 3).item() == pytest.approx(math.sqrt(2e-6), rel=1e-3)
    assert comp_sum_gamma(torch.tensor(0.01), 2.0, 10).item() == pytest.approx(0.1)


@pytest.mark.parametrize("tau", TAUS)
def test_extreme_logits_stay_finite(tau):
    g = torch.Generator().manual_seed(3)
    z = (1e4 * torch.randn(16, 6, generator=g)).requires_grad_()
    y = torch.randint(0, 6, (16,), generator=g)
    loss = comp_sum_loss(z, y, tau=tau)
    (grad,) = torch.autograd.grad(loss, z)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()


def test_bf16_autocast():
    z = torch.randn(8, 5)
    y = torch.randint(0, 5, (8,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = comp_sum_loss(z.bfloat16(), y, tau=1.5)
    assert torch.isfinite(out) and abs(out.float().item() - comp_sum_loss(z, y, tau=1.5).item()) < 0.05


@pytest.mark.parametrize("kwargs,match", [
    ({"tau": -0.5}, "tau"), ({"tau": float("nan")}, "tau"), ({"reduction": "avg"}, "reduction"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        comp_sum_loss(torch.zeros(2, 3), torch.tensor([0, 1]), **kwargs)


def test_bad_shapes_and_targets():
    with pytest.raises(ValueError, match="logits"):
        comp_sum_loss(torch.zeros(3), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="target"):
        comp_sum_loss(torch.zeros(2, 3), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="target"):
        comp_sum_loss(torch.zeros(2, 3), torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="target"):
        comp_sum_loss(torch.zeros(2, 3), torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="same shape"):
        conditional_regret(torch.ones(2, 3) / 3, torch.zeros(2, 4), 1.0)
    with pytest.raises(ValueError, match="tau"):
        comp_sum_T(torch.tensor(0.5), 2.5, 3)


def test_pgd_stays_in_the_ball_and_increases_the_objective():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3))
    x = torch.rand(8, 1, 4, 4)
    y = torch.randint(0, 3, (8,))
    obj = lambda out: F.cross_entropy(out, y, reduction="none")  # noqa: E731
    x_adv = pgd_linf(model, x, obj, eps=0.1, alpha=0.03, steps=10, generator=torch.Generator().manual_seed(0))
    assert (x_adv - x).abs().max() <= 0.1 + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
    assert obj(model(x_adv)).mean() > obj(model(x)).mean()
    with pytest.raises(ValueError, match="eps"):
        pgd_linf(model, x, obj, eps=0.0, alpha=0.1, steps=1)


def test_adversarial_losses_train_a_model():
    torch.manual_seed(0)
    x = torch.rand(64, 1, 4, 4)
    y = (x.mean((1, 2, 3)) > 0.5).long()
    for loss_fn in (lambda m: adv_comp_sum_loss(m, x, y, tau=1.0, nu=0.5, eps=0.05, alpha=0.02, steps=3),
                    lambda m: trades_loss(m, x, y, eps=0.05, alpha=0.02, steps=3, beta=1.0)):
        model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 2))
        opt = torch.optim.Adam(model.parameters(), lr=0.05)
        first = loss_fn(model).item()
        for _ in range(60):
            loss = loss_fn(model)
            opt.zero_grad()
            loss.backward()
            opt.step()
        assert loss.item() < first


@pytest.mark.parametrize("tau", [0.5, 1.5])
def test_tiny_training_learns(tau):
    torch.manual_seed(0)
    x = torch.randn(200, 2)
    y = (x[:, 0] + x[:, 1] > 0).long() + (x[:, 0] > 1).long()
    model = torch.nn.Sequential(torch.nn.Linear(2, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(200):
        loss = comp_sum_loss(model(x), y, tau=tau)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert (model(x).argmax(1) == y).float().mean() > 0.9


@pytest.mark.gpu
@pytest.mark.parametrize("tau", TAUS)
def test_cuda_matches_cpu(tau):
    z = torch.randn(128, 10, dtype=torch.float64)
    y = torch.randint(0, 10, (128,))
    zc = z.cuda().requires_grad_()
    zz = z.clone().requires_grad_()
    a, b = comp_sum_loss(zz, y, tau=tau), comp_sum_loss(zc, y.cuda(), tau=tau)
    a.backward()
    b.backward()
    torch.testing.assert_close(b.cpu(), a)
    torch.testing.assert_close(zc.grad.cpu(), zz.grad)
