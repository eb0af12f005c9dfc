"""Tests for lossbook.representation.proto_triplet (Proto-Triplet loss, ICNN score)."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from lossbook.representation.proto_triplet import (episode_loss, icnn_loss, icnn_score, proto_logits,
                                                   proto_triplet_loss, prototypes)


def _ref_pt(q, yq, p, margin):
    out = []
    for e in range(q.shape[0]):
        for i in range(q.shape[1]):
            d = [math.sqrt(float(((q[e, i] - p[e, c]) ** 2).sum()) + 1e-6) for c in range(p.shape[1])]
            c = int(yq[e, i])
            neg = min(d[j] for j in range(len(d)) if j != c)
            out.append(max(0.0, d[c] - neg + margin))
    return sum(out) / len(out)


def _ref_icnn(x, y, k):
    """Loop transcription of icnn_score for one episode (float64)."""
    m = x.shape[0]
    dist = [[math.sqrt(float(((x[i] - x[j]) ** 2).sum()) + 1e-6) for j in range(m)] for i in range(m)]
    nbrs, dneg = [], []
    for i in range(m):
        order = sorted((j for j in range(m) if j != i), key=lambda j: dist[i][j])[:k]
        nbrs.append(order)
        others = [dist[i][j] for j in range(m) if j != i and y[j] != y[i]]
        dneg.append(min(others) if others else max(dist[i][j] for j in order))
    intra, inter, gam = [], [], []
    dmax = max([dist[i][j] for i in range(m) for j in nbrs[i] if y[j] != y[i]] or [0.0])
    for i in range(m):
        r = [dist[i][j] / (dneg[i] + 1e-6) for j in nbrs[i]]
        top = max(1.0, max(r))
        same = [r[t] / top for t, j in enumerate(nbrs[i]) if y[j] == y[i]]
        diff = [dist[i][j] / (dmax + 1e-6) for j in nbrs[i] if y[j] != y[i]]
        if same:
            intra.append(sum(same) / len(same))
        if diff:
            inter.append(sum(diff) / len(diff))
        gam.append(len(same) / k)
    li = 1 - (sum(intra) / len(intra) if intra else 0.0)
    le = sum(inter) / len(inter) if inter else 1.0
    return 0.5 * (0.5 * (li + le) + sum(gam) / m)


def _episode(E=3, n=4, kk=3, d=5, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(E, n * kk, d, generator=g, dtype=dtype)
    y = torch.arange(n).repeat_interleave(kk).expand(E, -1).clone()
    return x, y


def test_proto_triplet_matches_loop_reference():
    q, yq = _episode(seed=1)
    p = torch.randn(3, 4, 5, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    for margin in (0.0, 0.5, 3.0):
        assert math.isclose(float(proto_triplet_loss(q, yq, p, margin=margin)), _ref_pt(q, yq, p, margin), rel_tol=1e-9)


def test_icnn_matches_loop_reference():
    x, y = _episode(E=2, n=3, kk=4, seed=3)
    got = icnn_score(x, y, k=4, reduction="none")
    for e in range(2):
        assert math.isclose(float(got[e]), _ref_icnn(x[e], y[e].tolist(), 4), rel_tol=1e-9)


def test_proto_triplet_zero_when_separated_and_margin_only_at_collapse():
    p = torch.tensor([[[0.0, 0.0], [10.0, 0.0]]], dtype=torch.float64)
    q = p.clone()
    yq = torch.tensor([[0, 1]])
    assert float(proto_triplet_loss(q, yq, p, margin=0.5)) == 0.0
    same = torch.zeros(1, 2, 2, dtype=torch.float64)
    assert math.isclose(float(proto_triplet_loss(same, yq, same, margin=0.5)), 0.5, abs_tol=1e-12)


def test_icnn_pure_neighbourhoods_and_bounds():
    # tight, far-apart clusters: every neighbour of the own class -> gamma = 1, inter term = 1
    c = torch.tensor([[0.0, 0.0], [100.0, 0.0], [0.0, 100.0]], dtype=torch.float64)
    x = (c.repeat_interleave(5, 0) + 0.01 * torch.randn(15, 2, dtype=torch.float64)).unsqueeze(0)
    y = torch.arange(3).repeat_interleave(5).unsqueeze(0)
    s = float(icnn_score(x, y, k=4))
    assert 0.99 < s <= 1.0
    # labels shuffled against the geometry: much lower
    yb = torch.arange(3).repeat(5).unsqueeze(0)
    assert float(icnn_score(x, yb, k=4)) < 0.5


def test_protonet_logits_and_prototypes():
    s, ys = _episode(seed=4)
    p = prototypes(s, ys, 4)
    assert torch.allclose(p[:, 1], s[:, 3:6].mean(1))
    q = torch.randn(3, 7, 5, dtype=torch.float64)
    assert torch.allclose(proto_logits(q, p), -torch.cdist(q, p) ** 2, atol=1e-10)


def test_gradcheck():
    q, yq = _episode(E=1, n=3, kk=2, d=3, seed=5)
    p = torch.randn(1, 3, 3, dtype=torch.float64, requires_grad=True)
    q.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: proto_triplet_loss(a, yq, b, margin=2.0), (q, p))
    x, y = _episode(E=1, n=3, kk=3, d=3, seed=6)
    x.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a: icnn_loss(a, y, k=3), (x,))


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), shift=st.floats(-5, 5), scale=st.sampled_from([0.125, 0.25, 0.5, 2.0, 4.0, 8.0]))
def test_invariances_and_range(seed, shift, scale):
    # powers of two scale every distance exactly, so a near-tie among neighbours cannot flip by rounding
    # (with scale 13/128 hypothesis found such a flip: a different neighbour set, not a bug)
    x, y = _episode(E=2, n=3, kk=4, d=4, seed=seed)
    s = icnn_score(x, y, k=3, reduction="none")
    assert torch.all((s >= 0) & (s <= 1))
    # translation invariant; the ICNN score is also scale invariant (all distances are ratios)
    assert torch.allclose(icnn_score(x + shift, y, k=3, reduction="none"), s, atol=1e-6)
    assert torch.allclose(icnn_score(x * scale, y, k=3, reduction="none"), s, atol=1e-6)
    p = prototypes(x, y, 3)
    assert float(proto_triplet_loss(x + shift, y, p + shift, margin=0.5)) == pytest.approx(
        float(proto_triplet_loss(x, y, p, margin=0.5)), abs=1e-6)
    assert float(proto_triplet_loss(x, y, p, margin=0.0)) >= 0


def test_bad_input():
    x, y = _episode()
    p = prototypes(x, y, 4)
    with pytest.raises(ValueError, match="margin"):
        proto_triplet_loss(x, y, p, margin=-1.0)
    with pytest.raises(ValueError, match="reduction"):
        proto_triplet_loss(x, y, p, reduction="max")
    with pytest.raises(ValueError, match="query_labels"):
        proto_triplet_loss(x, y + 4, p)
    with pytest.raises(ValueError, match="k must"):
        icnn_score(x, y, k=12)
    with pytest.raises(ValueError, match="emb"):
        icnn_score(x[0], y[0])
    with pytest.raises(ValueError, match="labels"):
        icnn_score(x, y.double())
    with pytest.raises(ValueError, match="losses"):
        episode_loss(x, y, x, y, 4, losses=("ce", "foo"))
    with pytest.raises(ValueError, match="support_labels"):
        prototypes(x, y, 3)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    x, y = _episode(dtype=torch.float32)
    cpu = episode_loss(x[:, :6], y[:, :6], x[:, 6:], y[:, 6:], 4)
    gpu = episode_loss(x[:, :6].cuda(), y[:, :6].cuda(), x[:, 6:].cuda(), y[:, 6:].cuda(), 4)
    assert torch.allclose(cpu, gpu.cpu(), atol=1e-4)


def test_learns_separable_episodes():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 6, generator=g) * 2
    y = torch.arange(4).repeat_interleave(6).expand(8, -1)
    net = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 8))
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)

    def batch():
        return centres[y] + torch.randn(8, 24, 6, generator=g) * 1.5

    with torch.no_grad():
        x = batch()
        before = float(icnn_score(net(x), y))
    for _ in range(60):
        f = net(batch())
        loss = episode_loss(f[:, ::2], y[:, ::2], f[:, 1::2], y[:, 1::2], 4)
        opt.zero_grad(); loss.backward(); opt.step()
    with torch.no_grad():
        after = float(icnn_score(net(x), y))
    assert after > before + 0.05
