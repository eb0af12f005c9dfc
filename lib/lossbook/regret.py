r"""Online-learning environments and regret bookkeeping, vectorized over independent runs.

An online learner plays :math:`x_t` in a convex set :math:`\mathcal X`, then suffers :math:`f_t(x_t)`
and sees :math:`\nabla f_t(x_t)`. Its (static) regret after :math:`T` rounds is

.. math::
    \mathrm{Reg}_T = \sum_{t=1}^T f_t(x_t) - \min_{u \in \mathcal X} \sum_{t=1}^T f_t(u),

the comparator being the best fixed point *in hindsight*, on the realised losses. Everything here
holds many independent runs in one tensor: ``x`` has shape ``(runs, d)``, and every run may have
its own environment parameters (noise level, switching period, ...), so a whole grid of
environments times seeds advances with one tensor operation per round.

The losses are diagonal quadratics, which include linear losses (:math:`h = 0`):

.. math::
    f_t(x) = \tfrac12 \sum_i h_{t,i} x_i^2 - \langle b_t, x \rangle + c_t,
    \qquad \nabla f_t(x) = h_t \odot x - b_t ,

so the sum of the losses is again of this form and the comparator is exact: on the ball of radius
:math:`R`, :math:`u = b / (H + \nu)` with :math:`H = \sum_t h_t`, :math:`b = \sum_t b_t` and the
multiplier :math:`\nu \ge 0` found by bisection (:func:`ball_quadratic_argmin`).

:class:`SEAQuadratic` is an instance of the stochastically extended adversarial (SEA) model of
Sachs et al. (2022) used in :cite:`chen2024optimistic`: the adversary picks the expected loss (a
fixed quadratic plus a linear term whose sign flips every ``switch_every`` rounds), nature adds
zero-mean noise :math:`\sigma \varepsilon_t` to the gradient.

Example::

    >>> env = SEAQuadratic(runs=4, d=3, sigma=0.1, adversarial=0.2, switch_every=1, generator=0)
    >>> tracker = RegretTracker(runs=4, d=3, radius=env.radius)
    >>> x = torch.zeros(4, 3, dtype=torch.float64)
    >>> for t in range(1, 11):
    ...     loss = env.loss(t)
    ...     _ = tracker.update(x, loss)
    ...     x = project_ball(x - 0.1 * loss.grad(x), env.radius)
    >>> tracker.regret().shape
    torch.Size([4])
"""
from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np
import torch

__all__ = ["QuadraticLoss", "RegretTracker", "SEAQuadratic", "ball_quadratic_argmin", "mean_ci", "play", "project_ball"]


def project_ball(x: torch.Tensor, radius: float | torch.Tensor = 1.0) -> torch.Tensor:
    r"""Euclidean projection of each row of ``x`` (shape ``(..., d)``) onto the ball
    :math:`\{u : \|u\|_2 \le R\}`: :math:`\Pi(x) = x \min\{1, R / \|x\|\}`."""
    r = torch.as_tensor(radius, dtype=x.dtype, device=x.device)
    if bool((r <= 0).any()):
        raise ValueError(f"radius must be positive, got {radius!r}")
    if r.dim() > 0:
        r = r.unsqueeze(-1)
    norm = x.norm(dim=-1, keepdim=True)
    return x * torch.clamp(r / norm.clamp_min(torch.finfo(x.dtype).tiny), max=1.0)


class QuadraticLoss(NamedTuple):
    r"""One round's losses for every run: :math:`f(x) = \frac12 \langle h, x \odot x\rangle - \langle b, x\rangle + c`.

    ``h`` and ``b`` have shape ``(runs, d)`` (``h`` may broadcast, e.g. ``(d,)``), ``c`` shape ``(runs,)``.
    """

    h: torch.Tensor
    b: torch.Tensor
    c: torch.Tensor

    def value(self, x: torch.Tensor) -> torch.Tensor:
        """:math:`f(x)` for each run, shape ``(runs,)``."""
        return 0.5 * (self.h * x * x).sum(-1) - (self.b * x).sum(-1) + self.c

    def grad(self, x: torch.Tensor) -> torch.Tensor:
        r""":math:`\nabla f(x) = h \odot x - b`, shape ``(runs, d)``."""
        return self.h * x - self.b


def ball_quadratic_argmin(h: torch.Tensor, b: torch.Tensor, radius: float = 1.0, *, iters: int = 100) -> torch.Tensor:
    r"""Minimise :math:`\frac12 \langle h, u \odot u \rangle - \langle b, u\rangle` over :math:`\|u\| \le R`, row by row.

    With :math:`h \ge 0` (convex), the KKT conditions give :math:`u(\nu) = b / (h + \nu)` with
    :math:`\nu = 0` if that point is feasible (and :math:`h > 0`), otherwise the :math:`\nu > 0` with
    :math:`\|u(\nu)\| = R`; :math:`\|u(\nu)\|` decreases in :math:`\nu`, so bisection finds it.
    All rows are solved at once. ``h``: ``(runs, d)`` or broadcastable, non-negative; ``b``: ``(runs, d)``.
    """
    if radius <= 0:
        raise ValueError(f"radius must be positive, got {radius!r}")
    h = torch.broadcast_to(h, b.shape)
    if bool((h < 0).any()):
        raise ValueError("h must be non-negative (a convex quadratic)")
    tiny = torch.finfo(b.dtype).tiny
    free = b / h.clamp_min(tiny)
    feasible = (h > 0).all(-1) & (free.norm(dim=-1) <= radius)
    lo = torch.zeros(b.shape[:-1], dtype=b.dtype, device=b.device)
    hi = b.norm(dim=-1) / radius + 1.0                      # ||b / (h + hi)|| <= ||b|| / hi < R
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        big = (b / (h + mid.unsqueeze(-1)).clamp_min(tiny)).norm(dim=-1) > radius
        lo = torch.where(big, mid, lo)
        hi = torch.where(big, hi, mid)
    u = b / (h + hi.unsqueeze(-1)).clamp_min(tiny)
    return torch.where(feasible.unsqueeze(-1), free, project_ball(u, radius))


class RegretTracker:
    r"""Accumulates the learner's losses and the sufficient statistics of :math:`\sum_t f_t`, so the
    regret against the best fixed point in hindsight can be read off at any round, exactly.

    ``update(x, loss)`` adds round :math:`t`; ``regret()`` returns :math:`\mathrm{Reg}_t` per run,
    shape ``(runs,)``; ``comparator()`` the minimiser :math:`u_t` over the ball of radius ``radius``.
    """

    def __init__(self, runs: int, d: int, *, radius: float = 1.0, dtype: torch.dtype = torch.float64,
                 device: str | torch.device = "cpu") -> None:
        if runs < 1 or d < 1:
            raise ValueError(f"runs and d must be positive, got runs={runs}, d={d}")
        if radius <= 0:
            raise ValueError(f"radius must be positive, got {radius!r}")
        self.radius = float(radius)
        kw = dict(dtype=dtype, device=device)
        self.H = torch.zeros(runs, d, **kw)
        self.B = torch.zeros(runs, d, **kw)
        self.C = torch.zeros(runs, **kw)
        self.learner = torch.zeros(runs, **kw)
        self.t = 0

    def update(self, x: torch.Tensor, loss: QuadraticLoss) -> torch.Tensor:
        """Charge the learner ``loss.value(x)`` (returned) and add the round to the sums."""
        if x.shape != self.B.shape:
            raise ValueError(f"x must have shape {tuple(self.B.shape)}, got {tuple(x.shape)}")
        v = loss.value(x)
        self.learner += v
        self.H += loss.h
        self.B += loss.b
        self.C += loss.c
        self.t += 1
        return v

    def comparator(self) -> torch.Tensor:
        """The best fixed point in hindsight, per run, shape ``(runs, d)``."""
        return ball_quadratic_argmin(self.H, self.B, self.radius)

    def comparator_loss(self) -> torch.Tensor:
        r""":math:`\min_u \sum_{s \le t} f_s(u)` per run."""
        return QuadraticLoss(self.H, self.B, self.C).value(self.comparator())

    def regret(self) -> torch.Tensor:
        r""":math:`\sum_{s \le t} f_s(x_s) - \min_u \sum_{s \le t} f_s(u)` per run, shape ``(runs,)``."""
        if self.t == 0:
            raise ValueError("no round has been recorded yet")
        return self.learner - self.comparator_loss()


def _per_run(value: Any, runs: int, name: str, **kw: Any) -> torch.Tensor:
    t = torch.as_tensor(value, **kw)
    if t.dim() == 0:
        t = t.expand(runs)
    if t.shape != (runs,):
        raise ValueError(f"{name} must be a scalar or have shape ({runs},), got {tuple(t.shape)}")
    return t.clone()


class SEAQuadratic:
    r"""A stochastically extended adversarial (SEA) stream of quadratic losses, one stream per run.

    .. math::
        f_t(x) = \tfrac12 (x - \mu)^\top A (x - \mu) + \langle a\, s_t v + \sigma \varepsilon_t,\ x \rangle,
        \qquad \varepsilon_t \sim \mathcal N(0, I_d / d),

    with :math:`A = \mathrm{diag}(\lambda_1, \dots, \lambda_d)` (``spectrum``: log-spaced from 1 down to
    ``lam_min``, so the loss is convex and 1-smooth but nearly flat in some directions), a centre
    :math:`\mu` of norm ``center_norm`` and a unit vector :math:`v`, both in uniformly random directions, and the adversary's sign :math:`s_t = (-1)^{\lfloor (t-1)/B \rfloor}`,
    :math:`B` = ``switch_every`` (``inf``: never switches). The adversary picks the expected loss
    :math:`F_t(x) = \frac12 (x - \mu)^\top A (x - \mu) + a s_t \langle v, x\rangle` (amplitude ``adversarial``
    = :math:`a`), nature adds the noise. In the notation of the SEA model

    .. math::
        \sigma_t^2 = \max_x \mathbb E\|\nabla f_t(x) - \nabla F_t(x)\|^2 = \sigma^2, \qquad
        \Sigma_t^2 = \sup_x \|\nabla F_t(x) - \nabla F_{t-1}(x)\|^2 = a^2 (s_t - s_{t-1})^2 ,

    the second being :math:`4a^2` at a switch and 0 otherwise. ``sigma``, ``adversarial`` and
    ``switch_every`` may differ between runs (shape ``(runs,)``): a grid of environments, times seeds,
    runs as one batch. ``sigma = adversarial = 0`` is a fixed, noise-free loss.
    """

    def __init__(self, runs: int, d: int = 20, *, sigma: Any = 0.0, adversarial: Any = 0.0,
                 switch_every: Any = 1.0, lam_min: float = 1e-3, center_norm: float = 0.5, radius: float = 1.0,
                 generator: torch.Generator | int | None = None, dtype: torch.dtype = torch.float64,
                 device: str | torch.device = "cpu") -> None:
        """``generator``: a ``torch.Generator`` or an integer seed (then a generator on ``device``)."""
        if not (isinstance(runs, int) and isinstance(d, int)) or runs < 1 or d < 1:
            raise ValueError(f"runs and d must be positive integers, got runs={runs!r}, d={d!r}")
        if not 0 < lam_min <= 1:
            raise ValueError(f"lam_min must be in (0, 1], got {lam_min!r}")
        if radius <= 0 or not 0 <= center_norm <= radius:
            raise ValueError(f"need radius > 0 and 0 <= center_norm <= radius, got {radius!r}, {center_norm!r}")
        kw = dict(dtype=dtype, device=device)
        self.sigma = _per_run(sigma, runs, "sigma", **kw)
        self.adversarial = _per_run(adversarial, runs, "adversarial", **kw)
        self.switch_every = _per_run(switch_every, runs, "switch_every", **kw)
        for name, v in (("sigma", self.sigma), ("adversarial", self.adversarial)):
            if bool((v < 0).any()) or not bool(torch.isfinite(v).all()):
                raise ValueError(f"{name} must be finite and non-negative")
        if bool((self.switch_every < 1).any()) or bool(torch.isnan(self.switch_every).any()):
            raise ValueError("switch_every must be >= 1 (inf: never switches)")
        if generator is None or isinstance(generator, (int, np.integer)):   # a seed: draw on the env's device
            generator = torch.Generator(torch.device(device)).manual_seed(int(generator or 0))
        self.generator = generator
        gkw = dict(generator=generator, device=generator.device)
        self.runs, self.d, self.radius = runs, d, float(radius)
        self.lam = torch.logspace(0.0, math.log10(lam_min), d, **kw)
        mu = torch.randn(runs, d, **gkw).to(**kw)
        self.mu = center_norm * mu / mu.norm(dim=-1, keepdim=True)
        v = torch.randn(runs, d, **gkw).to(**kw)
        self.v = v / v.norm(dim=-1, keepdim=True)
        self.smoothness = float(self.lam.max())
        self._h = self.lam.expand(runs, d)
        self._b0 = self._h * self.mu
        self._c0 = 0.5 * (self._h * self.mu * self.mu).sum(-1)
        self._block, self._next = max(1, min(256, 2**22 // (runs * d))), 0
        self._signs: dict[int, torch.Tensor] = {}
        self._noise = torch.empty(0, runs, d, **kw)

    def sign(self, t: int) -> torch.Tensor:
        r""":math:`s_t \in \{\pm 1\}` per run."""
        if t < 1:
            raise ValueError(f"rounds start at t = 1, got {t}")
        if t not in self._signs:                # each round asks for s_t up to three times: keep two
            if len(self._signs) > 2:
                self._signs.pop(next(iter(self._signs)))
            self._signs[t] = 1.0 - 2.0 * torch.remainder(torch.floor((t - 1) / self.switch_every), 2)
        return self._signs[t]

    def mean_loss(self, t: int) -> QuadraticLoss:
        r"""The expected loss :math:`F_t` of round ``t`` (the adversary's choice, no noise)."""
        shift = (self.adversarial * self.sign(t)).unsqueeze(-1) * self.v
        return QuadraticLoss(self._h, self._b0 - shift, self._c0)

    def loss(self, t: int) -> QuadraticLoss:
        """Draw round ``t``'s losses. The noise comes from the environment's generator (on the device of
        the generator: pass a CPU ``torch.Generator`` to get the same stream on every device), drawn
        for many rounds at once, so call this once per round, in order."""
        F = self.mean_loss(t)
        if self._next >= len(self._noise):      # draw the noise of many rounds at once (one transfer)
            self._noise = torch.randn(self._block, self.runs, self.d, generator=self.generator,
                                      device=self.generator.device).to(F.b)
            self._noise /= math.sqrt(self.d)
            self._next = 0
        eps = self._noise[self._next]
        self._next += 1
        return QuadraticLoss(F.h, F.b - self.sigma.unsqueeze(-1) * eps, F.c)

    def adversarial_variation(self, t: int) -> torch.Tensor:
        r""":math:`\Sigma_t^2` per run (0 at ``t = 1``)."""
        if t == 1:
            return torch.zeros_like(self.sigma)
        return (self.adversarial * (self.sign(t) - self.sign(t - 1))) ** 2

    def gradient_bound(self) -> torch.Tensor:
        r"""Per run, a bound :math:`G` on :math:`\|\nabla F_t(x)\|` over the ball plus three noise standard
        deviations: the constant that worst-case-tuned OGD needs. Shape ``(runs,)``."""
        stiff = self.lam.max() * (self.radius + self.mu.norm(dim=-1))
        return stiff + self.adversarial + 3 * self.sigma


def mean_ci(x: Any, dim: int = 0, level: float = 0.95) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""Mean over ``dim`` and a normal-approximation confidence band :math:`\bar x \pm z\, s/\sqrt n`.

    Returns ``(mean, low, high)``. ``x`` is a tensor or array; ``n = x.shape[dim] >= 2``.
    """
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level!r}")
    x = x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x, dtype=float))
    n = x.shape[dim]
    if n < 2:
        raise ValueError(f"need at least 2 runs along dim {dim} for a band, got {n}")
    m = x.mean(dim)
    z = float(torch.special.ndtri(torch.tensor(0.5 + level / 2, dtype=torch.float64)))
    half = z * x.std(dim, correction=1) / math.sqrt(n)
    return m, m - half, m + half


class PlayResult(NamedTuple):
    """What :func:`play` returns: regret at the checkpoints ``(runs, len(checkpoints))`` and the SEA
    quantities accumulated up to each checkpoint, same shape."""

    checkpoints: list[int]
    regret: torch.Tensor
    sigma2: torch.Tensor
    Sigma2: torch.Tensor


def play(learner: Any, env: Any, horizon: int, checkpoints: Any = None) -> PlayResult:
    r"""Run ``learner`` (``predict() -> x`` of shape ``(runs, d)``, ``update(grad)``) against ``env``
    (``loss(t) -> QuadraticLoss``) for ``horizon`` rounds; record the regret
    :math:`\mathrm{Reg}_t` of every run at each checkpoint (default: the last round), together with
    :math:`\sigma^2_{1:t} = \sum_{s\le t} \sigma_s^2` and :math:`\Sigma^2_{1:t} = \sum_{s\le t}\Sigma_s^2`.
    """
    if horizon < 1:
        raise ValueError(f"horizon must be a positive integer, got {horizon!r}")
    cps = sorted({int(c) for c in (checkpoints if checkpoints is not None else [horizon])})
    if cps[0] < 1 or cps[-1] > horizon:
        raise ValueError(f"checkpoints must lie in [1, {horizon}], got {cps}")
    tracker = None
    sig2 = Sig2 = None
    out_r, out_s, out_S = [], [], []
    want = set(cps)
    for t in range(1, horizon + 1):
        x = learner.predict()
        if tracker is None:
            tracker = RegretTracker(x.shape[0], x.shape[1], radius=env.radius, dtype=x.dtype, device=x.device)
            sig2 = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
            Sig2 = torch.zeros_like(sig2)
        loss = env.loss(t)
        tracker.update(x, loss)
        learner.update(loss.grad(x))
        sig2 += env.sigma.to(sig2) ** 2
        Sig2 += env.adversarial_variation(t).to(Sig2)
        if t in want:
            out_r.append(tracker.regret())
            out_s.append(sig2.clone())
            out_S.append(Sig2.clone())
    return PlayResult(cps, torch.stack(out_r, -1), torch.stack(out_s, -1), torch.stack(out_S, -1))
