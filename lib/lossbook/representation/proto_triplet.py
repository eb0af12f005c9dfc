r"""Proto-Triplet loss and ICNN score/loss for episodic few-shot training
{cite}`mendezruiz2023susana`.

All functions work on a batch of ``E`` episodes at once: embeddings ``(E, M, D)`` with episode
labels ``(E, M)`` in ``0 .. N-1`` (as produced by :func:`lossbook.episodes.sample_episodes`).
Distances are Euclidean, :math:`d(a, b) = \sqrt{\lVert a - b\rVert^2 + \epsilon}`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["prototypes", "proto_logits", "proto_triplet_loss", "icnn_score", "icnn_loss", "episode_loss"]

_EPS = 1e-6


def _check(emb: torch.Tensor, labels: torch.Tensor, name: str) -> None:
    if emb.dim() != 3:
        raise ValueError(f"{name} must have shape (E, M, D), got {tuple(emb.shape)}")
    if labels.shape != emb.shape[:2]:
        raise ValueError(f"{name}_labels must have shape {tuple(emb.shape[:2])}, got {tuple(labels.shape)}")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(f"{name}_labels must be an integer tensor, got {labels.dtype}")


def _dist(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Euclidean distances ``(E, A, B)`` with a small floor inside the square root (finite gradient at 0)."""
    sq = a.pow(2).sum(-1, keepdim=True) + b.pow(2).sum(-1).unsqueeze(1) - 2.0 * a @ b.transpose(1, 2)
    return (sq.clamp_min(0.0) + _EPS).sqrt()


def prototypes(support: torch.Tensor, support_labels: torch.Tensor, n_way: int) -> torch.Tensor:
    r"""Class means :math:`p_c = \frac1{|S_c|}\sum_{i \in S_c} f(x_i)`: ``(E, N*K, D) -> (E, N, D)``."""
    _check(support, support_labels, "support")
    if isinstance(n_way, bool) or not isinstance(n_way, int) or n_way < 1:
        raise ValueError(f"n_way must be a positive integer, got {n_way!r}")
    if int(support_labels.min()) < 0 or int(support_labels.max()) >= n_way:
        raise ValueError(f"support_labels must lie in [0, {n_way}), got range "
                         f"[{int(support_labels.min())}, {int(support_labels.max())}]")
    onehot = F.one_hot(support_labels.long(), n_way).to(support.dtype)          # (E, M, N)
    return onehot.transpose(1, 2) @ support / onehot.sum(1).clamp_min(1).unsqueeze(-1)


def proto_logits(query: torch.Tensor, protos: torch.Tensor) -> torch.Tensor:
    r"""ProtoNet logits :math:`-\lVert f(q) - p_c\rVert^2`: ``(E, Q, D), (E, N, D) -> (E, Q, N)``."""
    if query.dim() != 3 or protos.dim() != 3 or query.shape[::2] != protos.shape[::2]:
        raise ValueError(f"query (E, Q, D) and protos (E, N, D) must agree, got {tuple(query.shape)}, {tuple(protos.shape)}")
    return 2.0 * query @ protos.transpose(1, 2) - query.pow(2).sum(-1, keepdim=True) - protos.pow(2).sum(-1).unsqueeze(1)


def proto_triplet_loss(query: torch.Tensor, query_labels: torch.Tensor, protos: torch.Tensor, *,
                       margin: float = 0.5, reduction: str = "mean") -> torch.Tensor:
    r"""Proto-Triplet loss: a triplet loss whose anchor is a query, whose positive is the query's own
    class prototype and whose negative is the *nearest other-class* prototype,

    .. math::
        \mathcal L_{PT} = \frac1{|Q|}\sum_{q\in Q}\Big[d\big(f(q), p_{y_q}\big)
        - \min_{c \ne y_q} d\big(f(q), p_c\big) + m\Big]_+ .

    Args:
        query: ``(E, Q, D)`` query embeddings; query_labels: ``(E, Q)`` in ``0 .. N-1``.
        protos: ``(E, N, D)`` prototypes (``N >= 2``).
        margin: :math:`m \ge 0` (0.5 in the authors' code).
        reduction: ``"mean"`` (over all queries of all episodes), ``"sum"`` or ``"none"`` (``(E, Q)``).
    """
    _check(query, query_labels, "query")
    if protos.dim() != 3 or protos.shape[0] != query.shape[0] or protos.shape[2] != query.shape[2]:
        raise ValueError(f"protos must have shape ({query.shape[0]}, N, {query.shape[2]}), got {tuple(protos.shape)}")
    n = protos.shape[1]
    if n < 2:
        raise ValueError(f"protos needs at least 2 classes, got {n}")
    if not margin >= 0:
        raise ValueError(f"margin must be >= 0, got {margin!r}")
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    if int(query_labels.min()) < 0 or int(query_labels.max()) >= n:
        raise ValueError(f"query_labels must lie in [0, {n})")
    d = _dist(query, protos)                                                     # (E, Q, N)
    own = F.one_hot(query_labels.long(), n).bool()
    d_pos = d.masked_fill(~own, 0.0).sum(-1)
    d_neg = d.masked_fill(own, float("inf")).amin(-1)
    loss = (d_pos - d_neg + margin).clamp_min(0.0)
    return loss.mean() if reduction == "mean" else loss.sum() if reduction == "sum" else loss


def icnn_score(emb: torch.Tensor, labels: torch.Tensor, *, k: int = 4, reduction: str = "mean") -> torch.Tensor:
    r"""ICNN score in :math:`[0, 1]` of an episode's embeddings (higher: better separated classes).

    For each point :math:`i`, :math:`\mathcal N_k(i)` are its :math:`k` nearest other points,
    :math:`s_{ij} = [y_j = y_i]` and :math:`d^-_i` the distance to its nearest point of another class.

    .. math::
        \gamma = \frac1M\sum_i \frac1k\sum_{j\in\mathcal N_k(i)} s_{ij},\qquad
        \lambda_{\rm intra} = 1 - \operatorname{avg}_{i}\ \operatorname{avg}_{j\in\mathcal N_k(i),\,s_{ij}=1}
            \frac{d_{ij}/d^-_i}{\max(1, \max_{j'\in\mathcal N_k(i)} d_{ij'}/d^-_i)},

    .. math::
        \lambda_{\rm inter} = \operatorname{avg}_{i}\ \operatorname{avg}_{j\in\mathcal N_k(i),\,s_{ij}=0}
            \frac{d_{ij}}{\max_{i',j':\,s_{i'j'}=0} d_{i'j'}}\ \ (=1 \text{ if no neighbour is of another class}),

    .. math::
        \mathrm{ICNN} = \tfrac12\Big(\tfrac12(\lambda_{\rm intra} + \lambda_{\rm inter}) + \gamma\Big),

    where the outer averages run over the points that have at least one neighbour of that kind.
    :math:`\gamma` (a k-NN purity) has no gradient; :math:`\lambda` pulls same-class neighbours
    closer than the nearest other class and pushes other-class neighbours away.

    Args:
        emb: ``(E, M, D)`` embeddings of one episode each (support and queries together).
        labels: ``(E, M)`` integer labels.
        k: neighbours (``1 <= k <= M - 1``; 4 in the authors' code).
        reduction: ``"mean"`` over episodes or ``"none"`` (``(E,)``).
    """
    _check(emb, labels, "emb")
    m = emb.shape[1]
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= m - 1:
        raise ValueError(f"k must be an integer in [1, {m - 1}], got {k!r}")
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
    d = _dist(emb, emb)                                                          # (E, M, M)
    eye = torch.eye(m, dtype=torch.bool, device=emb.device)
    same_all = labels.unsqueeze(2) == labels.unsqueeze(1)
    d_off = d.masked_fill(eye, float("inf"))
    dist_k, idx = d_off.topk(k, dim=-1, largest=False)                           # (E, M, k)
    s = torch.gather(same_all, 2, idx).to(emb.dtype)
    diff = 1.0 - s
    d_neg = d_off.masked_fill(same_all, float("inf")).amin(-1, keepdim=True)    # (E, M, 1)
    d_neg = torch.where(torch.isinf(d_neg), dist_k.amax(-1, keepdim=True), d_neg)   # one class only: no scaling
    r = dist_k / (d_neg + _EPS)
    r = r / r.amax(-1, keepdim=True).clamp_min(1.0)
    n_s, n_d = s.sum(-1), diff.sum(-1)                                           # (E, M)
    has_s, has_d = (n_s > 0).to(emb.dtype), (n_d > 0).to(emb.dtype)
    intra_i = (r * s).sum(-1) / n_s.clamp_min(1)
    lam_intra = 1.0 - (intra_i * has_s).sum(-1) / has_s.sum(-1).clamp_min(1)
    dd = dist_k * diff
    u = dd / (dd.amax(dim=(1, 2), keepdim=True) + _EPS)
    inter_i = u.sum(-1) / n_d.clamp_min(1)
    lam_inter = (inter_i * has_d).sum(-1) / has_d.sum(-1).clamp_min(1)
    lam_inter = torch.where(has_d.sum(-1) > 0, lam_inter, torch.ones_like(lam_inter))
    gamma = s.mean(-1).mean(-1)
    score = 0.5 * (0.5 * (lam_intra + lam_inter) + gamma)
    return score.mean() if reduction == "mean" else score


def icnn_loss(emb: torch.Tensor, labels: torch.Tensor, *, k: int = 4) -> torch.Tensor:
    r"""ICNN loss :math:`-\log \mathrm{ICNN}` (per episode, averaged over episodes); see :func:`icnn_score`."""
    return -torch.log(icnn_score(emb, labels, k=k, reduction="none").clamp_min(_EPS)).mean()


def episode_loss(support: torch.Tensor, support_labels: torch.Tensor, query: torch.Tensor,
                 query_labels: torch.Tensor, n_way: int, *, losses: tuple[str, ...] = ("ce", "pt", "icnn"),
                 margin: float = 0.5, k: int = 4) -> torch.Tensor:
    r"""Episodic training loss: the mean of the chosen terms (as in the authors' code),

    .. math:: \mathcal L = \tfrac1{|T|}\sum_{t\in T}\mathcal L_t,\quad T \subseteq
        \{\mathcal L_{CE}^{\rm proto}, \mathcal L_{PT}, -\log\mathrm{ICNN}(S\cup Q)\}.

    ``losses=("ce",)`` is the prototypical network. Embeddings ``(E, N*K, D)`` and ``(E, N*Q, D)``.
    """
    bad = set(losses) - {"ce", "pt", "icnn"}
    if not losses or bad:
        raise ValueError(f"losses must be a non-empty subset of ('ce', 'pt', 'icnn'), got {losses!r}")
    protos = prototypes(support, support_labels, n_way)
    terms = []
    if "ce" in losses:
        logits = proto_logits(query, protos)
        terms.append(F.cross_entropy(logits.flatten(0, 1), query_labels.flatten().long()))
    if "pt" in losses:
        terms.append(proto_triplet_loss(query, query_labels, protos, margin=margin))
    if "icnn" in losses:
        terms.append(icnn_loss(torch.cat([support, query], 1), torch.cat([support_labels, query_labels], 1), k=k))
    return torch.stack(terms).mean()
