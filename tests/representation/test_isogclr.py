import math

import pytest
import torch

from lossbook.representation.contrastive_temperature import info_nce
from lossbook.representation.isogclr import ISogCLRLoss, SogCLRLoss, robust_gcl


def _z(b=6, d=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, d, generator=g, dtype=torch.float64), torch.randn(b, d, generator=g, dtype=torch.float64))


def ref_step(z1, z2, index, u, tau, mom, *, gamma, rho, eta, beta, tmin, tmax, clip):
    """Loop transcription of one iSogCLR step, float64: per-anchor objective values and the new state."""
    b = len(index)
    z = [[a / math.sqrt(sum(c * c for c in v)) for a in v] for v in torch.cat([z1, z2]).tolist()]
    u, tau, mom = list(u), list(tau), list(mom)
    new_u, new_tau, new_mom, values = list(u), list(tau), list(mom), []
    grads = {}
    for a in range(2 * b):
        k = index[a % b]
        t = tau[k]
        negs = [sum(p * q for p, q in zip(z[a], z[j])) for j in range(2 * b) if j != a and j != (a + b) % (2 * b)]
        g_hat = sum(math.exp(s / t) for s in negs) / len(negs)
        uv = g_hat if u[k] == 0 else (1 - gamma) * u[k] + gamma * g_hat
        pos = sum(p * q for p, q in zip(z[a], z[(a + b) % (2 * b)]))
        values.append(-pos + t * (math.log(uv) + rho))
        gt = math.log(uv) + rho - sum(math.exp(s / t) * s / t for s in negs) / len(negs) / uv
        grads.setdefault(k, []).append((uv, gt))
    for k, pair in grads.items():
        new_u[k] = (pair[0][0] + pair[1][0]) / 2
        gt = max(-clip, min(clip, (pair[0][1] + pair[1][1]) / 2))
        new_mom[k] = (1 - beta) * mom[k] + beta * gt
        new_tau[k] = min(tmax, max(tmin, tau[k] - eta * new_mom[k]))
    return values, new_u, new_tau, new_mom


def test_state_by_index_equals_loop_reference():
    kw = dict(gamma=0.7, rho=0.3, eta=0.05, beta=0.6, tmin=0.05, tmax=1.0, clip=3.0)
    n = 10
    loss = ISogCLRLoss(n, gamma=kw["gamma"], rho=kw["rho"], tau_init=0.2, tau_min=kw["tmin"], tau_max=kw["tmax"],
                       eta=kw["eta"], beta=kw["beta"], grad_clip=kw["clip"], reduction="none").double()
    u, tau, mom = [0.0] * n, [0.2] * n, [0.0] * n
    g = torch.Generator().manual_seed(3)
    for step in range(6):
        index = torch.randperm(n, generator=g)[:4]
        z1, z2 = _z(4, 3, seed=step)
        vals, u, tau, mom = ref_step(z1, z2, index.tolist(), u, tau, mom, **kw)
        out = loss(z1, z2, index)
        assert torch.allclose(out, torch.tensor(vals, dtype=torch.float64), atol=1e-12)
        for buf, ref in ((loss.u, u), (loss.tau, tau), (loss.tau_momentum, mom)):
            assert torch.allclose(buf, torch.tensor(ref, dtype=torch.float64), atol=1e-12)


def test_theta_gradient_is_the_papers():
    z1, z2 = _z(5, 3)
    z1.requires_grad_()
    loss = ISogCLRLoss(8, rho=0.2, reduction="sum").double()
    idx = torch.tensor([0, 2, 4, 6, 7])
    loss.u[idx] = torch.tensor([3.0, 5.0, 7.0, 2.0, 4.0], dtype=torch.float64)
    loss.tau[idx] = torch.tensor([0.1, 0.2, 0.3, 0.15, 0.5], dtype=torch.float64)
    u0, t = loss.u[idx].clone(), loss.tau[idx].clone()
    (got,) = torch.autograd.grad(loss(z1, z2, idx), z1)
    # reference: -s+ + (tau/u) * g_hat with u the (detached) updated moving average, summed over anchors
    zz = torch.nn.functional.normalize(torch.cat([z1, z2]), dim=1)
    s = zz @ zz.T
    b = 5
    eye = torch.eye(2 * b, dtype=torch.bool)
    pos = torch.roll(eye, b, 1)
    tt = t.repeat(2)
    g_hat = (s / tt[:, None]).exp().masked_fill(eye | pos, 0).sum(1) / (2 * b - 2)
    uv = (0.2 * u0.repeat(2) + 0.8 * g_hat).detach()
    ref = (-(s * pos).sum(1) + tt / uv * g_hat).sum()
    (want,) = torch.autograd.grad(ref, z1)
    assert torch.allclose(got, want, atol=1e-12)


def test_first_step_equals_exact_objective_and_gradcheck():
    z1, z2 = _z(6, 4)
    for fixed in (SogCLRLoss(6, tau=0.3).double(), ISogCLRLoss(6, rho=0.5, tau_init=0.3).double()):
        rho = getattr(fixed, "rho", 0.0)
        got = fixed(z1, z2, torch.arange(6))
        assert torch.allclose(got, robust_gcl(z1, z2, 0.3, rho), atol=1e-12)
    tau = torch.rand(4, dtype=torch.float64) + 0.2
    a, b = _z(4, 3)
    assert torch.autograd.gradcheck(lambda x, y, t: robust_gcl(x, y, t, 0.3), (a.requires_grad_(), b, tau.requires_grad_()))


def test_u_tracks_full_data_inner_function():
    g = torch.Generator().manual_seed(0)
    n, b = 256, 64
    z = torch.nn.functional.normalize(torch.randn(n, 8, generator=g, dtype=torch.float64), dim=1)
    loss = SogCLRLoss(n, gamma=0.1, tau=0.2).double()
    for _ in range(50):
        p = torch.randperm(n, generator=g)
        for k in range(0, n, b):
            i = p[k:k + b]
            loss(z[i], z[i], i)
    s = z @ z.T
    e = (s / 0.2).exp().masked_fill(torch.eye(n, dtype=torch.bool), 0)
    exact = e.sum(1) / (n - 1)          # each other sample, both (identical) views
    rel = ((loss.u - exact).abs() / exact)
    assert rel.mean() < 0.1, float(rel.mean())


def test_tau_step_decreases_objective_for_fixed_theta():
    z1, z2 = _z(16, 4, seed=2)
    n = 16
    loss = ISogCLRLoss(n, rho=0.4, tau_init=0.2, eta=0.01, beta=1.0, grad_clip=None, tau_min=0.05, tau_max=2.0).double()
    idx = torch.arange(n)
    for _ in range(5):
        before = robust_gcl(z1, z2, loss.tau.clone(), 0.4, reduction="none")
        loss(z1, z2, idx)            # full batch: u = g exactly on the first step, then tracks it
        after = robust_gcl(z1, z2, loss.tau.clone(), 0.4, reduction="none")
        per_sample = lambda f: f[:n] + f[n:]  # noqa: E731  (tau is shared by the two views of a sample)
        assert (per_sample(after) <= per_sample(before) + 1e-12).all()
        loss.u.zero_()               # restart u from the exact full-batch value


def test_state_dict_round_trip_and_to():
    a = ISogCLRLoss(20)
    z1, z2 = torch.randn(8, 4), torch.randn(8, 4)
    a(z1, z2, torch.arange(8))
    b = ISogCLRLoss(20)
    b.load_state_dict(a.state_dict())
    for k in ("u", "tau", "tau_momentum"):
        assert torch.equal(getattr(a, k), getattr(b, k))
    assert set(a.state_dict()) == {"u", "tau", "tau_momentum"}
    assert a.double().tau.dtype == torch.float64


def test_eval_mode_does_not_update_and_reductions():
    a = ISogCLRLoss(20).eval()
    z1, z2 = torch.randn(8, 4), torch.randn(8, 4)
    a(z1, z2, torch.arange(8))
    assert (a.u == 0).all() and (a.tau == 0.1).all()
    a.reduction = "none"
    out = a(z1, z2, torch.arange(8))
    assert out.shape == (16,)
    a.reduction = "sum"
    assert torch.allclose(a(z1, z2, torch.arange(8)), out.sum())


def test_sogclr_close_to_simclr_gradient_direction_at_first_step():
    # with u = g_hat the SogCLR gradient is that of tau * log mean exp(h / tau): SimCLR without the positive in the denominator
    z1, z2 = _z(8, 4)
    z1.requires_grad_()
    (g1,) = torch.autograd.grad(SogCLRLoss(8, tau=0.5).double()(z1, z2, torch.arange(8)), z1)
    (g2,) = torch.autograd.grad(0.5 * info_nce(z1, z2, 0.5), z1)
    assert torch.nn.functional.cosine_similarity(g1.flatten(), g2.flatten(), dim=0) > 0.9


@pytest.mark.parametrize("kw", [dict(n_data=1), dict(n_data=10, gamma=0.0), dict(n_data=10, tau=0.0),
                                dict(n_data=10, tau=0.001)])
def test_bad_construction(kw):
    with pytest.raises(ValueError):
        SogCLRLoss(**kw)


@pytest.mark.parametrize("kw", [dict(rho=-1.0), dict(tau_min=0.5, tau_max=0.2), dict(tau_init=2.0), dict(beta=0.0),
                                dict(eta=-0.1), dict(grad_clip=0.0)])
def test_bad_construction_isogclr(kw):
    with pytest.raises(ValueError):
        ISogCLRLoss(10, **kw)


def test_bad_inputs():
    loss = ISogCLRLoss(10)
    z = torch.randn(4, 3)
    with pytest.raises(ValueError, match="index"):
        loss(z, z, torch.tensor([0, 1, 2, 12]))
    with pytest.raises(ValueError, match="repeat"):
        loss(z, z, torch.tensor([0, 1, 1, 2]))
    with pytest.raises(ValueError, match="index"):
        loss(z, z, torch.tensor([0.0, 1.0, 2.0, 3.0]))
    with pytest.raises(ValueError, match="z1 and z2"):
        loss(z, torch.randn(4, 2), torch.arange(4))
    with pytest.raises(ValueError, match="at least 2"):
        loss(z[:1], z[:1], torch.arange(1))
    with pytest.raises(ValueError, match="reduction"):
        robust_gcl(z, z, 0.1, reduction="avg")


@pytest.mark.gpu
def test_cuda_matches_cpu_without_sync():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA")
    z1, z2 = torch.randn(32, 8), torch.randn(32, 8)
    idx = torch.randperm(100)[:32]
    cpu, gpu = ISogCLRLoss(100), ISogCLRLoss(100).cuda()
    for _ in range(3):
        a = cpu(z1, z2, idx)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            b = gpu(z1.cuda().requires_grad_(), z2.cuda(), idx.cuda())
            b.backward()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        torch.testing.assert_close(b.detach().cpu(), a, rtol=1e-4, atol=1e-5)
    for k in ("u", "tau", "tau_momentum"):
        torch.testing.assert_close(getattr(gpu, k).cpu(), getattr(cpu, k), rtol=1e-4, atol=1e-6)


def test_kl_to_uniform_and_optimal_tau_against_reference():
    from lossbook.representation.isogclr import kl_to_uniform, optimal_tau
    g = torch.Generator().manual_seed(5)
    z = torch.randn(7, 3, generator=g, dtype=torch.float64)
    tau = torch.rand(7, generator=g, dtype=torch.float64) + 0.1
    neg = ~torch.eye(7, dtype=torch.bool)
    zn = torch.nn.functional.normalize(z, dim=1).tolist()
    for i in range(7):                                   # loop reference: KL of the softmax from uniform
        s = [sum(a * b for a, b in zip(zn[i], zn[j])) for j in range(7) if j != i]
        e = [math.exp(v / float(tau[i])) for v in s]
        p = [v / sum(e) for v in e]
        ref = sum(q * math.log(q * len(p)) for q in p)
        assert float(kl_to_uniform(z, z, tau, neg)[i]) == pytest.approx(ref, abs=1e-12)
    t = optimal_tau(z, z, 0.3, 0.01, 10.0, neg)
    # the exact minimiser of tau*log mean exp(h/tau) + tau*rho: derivative rho - KL vanishes there
    assert torch.allclose(kl_to_uniform(z, z, t, neg), torch.full((7,), 0.3, dtype=torch.float64), atol=1e-8)
    grid = torch.logspace(-2, 1, 2000, dtype=torch.float64)
    for i in range(3):
        s = (torch.nn.functional.normalize(z, dim=1) @ torch.nn.functional.normalize(z, dim=1)[i])[neg[i]]
        f = grid * (torch.logsumexp(s[None] / grid[:, None], 1) - math.log(6) + 0.3)
        assert float(grid[f.argmin()]) == pytest.approx(float(t[i]), rel=0.01)


def test_tiny_training_learns():
    # iSogCLR on a frozen-data toy: two views = noisy copies; the loss falls and the views align
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 10, generator=g)
    net = torch.nn.Linear(10, 8)
    loss_fn = ISogCLRLoss(64, tau_init=0.2)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    first = None
    for step in range(60):
        i = torch.randperm(64, generator=g)[:32]
        v1 = x[i] + 0.3 * torch.randn(32, 10, generator=g)
        v2 = x[i] + 0.3 * torch.randn(32, 10, generator=g)
        loss = loss_fn(net(v1), net(v2), i)
        opt.zero_grad(); loss.backward(); opt.step()
        first = float(loss.detach()) if first is None else first
    assert float(loss.detach()) < first - 0.1
