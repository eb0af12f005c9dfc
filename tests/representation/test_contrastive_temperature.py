import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

from lossbook.encoders import ContrastiveNet, ConvEncoder, ProjectionHead, StackedContrastiveNet
from lossbook.representation.contrastive_temperature import (
    hard_info_nce, info_nce, info_nce_similarity_grad, masked_info_nce, negative_weights, simclr_masks, supcon_loss, tolerance,
    train_contrastive, train_contrastive_stacked, uniformity, weight_entropy)


def reference_nt_xent(z1, z2, tau, keep=1.0):
    """Loop transcription in float64: each of the 2N views against its twin and (the hardest ceil(keep (2N-2)) of)
    the other 2N - 2 views."""
    z = [[a / math.sqrt(sum(b * b for b in v)) for a in v] for v in torch.cat([z1, z2]).double().tolist()]
    n2, n = len(z), len(z1)
    dot = lambda a, b: sum(p * q for p, q in zip(a, b))  # noqa: E731
    out = []
    for i in range(n2):
        j = (i + n) % n2
        negs = sorted((dot(z[i], z[k]) for k in range(n2) if k not in (i, j)), reverse=True)
        negs = negs[:max(1, math.ceil(keep * len(negs)))]
        s_pos = dot(z[i], z[j])
        out.append(-math.log(math.exp(s_pos / tau) / (math.exp(s_pos / tau) + sum(math.exp(s / tau) for s in negs))))
    return torch.tensor(out, dtype=torch.float64)


def rand_views(n=6, d=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=torch.float64), torch.randn(n, d, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("tau", [0.07, 0.5, 2.0])
def test_info_nce_matches_loop_reference(tau):
    z1, z2 = rand_views()
    torch.testing.assert_close(info_nce(z1, z2, tau, reduction="none"), reference_nt_xent(z1, z2, tau))


@pytest.mark.parametrize("keep", [0.1, 0.5, 0.8])
def test_hard_info_nce_matches_loop_reference(keep):
    z1, z2 = rand_views(seed=1)
    torch.testing.assert_close(hard_info_nce(z1, z2, 0.3, keep=keep, reduction="none"),
                               reference_nt_xent(z1, z2, 0.3, keep))


def test_hard_with_all_negatives_is_info_nce_and_matches_cross_entropy():
    z1, z2 = rand_views(8, 5, seed=2)
    torch.testing.assert_close(hard_info_nce(z1, z2, 0.2, keep=1.0), info_nce(z1, z2, 0.2))
    # SimCLR's usual form: cross-entropy over the similarity row with the self-similarity removed
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    logits = (z @ z.T / 0.2).fill_diagonal_(float("-inf"))
    target = (torch.arange(16) + 8) % 16
    torch.testing.assert_close(info_nce(z1, z2, 0.2), F.cross_entropy(logits, target))


def test_masks():
    pos, neg = simclr_masks(3)
    assert pos.sum() == 6 and bool(pos[0, 3]) and bool(pos[4, 1])
    assert (neg.sum(1) == 4).all() and not bool((neg & pos).any()) and not bool(neg.diagonal().any())


@pytest.mark.parametrize("tau", [0.05, 1.0])
def test_closed_form_gradient_and_gradcheck(tau):
    z1, z2 = rand_views(5, 3, seed=3)
    pos, neg = simclr_masks(5)
    sim = (F.normalize(torch.cat([z1, z2]), dim=1) @ F.normalize(torch.cat([z1, z2]), dim=1).T).requires_grad_()
    (g,) = torch.autograd.grad(masked_info_nce(sim, pos, neg, tau, reduction="sum"), sim)
    torch.testing.assert_close(g, info_nce_similarity_grad(sim.detach(), pos, neg, tau))
    # positive's gradient = minus the sum over the negatives (the paper's identity)
    closed = info_nce_similarity_grad(sim.detach(), pos, neg, tau)
    torch.testing.assert_close(closed[pos], -(closed * neg).sum(1))
    assert torch.autograd.gradcheck(lambda a, b: info_nce(a, b, tau), (z1.requires_grad_(), z2.requires_grad_()))
    assert torch.autograd.gradcheck(lambda a, b: hard_info_nce(a, b, tau, keep=0.5), (z1, z2))


def test_temperature_limits():
    s = torch.tensor([[0.9, 0.2, 0.5, 0.45, -0.3]], dtype=torch.float64)
    pos = torch.tensor([[True, False, False, False, False]])
    neg = ~pos
    r_cold = negative_weights(s, neg, 1e-3)
    torch.testing.assert_close(r_cold, torch.tensor([[0.0, 0.0, 1.0, 0.0, 0.0]], dtype=torch.float64))   # hardest only
    torch.testing.assert_close(negative_weights(s, neg, 1e6), neg.double() / 4, atol=1e-5, rtol=0)      # uniform
    # tau -> 0: tau * loss -> max(hardest negative - positive, 0), a triplet loss with margin 0
    for s_pos in (0.9, 0.3):
        s2 = s.clone(); s2[0, 0] = s_pos
        tau = 1e-3
        assert abs(tau * float(masked_info_nce(s2, pos, neg, tau)) - max(0.5 - s_pos, 0.0)) < 5e-3


@settings(max_examples=40, deadline=None)
@given(k=st.integers(2, 30), seed=st.integers(0, 2**31 - 1), t1=st.floats(0.01, 5.0), t2=st.floats(0.01, 5.0))
def test_property_entropy_increases_with_tau(k, seed, t1, t2):
    s = torch.rand(1, k, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 2 - 1
    neg = torch.ones(1, k, dtype=torch.bool)
    lo, hi = sorted((t1, t2))
    h_lo, h_hi = weight_entropy(negative_weights(s, neg, lo)), weight_entropy(negative_weights(s, neg, hi))
    assert float(h_lo) <= float(h_hi) + 1e-9 and float(h_hi) <= math.log(k) + 1e-9


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), scale=st.floats(0.1, 100.0))
def test_property_scale_invariance(seed, scale):
    z1, z2 = rand_views(4, 3, seed=seed % 1000)
    torch.testing.assert_close(info_nce(scale * z1, scale * z2, 0.3), info_nce(z1, z2, 0.3))
    torch.testing.assert_close(uniformity(scale * z1), uniformity(z1))


def test_uniformity_and_tolerance_match_loops():
    g = torch.Generator().manual_seed(4)
    z = F.normalize(torch.randn(12, 3, generator=g, dtype=torch.float64), dim=1)
    y = torch.tensor([0, 1, 2] * 4)
    pairs = [(i, j) for i in range(12) for j in range(i + 1, 12)]
    ref_u = math.log(sum(math.exp(-2 * float((z[i] - z[j]).square().sum())) for i, j in pairs) / len(pairs))
    same = [(i, j) for i in range(12) for j in range(12) if i != j and y[i] == y[j]]
    ref_t = sum(float(z[i] @ z[j]) for i, j in same) / len(same)
    assert abs(float(uniformity(z)) - ref_u) < 1e-12 and abs(float(tolerance(z, y)) - ref_t) < 1e-12
    assert float(uniformity(z[:1].expand(5, 3))) == pytest.approx(0.0)      # collapsed: the maximum, 0
    assert float(tolerance(z[:1].expand(5, 3), torch.zeros(5, dtype=torch.int64))) == pytest.approx(1.0)


def test_stacked_batches_and_tensor_tau():
    g = torch.Generator().manual_seed(5)
    z1, z2 = torch.randn(3, 6, 4, generator=g), torch.randn(3, 6, 4, generator=g)
    taus = torch.tensor([0.1, 0.5, 1.0])
    many = info_nce(z1, z2, taus, reduction="none").mean(-1)
    hard = hard_info_nce(z1, z2, 0.5, keep=0.4, reduction="none").mean(-1)
    for m in range(3):
        torch.testing.assert_close(many[m], info_nce(z1[m], z2[m], float(taus[m])))
        torch.testing.assert_close(hard[m], hard_info_nce(z1[m], z2[m], 0.5, keep=0.4))


def test_bad_input():
    z1, z2 = rand_views()
    pos, neg = simclr_masks(6)
    for bad in (0.0, -1.0, math.inf, math.nan, True):
        with pytest.raises(ValueError, match="tau"):
            info_nce(z1, z2, bad)
    with pytest.raises(ValueError, match="tau"):
        info_nce(z1, z2, torch.tensor([0.1, 0.2]))
    with pytest.raises(ValueError, match="z1 and z2"):
        info_nce(z1, z2[:3])
    with pytest.raises(ValueError, match="reduction"):
        info_nce(z1, z2, reduction="avg")
    with pytest.raises(ValueError, match="keep"):
        hard_info_nce(z1, z2, keep=0.0)
    sim = torch.zeros(12, 12)
    with pytest.raises(ValueError, match="exactly one positive"):
        masked_info_nce(sim, pos | neg, torch.zeros_like(neg), 0.5)
    with pytest.raises(ValueError, match="overlap"):
        masked_info_nce(sim, pos, neg | pos, 0.5)
    with pytest.raises(ValueError, match="pos_mask"):
        masked_info_nce(sim, pos.float(), neg, 0.5)
    with pytest.raises(ValueError, match="z must"):
        uniformity(torch.zeros(1, 3))
    with pytest.raises(ValueError, match="labels"):
        tolerance(torch.zeros(4, 3), torch.zeros(3, dtype=torch.int64))
    with pytest.raises(ValueError, match="multiple"):
        train_contrastive_stacked(StackedContrastiveNet(3, width=4), torch.rand(10, 1, 8, 8), [info_nce] * 3,
                                  steps=1, generators=[None, None])


def test_stacked_training_equals_separate_training():
    """Two temperatures trained in one stack = each trained alone on the same batches and views."""
    x = torch.rand(40, 1, 8, 8, generator=torch.Generator().manual_seed(6))
    torch.manual_seed(0)
    stack = StackedContrastiveNet(2, width=16, out_dim=8, proj_hidden=8, proj_dim=4, encoder="mlp")
    alone = [stack.member(i) for i in range(2)]
    kw = dict(steps=5, batch_size=16, lr=1e-2)
    train_contrastive_stacked(stack, x, lambda a, b: info_nce(a, b, torch.tensor([0.1, 1.0]), reduction="none").mean(-1),
                              generators=[torch.Generator().manual_seed(1)], **kw)
    for i, tau in enumerate((0.1, 1.0)):
        train_contrastive(alone[i], x, lambda a, b, t=tau: info_nce(a, b, t), generator=torch.Generator().manual_seed(1), **kw)
        torch.testing.assert_close(stack.member(i)(x), alone[i](x), rtol=1e-4, atol=1e-5)


def test_tiny_training_learns():
    from lossbook import data
    x = data.load_sklearn("digits", image=True, test_size=0.5, seed=0).x_train[:256]
    torch.manual_seed(0)
    net = ContrastiveNet(ConvEncoder(1, 4, 32, batch_norm=True), ProjectionHead(32, 32, 16))
    net.eval()
    with torch.no_grad():
        before = float(uniformity(net(x)))
    losses = train_contrastive(net, x, lambda a, b: info_nce(a, b, 0.3), steps=40, batch_size=64,
                               generator=torch.Generator().manual_seed(0))
    net.eval()
    with torch.no_grad():
        after = float(uniformity(net(x)))
    assert sum(losses[-5:]) / 5 < losses[0] - 0.3 and after < before - 0.5


@pytest.mark.gpu
def test_cuda_matches_cpu():
    z1, z2 = rand_views(32, 8, seed=7)
    for fn in (lambda a, b: info_nce(a, b, 0.2), lambda a, b: hard_info_nce(a, b, 0.2, keep=0.3)):
        torch.testing.assert_close(fn(z1.cuda(), z2.cuda()).cpu(), fn(z1, z2))
    z = z1.cuda()
    torch.testing.assert_close(uniformity(z).cpu(), uniformity(z1))
    torch.testing.assert_close(tolerance(z, (torch.arange(32) % 4).cuda()).cpu(), tolerance(z1, torch.arange(32) % 4))
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")                    # the loss on the device never waits on the host
    try:
        info_nce(z.float().requires_grad_(), z2.cuda().float(), 0.2).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


def reference_supcon(emb, labels, tau):
    """Loop transcription in float64: each anchor with a positive, averaged over its positives of
    -log(e^{s_ip/tau} / sum_{a != i} e^{s_ia/tau})."""
    z = F.normalize(emb.double(), dim=1).tolist()
    y = labels.tolist()
    dot = lambda a, b: sum(p * q for p, q in zip(a, b))  # noqa: E731
    out = []
    for i in range(len(z)):
        pos = [p for p in range(len(z)) if p != i and y[p] == y[i]]
        if not pos:
            out.append(0.0)
            continue
        denom = sum(math.exp(dot(z[i], z[a]) / tau) for a in range(len(z)) if a != i)
        out.append(-sum(math.log(math.exp(dot(z[i], z[p]) / tau) / denom) for p in pos) / len(pos))
    return torch.tensor(out, dtype=torch.float64)


@given(n=st.integers(2, 12), k=st.integers(1, 5), tau=st.floats(0.05, 2.0), seed=st.integers(0, 2**16))
@settings(max_examples=25, deadline=None)
def test_supcon_matches_loop_reference(n, k, tau, seed):
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(n, 3, generator=g, dtype=torch.float64)
    labels = torch.randint(0, k, (n,), generator=g)
    ref = reference_supcon(emb, labels, tau)
    torch.testing.assert_close(supcon_loss(emb, labels, tau, reduction="none"), ref)
    has = torch.tensor([(labels == labels[i]).sum() > 1 for i in range(n)])
    torch.testing.assert_close(supcon_loss(emb, labels, tau, reduction="sum"), ref[has].sum())
    if has.any():
        torch.testing.assert_close(supcon_loss(emb, labels, tau), ref[has].mean())


def test_supcon_with_two_views_is_info_nce_and_has_gradients():
    z1, z2 = rand_views(7, 5, seed=3)
    z1.requires_grad_(True)
    labels = torch.arange(7).repeat(2)
    torch.testing.assert_close(supcon_loss(torch.cat([z1, z2]), labels, 0.3), info_nce(z1, z2, 0.3))
    supcon_loss(torch.cat([z1, z2]), labels, 0.3).backward()
    assert z1.grad is not None and torch.isfinite(z1.grad).all() and z1.grad.abs().sum() > 0


def test_supcon_rejects_bad_input():
    z = torch.randn(4, 3)
    with pytest.raises(ValueError, match="labels"):
        supcon_loss(z, torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="labels"):
        supcon_loss(z, torch.zeros(4))
    with pytest.raises(ValueError, match="emb"):
        supcon_loss(z[0], torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="reduction"):
        supcon_loss(z, torch.zeros(4, dtype=torch.long), reduction="avg")
    with pytest.raises(ValueError):
        supcon_loss(z, torch.zeros(4, dtype=torch.long), tau=0.0)


@pytest.mark.gpu
def test_supcon_cuda_matches_cpu():
    z, y = torch.randn(32, 8), torch.arange(32) % 5
    torch.testing.assert_close(supcon_loss(z.cuda(), y.cuda()).cpu(), supcon_loss(z, y))
