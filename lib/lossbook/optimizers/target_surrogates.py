r"""Target-based surrogates (Lavington, Vaswani, Babanezhad, Schmidt and Le Roux, ICML 2023,
``lavington2023target``): spend one expensive gradient in *target space*, then take many cheap
steps in parameter space.

The loss is a composition :math:`L(\theta) = \ell(f(\theta))`: a model :math:`f` maps the
parameters to *targets* :math:`z = f(\theta)` (the logits of a batch, the actions of a policy) and
a loss :math:`\ell` scores the targets. When the gradient :math:`\nabla_z \ell` is the expensive
part (an expert to query, a simulator to run), one call of it at :math:`z_t = f(\theta_t)` builds
the surrogate

.. math::
    g_t(\theta) = \ell(z_t) + \langle \nabla_z \ell(z_t),\, f(\theta) - z_t \rangle
                  + \frac{1}{2\eta} \lVert f(\theta) - z_t \rVert^2 ,

an upper bound of :math:`L` when :math:`\ell` is :math:`1/\eta`-smooth, whose minimisation needs
only forward and backward passes through :math:`f`. :class:`SSO` takes ``inner_steps`` of them
per expensive call. Completing the square shows what the surrogate is: the squared distance of
:math:`f(\theta)` to the moved target :math:`z_t - \eta \nabla_z \ell(z_t)`, so minimising it
projects a gradient step *in target space* back onto what the model can output.

Typical use::

    oracle = CountingOracle(lambda z: F.cross_entropy(z, yb))          # the expensive part
    opt = SSO(model.parameters(), eta=2.0, inner_steps=10)
    opt.step(lambda: model(xb), oracle)                                # 1 oracle call
    oracle.calls, opt.state["sso"]
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import nn

__all__ = ["CountingOracle", "SSO", "moved_target", "target_surrogate"]

_REDUCTIONS = ("mean", "sum")


def _check(outputs: torch.Tensor, z_t: torch.Tensor, grad_t: torch.Tensor, eta: float, reduction: str) -> None:
    for name, t in (("outputs", outputs), ("z_t", z_t), ("grad_t", grad_t)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a tensor, got {type(t).__name__}")
    if outputs.dim() == 0:
        raise ValueError("outputs must have a batch dimension (shape (B, ...)), got a scalar")
    if z_t.shape != outputs.shape or grad_t.shape != outputs.shape:
        raise ValueError(f"z_t and grad_t must have the shape of outputs {tuple(outputs.shape)}, got "
                         f"{tuple(z_t.shape)} and {tuple(grad_t.shape)}")
    if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not eta > 0 or eta == float("inf"):
        raise ValueError(f"eta must be a positive finite number, got {eta!r}")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")


def target_surrogate(outputs: torch.Tensor, z_t: torch.Tensor, grad_t: torch.Tensor, eta: float, *,
                     reduction: str = "mean") -> torch.Tensor:
    r"""The target-space surrogate at :math:`z_t`, less its constant :math:`\ell(z_t)`.

    With ``reduction="mean"`` the loss is taken to be an average over the ``B`` rows of the batch,
    :math:`\ell(z) = \frac1B \sum_i \ell_i(z_i)`, and ``grad_t`` is its gradient (which carries the
    :math:`1/B`). Then ``eta`` is the step *per example* and

    .. math::
        g_t(\theta) - \ell(z_t) = \langle \nabla \ell(z_t), f(\theta) - z_t \rangle
            + \frac{1}{2\eta B} \lVert f(\theta) - z_t \rVert^2
            = \frac1B \sum_{i=1}^B \Big[ \langle \nabla \ell_i(z_{t,i}), f_i(\theta) - z_{t,i} \rangle
            + \frac{1}{2\eta} \lVert f_i(\theta) - z_{t,i} \rVert^2 \Big],

    an upper bound of :math:`\ell(f(\theta)) - \ell(z_t)` for every :math:`\theta` when each
    :math:`\ell_i` is :math:`\beta`-smooth and :math:`\eta \le 1/\beta` (logistic loss:
    :math:`\beta = 1/4`; softmax cross-entropy: :math:`\beta = 1/2`; squared error
    :math:`\frac12 (z - y)^2`: :math:`\beta = 1`). With ``reduction="sum"`` the :math:`1/B` is dropped
    from the quadratic: use it when ``grad_t`` is the gradient of a sum.

    Args:
        outputs: :math:`f(\theta)`, shape ``(B, ...)``, differentiable in the parameters.
        z_t: the targets :math:`f(\theta_t)` the surrogate was built at, same shape (no gradient).
        grad_t: :math:`\nabla_z \ell(z_t)`, same shape (the one expensive call).
        eta: the target-space step :math:`\eta > 0`.
        reduction: ``"mean"`` or ``"sum"`` (how ``grad_t``'s loss reduces the batch).

    Returns:
        A 0-d tensor; its gradient at :math:`\theta_t` equals :math:`\nabla_\theta L(\theta_t)`.

    Example::

        >>> z_t, g = torch.zeros(2, 1), torch.tensor([[1.0], [-1.0]])
        >>> target_surrogate(torch.tensor([[1.0], [1.0]]), z_t, g, eta=1.0)  # 1 - 1 + 2 / (2 * 1 * 2)
        tensor(0.5000)
    """
    _check(outputs, z_t, grad_t, eta, reduction)
    diff = outputs - z_t.detach()
    scale = eta * outputs.shape[0] if reduction == "mean" else eta
    return (grad_t.detach() * diff).sum() + diff.pow(2).sum() / (2 * scale)


def moved_target(z_t: torch.Tensor, grad_t: torch.Tensor, eta: float, *, reduction: str = "mean") -> torch.Tensor:
    r"""The gradient step in target space that the surrogate pulls :math:`f(\theta)` towards,

    .. math:: z_{t+1/2} = z_t - \eta B\, \nabla \ell(z_t)
              \quad(\text{per example: } z_{t,i} - \eta \nabla \ell_i(z_{t,i})),

    (``reduction="sum"``: :math:`z_t - \eta \nabla \ell(z_t)`). Completing the square,
    ``target_surrogate(out, ...) == ||out - moved_target(...)||^2 / (2 eta B)`` up to a constant.
    """
    _check(z_t, z_t, grad_t, eta, reduction)
    scale = eta * z_t.shape[0] if reduction == "mean" else eta
    return z_t - scale * grad_t


class CountingOracle:
    """Wrap the expensive function of the targets and count its calls.

    ``calls`` counts calls, ``samples`` the rows of the first argument (the batch size), the unit
    in which a per-example oracle (an expert label, a simulator roll-out) is paid for. No host sync.

    Example::

        >>> oracle = CountingOracle(lambda z: (z ** 2).mean())
        >>> _ = oracle(torch.ones(5, 2)); (oracle.calls, oracle.samples)
        (1, 5)
    """

    def __init__(self, fn: Callable[..., torch.Tensor]):
        if not callable(fn):
            raise ValueError(f"fn must be callable, got {type(fn).__name__}")
        self.fn = fn
        self.reset()

    def reset(self) -> None:
        self.calls = 0
        self.samples = 0

    def __call__(self, z: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        self.calls += 1
        self.samples += int(z.shape[0]) if isinstance(z, torch.Tensor) and z.dim() > 0 else 1
        return self.fn(z, *args, **kwargs)

    def __repr__(self) -> str:
        return f"CountingOracle(calls={self.calls}, samples={self.samples})"


InnerFactory = Callable[[list], torch.optim.Optimizer]


class SSO(torch.optim.Optimizer):
    r"""Stochastic surrogate optimisation: one expensive target-space gradient, ``inner_steps``
    cheap steps on the surrogate :func:`target_surrogate` (Algorithm "SSO" of ``lavington2023target``).

    Each :meth:`step(forward, loss_fn)` does, for the current batch,

    1. :math:`z_t = f(\theta_t)` = ``forward()`` and :math:`\nabla_z \ell(z_t)` from
       ``loss_fn(z_t)``: the **only** call of the expensive ``loss_fn``;
    2. ``inner_steps`` steps of a deterministic optimiser on
       :math:`\theta \mapsto g_t(\theta)`, each needing ``forward()`` and a backward pass
       through :math:`f` only. The first starts at :math:`\theta_t`, where
       :math:`\nabla g_t(\theta_t) = \nabla L(\theta_t)`: with ``inner_steps=1`` and
       ``inner="sgd"`` this is exactly an SGD step of size ``inner_lr``.

    Args:
        params: the parameters of :math:`f` (or param groups; ``inner_lr`` may differ per group).
        eta: target-space step :math:`\eta` (per example for a mean-reduced loss): at most
            :math:`1/\beta` for a :math:`\beta`-smooth loss to keep the surrogate an upper bound.
        inner_steps: :math:`m \ge 1`, surrogate steps per oracle call.
        inner_lr: step of the inner gradient steps (``"sgd"``), or the first step tried by the
            line search (``"armijo"``), reset at every outer step as in the authors' code.
        inner: ``"armijo"`` (gradient descent with a backtracking Armijo line search on the
            surrogate: it syncs with the host once per trial step), ``"sgd"`` (fixed step, no sync),
            or a factory ``params -> torch.optim.Optimizer`` built afresh at every outer step and
            stepped ``inner_steps`` times with a closure (so ``torch.optim.LBFGS`` works: each of its
            steps may evaluate the surrogate several times).
        c, backtrack, max_backtracks: Armijo constant, shrink factor, and cap on the trials.
        reduction: how ``loss_fn`` reduces the batch (see :func:`target_surrogate`).

    ``state["sso"]`` counts ``oracle_calls``, ``inner_steps``, ``forward`` (passes of ``forward``)
    and ``backward`` (backward passes through :math:`f`).

    Example::

        opt = SSO(model.parameters(), eta=4.0, inner_steps=10)
        for xb, yb in loader:
            opt.step(lambda: model(xb).squeeze(-1),
                     lambda z: F.binary_cross_entropy_with_logits(z, yb))
    """

    def __init__(self, params: Iterable[torch.Tensor] | Iterable[dict], eta: float = 1.0, inner_steps: int = 10,
                 inner_lr: float = 1.0, *, inner: str | InnerFactory = "armijo", c: float = 0.5,
                 backtrack: float = 0.5, max_backtracks: int = 30, reduction: str = "mean"):
        if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not 0 < eta < float("inf"):
            raise ValueError(f"eta must be a positive finite number, got {eta!r}")
        if isinstance(inner_steps, bool) or not isinstance(inner_steps, int) or inner_steps < 1:
            raise ValueError(f"inner_steps must be a positive integer, got {inner_steps!r}")
        if not (isinstance(inner_lr, (int, float)) and 0 < inner_lr < float("inf")):
            raise ValueError(f"inner_lr must be a positive finite number, got {inner_lr!r}")
        if not (callable(inner) or inner in ("armijo", "sgd")):
            raise ValueError(f"inner must be 'armijo', 'sgd' or an optimizer factory, got {inner!r}")
        if not 0 < c < 1:
            raise ValueError(f"c must be in (0, 1), got {c!r}")
        if not 0 < backtrack < 1:
            raise ValueError(f"backtrack must be in (0, 1), got {backtrack!r}")
        if not isinstance(max_backtracks, int) or max_backtracks < 0:
            raise ValueError(f"max_backtracks must be a non-negative integer, got {max_backtracks!r}")
        if reduction not in _REDUCTIONS:
            raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
        super().__init__(params, dict(inner_lr=inner_lr))
        self.eta, self.inner_steps, self.inner = float(eta), inner_steps, inner
        self.c, self.backtrack, self.max_backtracks, self.reduction = c, backtrack, max_backtracks, reduction
        self.state["sso"] = dict(oracle_calls=0, inner_steps=0, forward=0, backward=0)

    def _params(self) -> list[torch.Tensor]:
        return [p for g in self.param_groups for p in g["params"] if p.requires_grad]

    def step(self, forward: Callable[[], torch.Tensor], loss_fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:  # type: ignore[override]
        """One oracle call and ``inner_steps`` surrogate steps; returns :math:`\\ell(z_t)` (detached).

        Args:
            forward: closure computing the targets :math:`f(\\theta)` of the current batch
                (cheap; called ``inner_steps`` times or more).
            loss_fn: the expensive loss of the targets, ``z -> scalar`` (called once).
        """
        if not callable(forward) or not callable(loss_fn):
            raise ValueError("step needs two callables: forward() -> targets and loss_fn(targets) -> loss")
        count = self.state["sso"]
        params = self._params()
        with torch.enable_grad():
            z = forward()
            if not isinstance(z, torch.Tensor) or not z.requires_grad:
                raise ValueError("forward() must return a tensor that depends on the parameters")
            z_t = z.detach()
            zq = z_t.clone().requires_grad_(True)
            loss = loss_fn(zq)
            if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                raise ValueError("loss_fn must return a scalar tensor")
            (grad_t,) = torch.autograd.grad(loss.reshape(()), zq)
        count["oracle_calls"] += 1
        count["forward"] += 1

        def surrogate(out: torch.Tensor) -> torch.Tensor:
            return target_surrogate(out, z_t, grad_t, self.eta, reduction=self.reduction)

        if callable(self.inner):                 # any torch optimizer, driven through a closure
            inner_opt = self.inner(params)

            def closure() -> torch.Tensor:
                inner_opt.zero_grad(set_to_none=True)
                with torch.enable_grad():
                    s = surrogate(forward())
                    s.backward()
                count["forward"] += 1
                count["backward"] += 1
                return s

            for _ in range(self.inner_steps):
                inner_opt.step(closure)
                count["inner_steps"] += 1
            return loss.detach()
        out = z          # the first inner step reuses the graph of z_t; later ones the line search's accepted trial
        for k in range(self.inner_steps):
            if out is None:
                with torch.enable_grad():
                    out = forward()
                count["forward"] += 1
            with torch.enable_grad():
                s = surrogate(out)
                grads = torch.autograd.grad(s, params, allow_unused=True)
            count["backward"] += 1
            count["inner_steps"] += 1
            if self.inner == "sgd":
                self._move(params, grads, 1.0, start=None)
                out = None
            else:
                out = self._armijo(params, grads, s.detach(), forward, surrogate, count)
        return loss.detach()

    @torch.no_grad()
    def _move(self, params: list[torch.Tensor], grads, factor: float, start) -> None:
        i = 0
        for group in self.param_groups:
            lr = group["inner_lr"] * factor
            for p in group["params"]:
                if not p.requires_grad:
                    continue
                g = grads[i]
                if start is not None:
                    p.copy_(start[i])
                if g is not None:
                    p.add_(g, alpha=-lr)
                i += 1

    def _armijo(self, params, grads, s0: torch.Tensor, forward, surrogate, count) -> torch.Tensor | None:
        """Backtrack from ``inner_lr`` until the Armijo condition holds; return the accepted trial's
        outputs (with their graph, so the next inner step needs no new forward pass), or ``None``."""
        # decrease wanted per unit step: sum over groups of lr_group * ||g_group||^2
        i, slope = 0, torch.zeros((), dtype=s0.dtype, device=s0.device)
        for group in self.param_groups:
            for p in group["params"]:
                if not p.requires_grad:
                    continue
                if grads[i] is not None:
                    slope = slope + group["inner_lr"] * grads[i].pow(2).sum()
                i += 1
        start = [p.detach().clone() for p in params]
        factor = 1.0
        for _ in range(self.max_backtracks + 1):
            self._move(params, grads, factor, start)
            with torch.enable_grad():
                out = forward()
            count["forward"] += 1
            with torch.no_grad():
                accepted = bool(surrogate(out) <= s0 - self.c * factor * slope)
            if accepted:
                return out
            factor *= self.backtrack
        self._move(params, grads, 0.0, start)   # no decrease found: stay put (a stationary point)
        return None
