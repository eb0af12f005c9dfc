r"""Few-shot episodes, many at once.

An :math:`N`-way :math:`K`-shot :math:`Q`-query *episode* picks :math:`N` classes, then
:math:`K + Q` distinct points of each: :math:`K` labelled (the support set) and :math:`Q` to
classify (the query set). Labels inside an episode are re-indexed ``0 .. N-1`` in the order the
classes were drawn. :func:`sample_episodes` draws ``E`` episodes as one batch of tensors, so that
a method written for shape ``(E, ...)`` evaluates all of them in a few tensor operations, and
:func:`mean_ci` turns per-episode accuracies into the usual mean ± 95 % interval.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import torch

__all__ = ["Episodes", "mean_ci", "sample_episodes"]


class Episodes(NamedTuple):
    """A batch of ``E`` episodes (``N`` ways, ``K`` shots, ``Q`` queries per class).

    ``support`` ``(E, N*K, ...)`` and ``query`` ``(E, N*Q, ...)`` hold the inputs (or features),
    class-major (all shots of episode-class 0, then of class 1, ...); ``support_labels`` ``(E, N*K)``
    and ``query_labels`` ``(E, N*Q)`` are episode labels in ``0 .. N-1``; ``classes`` ``(E, N)``
    gives the original class of each episode label; ``support_index``/``query_index`` the rows of
    ``x`` that were drawn.
    """

    support: torch.Tensor
    support_labels: torch.Tensor
    query: torch.Tensor
    query_labels: torch.Tensor
    classes: torch.Tensor
    support_index: torch.Tensor
    query_index: torch.Tensor


def _positive_int(name: str, v: int, minimum: int = 1) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {v!r}")
    return v


def sample_episodes(x: torch.Tensor, y: torch.Tensor, *, n_way: int, k_shot: int, n_query: int,
                    n_episodes: int, classes: Sequence[int] | torch.Tensor | None = None,
                    generator: torch.Generator | None = None) -> Episodes:
    r"""Draw ``n_episodes`` independent :math:`N`-way :math:`K`-shot :math:`Q`-query episodes.

    Per episode: :math:`N` distinct classes uniformly from ``classes`` (default: every class in
    ``y``), then :math:`K + Q` distinct points uniformly without replacement from each of them; the
    first :math:`K` are the support, the rest the queries. Episodes are independent of each other.
    Vectorized: one random sort over classes and one over points, for all episodes together.

    Args:
        x: inputs or features, shape ``(M, ...)``.
        y: integer class labels, shape ``(M,)``, on the device of ``x``.
        n_way, k_shot, n_query: :math:`N \ge 1`, :math:`K \ge 1`, :math:`Q \ge 0`.
        n_episodes: :math:`E \ge 1`.
        classes: the classes to draw from (e.g. the novel classes); each needs at least
            :math:`K + Q` points in ``y``.
        generator: a CPU ``torch.Generator`` for reproducible draws.

    Returns:
        :class:`Episodes` with support ``(E, N*K, ...)``, query ``(E, N*Q, ...)`` on ``x.device``.

    Example::

        >>> x, y = torch.randn(100, 3), torch.arange(100) % 5
        >>> ep = sample_episodes(x, y, n_way=3, k_shot=2, n_query=4, n_episodes=10,
        ...                      generator=torch.Generator().manual_seed(0))
        >>> ep.support.shape, ep.query_labels.shape
        (torch.Size([10, 6, 3]), torch.Size([10, 12]))
    """
    if y.dim() != 1 or y.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.bool):
        raise ValueError(f"y must be a 1-d integer tensor, got shape {tuple(y.shape)} and dtype {y.dtype}")
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x and y must have the same length, got {x.shape[0]} and {y.shape[0]}")
    n_way, k_shot = _positive_int("n_way", n_way), _positive_int("k_shot", k_shot)
    n_query, n_episodes = _positive_int("n_query", n_query, 0), _positive_int("n_episodes", n_episodes)
    y_cpu = y.detach().cpu().long()
    pool = torch.unique(y_cpu) if classes is None else torch.as_tensor(classes, dtype=torch.long).unique()
    if pool.numel() < n_way:
        raise ValueError(f"n_way={n_way} needs at least {n_way} classes, got {pool.numel()}")
    need = k_shot + n_query
    # index table: row c lists the positions of class pool[c], padded
    members = [torch.nonzero(y_cpu == c).flatten() for c in pool.tolist()]
    counts = torch.tensor([m.numel() for m in members])
    if int(counts.min()) < need:
        bad = pool[counts.argmin()].item()
        raise ValueError(f"class {bad} has {int(counts.min())} points; k_shot + n_query = {need} needed")
    width = int(counts.max())
    table = torch.zeros(len(members), width, dtype=torch.long)
    for c, m in enumerate(members):
        table[c, :m.numel()] = m
    E = n_episodes
    cls = torch.rand(E, pool.numel(), generator=generator).argsort(dim=1)[:, :n_way]      # (E, N) in pool
    keys = torch.rand(E, n_way, width, generator=generator)
    keys = keys.masked_fill(torch.arange(width) >= counts[cls].unsqueeze(-1), 2.0)         # padding last
    pos = keys.argsort(dim=-1)[..., :need]                                                  # (E, N, K+Q)
    idx = table[cls.unsqueeze(-1).expand(-1, -1, need), pos]                                # rows of x
    s_idx = idx[..., :k_shot].reshape(E, n_way * k_shot).to(x.device)
    q_idx = idx[..., k_shot:].reshape(E, n_way * n_query).to(x.device)
    lab = torch.arange(n_way, device=x.device)
    return Episodes(support=x[s_idx], support_labels=lab.repeat_interleave(k_shot).expand(E, -1).clone(),
                    query=x[q_idx], query_labels=lab.repeat_interleave(n_query).expand(E, -1).clone(),
                    classes=pool[cls].to(x.device), support_index=s_idx, query_index=q_idx)


def mean_ci(values: torch.Tensor | Sequence[float], *, z: float = 1.96) -> tuple[float, float]:
    r"""Mean and half-width of the normal-approximation confidence interval,
    :math:`\bar v \pm z\, s / \sqrt{E}` (``z = 1.96``: 95 %), over episodes (or seeds).

    Returns ``(mean, half_width)``; the half-width is 0 for a single value.
    """
    v = torch.as_tensor(values, dtype=torch.float64).flatten()
    if v.numel() == 0:
        raise ValueError("values must not be empty")
    if not math.isfinite(z) or z <= 0:
        raise ValueError(f"z must be a positive number, got {z!r}")
    half = float(z * v.std(unbiased=True) / math.sqrt(v.numel())) if v.numel() > 1 else 0.0
    return float(v.mean()), half
