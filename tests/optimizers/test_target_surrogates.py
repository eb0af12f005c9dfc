import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

from lossbook import data, models
from lossbook.optimizers.target_surrogates import SSO, CountingOracle, moved_target, target_surrogate

F64 = torch.float64


def surrogate_loop(out, z_t, grad, eta, reduction="mean"):
    """The paper's surrogate, less l(z_t), one example at a time in float64."""
    b = out.shape[0]
    total = 0.0
    for i in range(b):
        d = (out[i] - z_t[i]).reshape(-1).tolist()
        g = grad[i].reshape(-1).tolist()
        total += sum(gi * di for gi, di in zip(g, d))
        total += sum(di * di for di in d) / (2 * eta * (b if reduction == "mean" else 1))
    return total


def target_grad(loss_fn, z_t):
    zq = z_t.clone().requires_grad_(True)
    loss = loss_fn(zq)
    (g,) = torch.autograd.grad(loss, zq)
    return loss.detach(), g


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("shape", [(7,), (5, 3), (4, 2, 3)])
def test_matches_loop_reference(reduction, shape):
    gen = torch.Generator().manual_seed(0)
    out, z_t, g = (torch.randn(shape, generator=gen, dtype=F64) for _ in range(3))
    for eta in (0.1, 1.0, 7.5):
        ref = surrogate_loop(out, z_t, g, eta, reduction)
        assert abs(float(target_surrogate(out, z_t, g, eta, reduction=reduction)) - ref) < 1e-10


def test_zero_at_z_t_and_completed_square():
    gen = torch.Generator().manual_seed(1)
    z_t, g, out = (torch.randn(6, 4, generator=gen, dtype=F64) for _ in range(3))
    assert float(target_surrogate(z_t, z_t, g, 2.0)) == 0.0
    for reduction, scale in (("mean", 2.0 * 6), ("sum", 2.0)):
        zh = moved_target(z_t, g, 2.0, reduction=reduction)
        sq = lambda z: ((z - zh) ** 2).sum() / (2 * scale)   # noqa: E731
        torch.testing.assert_close(target_surrogate(out, z_t, g, 2.0, reduction=reduction), sq(out) - sq(z_t))
    # the surrogate's minimiser over free targets is the moved target
    assert float(target_surrogate(moved_target(z_t, g, 2.0), z_t, g, 2.0)) <= float(target_surrogate(out, z_t, g, 2.0))


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10_000), eta_frac=st.floats(0.05, 1.0), scale=st.floats(0.1, 20.0),
       kind=st.sampled_from(["logistic", "softmax", "squared"]))
def test_upper_bound_when_eta_at_most_one_over_beta(seed, eta_frac, scale, kind):
    gen = torch.Generator().manual_seed(seed)
    if kind == "logistic":
        y = torch.randint(2, (9,), generator=gen).to(F64)
        loss, beta, shape = (lambda z: F.binary_cross_entropy_with_logits(z, y)), 0.25, (9,)
    elif kind == "softmax":
        y = torch.randint(4, (9,), generator=gen)
        loss, beta, shape = (lambda z: F.cross_entropy(z, y)), 0.5, (9, 4)
    else:
        y = torch.randn(9, 2, generator=gen, dtype=F64)
        loss, beta, shape = (lambda z: 0.5 * ((z - y) ** 2).sum(1).mean()), 1.0, (9, 2)
    z_t = scale * torch.randn(shape, generator=gen, dtype=F64)
    z = z_t + scale * torch.randn(shape, generator=gen, dtype=F64)
    l_t, g = target_grad(loss, z_t)
    eta = eta_frac / beta
    assert float(loss(z)) <= float(l_t + target_surrogate(z, z_t, g, eta)) + 1e-10


def test_bound_can_fail_above_one_over_beta():
    y = torch.tensor([0.0, 1.0], dtype=F64)
    loss = lambda z: F.binary_cross_entropy_with_logits(z, y)   # noqa: E731
    z_t = torch.zeros(2, dtype=F64)                              # curvature 1/4 exactly here
    l_t, g = target_grad(loss, z_t)
    z = torch.tensor([0.1, -0.1], dtype=F64)
    assert float(loss(z)) > float(l_t + target_surrogate(z, z_t, g, 8.0))   # eta = 2 / beta


def test_gradient_at_theta_t_is_the_loss_gradient():
    gen = torch.Generator().manual_seed(2)
    x, y = torch.randn(12, 5, generator=gen, dtype=F64), torch.randint(3, (12,), generator=gen)
    torch.manual_seed(0)
    net = models.MLP(5, (7,), 3).to(F64)
    out = net(x)
    loss = F.cross_entropy(out, y)
    g_loss = torch.autograd.grad(loss, list(net.parameters()), retain_graph=True)
    _, g = target_grad(lambda z: F.cross_entropy(z, y), out.detach())
    g_sur = torch.autograd.grad(target_surrogate(out, out.detach(), g, 2.0), list(net.parameters()))
    for a, b in zip(g_loss, g_sur):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_gradcheck():
    gen = torch.Generator().manual_seed(3)
    out = torch.randn(4, 3, generator=gen, dtype=F64, requires_grad=True)
    z_t, g = torch.randn(4, 3, generator=gen, dtype=F64), torch.randn(4, 3, generator=gen, dtype=F64)
    assert torch.autograd.gradcheck(lambda o: target_surrogate(o, z_t, g, 0.7), (out,))
    assert torch.autograd.gradgradcheck(lambda o: target_surrogate(o, z_t, g, 0.7, reduction="sum"), (out,))


def test_one_inner_sgd_step_is_an_sgd_step():
    gen = torch.Generator().manual_seed(4)
    x, y = torch.randn(16, 6, generator=gen, dtype=F64), torch.randint(4, (16,), generator=gen)
    torch.manual_seed(0)
    a = models.MLP(6, (8,), 4).to(F64)
    b = models.MLP(6, (8,), 4).to(F64)
    b.load_state_dict(a.state_dict())
    opt_a = SSO([{"params": a[1].parameters(), "inner_lr": 0.3}, {"params": a[3].parameters(), "inner_lr": 0.05}],
                eta=2.0, inner_steps=1, inner="sgd")
    opt_b = torch.optim.SGD([{"params": b[1].parameters(), "lr": 0.3}, {"params": b[3].parameters(), "lr": 0.05}])
    for _ in range(3):
        opt_a.step(lambda: a(x), lambda z: F.cross_entropy(z, y))
        opt_b.zero_grad()
        F.cross_entropy(b(x), y).backward()
        opt_b.step()
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)


def test_exact_inner_solve_is_the_target_space_projection():
    gen = torch.Generator().manual_seed(5)
    x, y = torch.randn(40, 4, generator=gen, dtype=F64), torch.randn(40, generator=gen, dtype=F64)
    lin = torch.nn.Linear(4, 1).to(F64)
    loss = lambda z: 0.5 * ((z - y) ** 2).mean()   # noqa: E731  beta = 1
    with torch.no_grad():
        z_t = lin(x).squeeze(-1)
    _, g = target_grad(loss, z_t)
    x1 = torch.cat([x, torch.ones(40, 1, dtype=F64)], 1)
    proj = torch.linalg.lstsq(x1, moved_target(z_t, g, 0.5).unsqueeze(1)).solution.squeeze(1)
    opt = SSO(lin.parameters(), eta=0.5, inner_steps=1,
              inner=lambda ps: torch.optim.LBFGS(ps, lr=1, max_iter=200, tolerance_grad=1e-13,
                                                 tolerance_change=1e-16, line_search_fn="strong_wolfe"))
    opt.step(lambda: lin(x).squeeze(-1), loss)
    torch.testing.assert_close(torch.cat([lin.weight.detach()[0], lin.bias.detach()]), proj, rtol=0, atol=1e-8)


def test_full_batch_majorization_minimization_is_monotone():
    d = data.load_sklearn("breast_cancer", seed=0)
    x, y = d.x_train.to(F64), d.y_train.to(F64)
    torch.manual_seed(0)
    lin = torch.nn.Linear(30, 1).to(F64)
    loss = lambda z: F.binary_cross_entropy_with_logits(z, y)   # noqa: E731
    opt = SSO(lin.parameters(), eta=4.0, inner_steps=5)
    losses = [float(opt.step(lambda: lin(x).squeeze(-1), loss)) for _ in range(15)]
    assert all(b <= a + 1e-12 for a, b in zip(losses, losses[1:]))
    assert losses[-1] < 0.5 * losses[0]


def test_counts_and_state_dict():
    gen = torch.Generator().manual_seed(6)
    x, y = torch.randn(10, 3, generator=gen), torch.randint(2, (10,), generator=gen)
    net = models.MLP(3, (4,), 2)
    oracle = CountingOracle(lambda z: F.cross_entropy(z, y))
    opt = SSO(net.parameters(), eta=2.0, inner_steps=4, inner="sgd", inner_lr=0.1)
    for _ in range(3):
        opt.step(lambda: net(x), oracle)
    assert (oracle.calls, oracle.samples) == (3, 30)
    assert opt.state["sso"] == dict(oracle_calls=3, inner_steps=12, forward=12, backward=12)
    opt2 = SSO(net.parameters(), eta=2.0, inner_steps=4)
    opt2.load_state_dict(opt.state_dict())
    assert opt2.state["sso"]["oracle_calls"] == 3
    opt_a = SSO(net.parameters(), eta=2.0, inner_steps=2)   # armijo: one forward per trial step, reused
    opt_a.step(lambda: net(x), oracle)
    assert opt_a.state["sso"]["forward"] >= 1 + 2 and opt_a.state["sso"]["backward"] == 2 and oracle.calls == 4
    oracle.reset()
    assert oracle.calls == 0 and "calls=0" in repr(oracle)


def test_inner_adam_factory_runs():
    gen = torch.Generator().manual_seed(7)
    x, y = torch.randn(32, 3, generator=gen), torch.randint(2, (32,), generator=gen)
    net = models.MLP(3, (8,), 2)
    opt = SSO(net.parameters(), eta=2.0, inner_steps=5, inner=lambda ps: torch.optim.Adam(ps, lr=1e-2))
    l0 = float(opt.step(lambda: net(x), lambda z: F.cross_entropy(z, y)))
    assert torch.isfinite(torch.tensor(l0)) and opt.state["sso"]["backward"] == 5


def test_bad_input():
    z = torch.zeros(3, 2)
    with pytest.raises(ValueError, match="shape"):
        target_surrogate(z, torch.zeros(3, 3), z, 1.0)
    with pytest.raises(ValueError, match="eta"):
        target_surrogate(z, z, z, 0.0)
    with pytest.raises(ValueError, match="eta"):
        target_surrogate(z, z, z, float("inf"))
    with pytest.raises(ValueError, match="reduction"):
        target_surrogate(z, z, z, 1.0, reduction="max")
    with pytest.raises(ValueError, match="batch"):
        target_surrogate(torch.tensor(1.0), torch.tensor(1.0), torch.tensor(1.0), 1.0)
    with pytest.raises(ValueError, match="tensor"):
        target_surrogate([1.0], z, z, 1.0)
    p = [torch.zeros(2, requires_grad=True)]
    for kw, name in ((dict(eta=-1.0), "eta"), (dict(inner_steps=0), "inner_steps"), (dict(inner_lr=0.0), "inner_lr"),
                     (dict(inner="newton"), "inner"), (dict(c=1.5), "c"), (dict(backtrack=1.0), "backtrack"),
                     (dict(max_backtracks=-1), "max_backtracks"), (dict(reduction="none"), "reduction")):
        with pytest.raises(ValueError, match=name):
            SSO(p, **kw)
    opt = SSO(p)
    with pytest.raises(ValueError, match="callables"):
        opt.step(None, lambda z: z.sum())
    with pytest.raises(ValueError, match="depends on the parameters"):
        opt.step(lambda: torch.zeros(3), lambda z: z.sum())
    with pytest.raises(ValueError, match="scalar"):
        opt.step(lambda: p[0] * 2, lambda z: z)
    with pytest.raises(ValueError, match="callable"):
        CountingOracle(3)


def test_learns_and_beats_sgd_per_oracle_call():
    d = data.load_sklearn("digits", seed=0)
    x, y = d.x_train[:512], d.y_train[:512]

    def train(method):
        torch.manual_seed(0)
        net = models.MLP(64, (16,), 10)
        gen = torch.Generator().manual_seed(0)
        oracle = CountingOracle(lambda z, yb: F.cross_entropy(z, yb))
        opt = SSO(net.parameters(), eta=8.0, inner_steps=8) if method == "sso" else torch.optim.SGD(net.parameters(), lr=1.0)
        while oracle.calls < 25:
            i = torch.randint(512, (64,), generator=gen)
            if method == "sso":
                opt.step(lambda: net(x[i]), lambda z: oracle(z, y[i]))
            else:
                opt.zero_grad()
                oracle(net(x[i]), y[i]).backward()
                opt.step()
        with torch.no_grad():
            return float(F.cross_entropy(net(x), y))

    l_sso, l_sgd = train("sso"), train("sgd")
    assert l_sso < 0.5 and l_sso < l_sgd


@pytest.mark.gpu
def test_cuda_matches_cpu():
    gen = torch.Generator().manual_seed(8)
    x, y = torch.randn(64, 5, generator=gen), torch.randint(3, (64,), generator=gen)
    results = []
    for dev in ("cpu", "cuda"):
        torch.manual_seed(0)
        net = models.MLP(5, (16,), 3).to(dev, F64)
        xd, yd = x.to(dev, F64), y.to(dev)
        opt = SSO(net.parameters(), eta=2.0, inner_steps=3, inner="sgd", inner_lr=0.5)
        for _ in range(3):
            opt.step(lambda: net(xd), lambda z: F.cross_entropy(z, yd))
        results.append(torch.nn.utils.parameters_to_vector(net.parameters()).cpu())
        out = net(xd)
        assert target_surrogate(out, out.detach(), torch.ones_like(out), 1.0).device.type == dev
    torch.testing.assert_close(results[0], results[1], rtol=1e-9, atol=1e-10)
