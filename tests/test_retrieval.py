import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from lossbook.retrieval import map_at_r, mine_pairs, pair_masks, recall_at_k, similarity_matrix


def _cos(a, b):
    return sum(x * y for x, y in zip(a, b)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


def ref_ranking(emb, q):
    """Other items ordered by decreasing cosine similarity to item q (loop, float64)."""
    e = emb.tolist()
    others = [i for i in range(len(e)) if i != q]
    return sorted(others, key=lambda i: -_cos(e[q], e[i]))


def ref_recall(emb, labels, k):
    lab = labels.tolist()
    return sum(any(lab[i] == lab[q] for i in ref_ranking(emb, q)[:k]) for q in range(len(lab))) / len(lab)


def ref_map_at_r(emb, labels):
    lab = labels.tolist()
    aps = []
    for q in range(len(lab)):
        r = sum(1 for i in range(len(lab)) if i != q and lab[i] == lab[q])
        if r == 0:
            continue
        ranking, hits, ap = ref_ranking(emb, q)[:r], 0, 0.0
        for pos, i in enumerate(ranking, 1):
            if lab[i] == lab[q]:
                hits += 1
                ap += hits / pos
        aps.append(ap / r)
    return sum(aps) / len(aps)


def data(n=40, d=6, c=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=torch.float64), torch.randint(c, (n,), generator=g)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_recall_and_map_match_loop_reference(seed):
    emb, lab = data(seed=seed)
    got = recall_at_k(emb, lab, (1, 2, 4, 8))
    for k in (1, 2, 4, 8):
        assert got[k] == pytest.approx(ref_recall(emb, lab, k), abs=1e-12)
    assert map_at_r(emb, lab) == pytest.approx(ref_map_at_r(emb, lab), abs=1e-12)


def test_special_cases():
    lab = torch.tensor([0, 0, 1, 1, 2, 2])
    perfect = torch.nn.functional.one_hot(lab, 3).double() + 0.01 * torch.arange(6.0)[:, None]
    assert recall_at_k(perfect, lab, 1)[1] == 1.0 and map_at_r(perfect, lab) == pytest.approx(1.0)
    # singleton classes are skipped by MAP@R, count as misses for recall
    lab2 = torch.tensor([0, 0, 1])
    e2 = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])
    assert map_at_r(e2, lab2) == 1.0 and recall_at_k(e2, lab2, 1)[1] == pytest.approx(2 / 3)


def test_pair_masks():
    pos, neg = pair_masks(torch.tensor([0, 0, 1]))
    assert pos.tolist() == [[False, True, False], [True, False, False], [False, False, False]]
    assert neg.tolist() == [[False, False, True], [False, False, True], [True, True, False]]
    pos2, neg2 = pair_masks(torch.tensor([0, 1]), torch.tensor([0, 0, 1]))
    assert pos2.tolist() == [[True, True, False], [False, False, True]] and bool((pos2 ^ neg2).all())


def ref_mine(sim, lab, kind, m):
    s, y, n = sim.tolist(), lab.tolist(), len(lab)
    P = lambda a: [p for p in range(n) if p != a and y[p] == y[a]]   # noqa: E731
    N = lambda a: [j for j in range(n) if y[j] != y[a]]              # noqa: E731
    pos = [[False] * n for _ in range(n)]
    neg = [[False] * n for _ in range(n)]
    for a in range(n):
        for p in P(a):
            pos[a][p] = kind == "semihard" or any(s[a][p] - m < s[a][j] for j in N(a))
        for j in N(a):
            if kind == "hard":
                neg[a][j] = any(s[a][j] + m > s[a][p] for p in P(a))
            else:
                neg[a][j] = any(s[a][p] - m < s[a][j] < s[a][p] for p in P(a))
    return torch.tensor(pos), torch.tensor(neg)


@pytest.mark.parametrize("kind", ["hard", "semihard"])
@pytest.mark.parametrize("seed", [0, 1])
def test_miners_match_loop_reference(kind, seed):
    emb, lab = data(30, 5, 3, seed)
    sim = similarity_matrix(emb)
    for m in (0.0, 0.1, 0.5):
        got = mine_pairs(sim, lab, kind=kind, margin=m)
        ref = ref_mine(sim, lab, kind, m)
        assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])


@settings(max_examples=40, deadline=None)
@given(n=st.integers(3, 25), c=st.integers(2, 5), seed=st.integers(0, 2**31 - 1), scale=st.floats(0.1, 10.0))
def test_property_invariances(n, c, seed, scale):
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(n, 4, generator=g, dtype=torch.float64)
    lab = torch.randint(c, (n,), generator=g)
    lab[0] = lab[1]                                       # at least one pair of a class
    r, m = recall_at_k(emb, lab, 1)[1], map_at_r(emb, lab)
    perm = torch.randperm(n, generator=g)
    assert 0 <= m <= 1 and 0 <= r <= 1
    assert recall_at_k(emb[perm] * scale, lab[perm], 1)[1] == pytest.approx(r)   # cosine: scale-free
    assert map_at_r(emb[perm] * scale, lab[perm]) == pytest.approx(m)
    ks = recall_at_k(emb, lab, list(range(1, n)))
    assert all(ks[k] <= ks[k + 1] + 1e-12 for k in range(1, n - 1))               # R@K non-decreasing
    hard_pos, hard_neg = mine_pairs(similarity_matrix(emb), lab, kind="hard", margin=0.1)
    pos, neg = pair_masks(lab)
    assert not bool((hard_pos & ~pos).any()) and not bool((hard_neg & ~neg).any())


def test_bad_input():
    emb, lab = data()
    with pytest.raises(ValueError, match="ks"):
        recall_at_k(emb, lab, [0])
    with pytest.raises(ValueError, match="labels"):
        recall_at_k(emb, lab[:-1], 1)
    with pytest.raises(ValueError, match="labels"):
        map_at_r(emb, lab.double())
    with pytest.raises(ValueError, match="emb"):
        recall_at_k(emb[0], lab, 1)
    with pytest.raises(ValueError, match="kind"):
        mine_pairs(similarity_matrix(emb), lab, kind="easy")
    with pytest.raises(ValueError, match="margin"):
        mine_pairs(similarity_matrix(emb), lab, margin=-1.0)
    with pytest.raises(ValueError, match="two or more"):
        map_at_r(emb[:3], torch.tensor([0, 1, 2]))


@pytest.mark.gpu
def test_cuda_matches_cpu():
    emb, lab = data(200, 16, 10)
    assert recall_at_k(emb.cuda(), lab.cuda(), (1, 4)) == pytest.approx(recall_at_k(emb, lab, (1, 4)))
    assert map_at_r(emb.cuda(), lab.cuda()) == pytest.approx(map_at_r(emb, lab))
    for kind in ("hard", "semihard"):
        a = mine_pairs(similarity_matrix(emb.cuda()), lab.cuda(), kind=kind)
        b = mine_pairs(similarity_matrix(emb), lab, kind=kind)
        assert torch.equal(a[0].cpu(), b[0]) and torch.equal(a[1].cpu(), b[1])
