r"""EnsLoss: a fresh random convex calibrated loss at every step {cite}`dai2024ensloss`.

For labels :math:`y \in \{-1, +1\}` and real scores :math:`f(x)`, a margin loss
:math:`\phi(y f(x))` is convex and classification-calibrated ("CC") exactly when :math:`\phi` is
convex, differentiable at 0 and :math:`\phi'(0) < 0` {cite}`bartlett2006convexity`. In terms of the
derivative: :math:`\phi'` non-decreasing and negative at 0. Gradient descent only ever sees
:math:`\phi'` at the margins of the batch,

.. math::
    \nabla_\theta \frac1B \sum_{i=1}^B \phi(s_i) = \frac1B \sum_{i=1}^B \phi'(s_i)\, \nabla_\theta s_i,
    \qquad s_i = y_i f_\theta(x_i),

so EnsLoss never writes :math:`\phi` down: at each mini-batch it draws values
:math:`g_i = \phi'(s_i)` that are non-decreasing in the margin and negative (a random CC loss,
seen through its derivative) and steps along :math:`\frac1B \sum_i g_i \nabla_\theta s_i`.

Public functions: :func:`sample_calibrated_derivatives` (the sampler),
:func:`is_calibrated_derivative` (the CC check), :func:`ensloss` / :class:`EnsLoss` (the training
objective), :func:`margin_loss` (fixed CC losses to compare with) and :func:`margins`.
Targets are ``{0, 1}`` labels throughout (``y = 2 t - 1``), as for
``binary_cross_entropy_with_logits``.
"""
from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F
from torch import nn

from .._checks import check_reduction as _check_reduction, reduce as _reduce

__all__ = ["EnsLoss", "ensloss", "is_calibrated_derivative", "margin_loss", "margins",
           "sample_calibrated_derivatives"]

_KINDS = ("logistic", "hinge", "squared_hinge", "exponential")
_EXP_MARGIN_FLOOR = -80.0  # e^{80} ~ 5.5e34: finite in float32


def _check_lambda(lam: float) -> float:
    if isinstance(lam, bool) or not isinstance(lam, numbers.Real) or not math.isfinite(lam):
        raise ValueError(f"boxcox_lambda must be a finite real number, got {lam!r}")
    return float(lam)


def margins(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    r"""The margins :math:`s_i = y_i f(x_i)`, with :math:`y_i = 2 t_i - 1` for targets :math:`t_i \in \{0, 1\}`.

    Args:
        logits: real scores :math:`f(x)`, shape ``(B,)`` or ``(B, 1)``, floating point.
        target: labels 0 or 1, ``B`` entries (shape ``(B,)`` or ``(B, 1)``), any numeric or bool
            dtype. Their values are checked for CPU tensors only, so that a GPU training loop
            never waits on the host.

    Returns:
        ``(B,)`` tensor of margins, differentiable in ``logits``.
    """
    if not logits.is_floating_point():
        raise ValueError(f"logits must be a floating-point tensor, got dtype {logits.dtype}")
    if logits.dim() == 2 and logits.shape[1] == 1:
        logits = logits.squeeze(1)
    if logits.dim() != 1:
        raise ValueError(f"logits must have shape (B,) or (B, 1), got {tuple(logits.shape)}")
    if target.numel() != logits.numel() or target.dim() > 2:
        raise ValueError(f"target must have shape ({logits.numel()},) or ({logits.numel()}, 1) "
                         f"to match logits, got {tuple(target.shape)}")
    target = target.reshape(-1)
    if target.device.type == "cpu" and not ((target == 0) | (target == 1)).all():
        raise ValueError("target must hold binary labels 0 or 1 (not -1/+1)")
    return logits * (2.0 * target.to(logits.dtype) - 1.0)


def _boxcox_inverse(z: torch.Tensor, lam: float) -> torch.Tensor:
    r"""Inverse Box–Cox transform :math:`(1 + \lambda z)_+^{1/\lambda}`, :math:`e^z` at :math:`\lambda = 0`.

    For :math:`\lambda < 0` and :math:`1 + \lambda z \le 0` the value is :math:`+\infty` (the
    limit of the transform at the edge of its domain); the sampler's clip then maps it to 1.
    """
    if lam == 0.0:
        return torch.exp(z)
    return torch.clamp(1.0 + lam * z, min=0.0) ** (1.0 / lam)


def sample_calibrated_derivatives(s: torch.Tensor, *, boxcox_lambda: float = 0.0,
                                  generator: torch.Generator | None = None,
                                  z: torch.Tensor | None = None) -> torch.Tensor:
    r"""Draw a random convex calibrated loss derivative and evaluate it at the margins ``s``.

    Along the last dimension of ``s`` (one batch of :math:`B` margins per row):

    1. draw :math:`z_i \sim \mathcal N(0, 1)` (or take ``z``) and set
       :math:`g_i = -\min\{1,\, \mathrm{BC}^{-1}_\lambda(z_i)\} \in [-1, 0]` (negated, clipped at
       :math:`-1`), with :math:`\mathrm{BC}^{-1}_\lambda(z) = (1 + \lambda z)_+^{1/\lambda}`
       (:math:`e^z` at :math:`\lambda = 0`);
    2. give the :math:`k`-th smallest :math:`g` to the :math:`k`-th smallest margin, so :math:`g` is
       non-decreasing in :math:`s` (the derivative of a convex loss);
    3. divide by :math:`s_i` where :math:`s_i > 1`, so the derivative fades in the tail;
    4. subtract :math:`10^{-6}`, so every value, :math:`\phi'(0)` included, is strictly negative.

    .. math::
        g_{(k)} = \frac{-\min\{1, \mathrm{BC}^{-1}_\lambda(z_{(B+1-k)})\}}{\max\{1, s_{(k)}\}} - 10^{-6},
        \qquad k = 1, \dots, B,

    where :math:`s_{(k)}` is the :math:`k`-th smallest margin and :math:`z_{(j)}` the :math:`j`-th
    smallest draw (:math:`\mathrm{BC}^{-1}_\lambda` is increasing, so the largest draw gives the most
    negative derivative, which goes to the smallest margin).

    Args:
        s: margins, shape ``(..., B)``; only their order and the tail :math:`s > 1` matter. Not
            differentiated through (the result is detached).
        boxcox_lambda: :math:`\lambda`, any finite real. The default 0 (log-normal magnitudes) is
            the value in all of the authors' experiments. Larger :math:`\lambda` gives lighter-tailed
            magnitudes (for :math:`\lambda > 0` a draw below :math:`-1/\lambda` has magnitude 0);
            negative :math:`\lambda` sends the draws beyond :math:`z = -1/\lambda` to the clip at
            :math:`-1`.
        generator: optional ``torch.Generator`` for the normal draws (on any device; the draws are
            moved to ``s.device``). Ignored when ``z`` is given.
        z: optional standard-normal draws of the shape of ``s`` (for tests and ablations).

    Returns:
        ``g`` with the shape, dtype and device of ``s``: the sampled :math:`\phi'(s)`, all in
        :math:`[-1 - 10^{-6}, -10^{-6}]`. Vectorized (two sorts and a scatter per row), no host sync.

    Example::

        >>> s = torch.tensor([-2.0, 0.5, 3.0])
        >>> g = sample_calibrated_derivatives(s, generator=torch.Generator().manual_seed(0))
        >>> bool(is_calibrated_derivative(s, g))
        True
    """
    if s.dim() < 1:
        raise ValueError(f"s must have shape (..., B) with at least one dimension, got {tuple(s.shape)}")
    if not s.is_floating_point():
        raise ValueError(f"s must be a floating-point tensor, got dtype {s.dtype}")
    lam = _check_lambda(boxcox_lambda)
    s = s.detach()
    work = torch.float64 if s.dtype == torch.float64 else torch.float32  # half types: sort in float32
    if z is None:
        where = generator.device if generator is not None else s.device
        z = torch.randn(s.shape, generator=generator, device=where, dtype=work)
    elif z.shape != s.shape:
        raise ValueError(f"z must have the shape of s {tuple(s.shape)}, got {tuple(z.shape)}")
    z = z.to(device=s.device, dtype=work)
    sw = s.to(work)
    g_sorted = (-_boxcox_inverse(z, lam)).clamp(min=-1.0).sort(dim=-1).values   # ascending, in [-1, 0]
    g = torch.empty_like(sw).scatter_(-1, sw.argsort(dim=-1), g_sorted)          # k-th smallest to k-th smallest margin
    g = g / sw.clamp(min=1.0)                                                     # tail: g / s where s > 1
    return (g - 1e-6).to(s.dtype)


def is_calibrated_derivative(s: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    r"""Whether derivative values ``g`` at margins ``s`` can come from a convex calibrated loss.

    True when, along the last dimension, ``g`` is non-decreasing in ``s`` (a convex loss; tied
    margins may carry different values, as a subgradient at a kink may) and every value is
    negative (so :math:`\phi'(0) < 0`: the values on either side of 0 are negative and the
    derivative is non-decreasing).

    Args:
        s, g: tensors of the same shape ``(..., B)``.

    Returns:
        a bool tensor of shape ``s.shape[:-1]`` (0-d for a single batch). No host sync.
    """
    if s.shape != g.shape or s.dim() < 1:
        raise ValueError(f"s and g must have the same shape (..., B), got {tuple(s.shape)} and {tuple(g.shape)}")
    by_g = g.argsort(dim=-1)                                   # ties in s: order them by g
    order = by_g.gather(-1, s.gather(-1, by_g).argsort(dim=-1, stable=True))
    g_by_margin = g.gather(-1, order)
    monotone = (g_by_margin[..., 1:] >= g_by_margin[..., :-1]).all(dim=-1)
    return monotone & (g < 0).all(dim=-1)


def ensloss(logits: torch.Tensor, target: torch.Tensor, *, boxcox_lambda: float = 0.0,
            generator: torch.Generator | None = None, reduction: str = "mean") -> torch.Tensor:
    r"""The EnsLoss training objective for one mini-batch {cite}`dai2024ensloss`:

    .. math::
        L = \frac1B \sum_{i=1}^B \operatorname{sg}(g_i)\, s_i, \qquad
        \nabla_\theta L = \frac1B \sum_{i=1}^B g_i\, \nabla_\theta s_i,

    with :math:`s_i = y_i f(x_i)`, :math:`g` drawn by :func:`sample_calibrated_derivatives` and
    :math:`\operatorname{sg}` a stop-gradient. The gradient is that of the sampled CC loss; the
    *value* is not a loss value (it is negative and changes with the draw): monitor accuracy, or
    a fixed loss from :func:`margin_loss`, instead.

    Args:
        logits: scores, shape ``(B,)`` or ``(B, 1)``.
        target: labels in ``{0, 1}``, ``B`` entries.
        boxcox_lambda: see :func:`sample_calibrated_derivatives`.
        generator: optional ``torch.Generator`` for reproducible draws.
        reduction: ``"mean"`` (as above), ``"sum"`` or ``"none"`` (the ``(B,)`` terms :math:`g_i s_i`).

    Example::

        >>> model = torch.nn.Linear(5, 1)
        >>> x, t = torch.randn(8, 5), torch.randint(0, 2, (8,))
        >>> ensloss(model(x), t).backward()    # a step along the sampled CC loss's gradient
    """
    _check_reduction(reduction)
    s = margins(logits, target)
    g = sample_calibrated_derivatives(s, boxcox_lambda=boxcox_lambda, generator=generator)
    return _reduce(g * s, reduction)


class EnsLoss(nn.Module):
    r"""Module form of :func:`ensloss`: ``EnsLoss()(logits, target)``.

    Keeps an optional ``torch.Generator`` so that the sequence of sampled losses is
    reproducible; put it on the device of the logits (a CPU generator also works, at the price
    of a copy of the draws per step).

    Example::

        >>> loss_fn = EnsLoss(generator=torch.Generator().manual_seed(0))
        >>> loss_fn(torch.randn(4, 1, requires_grad=True), torch.tensor([0, 1, 1, 0])).backward()
    """

    def __init__(self, boxcox_lambda: float = 0.0, generator: torch.Generator | None = None,
                 reduction: str = "mean") -> None:
        super().__init__()
        self.boxcox_lambda = _check_lambda(boxcox_lambda)
        self.reduction = _check_reduction(reduction)
        self.generator = generator

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return ensloss(logits, target, boxcox_lambda=self.boxcox_lambda, generator=self.generator,
                       reduction=self.reduction)

    def extra_repr(self) -> str:
        return f"boxcox_lambda={self.boxcox_lambda}, reduction={self.reduction!r}"


def margin_loss(logits: torch.Tensor, target: torch.Tensor, kind: str = "logistic", *,
                reduction: str = "mean") -> torch.Tensor:
    r"""A fixed convex calibrated margin loss :math:`\phi(s)` at :math:`s = y f(x)`, for comparison.

    ========================  =====================================================
    ``kind``                  :math:`\phi(s)`
    ========================  =====================================================
    ``"logistic"``            :math:`\log(1 + e^{-s})` (softplus; equals binary cross-entropy)
    ``"hinge"``               :math:`(1 - s)_+`
    ``"squared_hinge"``       :math:`(1 - s)_+^2`
    ``"exponential"``         :math:`e^{-s}`
    ========================  =====================================================

    The exponential loss is computed in at least float32 with the margin floored at :math:`-80`
    (so it stays finite, about :math:`5.5 \times 10^{34}` at most); below the floor its gradient
    is zero.

    Args:
        logits: scores, shape ``(B,)`` or ``(B, 1)``.
        target: labels in ``{0, 1}``, ``B`` entries.
        kind: one of ``"logistic"``, ``"hinge"``, ``"squared_hinge"``, ``"exponential"``.
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (shape ``(B,)``).

    Example::

        >>> margin_loss(torch.tensor([2.0, -1.0]), torch.tensor([1, 1]), "hinge")
        tensor(1.)
    """
    if kind not in _KINDS:
        raise ValueError(f"kind must be one of {_KINDS}, got {kind!r}")
    _check_reduction(reduction)
    s = margins(logits, target)
    if kind == "logistic":
        loss = F.softplus(-s)
    elif kind == "hinge":
        loss = F.relu(1.0 - s)
    elif kind == "squared_hinge":
        loss = F.relu(1.0 - s).square()
    else:
        wide = s if s.dtype in (torch.float32, torch.float64) else s.float()
        loss = torch.exp(-wide.clamp(min=_EXP_MARGIN_FLOOR))
    return _reduce(loss, reduction)
