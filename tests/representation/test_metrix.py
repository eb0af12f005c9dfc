import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

from lossbook import models
from lossbook.retrieval import pair_masks, recall_at_k, similarity_matrix
from lossbook.representation.metrix import (MetrixLoss, MixPairs, interpolate, metrix_loss, mixed_pair_weights,
                                            open_set_split, pair_loss, sample_mix, utilization)


def ref_anchor_loss(s_row, pos_w, neg_w, loss, m=0.5, alpha=2.0, beta=50.0, b=0.5):
    """Loop transcription of tau(sum_x w+ rho+(s), sum_x w- rho-(s)) for one anchor, float64."""
    if loss == "contrastive":
        return sum(wp * (1 - s) + wn * max(s - m, 0.0) for s, wp, wn in zip(s_row, pos_w, neg_w))
    sp = sum(wp * math.exp(-alpha * (s - b)) for s, wp in zip(s_row, pos_w))
    sn = sum(wn * math.exp(beta * (s - b)) for s, wn in zip(s_row, neg_w))
    return math.log1p(sp) / alpha + math.log1p(sn) / beta


def ref_metrix(emb, labels, mix, loss, w):
    """Loop transcription of the Metrix objective (clean + w * mixed, mean over anchors)."""
    e = [[v / math.sqrt(sum(u * u for u in row)) for v in row] for row in emb.tolist()]
    y, n = labels.tolist(), len(labels)
    dot = lambda a, b: sum(p * q for p, q in zip(a, b))                          # noqa: E731
    clean = mixed = 0.0
    for a in range(n):
        s = [dot(e[a], e[x]) for x in range(n)]
        pw = [1.0 if (x != a and y[x] == y[a]) else 0.0 for x in range(n)]
        nw = [1.0 if y[x] != y[a] else 0.0 for x in range(n)]
        clean += ref_anchor_loss(s, pw, nw, loss)
        sm, pm, nm = [], [], []
        for i, j, lam in zip(mix.i.tolist(), mix.j.tolist(), mix.lam.tolist()):
            v = [lam * p + (1 - lam) * q for p, q in zip(e[i], e[j])]
            v = [c / math.sqrt(sum(u * u for u in v)) for c in v]
            t = lam * (y[a] == y[i]) + (1 - lam) * (y[a] == y[j])
            ok = a not in (i, j)
            sm.append(dot(e[a], v)); pm.append(t * ok); nm.append((1 - t) * ok)
        mixed += ref_anchor_loss(sm, pm, nm, loss)
    return (clean + w * mixed) / n


def batch(n=24, d=5, c=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=torch.float64), torch.arange(c).repeat(n // c)


@pytest.mark.parametrize("loss", ["contrastive", "multi_similarity"])
@pytest.mark.parametrize("w", [0.0, 1.0, 0.4])
def test_metrix_matches_loop_reference(loss, w):
    emb, lab = batch()
    mix = sample_mix(lab, 17, generator=torch.Generator().manual_seed(1))
    got = metrix_loss(emb, lab, loss=loss, w=w, mix=mix)
    assert float(got) == pytest.approx(ref_metrix(emb, lab, mix, loss, w), rel=1e-10, abs=1e-12)


@pytest.mark.parametrize("loss", ["contrastive", "multi_similarity"])
def test_pair_loss_soft_weights_match_reference(loss):
    g = torch.Generator().manual_seed(2)
    s = torch.rand(6, 9, generator=g, dtype=torch.float64) * 2 - 1
    pw, nw = torch.rand(6, 9, generator=g, dtype=torch.float64), torch.rand(6, 9, generator=g, dtype=torch.float64)
    pw[0] = 0.0                                                 # an anchor with no positive weight at all
    got = pair_loss(s, pw, nw, loss=loss)
    ref = [ref_anchor_loss(s[a].tolist(), pw[a].tolist(), nw[a].tolist(), loss) for a in range(6)]
    torch.testing.assert_close(got, torch.tensor(ref, dtype=torch.float64), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("loss", ["contrastive", "multi_similarity"])
def test_lambda_ends_recover_clean_pairs(loss):
    """lambda = 1: the mixed pair is the positive pair; lambda = 0: the negative pair."""
    emb, lab = batch()
    emb = F.normalize(emb, dim=1)
    i, j = torch.tensor([1]), torch.tensor([2])                 # labels 1 and 2; anchors of class 1 see i as positive
    anchors = (lab == 1) & (torch.arange(len(lab)) != 1)
    for lam, x, pos in ((1.0, 1, True), (0.0, 2, False)):
        mix = MixPairs(i, j, torch.tensor([lam], dtype=torch.float64))
        pw, nw = mixed_pair_weights(lab, mix)
        mixed = pair_loss(similarity_matrix(emb, interpolate(emb, mix)), pw, nw, loss=loss)[anchors]
        one = torch.ones(len(lab), 1, dtype=torch.float64)
        clean = pair_loss(similarity_matrix(emb, emb[x:x + 1]), one if pos else 0 * one, 0 * one if pos else one,
                          loss=loss)[anchors]
        torch.testing.assert_close(mixed, clean)


def test_weights_loop_reference_and_self_exclusion():
    lab = torch.tensor([0, 0, 1, 2, 1])
    mix = MixPairs(torch.tensor([0, 2, 3]), torch.tensor([2, 3, 1]), torch.tensor([0.3, 0.6, 0.9], dtype=torch.float64))
    pw, nw = mixed_pair_weights(lab, mix)
    for a in range(5):
        for k in range(3):
            i, j, lam = int(mix.i[k]), int(mix.j[k]), float(mix.lam[k])
            t = lam * (lab[a] == lab[i]) + (1 - lam) * (lab[a] == lab[j])
            ok = a not in (i, j)
            assert float(pw[a, k]) == pytest.approx(float(t) * ok) and float(nw[a, k]) == pytest.approx((1 - float(t)) * ok)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(4, 30), c=st.integers(2, 6), m=st.integers(1, 20), seed=st.integers(0, 2**31 - 1))
def test_property_weights(n, c, m, seed):
    g = torch.Generator().manual_seed(seed)
    lab = torch.arange(n) % c
    mix = sample_mix(lab, m, generator=g)
    assert bool((lab[mix.i] != lab[mix.j]).all()) and bool(((mix.lam > 0) & (mix.lam < 1)).all())
    pw, nw = mixed_pair_weights(lab, mix)
    assert bool((pw >= 0).all()) and bool((nw >= 0).all())
    total = pw + nw                                             # 1 where the anchor is not a mixed endpoint
    ar = torch.arange(n)[:, None]
    valid = (ar != mix.i[None]) & (ar != mix.j[None])
    torch.testing.assert_close(total, valid.to(total.dtype))
    # swapping the two endpoints and lambda -> 1 - lambda describes the same mixed example
    sw = MixPairs(mix.j, mix.i, 1 - mix.lam)
    pw2, nw2 = mixed_pair_weights(lab, sw)
    torch.testing.assert_close(pw, pw2)
    torch.testing.assert_close(nw, nw2)


def test_sample_mix_beta_moments_and_reproducible():
    lab = torch.arange(200) % 5
    a = sample_mix(lab, 20000, alpha=2.0, generator=torch.Generator().manual_seed(3))
    b = sample_mix(lab, 20000, alpha=2.0, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a.i, b.i) and torch.equal(a.j, b.j) and torch.equal(a.lam, b.lam)
    assert float(a.lam.mean()) == pytest.approx(0.5, abs=0.01)
    assert float(a.lam.var()) == pytest.approx(1 / 20, abs=0.003)            # Var Beta(2, 2) = 1/20


def test_gradcheck():
    emb, lab = batch(12, 4, 3)
    emb.requires_grad_(True)
    mix = sample_mix(lab, 7, generator=torch.Generator().manual_seed(0))
    for loss in ("contrastive", "multi_similarity"):
        assert torch.autograd.gradcheck(lambda e: metrix_loss(e, lab, loss=loss, w=1.0, mix=mix, beta=5.0), (emb,))


def test_utilization_and_split():
    g = torch.Generator().manual_seed(0)
    q, x = torch.randn(7, 3, generator=g, dtype=torch.float64), torch.randn(9, 3, generator=g, dtype=torch.float64)
    qn, xn = F.normalize(q, dim=1).tolist(), F.normalize(x, dim=1).tolist()
    ref = sum(min(math.dist(a, b) for b in xn) for a in qn) / 7
    assert float(utilization(q, x)) == pytest.approx(ref)
    assert float(utilization(x, x)) == pytest.approx(0.0, abs=1e-7)
    xs, ys = torch.randn(10, 2), torch.arange(10) % 4
    xtr, ytr, xte, yte = open_set_split(xs, ys, [0, 1])
    assert set(ytr.tolist()) == {0, 1} and set(yte.tolist()) == {2, 3} and len(ytr) + len(yte) == 10


def test_module_and_multi_similarity_stable_in_float32():
    emb = torch.randn(40, 8) * 30                                # large beta * s: no overflow
    lab = torch.arange(40) % 4
    out = MetrixLoss("multi_similarity", w=1.0, generator=torch.Generator().manual_seed(0))(emb, lab)
    assert torch.isfinite(out)


def test_bad_input():
    emb, lab = batch()
    with pytest.raises(ValueError, match="loss"):
        metrix_loss(emb, lab, loss="triplet")
    with pytest.raises(ValueError, match="w"):
        metrix_loss(emb, lab, w=-1.0)
    with pytest.raises(ValueError, match="labels"):
        metrix_loss(emb, lab[:-1])
    with pytest.raises(ValueError, match="alpha"):
        sample_mix(lab, alpha=0.0)
    with pytest.raises(ValueError, match="two classes"):
        sample_mix(torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="n_mix"):
        sample_mix(lab, 0)
    with pytest.raises(ValueError, match="pos_w"):
        pair_loss(torch.zeros(2, 3), torch.zeros(3, 2), torch.zeros(2, 3))
    with pytest.raises(ValueError, match="mix pairs"):
        metrix_loss(emb, lab, mixed_emb=emb)
    with pytest.raises(ValueError, match="train_classes"):
        open_set_split(emb, lab, [7])


@pytest.mark.gpu
def test_cuda_matches_cpu():
    emb, lab = batch(60, 8, 5)
    mix = sample_mix(lab, 30, generator=torch.Generator().manual_seed(0))
    gpu_mix = MixPairs(mix.i.cuda(), mix.j.cuda(), mix.lam.cuda())
    for loss in ("contrastive", "multi_similarity"):
        a = metrix_loss(emb.cuda(), lab.cuda(), loss=loss, mix=gpu_mix)
        assert float(a) == pytest.approx(float(metrix_loss(emb, lab, loss=loss, mix=mix)), rel=1e-9)
    out = metrix_loss(emb.cuda().float(), lab.cuda(), generator=torch.Generator().manual_seed(0))
    assert out.device.type == "cuda" and torch.isfinite(out)


def test_learns():
    """A few steps of Metrix on separable clusters raise leave-one-out Recall@1."""
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(4, 10, generator=g) * 1.5
    lab = torch.arange(80) % 4
    x = centers[lab] + torch.randn(80, 10, generator=g)
    torch.manual_seed(0)
    model = models.MLP(10, (32,), 8)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    with torch.no_grad():
        before = recall_at_k(model(x), lab, 1)[1]
    for _ in range(60):
        loss = metrix_loss(model(x), lab, loss="multi_similarity", w=1.0, generator=g)
        opt.zero_grad(); loss.backward(); opt.step()
    with torch.no_grad():
        after = recall_at_k(model(x), lab, 1)[1]
    assert after > before and after > 0.95


def test_clean_losses_match_pytorch_metric_learning():
    """With w = 0 the generic form reproduces pytorch-metric-learning's losses (cosine similarity)."""
    pml = pytest.importorskip("pytorch_metric_learning")
    from pytorch_metric_learning import distances, losses, reducers

    emb, lab = batch(60, 16, 6, seed=3)
    ms = losses.MultiSimilarityLoss(alpha=2, beta=50, base=0.5)
    assert float(metrix_loss(emb, lab, loss="multi_similarity", w=0)) == pytest.approx(float(ms(emb, lab)), rel=1e-10)
    contrastive = losses.ContrastiveLoss(pos_margin=1, neg_margin=0.5, distance=distances.CosineSimilarity(),
                                         reducer=reducers.SumReducer())
    assert float(metrix_loss(emb, lab, loss="contrastive", w=0)) == pytest.approx(float(contrastive(emb, lab)) / 60,
                                                                                 rel=1e-10)
    assert pml.__version__
