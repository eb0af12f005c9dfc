r"""Optimistic online mirror descent (Euclidean) for the stochastically extended adversarial model
:cite:`chen2024optimistic`, and online gradient descent as the baseline.

With the Euclidean regulariser :math:`\psi(x) = \frac12\|x\|^2` on a ball of diameter :math:`D`,
optimistic OMD keeps an auxiliary point :math:`\hat x_t` and a hint :math:`M_t` (a guess of the next
gradient; here the last observed one) and plays

.. math::
    x_t = \Pi_{\mathcal X}\big[\hat x_t - \eta_t M_t\big], \qquad
    \hat x_{t+1} = \Pi_{\mathcal X}\big[\hat x_t - \eta_t \nabla f_t(x_t)\big], \qquad
    M_{t+1} = \nabla f_t(x_t),

with the step size for convex and :math:`L`-smooth expected losses

.. math::
    \eta_t = \min\Big\{ \frac{D}{\sqrt{\delta + \sum_{s<t} \|\nabla f_s(x_s) - M_s\|^2}},\ \frac{1}{4L} \Big\}.

All learners here hold many independent runs: iterates have shape ``(runs, d)`` and each run has its
own step size. They share the interface ``predict() -> x_t`` then ``update(grad)``, which
:func:`lossbook.regret.play` drives.
"""
from __future__ import annotations

import math

import torch

from lossbook.regret import project_ball

__all__ = ["OnlineGradientDescent", "OptimisticOMD", "adaptive_step_size", "optimistic_omd_step"]


def adaptive_step_size(cum_sq_dev: torch.Tensor, *, diameter: float, smoothness: float,
                       delta: float = 1.0) -> torch.Tensor:
    r"""The convex-and-smooth step size :math:`\eta_t = \min\{D / \sqrt{\delta + V_{t-1}},\ 1/(4L)\}`,
    :math:`V_{t-1} = \sum_{s<t}\|\nabla f_s(x_s) - M_s\|^2` (``cum_sq_dev``, shape ``(runs,)``)."""
    if diameter <= 0 or smoothness <= 0 or delta <= 0:
        raise ValueError(f"diameter, smoothness and delta must be positive, got {diameter}, {smoothness}, {delta}")
    return torch.clamp(diameter / torch.sqrt(delta + cum_sq_dev), max=1.0 / (4.0 * smoothness))


def optimistic_omd_step(x_hat: torch.Tensor, grad: torch.Tensor, hint: torch.Tensor, eta: torch.Tensor,
                        radius: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    r"""One round of Euclidean optimistic OMD on a ball, for every run at once.

    Given :math:`\hat x_t` (``x_hat``), the played point's gradient :math:`g_t` (``grad``) and the hint
    :math:`M_{t+1}` for the next round (``hint``), returns
    :math:`\hat x_{t+1} = \Pi[\hat x_t - \eta_t g_t]` and :math:`x_{t+1} = \Pi[\hat x_{t+1} - \eta_{t+1} M_{t+1}]`,
    where ``eta = (eta_t, eta_{t+1})``, a pair of ``(runs,)`` tensors (or an ``(2, runs)`` tensor).
    """
    eta_t, eta_next = eta[0], eta[1]
    x_hat_next = project_ball(x_hat - eta_t.unsqueeze(-1) * grad, radius)
    return x_hat_next, project_ball(x_hat_next - eta_next.unsqueeze(-1) * hint, radius)


class OptimisticOMD:
    r"""Euclidean optimistic OMD on the ball :math:`\{\|x\| \le R\}` (diameter :math:`D = 2R`), ``runs`` copies.

    ``step="adaptive"``: the convex-and-smooth step of :func:`adaptive_step_size` (``smoothness`` = :math:`L`,
    ``delta`` = :math:`\delta`). ``step="strongly_convex"``: :math:`\eta_t = 1/(\lambda t + 4L)`
    (``strong_convexity`` = :math:`\lambda`). ``hint="last_grad"`` (:math:`M_t = \nabla f_{t-1}(x_{t-1})`,
    the SEA choice) or ``"zero"`` (no optimism: plain OMD with the same step rule).

    Example::

        >>> learner = OptimisticOMD(runs=8, d=5, smoothness=1.0)
        >>> x = learner.predict()                 # (8, 5), x_1 = 0
        >>> learner.update(torch.randn(8, 5, dtype=torch.float64))
    """

    def __init__(self, runs: int, d: int, *, radius: float = 1.0, smoothness: float = 1.0, delta: float = 1.0,
                 step: str = "adaptive", strong_convexity: float = 0.0, hint: str = "last_grad",
                 dtype: torch.dtype = torch.float64, device: str | torch.device = "cpu") -> None:
        if runs < 1 or d < 1:
            raise ValueError(f"runs and d must be positive, got runs={runs}, d={d}")
        if radius <= 0 or smoothness <= 0 or delta <= 0:
            raise ValueError(f"radius, smoothness and delta must be positive, got {radius}, {smoothness}, {delta}")
        if step not in ("adaptive", "strongly_convex"):
            raise ValueError(f"step must be 'adaptive' or 'strongly_convex', got {step!r}")
        if step == "strongly_convex" and strong_convexity <= 0:
            raise ValueError(f"step='strongly_convex' needs strong_convexity > 0, got {strong_convexity!r}")
        if hint not in ("last_grad", "zero"):
            raise ValueError(f"hint must be 'last_grad' or 'zero', got {hint!r}")
        self.radius, self.L, self.delta = float(radius), float(smoothness), float(delta)
        self.step, self.lam, self.hint_kind = step, float(strong_convexity), hint
        kw = dict(dtype=dtype, device=device)
        self.x_hat = torch.zeros(runs, d, **kw)
        self.hint = torch.zeros(runs, d, **kw)
        self.cum_sq_dev = torch.zeros(runs, **kw)
        self.t = 1
        self.eta = self._eta()
        self.x = project_ball(self.x_hat - self.eta.unsqueeze(-1) * self.hint, self.radius)

    @property
    def diameter(self) -> float:
        return 2.0 * self.radius

    def _eta(self) -> torch.Tensor:
        if self.step == "adaptive":
            return adaptive_step_size(self.cum_sq_dev, diameter=self.diameter, smoothness=self.L, delta=self.delta)
        return torch.full_like(self.cum_sq_dev, 1.0 / (self.lam * self.t + 4.0 * self.L))

    def predict(self) -> torch.Tensor:
        """The point :math:`x_t` played this round, shape ``(runs, d)``."""
        return self.x

    def update(self, grad: torch.Tensor) -> None:
        r"""Observe :math:`\nabla f_t(x_t)` (shape ``(runs, d)``) and move to round :math:`t+1`."""
        if grad.shape != self.x.shape:
            raise ValueError(f"grad must have shape {tuple(self.x.shape)}, got {tuple(grad.shape)}")
        eta_t = self.eta
        self.cum_sq_dev = self.cum_sq_dev + ((grad - self.hint) ** 2).sum(-1)
        self.hint = grad if self.hint_kind == "last_grad" else torch.zeros_like(grad)
        self.t += 1
        self.eta = self._eta()
        self.x_hat, self.x = optimistic_omd_step(self.x_hat, grad, self.hint, (eta_t, self.eta), self.radius)


class OnlineGradientDescent:
    r"""Projected online gradient descent :math:`x_{t+1} = \Pi[x_t - \eta_t \nabla f_t(x_t)]` with the
    worst-case step :math:`\eta_t = D / (G\sqrt t)` (Zinkevich; :math:`G` bounds the gradient norms, a scalar
    or one per run), ``runs`` copies, the same interface as :class:`OptimisticOMD`."""

    def __init__(self, runs: int, d: int, *, radius: float = 1.0, lipschitz: float | torch.Tensor = 1.0,
                 dtype: torch.dtype = torch.float64, device: str | torch.device = "cpu") -> None:
        if runs < 1 or d < 1:
            raise ValueError(f"runs and d must be positive, got runs={runs}, d={d}")
        G = torch.as_tensor(lipschitz, dtype=dtype, device=device)
        if radius <= 0 or not bool((G > 0).all()) or G.dim() > 1 or (G.dim() == 1 and G.shape[0] != runs):
            raise ValueError(f"radius and lipschitz must be positive (lipschitz a scalar or one per run), "
                             f"got {radius}, {lipschitz}")
        self.radius, self.G = float(radius), G.expand(runs).clone()
        self.x = torch.zeros(runs, d, dtype=dtype, device=device)
        self.t = 1

    def predict(self) -> torch.Tensor:
        return self.x

    def update(self, grad: torch.Tensor) -> None:
        if grad.shape != self.x.shape:
            raise ValueError(f"grad must have shape {tuple(self.x.shape)}, got {tuple(grad.shape)}")
        eta = 2.0 * self.radius / (self.G * math.sqrt(self.t))
        self.x = project_ball(self.x - eta.unsqueeze(-1) * grad, self.radius)
        self.t += 1
