r"""EnsLoss: a random convex calibrated loss at every step {cite}`dai2024ensloss`.

For binary labels :math:`y \in \{-1, +1\}` and scores :math:`f(x)`, a margin loss
:math:`\phi(y f(x))` is classification-calibrated and convex ("CC") when :math:`\phi` is convex and
:math:`\phi'(0) < 0` {cite}`bartlett2006convexity`. EnsLoss never writes :math:`\phi` down. At
each mini-batch it draws a random *derivative* :math:`g_i = \phi'(s_i)` at the batch's margins
:math:`s_i = y_i f(x_i)`, non-decreasing in :math:`s` (so :math:`\phi` is convex) and negative (so
:math:`\phi'(0) < 0`), and descends along :math:`\frac1B \sum_i g_i \nabla s_i`: doubly stochastic
gradient descent over batches and losses.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["EnsLoss", "ensloss", "is_calibrated_derivative", "margin_loss", "margins",
           "sample_calibrated_derivatives"]

_REDUCTIONS = ("mean", "sum", "none")
_KINDS = ("logistic", "hinge", "exponential", "squared_hinge")


def margins(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    r"""Margins :math:`s_i = y_i f(x_i)` with :math:`y = 2t - 1` for targets :math:`t \in \{0, 1\}`.

    ``logits`` is (B,) or (B, 1); ``target`` has B entries, 0 or 1 (any numeric dtype). Values are
    checked on CPU tensors only, so that a GPU training loop never waits on the host.
    """
    if logits.dim() == 2 and logits.shape[1] == 1:
        logits = logits.squeeze(1)
    if logits.dim() != 1:
        raise ValueError(f"logits must have shape (B,) or (B, 1), got {tuple(logits.shape)}")
    if target.numel() != logits.numel():
        raise ValueError(f"target must have {logits.numel()} entries, got shape {tuple(target.shape)}")
    target = target.reshape(-1)
    if target.device.type == "cpu" and not ((target == 0) | (target == 1)).all():
        raise ValueError("target must hold binary labels 0 or 1")
    return logits * (2.0 * target.to(logits.dtype) - 1.0)


def _boxcox_inverse(z: torch.Tensor, lam: float) -> torch.Tensor:
    r"""Inverse Box–Cox transform :math:`(1 + \lambda z)_+^{1/\lambda}`, and :math:`e^z` at :math:`\lambda = 0`."""
    if lam == 0.0:
        return torch.exp(z)
    return torch.clamp(1.0 + lam * z, min=0.0) ** (1.0 / lam)


def sample_calibrated_derivatives(s: torch.Tensor, *, boxcox_lambda: float = 0.0,
                                  generator: torch.Generator | None = None,
                                  z: torch.Tensor | None = None) -> torch.Tensor:
    r"""A random CC loss derivative evaluated at the margins ``s`` (B,).

    1. draw :math:`z_i \sim \mathcal N(0, 1)` (or take ``z``) and set :math:`g_i = -\mathrm{BC}^{-1}_\lambda(z_i) \le 0`;
    2. sort the :math:`g` ascending, clip them at :math:`-1`, and give the :math:`k`-th smallest to
       the :math:`k`-th smallest margin, so :math:`g` is non-decreasing in :math:`s` (a convex loss);
    3. for margins :math:`s > 1`, divide by :math:`s`, so the derivative dies out in the tail;
    4. subtract :math:`10^{-6}`, so every value, :math:`\phi'(0)` included, is strictly negative.

    Returns a detached tensor like ``s``. Vectorized: two sorts and a scatter, no host sync.
    """
    if s.dim() != 1:
        raise ValueError(f"margins must have shape (B,), got {tuple(s.shape)}")
    if not isinstance(boxcox_lambda, (int, float)) or boxcox_lambda < 0:
        raise ValueError(f"boxcox_lambda must be a number >= 0, got {boxcox_lambda!r}")
    s = s.detach()
    if z is None:
        where = generator.device if generator is not None else s.device
        dtype = s.dtype if s.dtype in (torch.float32, torch.float64) else torch.float32
        z = torch.randn(s.shape, generator=generator, device=where, dtype=dtype).to(s.device)
    elif z.shape != s.shape:
        raise ValueError(f"z must have the margins' shape {tuple(s.shape)}, got {tuple(z.shape)}")
    g_sorted = (-_boxcox_inverse(z.to(s.dtype), float(boxcox_lambda))).sort().values.clamp(min=-1.0)
    g = torch.empty_like(s).scatter_(0, s.argsort(), g_sorted)  # k-th smallest g to k-th smallest margin
    g = torch.where(s > 1.0, g / s.clamp(min=1.0), g)
    return g - 1e-6


def is_calibrated_derivative(s: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    r"""True (a 0-d bool tensor) when the derivative values ``g`` at margins ``s`` can come from a
    convex calibrated loss: non-decreasing in the margin, and negative (so :math:`\phi'(0) < 0`).
    Works on a batch of rows too: ``s``, ``g`` of shape (R, B) give one answer per row."""
    if s.shape != g.shape:
        raise ValueError(f"s and g must have the same shape, got {tuple(s.shape)} and {tuple(g.shape)}")
    order = s.argsort(dim=-1)
    g_by_margin = g.gather(-1, order)
    monotone = (g_by_margin[..., 1:] >= g_by_margin[..., :-1]).all(dim=-1)
    return monotone & (g < 0).all(dim=-1)


def _reduce(x: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    return x.mean() if reduction == "mean" else x.sum() if reduction == "sum" else x


def ensloss(logits: torch.Tensor, target: torch.Tensor, *, boxcox_lambda: float = 0.0,
            generator: torch.Generator | None = None, reduction: str = "mean") -> torch.Tensor:
    r"""The EnsLoss surrogate :math:`\frac1B \sum_i \operatorname{sg}(g_i)\, s_i` for one mini-batch.

    Its gradient is :math:`\frac1B \sum_i g_i \nabla s_i`, the gradient of the sampled CC loss.
    Its *value* is not a loss value (it is negative and depends on the draw): monitor accuracy or
    a fixed loss instead.

    Example::

        >>> out = model(x).squeeze(1)          # scores, shape (B,)
        >>> ensloss(out, y01).backward()        # y01 in {0, 1}
    """
    s = margins(logits, target)
    g = sample_calibrated_derivatives(s, boxcox_lambda=boxcox_lambda, generator=generator)
    return _reduce(g * s, reduction)


class EnsLoss(nn.Module):
    """Module form of :func:`ensloss`; keeps an optional generator so training is reproducible."""

    def __init__(self, boxcox_lambda: float = 0.0, generator: torch.Generator | None = None,
                 reduction: str = "mean"):
        super().__init__()
        if boxcox_lambda < 0:
            raise ValueError(f"boxcox_lambda must be >= 0, got {boxcox_lambda}")
        self.boxcox_lambda, self.generator, self.reduction = float(boxcox_lambda), generator, reduction

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return ensloss(logits, target, boxcox_lambda=self.boxcox_lambda, generator=self.generator,
                       reduction=self.reduction)


def margin_loss(logits: torch.Tensor, target: torch.Tensor, kind: str = "logistic", *,
                reduction: str = "mean") -> torch.Tensor:
    r"""Fixed CC margin losses :math:`\phi(s)` at :math:`s = y f(x)`: ``"logistic"``
    :math:`\log(1 + e^{-s})` (softplus, stable), ``"hinge"`` :math:`(1 - s)_+`, ``"squared_hinge"``
    :math:`(1 - s)_+^2`, ``"exponential"`` :math:`e^{-s}` (margins below :math:`-80` are clamped so
    the value stays finite in float32; the gradient is zero there)."""
    if kind not in _KINDS:
        raise ValueError(f"kind must be one of {_KINDS}, got {kind!r}")
    s = margins(logits, target)
    if kind == "logistic":
        loss = F.softplus(-s)
    elif kind == "hinge":
        loss = F.relu(1.0 - s)
    elif kind == "squared_hinge":
        loss = F.relu(1.0 - s).square()
    else:
        loss = torch.exp(-s.clamp(min=-80.0))
    return _reduce(loss, reduction)
