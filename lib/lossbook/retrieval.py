r"""Retrieval metrics and pair bookkeeping for metric learning, shared by the chapters that learn
embeddings (deep metric learning, contrastive representation learning).

Everything works on the :math:`N \times N` (or :math:`N \times M`) similarity matrix of a batch or
an evaluation set, with boolean masks marking which entries are positive pairs (same label) and
which are negative pairs (different label); no list of all positive × negative index pairs is ever
built.

- :func:`similarity_matrix`: cosine (or dot-product) similarities :math:`s_{ij}`;
- :func:`pair_masks`: positive / negative masks, the diagonal excluded when both sides are the
  same set;
- :func:`recall_at_k`: leave-one-out Recall@K, :math:`\frac1N \sum_q \mathbb 1[\exists\, i \le K:
  y_{\pi_q(i)} = y_q]`;
- :func:`map_at_r`: leave-one-out MAP@R (Musgrave et al., 2020);
- :func:`mine_pairs`: hard / semi-hard miners that return masks.

torch only; device- and dtype-agnostic; no host synchronisation except where a Python number is
returned on purpose (the metrics).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

__all__ = ["map_at_r", "mine_pairs", "pair_masks", "recall_at_k", "similarity_matrix"]


def _check_emb_labels(emb: torch.Tensor, labels: torch.Tensor, name: str = "emb") -> None:
    if not isinstance(emb, torch.Tensor) or emb.dim() != 2 or not emb.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor of shape (N, D), got "
                         f"{tuple(emb.shape) if isinstance(emb, torch.Tensor) else type(emb).__name__}")
    if not isinstance(labels, torch.Tensor) or labels.dim() != 1 or labels.shape[0] != emb.shape[0]:
        raise ValueError(f"labels must be a 1-d tensor with one label per row of {name} "
                         f"({emb.shape[0]}), got "
                         f"{tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__}")
    if labels.is_floating_point() or labels.is_complex():
        raise ValueError(f"labels must be integer (or bool) class ids, got dtype {labels.dtype}")


def similarity_matrix(emb: torch.Tensor, other: torch.Tensor | None = None, *,
                      normalize: bool = True) -> torch.Tensor:
    r"""Similarities :math:`s_{ij} = \langle u_i, v_j\rangle`, cosine when ``normalize`` (default).

    Args:
        emb: ``(N, D)`` embeddings :math:`u`.
        other: ``(M, D)`` embeddings :math:`v` (default: ``emb`` itself).
        normalize: L2-normalise both sides first, so :math:`s_{ij} \in [-1, 1]`.

    Returns:
        ``(N, M)`` similarity matrix, differentiable.
    """
    other = emb if other is None else other
    for name, t in (("emb", emb), ("other", other)):
        if t.dim() != 2 or not t.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor of shape (N, D), got {tuple(t.shape)}")
    if emb.shape[1] != other.shape[1]:
        raise ValueError(f"emb and other must have the same width, got {emb.shape[1]} and {other.shape[1]}")
    if normalize:
        emb, other = F.normalize(emb, dim=1), F.normalize(other, dim=1)
    return emb @ other.T


def pair_masks(labels: torch.Tensor, other_labels: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Boolean masks of positive and negative pairs over the similarity matrix.

    :math:`P_{ij} = \mathbb 1[y_i = y'_j]` and :math:`N_{ij} = \mathbb 1[y_i \ne y'_j]`. When
    ``other_labels`` is omitted the two sides are the same batch and the diagonal (an example with
    itself) is removed from :math:`P`.

    Args:
        labels: ``(N,)`` integer labels of the anchors.
        other_labels: ``(M,)`` integer labels of the other side (default: ``labels``).

    Returns:
        ``(pos, neg)``, two ``(N, M)`` bool tensors.

    Example::

        >>> pos, neg = pair_masks(torch.tensor([0, 0, 1]))
        >>> pos.int().tolist(), neg.int().tolist()
        ([[0, 1, 0], [1, 0, 0], [0, 0, 0]], [[0, 0, 1], [0, 0, 1], [1, 1, 0]])
    """
    if labels.dim() != 1 or labels.is_floating_point():
        raise ValueError(f"labels must be a 1-d integer tensor, got shape {tuple(labels.shape)}, dtype {labels.dtype}")
    same = other_labels is None
    other_labels = labels if same else other_labels
    if other_labels.dim() != 1 or other_labels.is_floating_point():
        raise ValueError(f"other_labels must be a 1-d integer tensor, got shape {tuple(other_labels.shape)}, "
                         f"dtype {other_labels.dtype}")
    eq = labels[:, None] == other_labels[None, :]
    neg = ~eq
    if same:
        eq = eq & ~torch.eye(len(labels), dtype=torch.bool, device=labels.device)
    return eq, neg


def _loo_similarity(emb: torch.Tensor, labels: torch.Tensor, normalize: bool) -> torch.Tensor:
    _check_emb_labels(emb, labels)
    if emb.shape[0] < 2:
        raise ValueError(f"need at least 2 embeddings for leave-one-out retrieval, got {emb.shape[0]}")
    s = similarity_matrix(emb.detach(), normalize=normalize)
    return s.fill_diagonal_(float("-inf"))   # a query never retrieves itself


def recall_at_k(emb: torch.Tensor, labels: torch.Tensor, ks: int | Sequence[int] = (1, 2, 4, 8), *,
                normalize: bool = True) -> dict[int, float]:
    r"""Leave-one-out Recall@K: each embedding queries all the others.

    .. math::
        \mathrm{R@}K = \frac1N \sum_{q=1}^N \mathbb 1\big[\exists\, i \le K : y_{\pi_q(i)} = y_q\big],

    where :math:`\pi_q` orders the other :math:`N - 1` items by decreasing similarity to :math:`q`
    (cosine when ``normalize``). This is the "Recall@K" of the deep-metric-learning literature
    (Oh Song et al., 2016), not the information-retrieval recall.

    Args:
        emb: ``(N, D)`` embeddings of the evaluation set.
        labels: ``(N,)`` integer class labels.
        ks: one K or several, each in ``[1, N - 1]``.
        normalize: rank by cosine (default) or by raw dot product.

    Returns:
        ``{K: recall}`` as Python floats.
    """
    ks = [ks] if isinstance(ks, int) else list(ks)
    s = _loo_similarity(emb, labels, normalize)
    n = emb.shape[0]
    if not ks or any((not isinstance(k, int)) or k < 1 or k > n - 1 for k in ks):
        raise ValueError(f"ks must be integers in [1, {n - 1}], got {ks}")
    idx = s.topk(max(ks), dim=1).indices                     # (N, Kmax)
    hit = labels[idx] == labels[:, None]                     # (N, Kmax)
    first = hit.cummax(dim=1).values.double()                # 1 from the first hit on
    return {k: float(first[:, k - 1].mean()) for k in ks}


def map_at_r(emb: torch.Tensor, labels: torch.Tensor, *, normalize: bool = True) -> float:
    r"""Leave-one-out MAP@R (mean average precision at R; Musgrave, Belongie and Lim, 2020).

    For query :math:`q` with :math:`R_q` other items of its class,

    .. math::
        \mathrm{AP@R}(q) = \frac1{R_q} \sum_{i=1}^{R_q} P_q(i)\, \mathrm{rel}_q(i), \qquad
        P_q(i) = \frac1i \sum_{j \le i} \mathrm{rel}_q(j),

    with :math:`\mathrm{rel}_q(i) = 1` when the :math:`i`-th nearest other item shares :math:`q`'s
    label. MAP@R averages over the queries with :math:`R_q \ge 1` (singletons are skipped).

    Args:
        emb: ``(N, D)`` embeddings; labels: ``(N,)`` integer labels; normalize: cosine ranking.

    Returns:
        MAP@R as a Python float.
    """
    s = _loo_similarity(emb, labels, normalize)
    pos, _ = pair_masks(labels)
    r = pos.sum(1)                                            # (N,)
    keep = r > 0
    if not bool(keep.any()):
        raise ValueError("map_at_r needs at least one class with two or more items")
    rmax = int(r.max())
    idx = s.topk(rmax, dim=1).indices                         # only the first R_q ranks matter
    rel = (labels[idx] == labels[:, None]).to(emb.dtype)      # (N, Rmax)
    ranks = torch.arange(1, rmax + 1, device=emb.device, dtype=emb.dtype)
    prec = rel.cumsum(1) / ranks
    within = ranks[None, :] <= r[:, None]
    ap = (prec * rel * within).sum(1) / r.clamp(min=1)
    return float(ap[keep].mean())


def mine_pairs(sim: torch.Tensor, labels: torch.Tensor, *, kind: str = "hard", margin: float = 0.1
               ) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Mine informative pairs; returns masks ``(pos, neg)`` over the ``(N, N)`` similarity matrix.

    ``kind="hard"`` (the pair-mining rule of the multi-similarity loss, Wang et al., 2019): keep
    negative :math:`(a, n)` when :math:`s_{an} + \epsilon > \min_{p \in P(a)} s_{ap}` and positive
    :math:`(a, p)` when :math:`s_{ap} - \epsilon < \max_{n \in N(a)} s_{an}`.

    ``kind="semihard"`` (FaceNet's rule, Schroff et al., 2015, expressed per pair): keep negative
    :math:`(a, n)` when some positive of the anchor is more similar but by less than the margin,
    :math:`\exists\, p \in P(a): s_{ap} - \epsilon < s_{an} < s_{ap}`; all positives are kept.

    Args:
        sim: ``(N, N)`` similarity matrix of a batch with itself.
        labels: ``(N,)`` integer labels.
        kind: ``"hard"`` or ``"semihard"``.
        margin: :math:`\epsilon \ge 0`.

    Returns:
        ``(pos, neg)`` bool masks, sub-masks of :func:`pair_masks`. Anchors without positives or
        without negatives keep nothing.
    """
    if sim.dim() != 2 or sim.shape[0] != sim.shape[1] or not sim.is_floating_point():
        raise ValueError(f"sim must be a square floating-point (N, N) matrix, got {tuple(sim.shape)}")
    if labels.dim() != 1 or labels.shape[0] != sim.shape[0]:
        raise ValueError(f"labels must have shape ({sim.shape[0]},), got {tuple(labels.shape)}")
    if kind not in ("hard", "semihard"):
        raise ValueError(f"kind must be 'hard' or 'semihard', got {kind!r}")
    if not margin >= 0:
        raise ValueError(f"margin must be >= 0, got {margin!r}")
    s = sim.detach()
    pos, neg = pair_masks(labels)
    inf = torch.tensor(float("inf"), dtype=s.dtype, device=s.device)
    if kind == "hard":
        min_pos = torch.where(pos, s, inf).amin(1, keepdim=True)     # +inf without positives
        max_neg = torch.where(neg, s, -inf).amax(1, keepdim=True)    # -inf without negatives
        return pos & (s - margin < max_neg), neg & (s + margin > min_pos)
    # semi-hard: the smallest positive similarity strictly above s_an must lie within the margin
    sorted_pos = torch.where(pos, s, inf).sort(1).values             # (N, N), +inf padding at the end
    j = torch.searchsorted(sorted_pos.contiguous(), s.contiguous(), right=True)
    above = sorted_pos.gather(1, j.clamp(max=s.shape[1] - 1))
    above = torch.where(j < s.shape[1], above, inf)
    return pos, neg & (above < inf) & (above - margin < s)
