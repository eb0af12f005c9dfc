r"""Transductive few-shot inference as regularised clustering, solved by a bound optimizer
{cite}`ziko2021transductive`.

All the points of a task, support and query, :math:`f_1, \dots, f_P`, are clustered into the
:math:`N` classes with soft assignments :math:`y_p \in \Delta_N` (one-hot and fixed on the support)
and prototypes :math:`m_k`, by minimising

.. math::
    \mathcal E(Y, M) = \sum_p y_p^\top \log y_p + \sum_p \sum_k y_{pk} \frac{\|f_p - m_k\|^2}{T}
    - \frac\lambda2 \sum_{p, q} w_{pq}\, y_p^\top y_q ,

the K-means term, a Laplacian term on a kNN affinity :math:`W` (written :math:`-y_p^\top y_q`, its
form on one-hot assignments) and the negative entropy of the relaxation to the simplex. For a
positive semi-definite :math:`W` the Laplacian term is concave: linearising it at the current
:math:`Y^{(i)}` gives an upper bound, tight at :math:`Y^{(i)}`, that separates over the points and is
minimised in closed form, all points in parallel,

.. math::
    y_{q}^{(i+1)} \propto \exp\Big(-\frac{\|f_q - m_k\|^2}{T} + \lambda \sum_p w_{qp}\, y_{p}^{(i)}\Big)_k .

Alternating these bound steps with the prototype step :math:`m_k = \sum_p y_{pk} f_p / \sum_p y_{pk}`
(block-coordinate descent) never increases :math:`\mathcal E`. All functions work on a batch of
``E`` episodes at once: features ``(E, P, D)``.

Public functions: :func:`center_l2`, :func:`prototypes`, :func:`nearest_prototype` (the inductive
baseline), :func:`knn_affinity`, :func:`energy`, :func:`bound_optimizer` (the method),
:func:`kmeans_transductive` (plain K-means seeded by the support) and :func:`episode_accuracy`.
"""
from __future__ import annotations

import math
import numbers
from typing import NamedTuple

import torch
import torch.nn.functional as F

__all__ = ["TransductiveResult", "bound_optimizer", "center_l2", "energy", "episode_accuracy",
           "kmeans_transductive", "knn_affinity", "nearest_prototype", "prototypes"]


def _check_features(name: str, f: torch.Tensor) -> None:
    if f.dim() != 3 or not f.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor of shape (E, points, D), "
                         f"got shape {tuple(f.shape)} and dtype {f.dtype}")


def _check_labels(support: torch.Tensor, labels: torch.Tensor, n_way: int) -> None:
    if isinstance(n_way, bool) or not isinstance(n_way, int) or n_way < 1:
        raise ValueError(f"n_way must be a positive integer, got {n_way!r}")
    if labels.shape != support.shape[:2] or labels.is_floating_point():
        raise ValueError(f"support_labels must be integers of shape {tuple(support.shape[:2])}, "
                         f"got shape {tuple(labels.shape)} and dtype {labels.dtype}")
    if labels.device.type == "cpu" and labels.numel() and (labels.min() < 0 or labels.max() >= n_way):
        raise ValueError(f"support_labels must lie in [0, {n_way - 1}]")


def _check_nonneg(name: str, v: float, positive: bool = False) -> float:
    if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v) or v < 0 or (positive and v == 0):
        raise ValueError(f"{name} must be a finite {'positive' if positive else 'non-negative'} number, got {v!r}")
    return float(v)


def _sqdist(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances ``(E, P, N)`` between rows of ``a`` ``(E, P, D)`` and ``b`` ``(E, N, D)``
    (one batched matrix product; faster than ``cdist`` for these small shapes)."""
    d = a.square().sum(-1, keepdim=True) - 2 * a @ b.transpose(1, 2) + b.square().sum(-1).unsqueeze(1)
    return d.clamp_min(0)


def _softmax(z: torch.Tensor) -> torch.Tensor:
    """Softmax over a short last dimension (several times faster than ``torch.softmax`` there on CPU)."""
    e = (z - z.amax(-1, keepdim=True)).exp()
    return e / e.sum(-1, keepdim=True)


def center_l2(features: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    r"""Centre by the base-class mean, then scale to unit norm: :math:`(f - \bar f)/\|f - \bar f\|`
    (the "CL2N" preprocessing of SimpleShot and of the authors' code). ``mean`` broadcasts
    against ``features`` (usually shape ``(D,)``)."""
    g = features - mean
    return g / g.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def prototypes(support: torch.Tensor, support_labels: torch.Tensor, n_way: int) -> torch.Tensor:
    r"""Class means of the support, :math:`m_k = \frac1{|S_k|}\sum_{p \in S_k} f_p`: ``(E, N, D)``
    from support ``(E, S, D)`` and labels ``(E, S)`` in ``0..N-1`` (every class needs one shot)."""
    _check_features("support", support)
    _check_labels(support, support_labels, n_way)
    onehot = F.one_hot(support_labels, n_way).to(support.dtype)              # (E, S, N)
    return onehot.transpose(1, 2) @ support / onehot.sum(1).unsqueeze(-1)


def nearest_prototype(support: torch.Tensor, support_labels: torch.Tensor, query: torch.Tensor,
                      n_way: int) -> torch.Tensor:
    r"""The inductive baseline: each query gets the class of its nearest support prototype,
    :math:`\hat y_q = \arg\min_k \|f_q - m_k\|^2`. Returns labels ``(E, Q)``."""
    _check_features("query", query)
    return _sqdist(query, prototypes(support, support_labels, n_way)).argmin(-1)


def knn_affinity(features: torch.Tensor, k: int, *, psd: bool = False) -> torch.Tensor:
    r"""Symmetric kNN affinity of each episode, ``(E, P, P)`` from features ``(E, P, D)``.

    :math:`a_{pq} = 1` when :math:`q \ne p` is among the ``k`` nearest neighbours of :math:`p`, and
    :math:`W = (A + A^\top)/2`: weights 1 for mutual neighbours, 1/2 for one-way ones, zero diagonal.
    Such a :math:`W` has trace 0, so it is never positive semi-definite. ``psd=True`` adds
    :math:`c\,I` with :math:`c = \max(0, -\lambda_{\min}(W))` per episode: the smallest shift that
    makes :math:`W` PSD, which changes the Laplacian term only by the constant
    :math:`-\frac\lambda2 c P` on one-hot assignments (:math:`y_p^\top y_p = 1`).
    """
    _check_features("features", features)
    P = features.shape[1]
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= P - 1:
        raise ValueError(f"k must be an integer in [1, {P - 1}] (points per episode minus one), got {k!r}")
    d = _sqdist(features, features)
    d.diagonal(dim1=1, dim2=2).fill_(float("inf"))
    nn_idx = d.topk(k, dim=-1, largest=False).indices                        # (E, P, k)
    a = torch.zeros_like(d).scatter_(-1, nn_idx, 1.0)
    w = 0.5 * (a + a.transpose(1, 2))
    if psd:
        lam_min = torch.linalg.eigvalsh(w.double()).amin(-1).to(w.dtype)     # (E,)
        w = w + torch.diag_embed((-lam_min).clamp_min(0).unsqueeze(-1).expand(-1, P))
    return w


def energy(Y: torch.Tensor, features: torch.Tensor, means: torch.Tensor, W: torch.Tensor, *,
           lam: float, temperature: float = 1.0) -> torch.Tensor:
    r"""The relaxed objective, one value per episode (shape ``(E,)``):

    .. math::
        \mathcal E(Y, M) = \sum_p y_p^\top \log y_p + \sum_{p,k} y_{pk}\frac{\|f_p - m_k\|^2}{T}
        - \frac\lambda2 \sum_{p,q} w_{pq}\, y_p^\top y_q .

    ``Y`` ``(E, P, N)`` rows on the simplex (:math:`0 \log 0 = 0`), ``features`` ``(E, P, D)``,
    ``means`` ``(E, N, D)``, ``W`` ``(E, P, P)``.
    """
    a = _sqdist(features, means) / temperature
    ent = torch.special.xlogy(Y, Y).sum((1, 2))
    lap = (Y * (W @ Y)).sum((1, 2))
    return ent + (Y * a).sum((1, 2)) - 0.5 * lam * lap


class TransductiveResult(NamedTuple):
    """``labels`` ``(E, Q)`` (argmax of the query assignments), ``assignments`` ``(E, Q, N)``,
    ``means`` ``(E, N, D)``, ``energy_trace`` ``(E, steps + 1)``: :math:`\\mathcal E` at the start and
    after every bound step and every prototype step (``None`` when not tracked)."""

    labels: torch.Tensor
    assignments: torch.Tensor
    means: torch.Tensor
    energy_trace: torch.Tensor | None


def bound_optimizer(support: torch.Tensor, support_labels: torch.Tensor, query: torch.Tensor, n_way: int, *,
                    lam: float = 0.5, knn: int = 5, outer: int = 10, inner: int = 10, temperature: float = 1.0,
                    W: torch.Tensor | None = None, psd: bool = False,
                    track_energy: bool = True) -> TransductiveResult:
    r"""Laplacian-regularised K-means on support + query, by block-coordinate bound optimisation.

    Prototypes start at the support means, the query assignments at
    :math:`\operatorname{softmax}(-\|f_q - m_k\|^2/T)`; the support assignments stay one-hot. Then
    ``outer`` rounds of: ``inner`` bound steps, each updating every query in parallel,

    .. math::
        y_q \leftarrow \operatorname{softmax}_k\Big(-\frac{\|f_q - m_k\|^2}{T} + \lambda \sum_p w_{qp}\, y_p\Big),

    (the exact minimiser over the simplex of the bound obtained by linearising the concave
    Laplacian term at the current :math:`Y`), followed by one prototype step
    :math:`m_k = \sum_p y_{pk} f_p / \sum_p y_{pk}` (exact minimiser in :math:`M`). For a PSD ``W``
    every step is non-increasing in :math:`\mathcal E` ({func}`energy`). ``lam = 0`` is soft K-means.

    Args:
        support: ``(E, S, D)`` support features; ``support_labels`` ``(E, S)`` in ``0..N-1``.
        query: ``(E, Q, D)`` query features.
        n_way: :math:`N`.
        lam: :math:`\lambda \ge 0`, weight of the Laplacian term.
        knn: neighbours of the affinity built by {func}`knn_affinity` when ``W`` is not given.
        outer, inner: prototype steps and bound steps per prototype step.
        temperature: :math:`T > 0` dividing the squared distances (1 in the paper).
        W: optional affinity ``(E, S + Q, S + Q)`` over support then query points.
        psd: shift the built affinity to be PSD (see {func}`knn_affinity`).
        track_energy: record :math:`\mathcal E` after every step (``energy_trace``; else ``None``).

    Returns:
        :class:`TransductiveResult`.

    Example::

        >>> g = torch.Generator().manual_seed(0)
        >>> s, q = torch.randn(8, 6, 4, generator=g), torch.randn(8, 9, 4, generator=g)
        >>> out = bound_optimizer(s, torch.arange(3).repeat_interleave(2).expand(8, -1), q, 3, psd=True)
        >>> e = out.energy_trace
        >>> out.labels.shape, bool((e.diff(dim=1) <= 1e-6 * e[:, :-1].abs()).all())   # float32 rounding
        (torch.Size([8, 9]), True)
    """
    _check_features("support", support)
    _check_features("query", query)
    _check_labels(support, support_labels, n_way)
    if support.shape[0] != query.shape[0] or support.shape[2] != query.shape[2]:
        raise ValueError(f"support {tuple(support.shape)} and query {tuple(query.shape)} must agree "
                         "in episodes and feature dimension")
    lam = _check_nonneg("lam", lam)
    temperature = _check_nonneg("temperature", temperature, positive=True)
    for name, v in (("outer", outer), ("inner", inner)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"{name} must be a non-negative integer, got {v!r}")
    S = support.shape[1]
    feats = torch.cat([support, query], 1)                                   # (E, P, D)
    P = feats.shape[1]
    if W is None:
        W = knn_affinity(feats, knn, psd=psd)
    elif W.shape != (feats.shape[0], P, P):
        raise ValueError(f"W must have shape {(feats.shape[0], P, P)}, got {tuple(W.shape)}")
    W = W.to(feats.dtype)
    ys = F.one_hot(support_labels, n_way).to(feats.dtype)
    M = prototypes(support, support_labels, n_way)
    a = _sqdist(feats, M) / temperature                                      # (E, P, N), all points
    Y = torch.cat([ys, _softmax(-a[:, S:])], 1)
    WY = W @ Y

    def objective() -> torch.Tensor:   # energy(), reusing a and W @ Y
        return (torch.special.xlogy(Y, Y) + Y * a - 0.5 * lam * Y * WY).sum((1, 2))

    trace = [objective()] if track_energy else []
    for _ in range(outer):
        for _ in range(inner):                                               # bound steps (parallel)
            Y = torch.cat([ys, _softmax(-a[:, S:] + lam * WY[:, S:])], 1)
            WY = W @ Y
            if track_energy:
                trace.append(objective())
        M = (Y.transpose(1, 2) @ feats) / Y.sum(1).unsqueeze(-1)             # prototype step
        a = _sqdist(feats, M) / temperature
        if track_energy:
            trace.append(objective())
    Yq = Y[:, S:]
    return TransductiveResult(Yq.argmax(-1), Yq, M, torch.stack(trace, 1) if track_energy else None)


def kmeans_transductive(support: torch.Tensor, support_labels: torch.Tensor, query: torch.Tensor, n_way: int, *,
                        iters: int = 10) -> torch.Tensor:
    r"""Plain (hard) K-means on support + query, seeded by the support prototypes, support labels
    fixed: alternate :math:`\hat y_q = \arg\min_k \|f_q - m_k\|^2` and :math:`m_k` = mean of the
    support and query points assigned to :math:`k`. Returns query labels ``(E, Q)``. This is the
    bound optimizer's limit :math:`\lambda = 0`, :math:`T \to 0`."""
    _check_features("query", query)
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 0:
        raise ValueError(f"iters must be a non-negative integer, got {iters!r}")
    feats = torch.cat([support, query], 1)
    ys = F.one_hot(support_labels, n_way).to(feats.dtype)
    M = prototypes(support, support_labels, n_way)
    lab = _sqdist(query, M).argmin(-1)
    for _ in range(iters):
        Y = torch.cat([ys, F.one_hot(lab, n_way).to(feats.dtype)], 1)
        M = (Y.transpose(1, 2) @ feats) / Y.sum(1).unsqueeze(-1)             # never empty: support
        lab = _sqdist(query, M).argmin(-1)
    return lab


def episode_accuracy(pred: torch.Tensor, query_labels: torch.Tensor) -> torch.Tensor:
    """Fraction of correct query labels in each episode, ``(E,)`` (no relabelling of clusters)."""
    if pred.shape != query_labels.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and query_labels {tuple(query_labels.shape)} must match")
    return (pred == query_labels).to(torch.float64).mean(-1)
