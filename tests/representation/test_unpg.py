import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

from lossbook import models
from lossbook.representation.unpg import (
    ArcFaceHead, CosFaceHead, UNPGLoss, arcface_logits, batch_negative_similarities, cosface_logits, ks_distance,
    synthetic_identities, tar_at_far, unpg_loss, verification_pairs, whisker_filter)


# ----------------------------------------------------------------- slow, obviously-correct references (float64)
def _unit(v):
    n = math.sqrt(sum(a * a for a in v))
    return [a / n for a in v]


def ref_margin_logits(emb, weight, labels, m, kind):
    x = [_unit(r) for r in emb.tolist()]
    w = [_unit(r) for r in weight.tolist()]
    out = []
    for i, yi in enumerate(labels.tolist()):
        row = []
        for j, wj in enumerate(w):
            c = sum(a * b for a, b in zip(x[i], wj))
            if j == yi:
                c = c - m if kind == "cosface" else math.cos(math.acos(max(-1 + 1e-7, min(1 - 1e-7, c))) + m)
            row.append(c)
        out.append(row)
    return out


def ref_unpg(logits, labels, negs, s):
    """-log softmax of the target over [s * logits row, s * negs], per sample."""
    out = []
    for row, yi in zip(logits, labels):
        terms = [s * v for v in row] + [s * v for v in negs]
        top = max(terms)
        out.append(top + math.log(sum(math.exp(t - top) for t in terms)) - s * row[yi])
    return out


def ref_whisker(values, wisk):
    xs = sorted(values)
    q1, q3 = xs[int(0.25 * len(xs))], xs[int(0.75 * len(xs))]
    lo, hi = q1 - wisk * (q3 - q1), q3 + wisk * (q3 - q1)
    return [lo <= v <= hi for v in values]


def ref_batch_negatives(emb, labels):
    x = [_unit(r) for r in emb.tolist()]
    y = labels.tolist()
    return [sum(a * b for a, b in zip(x[i], x[j])) for i in range(len(y)) for j in range(i + 1, len(y)) if y[i] != y[j]]


def rand_problem(seed, n=10, d=4, c=5, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, d, generator=g, dtype=dtype), torch.randn(c, d, generator=g, dtype=dtype),
            torch.randint(c, (n,), generator=g))


# ----------------------------------------------------------------- value checks
@pytest.mark.parametrize("kind,fn,m", [("cosface", cosface_logits, 0.35), ("arcface", arcface_logits, 0.5)])
def test_margin_logits_match_reference(kind, fn, m):
    emb, w, y = rand_problem(0)
    assert torch.allclose(fn(emb, w, y, m=m), torch.tensor(ref_margin_logits(emb, w, y, m, kind), dtype=torch.float64),
                          atol=1e-12)


@pytest.mark.parametrize("s", [10.0, 30.0, 64.0])
def test_unpg_loss_matches_reference(s):
    emb, w, y = rand_problem(1)
    logits = cosface_logits(emb, w, y)
    negs = torch.rand(17, generator=torch.Generator().manual_seed(2), dtype=torch.float64) - 0.5
    ref = torch.tensor(ref_unpg(logits.tolist(), y.tolist(), negs.tolist(), s), dtype=torch.float64)
    assert torch.allclose(unpg_loss(logits, y, negs, s=s, reduction="none"), ref, atol=1e-10)
    # the same negatives given as a matrix and a mask
    mat = torch.zeros(5, 5, dtype=torch.float64)
    mask = torch.zeros(5, 5, dtype=torch.bool)
    mask.view(-1)[:17] = True
    mat.view(-1)[:17] = negs
    mat.view(-1)[17:] = 5.0   # large values outside the mask must not matter
    assert torch.allclose(unpg_loss(logits, y, mat, mask, s=s, reduction="none"), ref, atol=1e-10)


@pytest.mark.parametrize("head", ["cosface", "arcface"])
def test_no_negatives_is_plain_margin_loss(head):
    emb, w, y = rand_problem(3)
    fn = cosface_logits if head == "cosface" else arcface_logits
    logits = fn(emb, w, y)
    plain = F.cross_entropy(30.0 * logits, y)
    for negs, mask in ((None, None), (torch.empty(0, dtype=torch.float64), None),
                       (torch.rand(6, 6, dtype=torch.float64), torch.zeros(6, 6, dtype=torch.bool))):
        assert float(unpg_loss(logits, y, negs, mask, s=30.0)) == pytest.approx(float(plain), abs=1e-12)
    # and the module with unpg=False is the plain head
    crit = UNPGLoss(4, 5, head=head, s=30.0, unpg=False)
    with torch.no_grad():
        crit.head.weight.copy_(w.float())
    assert float(crit(emb.float(), y).detach()) == pytest.approx(float(F.cross_entropy(30.0 * fn(emb.float(), w.float(), y), y)),
                                                        rel=1e-5)


def test_empty_mask_gives_finite_gradients():
    emb, w, y = rand_problem(4)
    logits = cosface_logits(emb, w, y).requires_grad_()
    negs = torch.rand(6, 6, dtype=torch.float64, requires_grad=True)
    unpg_loss(logits, y, negs, torch.zeros(6, 6, dtype=torch.bool)).backward()
    assert torch.isfinite(logits.grad).all() and torch.isfinite(negs.grad).all() and negs.grad.abs().max() == 0


def test_batch_negatives_and_filter_match_reference():
    g = torch.Generator().manual_seed(5)
    emb = torch.randn(14, 3, generator=g, dtype=torch.float64)
    y = torch.randint(4, (14,), generator=g)
    s, mask = batch_negative_similarities(emb, y)
    ref = ref_batch_negatives(emb, y)
    assert mask.sum() == len(ref)
    assert torch.allclose(s[mask], torch.tensor(ref, dtype=torch.float64), atol=1e-12)   # row-major = i<j order
    for wisk in (0.0, 0.5, 1.5):
        keep = whisker_filter(s, mask, wisk=wisk)
        assert keep[mask].tolist() == ref_whisker(ref, wisk)
        assert not (keep & ~mask).any()
    assert torch.equal(whisker_filter(s, mask, wisk=math.inf), mask)


def test_filter_drops_an_outlier_at_both_ends():
    v = torch.cat([torch.linspace(-0.1, 0.1, 40), torch.tensor([0.95, -0.9])])
    keep = whisker_filter(v, wisk=1.5)
    assert keep[:40].all() and not keep[40] and not keep[41]


def test_full_pipeline_matches_reference():
    torch.manual_seed(6)
    crit = UNPGLoss(3, 4, head="arcface", s=16.0, m=0.3, wisk=1.0).double()
    g = torch.Generator().manual_seed(6)
    emb = torch.randn(12, 3, generator=g, dtype=torch.float64)
    y = torch.randint(4, (12,), generator=g)
    negs = ref_batch_negatives(emb, y)
    kept = [v for v, k in zip(negs, ref_whisker(negs, 1.0)) if k]
    logits = ref_margin_logits(emb, crit.head.weight.detach(), y, 0.3, "arcface")
    ref = sum(ref_unpg(logits, y.tolist(), kept, 16.0)) / len(y)
    assert float(crit(emb, y).detach()) == pytest.approx(ref, abs=1e-10)


# ----------------------------------------------------------------- gradients, reductions, properties
def test_gradcheck():
    emb, w, y = rand_problem(7, n=6, d=3, c=4)
    negs = torch.rand(5, dtype=torch.float64) - 0.5
    for fn in (cosface_logits, arcface_logits):
        assert torch.autograd.gradcheck(lambda e, ww, n: unpg_loss(fn(e, ww, y), y, n, s=8.0),
                                        (emb.requires_grad_(), w.requires_grad_(), negs.requires_grad_()))
    crit = UNPGLoss(3, 4, s=8.0, wisk=math.inf).double()
    assert torch.autograd.gradcheck(lambda e: crit(e, y), (emb,))


def test_reductions():
    emb, w, y = rand_problem(8)
    logits, negs = cosface_logits(emb, w, y), torch.rand(9, dtype=torch.float64)
    per = unpg_loss(logits, y, negs, reduction="none")
    assert per.shape == (10,)
    assert torch.isclose(unpg_loss(logits, y, negs, reduction="sum"), per.sum())
    assert torch.isclose(unpg_loss(logits, y, negs), per.mean())


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 10_000), st.integers(1, 20))
def test_appending_negatives_only_raises_the_loss(seed, k):
    emb, w, y = rand_problem(seed)
    logits = cosface_logits(emb, w, y)
    negs = torch.rand(k + 5, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 2 - 1
    fewer = unpg_loss(logits, y, negs[:k], s=20.0, reduction="none")
    more = unpg_loss(logits, y, negs, s=20.0, reduction="none")
    plain = unpg_loss(logits, y, s=20.0, reduction="none")
    assert (plain <= fewer + 1e-12).all() and (fewer <= more + 1e-12).all()


def test_state_dict_round_trip():
    a = UNPGLoss(8, 6, head="arcface")
    b = UNPGLoss(8, 6, head="arcface")
    b.load_state_dict(a.state_dict())
    emb, y = torch.randn(10, 8), torch.randint(6, (10,))
    assert torch.equal(a(emb, y), b(emb, y))
    assert set(a.state_dict()) == {"head.weight"} and isinstance(CosFaceHead(3, 2), torch.nn.Module)
    assert isinstance(ArcFaceHead(3, 2).weight, torch.nn.Parameter)


# ----------------------------------------------------------------- verification metrics
def test_tar_at_far_against_brute_force():
    g = torch.Generator().manual_seed(9)
    scores = torch.randn(500, generator=g)
    same = torch.rand(500, generator=g) < 0.3
    scores[same] += 1.0
    neg, pos = scores[~same].tolist(), scores[same].tolist()
    for far in (0.01, 0.1, 0.5):
        # the smallest threshold among impostor scores whose false-accept rate is <= far
        t = min(v for v in neg if sum(u > v for u in neg) / len(neg) <= far)
        ref = sum(p > t for p in pos) / len(pos)
        assert float(tar_at_far(scores, same, far)) == pytest.approx(ref)
    assert tar_at_far(scores, same, [0.01, 0.1]).shape == (2,)


def test_verification_pairs_and_ks():
    emb = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    s, same = verification_pairs(emb, torch.tensor([0, 0, 1]))
    assert s.tolist() == pytest.approx([1.0, 0.0, 0.0]) and same.tolist() == [True, False, False]
    a, b = torch.tensor([0.0, 1.0, 2.0, 3.0]), torch.tensor([2.5, 3.5])
    assert float(ks_distance(a, b)) == pytest.approx(0.75)   # at t=2: F_a = 3/4, F_b = 0
    assert float(ks_distance(a, a)) == 0.0


def test_synthetic_identities_shapes_and_determinism():
    x, y = synthetic_identities(5, 4, seed=3)
    x2, _ = synthetic_identities(5, 4, seed=3)
    assert x.shape == (20, 64) and y.tolist() == sum([[c] * 4 for c in range(5)], []) and torch.equal(x, x2)


# ----------------------------------------------------------------- bad input
def test_bad_input():
    emb, w, y = rand_problem(10)
    logits = cosface_logits(emb, w, y)
    with pytest.raises(ValueError, match="weight"):
        cosface_logits(emb, w[:, :3], y)
    with pytest.raises(ValueError, match="labels"):
        arcface_logits(emb, w, y.float())
    with pytest.raises(ValueError, match="labels"):
        cosface_logits(emb, w, torch.full_like(y, 7))
    with pytest.raises(ValueError, match="reduction"):
        unpg_loss(logits, y, reduction="avg")
    with pytest.raises(ValueError, match="s must"):
        unpg_loss(logits, y, s=0.0)
    with pytest.raises(ValueError, match="neg_mask"):
        unpg_loss(logits, y, torch.rand(3, 3, dtype=torch.float64), torch.ones(2, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="wisk"):
        whisker_filter(torch.rand(5), wisk=-1.0)
    with pytest.raises(ValueError, match="head"):
        UNPGLoss(4, 5, head="sphereface")
    with pytest.raises(ValueError, match="far"):
        tar_at_far(torch.rand(4), torch.tensor([True, False, True, False]), 1.5)
    with pytest.raises(ValueError, match="genuine"):
        tar_at_far(torch.rand(4), torch.zeros(4, dtype=torch.bool), 0.1)


# ----------------------------------------------------------------- device and learning
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    torch.manual_seed(11)
    crit = UNPGLoss(6, 5, head="arcface")
    emb, y = torch.randn(32, 6), torch.randint(5, (32,))
    cpu = crit(emb, y)
    gpu = crit.cuda()(emb.cuda(), y.cuda())
    assert float(gpu) == pytest.approx(float(cpu), rel=1e-4)
    s, same = verification_pairs(emb.cuda(), y.cuda())
    s0, same0 = verification_pairs(emb, y)
    assert torch.allclose(tar_at_far(s, same, [0.1, 0.3]).cpu(), tar_at_far(s0, same0, [0.1, 0.3]))
    gpu.backward()
    assert crit.head.weight.grad.device.type == "cuda"


def test_learns_to_verify_unseen_identities():
    x, y = synthetic_identities(60, 10, seed=0)
    tr = y < 40
    torch.manual_seed(0)
    net = models.MLP(64, (64,), 32)
    crit = UNPGLoss(32, 40)
    opt = torch.optim.Adam(list(net.parameters()) + list(crit.parameters()), lr=3e-3)
    with torch.no_grad():
        before = float(tar_at_far(*verification_pairs(net(x[~tr]), y[~tr]), 1e-2))
    for _ in range(150):
        b = torch.randint(int(tr.sum()), (128,))
        loss = crit(net(x[tr][b]), y[tr][b])
        opt.zero_grad(); loss.backward(); opt.step()
    with torch.no_grad():
        after = float(tar_at_far(*verification_pairs(net(x[~tr]), y[~tr]), 1e-2))
    assert after > before + 0.1


def test_optional_pytorch_metric_learning():
    pytest.importorskip("pytorch_metric_learning")
    from pytorch_metric_learning.losses import CosFaceLoss
    emb, w, y = rand_problem(12, dtype=torch.float32)
    theirs = CosFaceLoss(num_classes=5, embedding_size=4, margin=0.35, scale=30.0)
    with torch.no_grad():
        theirs.W.copy_(w.T)
    ours = unpg_loss(cosface_logits(emb, w, y, m=0.35), y, s=30.0)
    assert float(ours.detach()) == pytest.approx(float(theirs(emb, y).detach()), rel=1e-5)


def test_optional_pytorch_metric_learning_arcface():
    pytest.importorskip("pytorch_metric_learning")
    from pytorch_metric_learning.losses import ArcFaceLoss
    emb, w, y = rand_problem(14, dtype=torch.float32)
    theirs = ArcFaceLoss(num_classes=5, embedding_size=4, margin=math.degrees(0.5), scale=32.0)   # pml: degrees
    with torch.no_grad():
        theirs.W.copy_(w.T)
    ours = unpg_loss(arcface_logits(emb, w, y, m=0.5), y, s=32.0)
    assert float(ours.detach()) == pytest.approx(float(theirs(emb, y).detach()), rel=1e-4)


def test_quartiles_sort_path_equals_selection_path():
    from lossbook.representation.unpg import _quartiles, _quartiles_by_sort
    g = torch.Generator().manual_seed(13)
    for n in (1, 2, 7, 100):
        x = torch.randn(n + 5, generator=g)
        sel = torch.zeros(n + 5, dtype=torch.bool)
        sel[torch.randperm(n + 5, generator=g)[:n]] = True
        a, b = _quartiles(x, sel), _quartiles_by_sort(x, sel)
        assert float(a[0]) == float(b[0]) and float(a[1]) == float(b[1])
