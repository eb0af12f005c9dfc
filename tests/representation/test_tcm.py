import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

from lossbook import models
from lossbook.retrieval import pair_masks, similarity_matrix
from lossbook.representation.tcm import far_threshold_range, opis, pair_utility, tcm_loss


def ref_tcm(emb, labels, lp=1.0, ln=1.0, mp=0.9, mn=0.5):
    """Loop transcription of the TCM regulariser over ordered pairs, float64."""
    e = [[v / math.sqrt(sum(u * u for u in r)) for v in r] for r in emb.tolist()]
    y = labels.tolist()
    pn = pd = nn_ = nd = 0.0
    for i in range(len(y)):
        for j in range(len(y)):
            if i == j:
                continue
            s = sum(a * b for a, b in zip(e[i], e[j]))
            if y[i] == y[j] and s <= mp:
                pn += mp - s; pd += 1
            if y[i] != y[j] and s >= mn:
                nn_ += s - mn; nd += 1
    return lp * (pn / pd if pd else 0.0) + ln * (nn_ / nd if nd else 0.0)


def test_matches_loop_reference():
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(12, 3, generator=g, dtype=torch.float64)
    y = torch.randint(3, (12,), generator=g)
    for kw, rk in (({}, {}), (dict(lam_pos=0.3, lam_neg=2.0, m_pos=0.5, m_neg=0.0), dict(lp=0.3, ln=2.0, mp=0.5, mn=0.0))):
        assert float(tcm_loss(emb, y, **kw)) == pytest.approx(ref_tcm(emb, y, **rk), abs=1e-12)


def test_zero_when_no_hard_pairs_and_doc_example():
    emb = torch.tensor([[1.0, 0.0], [1.0, 0.01], [0.0, 1.0], [0.01, 1.0]])   # positives s~1, negatives s~0
    assert float(tcm_loss(emb, torch.tensor([0, 0, 1, 1]))) == 0.0
    e = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]])
    assert float(tcm_loss(e, torch.tensor([0, 0, 1]))) == pytest.approx(0.6)


def test_gradcheck():
    g = torch.Generator().manual_seed(1)
    emb = torch.randn(8, 4, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 0, 1, 1, 2, 2, 0, 1])
    assert torch.autograd.gradcheck(lambda e: tcm_loss(e, y, m_pos=0.95, m_neg=-0.2), (emb,))


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 10_000), st.floats(0.1, 3.0))
def test_nonnegative_and_linear_in_lambdas(seed, lam):
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(10, 3, generator=g, dtype=torch.float64)
    y = torch.randint(3, (10,), generator=g)
    p = tcm_loss(emb, y, lam_neg=0.0)
    n = tcm_loss(emb, y, lam_pos=0.0)
    assert p >= 0 and n >= 0
    assert float(tcm_loss(emb, y, lam_pos=lam, lam_neg=lam)) == pytest.approx(lam * float(p + n), abs=1e-12)


def test_opis_zero_for_identical_classes_and_positive_otherwise():
    # two classes with mirror-image geometry: per-class utilities equal the overall one
    emb = torch.tensor([[1.0, 0.0], [0.9, 0.1], [-1.0, 0.0], [-0.9, -0.1]])
    y = torch.tensor([0, 0, 1, 1])
    t = torch.linspace(-0.5, 0.99, 20, dtype=torch.float64)
    assert opis(emb, y, t) == pytest.approx(0.0, abs=1e-12)
    emb2 = torch.tensor([[1.0, 0.0], [0.99, 0.1], [0.0, 1.0], [0.7, 0.7]])   # class 1 loose, near class 0
    assert opis(emb2, y, t) > 0.01


def test_pair_utility_against_counts():
    s = torch.tensor([[0.9, 0.2, 0.6]], dtype=torch.float64)
    pos = torch.tensor([[True, False, False]]); neg = ~pos
    u = pair_utility(s, pos, neg, torch.tensor([0.1, 0.5, 0.95], dtype=torch.float64))
    assert torch.allclose(u, torch.tensor([2 / 4, 2 / 3, 0.0], dtype=torch.float64))


def test_far_range_brackets_false_accepts():
    g = torch.Generator().manual_seed(2)
    emb = torch.randn(60, 5, generator=g); y = torch.randint(4, (60,), generator=g)
    t = far_threshold_range(emb, y)
    s = similarity_matrix(emb); _, neg = pair_masks(y)
    far_lo = float((s[neg] >= t[0]).double().mean()); far_hi = float((s[neg] >= t[-1]).double().mean())
    assert 0.08 < far_lo <= 0.11 and 0.005 < far_hi < 0.02


def test_bad_input():
    with pytest.raises(ValueError):
        tcm_loss(torch.randn(4), torch.tensor([0, 1, 0, 1]))
    with pytest.raises(ValueError):
        tcm_loss(torch.randn(4, 2), torch.tensor([0.0, 1.0, 0.0, 1.0]))
    with pytest.raises(ValueError):
        tcm_loss(torch.randn(4, 2), torch.tensor([0, 1, 0]))
    with pytest.raises(ValueError):
        tcm_loss(torch.randn(4, 2), torch.tensor([0, 1, 0, 1]), lam_pos=-1.0)
    with pytest.raises(ValueError):
        far_threshold_range(torch.randn(4, 2), torch.tensor([0, 1, 0, 1]), far=(0.2, 0.1))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    g = torch.Generator().manual_seed(3)
    emb = torch.randn(16, 4, generator=g); y = torch.randint(3, (16,), generator=g)
    assert float(tcm_loss(emb.cuda(), y.cuda())) == pytest.approx(float(tcm_loss(emb, y)), abs=1e-5)
    assert opis(emb.cuda(), y.cuda()) == pytest.approx(opis(emb, y), abs=1e-6)


def test_learns_fewer_hard_pairs():
    torch.manual_seed(0)
    x = torch.randn(40, 6); y = torch.arange(4).repeat(10); x = x + 2 * F.one_hot(y, 6).float()
    m = models.MLP(6, (16,), 4); opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    with torch.no_grad():
        before = float(tcm_loss(m(x), y))
    for _ in range(60):
        l = tcm_loss(m(x), y); opt.zero_grad(); l.backward(); opt.step()
    with torch.no_grad():
        assert float(tcm_loss(m(x), y)) < 0.5 * before


def test_optional_pytorch_metric_learning():
    pml = pytest.importorskip("pytorch_metric_learning")
    from pytorch_metric_learning.losses import ContrastiveLoss, ThresholdConsistentMarginLoss
    g = torch.Generator().manual_seed(4)
    emb = torch.randn(10, 3, generator=g, dtype=torch.float64); y = torch.randint(3, (10,), generator=g)
    ours = float(tcm_loss(emb, y))
    try:                         # older pml wrapped a base loss; since 2.x the class is the regulariser alone
        zero = ContrastiveLoss(pos_margin=0, neg_margin=100)
        theirs = float(ThresholdConsistentMarginLoss(base_loss=zero)(emb, y)) - float(zero(emb, y))
    except TypeError:
        theirs = float(ThresholdConsistentMarginLoss()(emb, y))
    assert ours == pytest.approx(theirs, abs=1e-6)
