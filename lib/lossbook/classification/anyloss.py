r"""AnyLoss: any confusion-matrix metric as a differentiable loss {cite}`han2024anyloss`.

A binary classifier outputs :math:`p_i = \sigma(f(x_i)) \in (0, 1)`. AnyLoss pushes each
:math:`p_i` towards 0 or 1 with a steep sigmoid centred at 1/2, the *approximation function*

.. math::
    A(p) = \frac{1}{1 + e^{-L (p - 1/2)}}, \qquad L > 0 \text{ (the amplifying scale)},

reads the amplified outputs as soft labels, and counts a confusion matrix with them,

.. math::
    \mathrm{TP} = \sum_i y_i A_i, \quad \mathrm{FP} = \sum_i (1 - y_i) A_i, \quad
    \mathrm{FN} = \sum_i y_i (1 - A_i), \quad \mathrm{TN} = \sum_i (1 - y_i)(1 - A_i).

Any metric :math:`M(\mathrm{TN}, \mathrm{FP}, \mathrm{FN}, \mathrm{TP})` of those counts is then a
differentiable function of the network's outputs, and :math:`1 - M` is the loss. The counts and
the metrics come from :mod:`lossbook.metrics` (:func:`~lossbook.metrics.binary_confusion` and
:func:`~lossbook.metrics.binary_metrics`, which accept soft predictions); this module adds the
approximation function and the loss.

Public functions: :func:`approximate` (:math:`A`), :func:`max_amplifying_scale` (the largest
:math:`L` for which :math:`A` never rounds to 0 or 1), :func:`soft_confusion` and
:func:`anyloss` / :class:`AnyLoss`.
"""
from __future__ import annotations

import math
import numbers
from typing import Callable, Union

import torch
from torch import nn

from ..metrics import binary_confusion, binary_metrics

__all__ = ["AnyLoss", "METRICS", "anyloss", "approximate", "max_amplifying_scale", "soft_confusion"]

MetricFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

METRICS = {"accuracy": "accuracy", "f1": "f_beta", "f_beta": "f_beta",
           "balanced_accuracy": "balanced_accuracy", "bacc": "balanced_accuracy",
           "g_mean": "g_mean", "gmean": "g_mean", "precision": "precision", "recall": "recall",
           "specificity": "specificity"}
"""Metric names :func:`anyloss` accepts, mapped to the keys of
:func:`lossbook.metrics.binary_metrics` (``"f1"`` is ``"f_beta"`` with ``beta=1``)."""

PAPER_L = 73.0
"""The amplifying scale of the paper and of all the authors' experiments."""


def _check_L(L: float) -> float:
    if isinstance(L, bool) or not isinstance(L, numbers.Real) or not math.isfinite(L) or L <= 0:
        raise ValueError(f"L (the amplifying scale) must be a finite number > 0, got {L!r}")
    return float(L)


def approximate(p: torch.Tensor, L: float = PAPER_L) -> torch.Tensor:
    r"""The approximation function :math:`A(p) = \sigma\big(L (p - \tfrac12)\big) = 1 / (1 + e^{-L(p - 1/2)})`.

    It maps a probability to a value closer to the label it predicts (for :math:`L > 4`,
    :math:`A(p) > p` just above 1/2 and :math:`A(p) < p` just below), keeps :math:`A(1/2) = 1/2`,
    and has derivative :math:`A'(p) = L\,A(p)\,(1 - A(p))`, which is :math:`L/4` at :math:`p = 1/2`.

    The value is ``torch.sigmoid(x)`` with :math:`x = L (p - 1/2)`; the derivative is computed from
    :math:`e = e^{-|x|}` as :math:`L\,e/(1 + e)^2`, the true (tiny) value, even where :math:`A`
    itself rounds to 1 (``torch.sigmoid``'s own backward, :math:`A(1 - A)`, is exactly 0 there; in
    float32 that happens for :math:`p > 0.728` at :math:`L = 73`). It vanishes only when :math:`e`
    underflows, for :math:`|x| > 87` in float32.

    Args:
        p: probabilities, any shape, floating point (values outside [0, 1] are not rejected:
            the formula applies to them too).
        L: the amplifying scale, > 0 (default 73, the paper's).

    Returns:
        :math:`A(p)`, same shape, dtype and device as ``p``.

    Example::

        >>> approximate(torch.tensor([0.2, 0.5, 0.7]), L=20.0)
        tensor([0.0025, 0.5000, 0.9820])
    """
    L = _check_L(L)
    if not p.is_floating_point():
        raise ValueError(f"p must be a floating-point tensor, got dtype {p.dtype}")
    return _Sigmoid.apply(L * (p - 0.5))


class _Sigmoid(torch.autograd.Function):
    """``torch.sigmoid`` whose backward uses :math:`e^{-|x|}/(1 + e^{-|x|})^2` instead of the
    rounded output, so the gradient survives where the value has rounded to 1."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        ctx.save_for_backward(x)
        return torch.sigmoid(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # noqa: D102
        (x,) = ctx.saved_tensors
        e = torch.exp(-x.abs())
        return grad * e / (1 + e).square()


def max_amplifying_scale(dtype: torch.dtype = torch.float64) -> float:
    r"""The largest :math:`L` for which :math:`A(p)` stays strictly inside (0, 1) for all
    :math:`p \in [0, 1]` when computed in ``dtype``: :math:`L_{\max} = 2\,(m + 1) \ln 2`, with
    :math:`m` the number of explicit mantissa bits.

    :math:`A(1) = 1 / (1 + e^{-L/2})` rounds to exactly 1 once :math:`e^{-L/2}` is below half the
    machine epsilon, :math:`2^{-(m+1)}`, and then :math:`A'(1) = L A (1 - A) = 0`: no gradient
    reaches a confidently wrong output. In float64 (:math:`m = 52`) the bound is
    :math:`106 \ln 2 = 73.47`, so 73 is the largest integer that keeps :math:`A(1) < 1`: the
    paper's value. In float32 (:math:`m = 23`) it is :math:`48 \ln 2 = 33.27`.
    """
    if not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating-point dtype, got {dtype}")
    return 2.0 * math.log(2.0 / torch.finfo(dtype).eps)   # eps = 2^-m, so this is 2 (m + 1) ln 2


def _probs_and_target(logits: torch.Tensor, target: torch.Tensor, from_logits: bool
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    name = "logits" if from_logits else "probs"
    if not logits.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {logits.dtype}")
    if logits.dim() == 2 and logits.shape[1] == 1:
        logits = logits.squeeze(1)
    if logits.dim() != 1 or logits.numel() == 0:
        raise ValueError(f"{name} must have shape (B,) or (B, 1) with B >= 1, got {tuple(logits.shape)}")
    if target.numel() != logits.numel() or target.dim() > 2:
        raise ValueError(f"target must have shape ({logits.numel()},) or ({logits.numel()}, 1) "
                         f"to match {name}, got {tuple(target.shape)}")
    target = target.reshape(-1)
    if target.device.type == "cpu" and not ((target == 0) | (target == 1)).all():
        raise ValueError("target must hold binary labels 0 or 1")
    p = torch.sigmoid(logits) if from_logits else logits
    return p, target


def soft_confusion(logits: torch.Tensor, target: torch.Tensor, *, L: float = PAPER_L,
                   from_logits: bool = True) -> torch.Tensor:
    r"""The approximated confusion matrix ``(TN, FP, FN, TP)`` of a batch, shape (4,).

    :math:`A_i = A(\sigma(f_i))` (or :math:`A(p_i)` with ``from_logits=False``) are counted by
    :func:`lossbook.metrics.binary_confusion`: :math:`\mathrm{TP} = \sum y_i A_i` and so on. With
    hard outputs (:math:`A_i \in \{0, 1\}`) these are the ordinary counts.

    Args:
        logits: scores :math:`f(x_i)`, shape ``(B,)`` or ``(B, 1)``; probabilities if
            ``from_logits=False``.
        target: labels 0/1, ``B`` entries (checked on CPU only, so a GPU loop never syncs).
        L: amplifying scale, > 0.
        from_logits: apply the sigmoid first (default) or take ``logits`` as probabilities.
    """
    p, t = _probs_and_target(logits, target, from_logits)
    return binary_confusion(approximate(p, L), t)


def anyloss(logits: torch.Tensor, target: torch.Tensor, metric: Union[str, MetricFn] = "f1", *,
            L: float = PAPER_L, beta: float = 1.0, from_logits: bool = True) -> torch.Tensor:
    r"""AnyLoss for one batch: :math:`1 - M(\mathrm{TN}, \mathrm{FP}, \mathrm{FN}, \mathrm{TP})` on the
    approximated confusion matrix of :func:`soft_confusion` {cite}`han2024anyloss`.

    For instance, with :math:`n_+ = \sum_i y_i`, :math:`n_- = B - n_+` and :math:`S = \sum_i A_i`,

    .. math::
        1 - F_\beta = 1 - \frac{(1 + \beta^2)\,\mathrm{TP}}{\beta^2 n_+ + S}, \qquad
        1 - \mathrm{BAcc} = 1 - \frac12\Big(\frac{\mathrm{TP}}{n_+} + \frac{\mathrm{TN}}{n_-}\Big), \qquad
        1 - \mathrm{G} = 1 - \sqrt{\frac{\mathrm{TP}}{n_+} \cdot \frac{\mathrm{TN}}{n_-}}.

    The metric is a property of the whole batch, not a mean of per-example terms, so there is
    no ``reduction``; use batches that hold both classes (full batches where possible).

    Args:
        logits: scores, shape ``(B,)`` or ``(B, 1)``; probabilities if ``from_logits=False``.
        target: labels 0/1, ``B`` entries.
        metric: a name in :data:`METRICS` (``"f1"``, ``"f_beta"``, ``"balanced_accuracy"``,
            ``"g_mean"``, ``"accuracy"``, ...) or a callable ``(tn, fp, fn, tp) -> tensor`` to be
            maximised (any metric of the confusion matrix).
        L: amplifying scale, > 0; default 73 as in the paper (see :func:`max_amplifying_scale`).
        beta: :math:`\beta > 0` for ``"f_beta"`` (``"f1"`` ignores it).
        from_logits: whether ``logits`` are scores (default) or probabilities.

    Returns:
        a 0-d tensor, :math:`1 - M`, differentiable in ``logits``; computed in at least float32.

    Example::

        >>> f = torch.tensor([2.0, -1.0, 0.3, -3.0], requires_grad=True)
        >>> y = torch.tensor([1, 0, 1, 0])
        >>> loss = anyloss(f, y, "f1")
        >>> loss.backward()
        >>> custom = anyloss(f, y, lambda tn, fp, fn, tp: tp / (tp + fp + fn))   # Jaccard index
    """
    p, t = _probs_and_target(logits, target, from_logits)
    A = approximate(p, L)
    if callable(metric):
        tn, fp, fn, tp = binary_confusion(A, t)
        value = metric(tn, fp, fn, tp)
        if not isinstance(value, torch.Tensor) or value.dim() != 0:
            raise ValueError("a callable metric must return a 0-d tensor")
        return 1 - value
    if metric not in METRICS:
        raise ValueError(f"metric must be a callable or one of {sorted(METRICS)}, got {metric!r}")
    if metric == "f1":
        beta = 1.0
    if isinstance(beta, bool) or not isinstance(beta, numbers.Real) or not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta!r}")
    return 1 - binary_metrics(A, t, beta=float(beta))[METRICS[metric]]


class AnyLoss(nn.Module):
    r"""Module form of :func:`anyloss`: ``AnyLoss("balanced_accuracy")(logits, target)``.

    Example::

        >>> loss_fn = AnyLoss("f_beta", beta=2.0)                  # recall weighted 4x precision
        >>> loss = loss_fn(torch.randn(8, 1), torch.tensor([0, 0, 1, 0, 0, 1, 0, 0]))
    """

    def __init__(self, metric: Union[str, MetricFn] = "f1", *, L: float = PAPER_L, beta: float = 1.0,
                 from_logits: bool = True) -> None:
        super().__init__()
        if not callable(metric) and metric not in METRICS:
            raise ValueError(f"metric must be a callable or one of {sorted(METRICS)}, got {metric!r}")
        if isinstance(beta, bool) or not isinstance(beta, numbers.Real) or not beta > 0:
            raise ValueError(f"beta must be > 0, got {beta!r}")
        self.metric, self.L, self.beta, self.from_logits = metric, _check_L(L), float(beta), from_logits

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return anyloss(logits, target, self.metric, L=self.L, beta=self.beta, from_logits=self.from_logits)

    def extra_repr(self) -> str:
        name = self.metric if isinstance(self.metric, str) else getattr(self.metric, "__name__", "callable")
        return f"metric={name!r}, L={self.L}, beta={self.beta}"
