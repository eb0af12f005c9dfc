import math

import pytest
import torch
import torch.nn.functional as F

from lossbook.representation.amcl import (AMCLLoss, AMCLNet, MultiHeadProjector, PairTemperature, amcl_loss,
                                          amcl_temperatures, omega)


def _net(dim, seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    return PairTemperature(dim, 8, tau_min=0.05, tau_max=2.0).to(dtype)


def ref_amcl(z1, z2, tn, beta, topk):
    """Loop transcription, float64: per head, per anchor over the 2N views; mean over anchors, sum over heads."""
    n, c, d = z1.shape
    total = 0.0
    for h in range(c):
        z = [F.normalize(v, dim=0) for v in torch.cat([z1[:, h], z2[:, h]])]
        phi = [tn.phi(v) for v in z]
        tau = lambda i, j: tn.tau_min + (tn.tau_max - tn.tau_min) / (1 + math.exp(float(phi[i] @ phi[j])))  # noqa: E731
        per = []
        for i in range(2 * n):
            p = (i + n) % (2 * n)
            negs = sorted((j for j in range(2 * n) if j not in (i, p)), key=lambda j: -float(z[i] @ z[j]))[:min(topk, 2 * n - 2)]
            k = len(negs)
            tp = tau(i, p)
            li = -float(z[i] @ z[p]) / tp + beta * (d / 2 * math.log(tp) + 1 / tp)
            for j in negs:
                tj = tau(i, j)
                li += float(z[i] @ z[j]) / tj / k - beta * (math.log(tj) + 1 / tj)
            per.append(li)
        total += sum(per) / len(per)
    return total


@pytest.mark.parametrize("topk", [3, 100])
def test_matches_loop_reference(topk):
    g = torch.Generator().manual_seed(1)
    z1, z2 = torch.randn(5, 2, 6, generator=g, dtype=torch.float64), torch.randn(5, 2, 6, generator=g, dtype=torch.float64)
    tn = _net(6)
    with torch.no_grad():
        got = float(amcl_loss(z1, z2, tn, beta=0.3, topk=topk))
        assert got == pytest.approx(ref_amcl(z1, z2, tn, 0.3, topk), rel=1e-10, abs=1e-10)


def test_reductions_and_single_head():
    g = torch.Generator().manual_seed(2)
    z1, z2 = torch.randn(6, 3, 4, generator=g, dtype=torch.float64), torch.randn(6, 3, 4, generator=g, dtype=torch.float64)
    tn = _net(4)
    none = amcl_loss(z1, z2, tn, topk=5, reduction="none")
    assert none.shape == (12, 3)
    assert torch.allclose(amcl_loss(z1, z2, tn, topk=5), none.mean(0).sum())
    assert torch.allclose(amcl_loss(z1, z2, tn, topk=5, reduction="sum"), none.sum())
    # a (N, d) input is one head; the heads are independent and summed
    one = amcl_loss(z1[:, 1], z2[:, 1], tn, topk=5, reduction="none")
    assert torch.allclose(one[:, 0], none[:, 1])


def test_gradcheck_embeddings_and_temperature_net():
    g = torch.Generator().manual_seed(3)
    z1 = torch.randn(4, 2, 3, generator=g, dtype=torch.float64, requires_grad=True)
    z2 = torch.randn(4, 2, 3, generator=g, dtype=torch.float64, requires_grad=True)
    tn = _net(3)
    assert torch.autograd.gradcheck(lambda a, b: amcl_loss(a, b, tn, beta=0.1, topk=3), (z1, z2))
    amcl_loss(z1, z2, tn, beta=0.1, topk=3).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in tn.parameters())   # gradient reaches phi


def test_temperatures_within_bounds_and_symmetric():
    tn = PairTemperature(5, tau_min=0.1, tau_max=0.7).double()
    with torch.no_grad():
        for p in tn.parameters():
            p.mul_(30)                                   # large scores: sigmoid saturates
        z = torch.randn(40, 5, dtype=torch.float64)
        t = tn(z)
    assert bool(((t >= 0.1) & (t <= 0.7)).all()) and torch.allclose(t, t.T)
    T = amcl_temperatures(torch.randn(6, 2, 5).double(), torch.randn(6, 2, 5).double(), tn, topk=4)
    assert T.positive.shape == (12, 2) and T.topk.shape == (12, 2, 4) and T.negatives.shape == (12, 2, 10)


def test_temperatures_split_matches_loss_inputs():
    g = torch.Generator().manual_seed(4)
    z1, z2 = torch.randn(5, 1, 4, generator=g), torch.randn(5, 1, 4, generator=g)
    tn = PairTemperature(4)
    T = amcl_temperatures(z1, z2, tn, topk=3)
    z = F.normalize(torch.cat([z1[:, 0], z2[:, 0]]), dim=1)
    with torch.no_grad():
        full = tn(z)
    for i in range(10):
        p = (i + 5) % 10
        assert float(T.positive[i, 0]) == pytest.approx(float(full[i, p]), abs=1e-6)
        s = z[i] @ z.T
        negs = [j for j in range(10) if j not in (i, p)]
        top = sorted(negs, key=lambda j: -float(s[j]))[:3]
        assert sorted(T.topk[i, 0].tolist()) == pytest.approx(sorted(full[i, top].tolist()), abs=1e-6)


def test_positive_pair_optimum_of_the_regulariser():
    # per pair, -s/tau + beta*Omega(tau) has its minimum at tau* = 2(beta - s)/(beta d) when beta > s,
    # and decreases towards tau -> 0 when s > beta (the collapse discussed in the chapter)
    d, beta, s = 8, 1.0, 0.6
    tau = torch.linspace(0.01, 1.0, 2000, dtype=torch.float64)
    f = -s / tau + beta * omega(tau, d)
    assert float(tau[f.argmin()]) == pytest.approx(2 * (beta - s) / (beta * d), abs=1e-3)
    f2 = -s / tau + 0.01 * omega(tau, d)
    assert bool((f2.diff() > 0).all())


def test_multi_head_projector_matches_per_head_linear():
    torch.manual_seed(0)
    mp = MultiHeadProjector(6, 5, 4, heads=3)
    h = torch.randn(7, 6)
    out = mp(h)
    for c in range(3):
        ref = torch.relu(h @ mp.w1[c] + mp.b1[c]) @ mp.w2[c] + mp.b2[c]
        assert torch.allclose(out[:, c], ref, atol=1e-6)


def test_state_dict_round_trip():
    a, b = AMCLLoss(8, topk=5), AMCLLoss(8, topk=5)
    b.load_state_dict(a.state_dict())
    z1, z2 = torch.randn(6, 2, 8), torch.randn(6, 2, 8)
    assert torch.equal(a(z1, z2), b(z1, z2))
    m1, m2 = MultiHeadProjector(4, 3, 2, 2), MultiHeadProjector(4, 3, 2, 2)
    m2.load_state_dict(m1.state_dict())
    x = torch.randn(3, 4)
    assert torch.equal(m1(x), m2(x))


def test_bad_input():
    tn = PairTemperature(4)
    z = torch.randn(6, 2, 4)
    with pytest.raises(ValueError, match="same shape"):
        amcl_loss(z, torch.randn(6, 3, 4), tn)
    with pytest.raises(ValueError, match="dimension"):
        amcl_loss(torch.randn(6, 2, 5), torch.randn(6, 2, 5), tn)
    with pytest.raises(ValueError, match="beta"):
        amcl_loss(z, z, tn, beta=-1.0)
    with pytest.raises(ValueError, match="topk"):
        amcl_loss(z, z, tn, topk=0)
    with pytest.raises(ValueError, match="reduction"):
        amcl_loss(z, z, tn, reduction="avg")
    with pytest.raises(ValueError, match="temp_net"):
        amcl_loss(z, z, torch.nn.Linear(4, 4))
    with pytest.raises(ValueError, match="at least 2"):
        amcl_loss(z[:1], z[:1], tn)
    with pytest.raises(ValueError, match="tau_min"):
        PairTemperature(4, tau_min=2.0, tau_max=1.0)
    with pytest.raises(ValueError, match="heads"):
        MultiHeadProjector(4, 4, 4, heads=0)
    with pytest.raises(ValueError, match="shape"):
        MultiHeadProjector(4, 4, 4)(torch.randn(3, 5))


def test_half_precision_inputs_use_float32_temperatures():
    tn = PairTemperature(4)
    z = torch.randn(6, 2, 4).to(torch.bfloat16)
    loss = amcl_loss(z, z.flip(0), tn, topk=3)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)


def test_learns_to_align_views():
    torch.manual_seed(0)
    x = torch.randn(32, 10)
    mp, tn = MultiHeadProjector(10, 16, 8, heads=2), PairTemperature(8, tau_min=0.05)
    opt = torch.optim.Adam([*mp.parameters(), *tn.parameters()], lr=1e-2)
    noisy = lambda: x + 0.3 * torch.randn_like(x)   # noqa: E731

    def gap():   # mean similarity of the two views of an image minus that of different images
        with torch.no_grad():
            s = F.normalize(mp(noisy()), dim=-1)[:, 0] @ F.normalize(mp(noisy()), dim=-1)[:, 0].T
            off = ~torch.eye(32, dtype=torch.bool)
            return float(s.diag().mean() - s[off].mean())
    before = gap()
    for _ in range(100):
        loss = amcl_loss(mp(noisy()), mp(noisy()), tn, beta=0.01, topk=8)
        opt.zero_grad(); loss.backward(); opt.step()
    assert gap() > before + 0.3


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    torch.manual_seed(5)
    loss = AMCLLoss(8, topk=6)
    z1, z2 = torch.randn(10, 3, 8), torch.randn(10, 3, 8)
    cpu = float(loss(z1, z2))
    gpu = loss.cuda()(z1.cuda(), z2.cuda())
    assert gpu.device.type == "cuda" and float(gpu) == pytest.approx(cpu, rel=1e-4, abs=1e-4)
    mp = MultiHeadProjector(8, 4, 8, 2)
    assert torch.allclose(mp.cuda()(z1[:, 0].cuda()).cpu(), mp.cpu()(z1[:, 0]), atol=1e-5)


def test_amcl_net_shapes_and_parameters():
    from lossbook.encoders import ConvEncoder
    net = AMCLNet(ConvEncoder(width=4, out_dim=16), 16, 8, 6, heads=2)
    x = torch.rand(5, 1, 8, 8)
    z = net(x)
    assert z.shape == (5, 2, 6) and torch.allclose(z.norm(dim=-1), torch.ones(5, 2), atol=1e-5)
    assert net.features(x).shape == (5, 16)
    names = {n.split(".")[0] for n, _ in net.named_parameters()}
    assert names == {"encoder", "proj", "temp"}
