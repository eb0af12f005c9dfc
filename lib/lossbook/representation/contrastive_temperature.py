r"""The contrastive (InfoNCE) loss as a hardness-aware loss, and the temperature that sets its hardness
{cite}`wang2021understanding`.

For an anchor :math:`i` with positive similarity :math:`s_{i,i}` and negative similarities
:math:`s_{i,k}` (cosines of unit-norm embeddings),

.. math::
    \mathcal L_i = -\log \frac{e^{s_{i,i}/\tau}}{e^{s_{i,i}/\tau} + \sum_{k \ne i} e^{s_{i,k}/\tau}},
    \qquad
    \frac{\partial \mathcal L_i}{\partial s_{i,j}} = \frac{P_{i,j}}{\tau}, \quad
    \frac{\partial \mathcal L_i}{\partial s_{i,i}} = -\frac1\tau \sum_{k \ne i} P_{i,k},

with :math:`P_{i,\cdot}` the softmax over the positive and the negatives. The negatives share the push
in proportion to :math:`r_i(s_{i,j}) = e^{s_{i,j}/\tau} / \sum_{k \ne i} e^{s_{i,k}/\tau}`, a Boltzmann
distribution at temperature :math:`\tau`: small :math:`\tau` puts all of it on the hardest negatives.

Everything works on an ``(M, K)`` similarity matrix with boolean *masks* for the positive and the
negatives of each row (no index lists): :func:`masked_info_nce`, :func:`negative_weights`,
:func:`info_nce_similarity_grad`. :func:`info_nce` is SimCLR's NT-Xent on two views,
:func:`hard_info_nce` the explicit hard-negative variant (only the most similar negatives of each anchor
are kept). :func:`uniformity` and :func:`tolerance` measure an embedding; :func:`train_contrastive` is a
small SimCLR training loop.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..augment import augment
from ..retrieval import pair_masks, similarity_matrix

from .._checks import check_reduction as _check_reduction, reduce as _reduce

__all__ = ["hard_info_nce", "info_nce", "info_nce_similarity_grad", "masked_info_nce", "negative_weights",
           "simclr_masks", "supcon_loss", "tolerance", "train_contrastive", "train_contrastive_stacked", "uniformity",
           "weight_entropy"]



def _check_tau(tau: float | torch.Tensor) -> float | torch.Tensor:
    if isinstance(tau, torch.Tensor):
        if not tau.is_floating_point():
            raise ValueError(f"tau must be floating point, got {tau.dtype}")
        if tau.device.type == "cpu" and not bool((tau > 0).all() & torch.isfinite(tau).all()):
            raise ValueError("tau must hold positive finite temperatures")
        return tau
    if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not math.isfinite(tau) or tau <= 0:
        raise ValueError(f"tau must be a positive finite number, got {tau!r}")
    return float(tau)


def _tau_for(tau: float | torch.Tensor, sim: torch.Tensor) -> float | torch.Tensor:
    """A temperature tensor of the leading shape of ``sim`` (..., M, K), made to broadcast over (M, K)."""
    if isinstance(tau, torch.Tensor):
        if tau.shape != sim.shape[:-2]:
            raise ValueError(f"a tensor tau must have the leading shape of sim {tuple(sim.shape[:-2])}, "
                             f"got {tuple(tau.shape)}")
        return tau.to(sim.dtype)[..., None, None]
    return tau


def _check_masks(sim: torch.Tensor, pos_mask: torch.Tensor, neg_mask: torch.Tensor) -> None:
    if sim.dim() < 2 or not sim.is_floating_point():
        raise ValueError(f"sim must be a floating-point (..., M, K) tensor, got {sim.dtype} {tuple(sim.shape)}")
    for name, m in (("pos_mask", pos_mask), ("neg_mask", neg_mask)):
        if m.dtype != torch.bool or m.dim() > sim.dim() or m.shape != sim.shape[sim.dim() - m.dim():]:
            raise ValueError(f"{name} must be a bool tensor of shape {tuple(sim.shape[-2:])} (or {tuple(sim.shape)}), "
                             f"got {m.dtype} {tuple(m.shape)}")
    if sim.device.type == "cpu":  # value checks only where they cost no device sync
        if not bool((pos_mask.sum(-1) == 1).all()):
            raise ValueError("pos_mask must mark exactly one positive in each row")
        if bool((pos_mask & neg_mask).any()):
            raise ValueError("pos_mask and neg_mask must not overlap")


def masked_info_nce(sim: torch.Tensor, pos_mask: torch.Tensor, neg_mask: torch.Tensor, tau: float, *,
                    reduction: str = "mean") -> torch.Tensor:
    r"""InfoNCE on a similarity matrix, one anchor per row:

    .. math::
        \mathcal L_i = -\frac{s_{i,p(i)}}{\tau} + \log\Big( e^{s_{i,p(i)}/\tau} + \sum_{k \in N(i)} e^{s_{i,k}/\tau} \Big),

    :math:`p(i)` the one column marked in ``pos_mask[i]``, :math:`N(i)` the columns marked in
    ``neg_mask[i]``; other columns are ignored. Computed by a masked log-sum-exp (stable in float32).

    Args:
        sim: similarities ``(M, K)``, or a stack ``(..., M, K)`` of such matrices (e.g. one per model).
        pos_mask, neg_mask: bool ``(M, K)`` (or ``(..., M, K)``); exactly one positive per row, disjoint
            from the negatives.
        tau: temperature :math:`\tau > 0`; or a tensor of the leading shape ``(...)``, one per matrix.
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (the ``(..., M)`` losses); ``"mean"`` and ``"sum"``
            reduce over everything (use ``"none"`` and ``.mean(-1)`` for one loss per matrix).
    """
    _check_masks(sim, pos_mask, neg_mask)
    logits = sim / _tau_for(_check_tau(tau), sim)
    pos = logits.masked_fill(~pos_mask, 0.0).sum(-1)
    lse = logits.masked_fill(~(pos_mask | neg_mask), float("-inf")).logsumexp(-1)
    return _reduce(lse - pos, reduction)


def negative_weights(sim: torch.Tensor, neg_mask: torch.Tensor, tau: float) -> torch.Tensor:
    r"""The relative penalty on each negative, :math:`r_i(s_{i,j}) = e^{s_{i,j}/\tau} / \sum_{k \in N(i)} e^{s_{i,k}/\tau}`
    (zero off the negatives): row ``i`` is the Boltzmann distribution of the gradient's push over
    anchor ``i``'s negatives. Rows without negatives are all zero."""
    if neg_mask.shape != sim.shape or neg_mask.dtype != torch.bool:
        raise ValueError(f"neg_mask must be a bool tensor of shape {tuple(sim.shape)}, "
                         f"got {neg_mask.dtype} {tuple(neg_mask.shape)}")
    tau = _check_tau(tau)
    r = (sim / tau).masked_fill(~neg_mask, float("-inf")).softmax(-1)
    return r.nan_to_num(0.0)


def weight_entropy(r: torch.Tensor) -> torch.Tensor:
    r"""Entropy :math:`-\sum_j r_{ij} \log r_{ij}` of each row of a weight matrix (``0 log 0 = 0``): 0 when
    one negative takes the whole push, :math:`\log |N(i)|` when the push is spread evenly."""
    return -(r * r.clamp_min(torch.finfo(r.dtype).tiny).log()).sum(-1)


def info_nce_similarity_grad(sim: torch.Tensor, pos_mask: torch.Tensor, neg_mask: torch.Tensor,
                             tau: float) -> torch.Tensor:
    r"""The gradient of the summed :func:`masked_info_nce` with respect to ``sim``, in closed form:
    :math:`P_{i,j}/\tau` on the negatives, :math:`-\frac1\tau \sum_{k \in N(i)} P_{i,k}` on the positive, 0 elsewhere,
    with :math:`P_{i,\cdot}` the softmax of :math:`s_{i,\cdot}/\tau` over the positive and the negatives."""
    _check_masks(sim, pos_mask, neg_mask)
    tau = _check_tau(tau)
    p = (sim / tau).masked_fill(~(pos_mask | neg_mask), float("-inf")).softmax(-1)
    on_neg = p.masked_fill(~neg_mask, 0.0)
    return (on_neg - pos_mask.to(sim.dtype) * on_neg.sum(-1, keepdim=True)) / tau


def simclr_masks(n: int, device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Masks for the ``(2n, 2n)`` similarity matrix of two stacked views ``[z1; z2]``: view ``i`` and
    view ``i ± n`` are positives; every other view except ``i`` itself is a negative (``2n - 2`` per row)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    idx = torch.arange(2 * n, device=device)
    pos = idx[:, None] == (idx[None, :] + n) % (2 * n)
    neg = ~(pos | torch.eye(2 * n, dtype=torch.bool, device=device))
    return pos, neg


def _views_similarity(z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
    if z1.dim() < 2 or z1.shape != z2.shape or not z1.is_floating_point():
        raise ValueError(f"z1 and z2 must be floating-point (..., N, d) tensors of the same shape, got "
                         f"{tuple(z1.shape)} and {tuple(z2.shape)}")
    z = F.normalize(torch.cat([z1, z2], dim=-2), dim=-1)
    return z @ z.transpose(-1, -2)


def info_nce(z1: torch.Tensor, z2: torch.Tensor, tau: float = 0.2, *, reduction: str = "mean") -> torch.Tensor:
    r"""SimCLR's NT-Xent: :func:`masked_info_nce` on the cosine similarities of the ``2N`` views
    ``[z1; z2]`` (rows ``i`` and ``i + N`` are two views of one image), each view an anchor with its twin
    as positive and the other ``2N - 2`` views as negatives.

    Args:
        z1, z2: embeddings ``(N, d)`` of the two views (normalised inside), or stacks ``(..., N, d)``
            (one batch per model; then ``reduction="none"`` gives ``(..., 2N)``).
        tau: temperature; or a tensor of the leading shape ``(...)``.
        reduction: ``"mean"`` over the ``2N`` anchors, ``"sum"``, or ``"none"`` (shape ``(2N,)``).

    Example::

        >>> z1, z2 = torch.randn(8, 4), torch.randn(8, 4)
        >>> info_nce(z1, z2, 0.5).shape
        torch.Size([])
    """
    sim = _views_similarity(z1, z2)
    pos, neg = simclr_masks(z1.shape[-2], sim.device)
    return masked_info_nce(sim, pos, neg, tau, reduction=reduction)


def supcon_loss(emb: torch.Tensor, labels: torch.Tensor, tau: float = 0.1, *,
                reduction: str = "mean") -> torch.Tensor:
    r"""The supervised contrastive loss: every other example of the anchor's class is a positive,

    .. math::
        \mathcal L_i = -\frac{1}{|P(i)|} \sum_{p \in P(i)} \Big( \frac{s_{i,p}}{\tau}
        - \log \sum_{a \ne i} e^{s_{i,a}/\tau} \Big),

    :math:`P(i)` the other examples labelled :math:`y_i` and :math:`s` the cosine similarities. It is
    :func:`masked_info_nce` with several positives per row, computed from the ``(N, N)`` similarity
    matrix and the label masks of :func:`lossbook.retrieval.pair_masks` (no list of pairs): one
    log-sum-exp per row, so time and memory are :math:`O(N^2)` whatever the number of positives. With
    two views per label (``labels = [0..N-1, 0..N-1]``) it equals :func:`info_nce`.

    Args:
        emb: ``(N, d)`` embeddings (normalised inside).
        labels: ``(N,)`` integer labels.
        tau: temperature :math:`\tau > 0`.
        reduction: ``"mean"`` over the anchors that have a positive, ``"sum"`` over them, or ``"none"``
            (shape ``(N,)``, zero for an anchor without positive).

    Example::

        >>> z = torch.randn(6, 3); y = torch.tensor([0, 1, 2, 0, 1, 2])
        >>> torch.allclose(supcon_loss(z, y, 0.5), info_nce(z[:3], z[3:], 0.5))
        True
    """
    if emb.dim() != 2 or not emb.is_floating_point():
        raise ValueError(f"emb must be a floating-point (N, d) tensor, got {emb.dtype} {tuple(emb.shape)}")
    if labels.shape != emb.shape[:1] or labels.is_floating_point():
        raise ValueError(f"labels must be an integer tensor of shape ({emb.shape[0]},), got "
                         f"{labels.dtype} {tuple(labels.shape)}")
    tau = _check_tau(tau)
    _check_reduction(reduction)
    logits = similarity_matrix(emb) / tau
    pos, neg = pair_masks(labels)                      # the diagonal is in neither
    n_pos = pos.sum(-1)
    lse = logits.masked_fill(~(pos | neg), float("-inf")).logsumexp(-1)
    pos_mean = logits.masked_fill(~pos, 0.0).sum(-1) / n_pos.clamp(min=1)
    has = n_pos > 0
    loss = torch.where(has, lse - pos_mean, torch.zeros_like(lse))
    if reduction == "none":
        return loss
    total = loss.sum()
    return total if reduction == "sum" else total / has.sum().clamp(min=1)


def hard_info_nce(z1: torch.Tensor, z2: torch.Tensor, tau: float = 0.2, *, keep: float = 0.25,
                  reduction: str = "mean") -> torch.Tensor:
    r"""The explicit hard-negative contrastive loss: :func:`info_nce` with each anchor's negatives cut to
    those at or above its threshold :math:`s^{(i)}_\alpha`, the :math:`K`-th largest negative similarity,
    :math:`K = \lceil \texttt{keep} \cdot (2N - 2) \rceil`:

    .. math::
        \mathcal L^{\rm hard}_i = -\log \frac{e^{s_{i,i}/\tau}}{e^{s_{i,i}/\tau} + \sum_{k \ne i,\ s_{i,k} \ge s^{(i)}_\alpha} e^{s_{i,k}/\tau}} .

    The threshold is found without gradient (it only selects); ``keep = 1`` gives :func:`info_nce`.
    """
    if not 0.0 < float(keep) <= 1.0:
        raise ValueError(f"keep must be in (0, 1], got {keep!r}")
    sim = _views_similarity(z1, z2)
    pos, neg = simclr_masks(z1.shape[-2], sim.device)
    n_neg = 2 * z1.shape[-2] - 2
    if n_neg > 0 and keep < 1.0:
        k = max(1, math.ceil(keep * n_neg))
        thr = sim.detach().masked_fill(~neg, float("-inf")).topk(k, dim=-1).values[..., -1:]
        neg = neg & (sim.detach() >= thr)
    return masked_info_nce(sim, pos, neg, tau, reduction=reduction)


def uniformity(z: torch.Tensor, t: float = 2.0) -> torch.Tensor:
    r"""Uniformity loss of unit-norm embeddings (Wang & Isola),
    :math:`\log \frac{2}{n(n-1)} \sum_{i<j} e^{-t \lVert z_i - z_j \rVert^2}`: lower is more uniform
    (its minimum on the sphere :math:`S^{d-1}` tends to :math:`-2t` as :math:`n, d` grow). ``z`` ``(n, d)`` is
    normalised inside; a log-sum-exp over the pairs, no pair list."""
    if z.dim() != 2 or len(z) < 2 or not z.is_floating_point():
        raise ValueError(f"z must be a floating-point (n, d) tensor with n >= 2, got {tuple(z.shape)}")
    if not t > 0:
        raise ValueError(f"t must be > 0, got {t!r}")
    z = F.normalize(z, dim=1)
    sq = (2.0 - 2.0 * (z @ z.T)).clamp_min(0.0)
    upper = torch.ones_like(sq, dtype=torch.bool).triu(1)
    n_pairs = len(z) * (len(z) - 1) / 2
    return (-t * sq).masked_fill(~upper, float("-inf")).logsumexp(dim=(0, 1)) - math.log(n_pairs)


def tolerance(z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    r"""Tolerance: the mean cosine similarity :math:`z_i^\top z_j` over pairs :math:`i \ne j` of the same
    class, i.e. :math:`\mathbb E[f(x)^\top f(y) \mid l(x) = l(y)]` (higher: same-class points left closer).
    ``z`` ``(n, d)`` is normalised inside; ``labels`` int64 ``(n,)``. Returns 0 when no class has two points."""
    if z.dim() != 2 or not z.is_floating_point():
        raise ValueError(f"z must be a floating-point (n, d) tensor, got {tuple(z.shape)}")
    if labels.shape != z.shape[:1]:
        raise ValueError(f"labels must have shape ({len(z)},), got {tuple(labels.shape)}")
    z = F.normalize(z, dim=1)
    same = (labels[:, None] == labels[None, :]) & ~torch.eye(len(z), dtype=torch.bool, device=z.device)
    return (z @ z.T).masked_fill(~same, 0.0).sum() / same.sum().clamp_min(1)


def train_contrastive(net: nn.Module, x: torch.Tensor, loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                      *, steps: int, batch_size: int = 256, lr: float = 3e-3, weight_decay: float = 1e-5,
                      generator: torch.Generator | None = None, augment_kw: dict | None = None) -> list[float]:
    r"""SimCLR-style training: at each step draw a batch of ``x`` (without replacement), make two views with
    :func:`lossbook.augment.augment` (one call on the doubled batch), embed both in one pass of ``net`` and
    step Adam (cosine-annealed learning rate)
    on ``loss_fn(z1, z2)``. Returns the loss every step (one host sync at the end).

    ``generator`` drives both the batches and the augmentations; give the same seed to two runs to
    show them the same batches and views (a paired comparison of two losses).
    """
    if steps < 1 or batch_size < 2:
        raise ValueError(f"steps must be >= 1 and batch_size >= 2, got {steps} and {batch_size}")
    batch_size = min(batch_size, len(x))
    opt = torch.optim.Adam(net.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    where = generator.device if generator is not None else x.device
    losses = []
    net.train()
    for _ in range(steps):
        idx = torch.randperm(len(x), generator=generator, device=where)[:batch_size].to(x.device)
        views = augment(x[idx].repeat(2, 1, 1, 1), generator=generator, **(augment_kw or {}))
        z1, z2 = net(views).chunk(2)            # both views in one pass (BatchNorm sees them together)
        loss = loss_fn(z1, z2)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.detach())
    return torch.stack(losses).tolist()


def train_contrastive_stacked(net: nn.Module, x: torch.Tensor,
                              loss_fns: list[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]
                              | Callable[..., torch.Tensor],
                              *, steps: int,
                              generators: list[torch.Generator | None], batch_size: int = 256, lr: float = 3e-3,
                              weight_decay: float = 1e-5, augment_kw: dict | None = None) -> torch.Tensor:
    r""":func:`train_contrastive` for ``M = len(loss_fns)`` models at once, in a stacked network such as
    :class:`lossbook.encoders.StackedContrastiveNet` (input ``(M, N, C, H, W)``, output ``(M, N, d)``).

    The models form ``G = len(generators)`` groups of ``M / G`` consecutive models; the models of a group
    see the same batches and the same views (drawn from that group's generator), so within a group they
    differ only by their loss: model ``m`` minimises ``loss_fns[m]``. ``loss_fns`` may instead be one
    callable on the stacks ``(M, B, d)`` returning the ``(M,)`` losses (faster: e.g. :func:`info_nce` with a
    tensor of temperatures), with ``n_models`` then read from ``net.n_models``. The step minimises the sum of the
    ``M`` losses with Adam, which (being element-wise) updates each model as if it were trained alone.

    Returns the ``(steps, M)`` losses (one host sync at the end).
    """
    vectorized = callable(loss_fns)
    m, g = (net.n_models if vectorized else len(loss_fns)), len(generators)
    if m < 1 or g < 1 or m % g:
        raise ValueError(f"len(loss_fns) ({m}) must be a positive multiple of len(generators) ({g})")
    if steps < 1 or batch_size < 2:
        raise ValueError(f"steps must be >= 1 and batch_size >= 2, got {steps} and {batch_size}")
    batch_size, per_group = min(batch_size, len(x)), m // g
    opt = torch.optim.Adam(net.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    losses = []
    net.train()
    for _ in range(steps):
        views = []
        for gen in generators:
            where = gen.device if gen is not None else x.device
            idx = torch.randperm(len(x), generator=gen, device=where)[:batch_size].to(x.device)
            views.append(augment(x[idx].repeat(2, 1, 1, 1), generator=gen, **(augment_kw or {})))
        v = torch.stack(views).repeat_interleave(per_group, dim=0)          # (M, 2B, C, H, W)
        z = net(v)
        if vectorized:
            per_model = loss_fns(z[:, :batch_size], z[:, batch_size:])
        else:
            per_model = torch.stack([fn(zi[:batch_size], zi[batch_size:]) for fn, zi in zip(loss_fns, z)])
        opt.zero_grad(set_to_none=True)
        per_model.sum().backward()
        opt.step()
        sched.step()
        losses.append(per_model.detach())
    return torch.stack(losses)
