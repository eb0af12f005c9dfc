r"""Comp-sum losses and their H-consistency bounds {cite}`mao2023crossentropy`.

For scores :math:`h(x) \in \mathbb R^n` the comp-sum family composes a function
:math:`\Phi^\tau` with the sum of exponentiated score differences,

.. math::
    \ell_\tau(h, x, y) = \Phi^\tau\Big(\sum_{y' \ne y} e^{h_{y'} - h_y}\Big), \qquad
    \Phi^\tau(u) = \begin{cases} \frac{(1+u)^{1-\tau} - 1}{1-\tau} & \tau \ne 1 \\
    \log(1+u) & \tau = 1, \end{cases}

and since :math:`1 + u = 1/p_y` with :math:`p = \operatorname{softmax}(h)`, every member is a
function of :math:`\log p_y` alone: :math:`\ell_\tau = -\operatorname{expm1}((\tau-1)\log p_y)/(\tau-1)`.
:math:`\tau = 0` is the sum-exponential loss, :math:`\tau = 1` cross-entropy,
:math:`\tau \in (1, 2)` generalized cross-entropy with :math:`q = \tau - 1`, :math:`\tau = 2`
mean absolute error :math:`1 - p_y`.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .._checks import REDUCTIONS as _REDUCTIONS, reduce as _reduce

__all__ = [
    "CompSumLoss",
    "adv_comp_sum_loss",
    "comp_sum_gamma",
    "comp_sum_loss",
    "comp_sum_T",
    "conditional_regret",
    "pgd_linf",
    "trades_loss",
    "zero_one_regret",
]



def _check_tau(tau: float) -> float:
    if not isinstance(tau, (int, float)) or not math.isfinite(tau) or tau < 0:
        raise ValueError(f"tau must be a finite number >= 0, got {tau!r}")
    return float(tau)


def _check_logits_target(logits: torch.Tensor, target: torch.Tensor) -> None:
    if logits.dim() != 2:
        raise ValueError(f"logits must have shape (batch, n_classes), got {tuple(logits.shape)}")
    if target.dim() != 1 or target.shape[0] != logits.shape[0]:
        raise ValueError(f"target must have shape ({logits.shape[0]},), got {tuple(target.shape)}")
    if target.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"target must hold integer class indices, got dtype {target.dtype}")


def comp_sum_loss(logits: torch.Tensor, target: torch.Tensor, *, tau: float = 1.0,
                  reduction: str = "mean") -> torch.Tensor:
    r"""The comp-sum loss :math:`\ell_\tau(h, x, y)` of each row of ``logits`` (B, C) at ``target`` (B,).

    Computed from :math:`\log p_y` (a log-softmax), so it is stable for any finite logits when
    :math:`\tau \ge 1` (the loss is then at most :math:`-\log p_y`). For :math:`\tau < 1` the loss
    grows like :math:`p_y^{\tau - 1}`, exponentially in the score gap; where its true value would
    leave the dtype's range it saturates at the largest finite value (with zero gradient there)
    instead of overflowing to ``inf`` and NaN gradients.

    ``tau=1`` equals ``F.cross_entropy``. Example::

        >>> comp_sum_loss(torch.zeros(2, 4), torch.tensor([0, 3]), tau=2.0)   # MAE: 1 - 1/4
        tensor(0.7500)
    """
    tau = _check_tau(tau)
    _check_logits_target(logits, target)
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    # range check without a host sync: on an accelerator an out-of-range index trips gather's own assert
    if target.device.type == "cpu" and target.numel() and (target.min() < 0 or target.max() >= logits.shape[1]):
        raise ValueError(f"target must hold class indices in [0, {logits.shape[1]})")
    log_py = logits.log_softmax(dim=1).gather(1, target.long().unsqueeze(1)).squeeze(1)
    if tau == 1.0:
        loss = -log_py
    else:
        expo = (tau - 1.0) * log_py
        if tau < 1.0:  # keep exp() finite; the batch mean of B such terms must stay finite too
            expo = expo.clamp(max=math.log(torch.finfo(expo.dtype).max) - math.log(max(target.numel(), 1)) - 1.0)
        loss = -torch.expm1(expo) / (tau - 1.0)
    return _reduce(loss, reduction)


class CompSumLoss(nn.Module):
    """Module form of :func:`comp_sum_loss`: ``CompSumLoss(tau=1.5)(logits, target)``."""

    def __init__(self, tau: float = 1.0, reduction: str = "mean"):
        super().__init__()
        self.tau = _check_tau(tau)
        if reduction not in _REDUCTIONS:
            raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
        self.reduction = reduction

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return comp_sum_loss(logits, target, tau=self.tau, reduction=self.reduction)

    def extra_repr(self) -> str:
        return f"tau={self.tau}, reduction={self.reduction!r}"


# --------------------------------------------------------------------------- the bound
def comp_sum_T(t: torch.Tensor, tau: float, n_classes: int) -> torch.Tensor:
    r"""The function :math:`\mathcal T_\tau(t)` of the H-consistency bound, for :math:`t \in [0, 1]`:

    .. math::
        \mathcal T_\tau(t) = \begin{cases}
        \frac{2^{1-\tau}}{1-\tau}\big[1 - m_\tau(t)\big] & \tau \in [0, 1) \\
        \frac{1+t}{2}\log(1+t) + \frac{1-t}{2}\log(1-t) & \tau = 1 \\
        \frac{1}{(\tau-1) n^{\tau-1}}\big[m_\tau(t) - 1\big] & \tau \in (1, 2) \\
        t / n & \tau = 2
        \end{cases},\quad m_\tau(t) = \Big(\tfrac{(1+t)^{1/(2-\tau)} + (1-t)^{1/(2-\tau)}}{2}\Big)^{2-\tau}.

    The bound reads :math:`\Delta\mathcal C_{0\text{-}1} \le \Gamma_\tau(\Delta\mathcal C_{\ell_\tau})`
    with :math:`\Gamma_\tau = \mathcal T_\tau^{-1}` (:func:`comp_sum_gamma`).
    """
    tau = _check_tau(tau)
    if tau > 2:
        raise ValueError(f"the bound is stated for tau in [0, 2], got {tau}")
    if n_classes < 2:
        raise ValueError(f"n_classes must be >= 2, got {n_classes}")
    t = torch.as_tensor(t, dtype=torch.float64).clamp(0.0, 1.0)
    if tau == 1.0:
        return 0.5 * (torch.xlogy(1 + t, 1 + t) + torch.xlogy(1 - t, 1 - t))
    if tau == 2.0:
        return t / n_classes
    a = 1.0 / (2.0 - tau)
    m = ((torch.pow(1 + t, a) + torch.pow(1 - t, a)) / 2) ** (2.0 - tau)
    if tau < 1.0:
        return 2.0 ** (1.0 - tau) / (1.0 - tau) * (1.0 - m)
    return (m - 1.0) / ((tau - 1.0) * n_classes ** (tau - 1.0))


def comp_sum_gamma(eps: torch.Tensor, tau: float, n_classes: int, *, iters: int = 60) -> torch.Tensor:
    r""":math:`\Gamma_\tau(\epsilon) = \mathcal T_\tau^{-1}(\epsilon)`, by bisection on [0, 1] in float64
    (vectorized over ``eps``); 1 where :math:`\epsilon \ge \mathcal T_\tau(1)`."""
    eps = torch.as_tensor(eps, dtype=torch.float64)
    lo, hi = torch.zeros_like(eps), torch.ones_like(eps)
    for _ in range(iters):  # T is increasing on [0, 1]
        mid = (lo + hi) / 2
        below = comp_sum_T(mid, tau, n_classes) < eps
        lo, hi = torch.where(below, mid, lo), torch.where(below, hi, mid)
    return hi


def _conditional_risk(p: torch.Tensor, log_s: torch.Tensor, tau: float) -> torch.Tensor:
    """sum_y p_y * ell_tau written through log softmax scores (0 * inf taken as 0)."""
    if tau == 1.0:
        per_class = -log_s
    else:
        per_class = -torch.expm1((tau - 1.0) * log_s) / (tau - 1.0)
    return torch.where(p > 0, p * per_class, torch.zeros_like(per_class)).sum(-1)


def conditional_regret(p: torch.Tensor, logits: torch.Tensor, tau: float) -> torch.Tensor:
    r"""Conditional regret :math:`\Delta\mathcal C_{\ell_\tau}(h, x) = \sum_y p_y \ell_\tau(h, x, y) - \inf_h(\cdot)`
    for conditional distributions ``p`` (..., n) and scores ``logits`` (..., n).

    The infimum is attained at :math:`\operatorname{softmax}(h^*) \propto p^{1/(2-\tau)}` for
    :math:`\tau < 2` (stationarity of the Lagrangian on the simplex), and for :math:`\tau = 2` it
    is :math:`1 - \max_y p_y`, approached by a one-hot softmax.
    """
    tau = _check_tau(tau)
    if tau > 2.0:
        raise ValueError(f"conditional_regret is implemented for tau in [0, 2], got {tau}")
    if p.shape != logits.shape:
        raise ValueError(f"p and logits must have the same shape, got {tuple(p.shape)} and {tuple(logits.shape)}")
    p = p.to(torch.float64)
    risk = _conditional_risk(p, logits.to(torch.float64).log_softmax(-1), tau)
    if tau == 2.0:
        best = 1.0 - p.max(-1).values
    else:
        log_star = torch.log(p) / (2.0 - tau)  # -inf where p = 0, which softmax maps to 0
        best = _conditional_risk(p, log_star.log_softmax(-1), tau)
    return (risk - best).clamp_min(0.0)


def zero_one_regret(p: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    r""":math:`\Delta\mathcal C_{0\text{-}1}(h, x) = \max_y p_y - p_{\arg\max h}` (ties broken towards
    the first index, as ``argmax`` does)."""
    if p.shape != logits.shape:
        raise ValueError(f"p and logits must have the same shape, got {tuple(p.shape)} and {tuple(logits.shape)}")
    return p.max(-1).values - p.gather(-1, logits.argmax(-1, keepdim=True)).squeeze(-1)


# --------------------------------------------------------------------------- adversarial training
def pgd_linf(model: nn.Module, x: torch.Tensor, objective: Callable[[torch.Tensor], torch.Tensor], *,
             eps: float, alpha: float, steps: int, clamp: tuple[float, float] | None = (0.0, 1.0),
             generator: torch.Generator | None = None) -> torch.Tensor:
    r"""Projected gradient ascent in the :math:`\ell_\infty` ball of radius ``eps`` around ``x``:
    maximizes ``objective(model(x_adv))`` (per-sample values, summed) with signed-gradient steps of
    size ``alpha`` from a uniform random start. Returns the detached adversarial inputs. The model's
    mode is left as the caller set it."""
    if eps <= 0 or alpha <= 0 or steps < 1:
        raise ValueError(f"eps and alpha must be > 0 and steps >= 1, got eps={eps}, alpha={alpha}, steps={steps}")
    noise = torch.rand(x.shape, generator=generator, dtype=x.dtype).to(x.device)
    x_adv = (x + (2 * noise - 1) * eps).detach()
    if clamp is not None:
        x_adv = x_adv.clamp(*clamp)
    for _ in range(steps):
        x_adv.requires_grad_(True)
        (grad,) = torch.autograd.grad(objective(model(x_adv)).sum(), x_adv)
        x_adv = x_adv.detach() + alpha * grad.sign()
        x_adv = torch.min(torch.max(x_adv, x - eps), x + eps)
        if clamp is not None:
            x_adv = x_adv.clamp(*clamp)
    return x_adv.detach()


def trades_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, alpha: float,
                steps: int, beta: float = 6.0, generator: torch.Generator | None = None) -> torch.Tensor:
    r"""TRADES {cite}`zhang2019trades`: :math:`\mathrm{CE}(h(x), y) + \beta\,
    \mathrm{KL}(\operatorname{softmax} h(x) \,\|\, \operatorname{softmax} h(x'))` with :math:`x'`
    maximizing the KL term by PGD."""
    logits = model(x)
    p_clean = logits.detach().softmax(1)
    log_p_clean = logits.detach().log_softmax(1)

    def kl_to_clean(adv_logits: torch.Tensor) -> torch.Tensor:
        return (p_clean * (log_p_clean - adv_logits.log_softmax(1))).sum(1)

    x_adv = pgd_linf(model, x, kl_to_clean, eps=eps, alpha=alpha, steps=steps, generator=generator)
    adv_log_p = model(x_adv).log_softmax(1)
    kl = (logits.softmax(1) * (logits.log_softmax(1) - adv_log_p)).sum(1).mean()
    return F.cross_entropy(logits, y) + beta * kl


def adv_comp_sum_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, tau: float = 1.0,
                      nu: float = 1.0, eps: float, alpha: float, steps: int,
                      generator: torch.Generator | None = None) -> torch.Tensor:
    r"""Smooth adversarial comp-sum loss, as we implement it:

    .. math::
        \ell_\tau(h, x, y) + \nu \max_{\|x' - x\|_\infty \le \gamma} \|h(x') - h(x)\|_2,

    the comp-sum loss on the clean input plus a smoothness penalty on the score vector, whose
    inner maximum is found by PGD. The paper's algorithm (ADV-COMP-SUM) regularizes a comp-sum
    loss with such a term; its exact scaling constants are not reproduced here (see the chapter).
    """
    if nu < 0:
        raise ValueError(f"nu must be >= 0, got {nu}")
    logits = model(x)
    ref = logits.detach()

    def logit_shift(adv_logits: torch.Tensor) -> torch.Tensor:
        return (adv_logits - ref).square().sum(1)

    x_adv = pgd_linf(model, x, logit_shift, eps=eps, alpha=alpha, steps=steps, generator=generator)
    smooth = (model(x_adv) - logits).norm(dim=1).mean()
    return comp_sum_loss(logits, y, tau=tau) + nu * smooth
