r"""Logistic regression by gradient descent with step sizes from tiny to huge, and its limit, the batch
perceptron {cite}`tyurin2024logistic`.

Data :math:`(a_i, y_i)_{i=1}^n`, :math:`a_i \in \mathbb R^d`, :math:`y_i \in \{-1, +1\}`; margins
:math:`m_i(w) = y_i \langle a_i, w\rangle`; the logistic loss and its gradient

.. math::
    f(w) = \frac1n \sum_{i=1}^n \log\bigl(1 + e^{-m_i(w)}\bigr), \qquad
    -\nabla f(w) = \frac1n \sum_{i=1}^n \sigma\bigl(-m_i(w)\bigr)\, y_i a_i ,

with :math:`\sigma(z) = 1/(1 + e^{-z})`. LR+GD is :math:`w_{t+1} = w_t - \gamma \nabla f(w_t)`. Writing
:math:`w = \gamma v` shows that as :math:`\gamma \to \infty` the weights :math:`\sigma(-\gamma m_i(v))`
become :math:`\mathbb 1[m_i < 0] + \tfrac12 \mathbb 1[m_i = 0]`: the batch perceptron

.. math::
    v_{t+1} = v_t + \frac1n \sum_{i=1}^n \Bigl(\mathbb 1[m_i(v_t) < 0] + \tfrac12\mathbb 1[m_i(v_t) = 0]\Bigr) y_i a_i .

Everything here is batched: ``A`` has shape ``(..., n, d)``, ``y`` ``(..., n)``, weights ``(..., d)``
and the step size ``gamma`` any shape that broadcasts with the batch dimensions, so a sweep over
step sizes and data sets (seeds) is one tensor computation per iteration.

Public functions: :func:`margins`, :func:`logistic_loss`, :func:`logistic_grad`,
:func:`logistic_hessian`, :func:`lr_gd` (plain and normalized), :func:`batch_perceptron`,
:func:`steps_to_separate`, :func:`logistic_minimizer`, :func:`separable_data`.
"""
from __future__ import annotations

import math
import numbers
from typing import NamedTuple

import torch
import torch.nn.functional as F

__all__ = ["Dataset", "Minimizer", "Trajectory", "batch_perceptron", "logistic_grad", "logistic_hessian",
           "logistic_loss", "logistic_minimizer", "lr_gd", "margins", "separable_data", "steps_to_separate"]

_NORMALIZE = (None, "loss", "grad_norm")


def _check_data(A: torch.Tensor, y: torch.Tensor) -> None:
    if not isinstance(A, torch.Tensor) or A.dim() < 2 or not A.is_floating_point():
        raise ValueError(f"A must be a floating-point tensor of shape (..., n, d), got "
                         f"{getattr(A, 'shape', type(A))} {getattr(A, 'dtype', '')}")
    if not isinstance(y, torch.Tensor) or y.dim() < 1 or y.shape[-1] != A.shape[-2]:
        raise ValueError(f"y must have shape (..., n) with n = {A.shape[-2]} (the rows of A), "
                         f"got {tuple(getattr(y, 'shape', ()))}")
    if y.device.type == "cpu" and not bool(((y == 1) | (y == -1)).all()):
        raise ValueError("y must hold labels -1 or +1")


def _check_w(w: torch.Tensor, A: torch.Tensor) -> None:
    if not isinstance(w, torch.Tensor) or w.dim() < 1 or w.shape[-1] != A.shape[-1]:
        raise ValueError(f"w must have shape (..., d) with d = {A.shape[-1]}, got {tuple(getattr(w, 'shape', ()))}")


def margins(w: torch.Tensor, A: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    r"""Margins :math:`m_i = y_i \langle a_i, w \rangle`, shape ``(..., n)`` (batch dimensions broadcast).

    Args:
        w: weights, ``(..., d)``.
        A: inputs, ``(..., n, d)``.
        y: labels in ``{-1, +1}``, ``(..., n)`` (values checked on the CPU only).
    """
    _check_data(A, y)
    _check_w(w, A)
    return y.to(A.dtype) * (A @ w.unsqueeze(-1)).squeeze(-1)


def logistic_loss(w: torch.Tensor, A: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    r""":math:`f(w) = \frac1n \sum_i \log(1 + e^{-m_i(w)})`, computed as a softplus (finite for any
    margin), shape ``(...)``. Differentiable in ``w``."""
    return F.softplus(-margins(w, A, y)).mean(-1)


def logistic_grad(w: torch.Tensor, A: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    r""":math:`\nabla f(w) = -\frac1n \sum_i \sigma(-m_i(w))\, y_i a_i`, shape ``(..., d)``."""
    m = margins(w, A, y)
    return -((torch.sigmoid(-m) * y.to(A.dtype)).unsqueeze(-2) @ A).squeeze(-2) / A.shape[-2]


def logistic_hessian(w: torch.Tensor, A: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    r""":math:`\nabla^2 f(w) = \frac1n \sum_i \sigma(m_i)\sigma(-m_i)\, a_i a_i^\top`, shape ``(..., d, d)``."""
    m = margins(w, A, y)
    s = torch.sigmoid(m) * torch.sigmoid(-m)
    return (A.transpose(-1, -2) * s.unsqueeze(-2)) @ A / A.shape[-2]


def _log_loss_terms(m: torch.Tensor) -> torch.Tensor:
    """log(log(1 + e^{-m})), finite for every margin (for m > 30, log1p(e^{-m}) = e^{-m}(1 - e^{-m}/2 + ...))."""
    big = m > 30.0
    return torch.where(big, -m - 0.5 * torch.exp(-m.clamp(min=30.0)),
                       torch.log(F.softplus(-m.clamp(max=30.0))))


class Trajectory(NamedTuple):
    """What :func:`lr_gd` and :func:`batch_perceptron` record at ``t = 0, ..., iters``.

    Attributes:
        loss: :math:`f(w_t)`, shape ``(iters + 1, *batch)``.
        errors: number of points with :math:`m_i(w_t) \\le 0`, ``(iters + 1, *batch)`` (int64).
        grad_norm: :math:`\\|\\nabla f(w_t)\\|`, ``(iters + 1, *batch)``.
        w: the final weights ``(*batch, d)``, or every iterate ``(iters + 1, *batch, d)`` with ``keep_w=True``.
    """

    loss: torch.Tensor
    errors: torch.Tensor
    grad_norm: torch.Tensor
    w: torch.Tensor


def _as_gamma(gamma: float | torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    if isinstance(gamma, bool) or not isinstance(gamma, (numbers.Real, torch.Tensor)):
        raise ValueError(f"gamma must be a positive number or tensor, got {gamma!r}")
    g = torch.as_tensor(gamma, dtype=A.dtype, device=A.device)
    if g.device.type == "cpu" and not bool(((g > 0) & torch.isfinite(g)).all()):
        raise ValueError(f"gamma must be positive and finite, got {gamma!r}")
    return g


def _check_iters(iters: int) -> int:
    if isinstance(iters, bool) or not isinstance(iters, numbers.Integral) or iters < 0:
        raise ValueError(f"iters must be a non-negative integer, got {iters!r}")
    return int(iters)


def _run(A: torch.Tensor, y: torch.Tensor, g: torch.Tensor, iters: int, w0: torch.Tensor | None,
         keep_w: bool, update) -> Trajectory:
    """The shared loop. Trajectories are laid out as (..., G, d) against data (..., n, d), so every
    product is a plain batched matmul (no broadcast copy of the data per step)."""
    scalar = g.dim() == 0
    g = g.reshape(1) if scalar else g
    batch = torch.broadcast_shapes(A.shape[:-2], y.shape[:-1], g.shape[:-1])
    A = A.expand(*batch, *A.shape[-2:])
    yf = y.to(A.dtype).expand(*batch, y.shape[-1]).unsqueeze(-2)        # (..., 1, n)
    n, d = A.shape[-2], A.shape[-1]
    w = torch.zeros(*batch, g.shape[-1], d, dtype=A.dtype, device=A.device)
    if w0 is not None:
        _check_w(w0, A)
        w = w + (w0.to(A.dtype).unsqueeze(-2) if scalar else w0.to(A.dtype))
    At = A.transpose(-1, -2)
    step = g.expand(*batch, g.shape[-1]).unsqueeze(-1)                  # (..., G, 1)
    losses, errors, gnorms, ws = [], [], [], []
    for t in range(iters + 1):
        m = yf * (w @ At)                                                 # (..., G, n)
        neg_grad = (torch.sigmoid(-m) * yf) @ A / n                       # (..., G, d)
        gnorm = neg_grad.norm(dim=-1)
        losses.append(F.softplus(-m).mean(-1))
        errors.append((m <= 0).sum(-1))
        gnorms.append(gnorm)
        if keep_w:
            ws.append(w)
        if t == iters:
            break
        w = w + step * update(m, yf, A, neg_grad, gnorm)
    out = [torch.stack(losses), torch.stack(errors), torch.stack(gnorms), torch.stack(ws) if keep_w else w]
    if scalar:
        out = [o.squeeze(-2) if i == 3 else o.squeeze(-1) for i, o in enumerate(out)]
    return Trajectory(*out)


def _plain(m, yf, A, neg_grad, gnorm):
    return neg_grad


def _by_loss(m, yf, A, neg_grad, gnorm):
    # sigma(-m_i) / sum_j log(1 + e^{-m_j}), in the log domain (finite when f underflows)
    q = torch.exp(-F.softplus(m) - torch.logsumexp(_log_loss_terms(m), dim=-1, keepdim=True))
    return (q * yf) @ A


def _by_grad_norm(m, yf, A, neg_grad, gnorm):
    return neg_grad / torch.where(gnorm > 0, gnorm, torch.ones_like(gnorm)).unsqueeze(-1)


def _perceptron(m, yf, A, neg_grad, gnorm):
    weight = (m < 0).to(A.dtype) + 0.5 * (m == 0).to(A.dtype)
    return (weight * yf) @ A / A.shape[-2]


_UPDATES = {None: _plain, "loss": _by_loss, "grad_norm": _by_grad_norm}


def lr_gd(A: torch.Tensor, y: torch.Tensor, gamma: float | torch.Tensor, *, iters: int,
          normalize: str | None = None, w0: torch.Tensor | None = None, keep_w: bool = False) -> Trajectory:
    r"""Gradient descent on the logistic loss, for many step sizes and data sets at once.

    .. math::
        w_{t+1} = w_t - \gamma\, \frac{\nabla f(w_t)}{N(w_t)}, \qquad
        N(w) = \begin{cases} 1 & \texttt{normalize=None} \text{ (LR+GD)}\\
                             f(w) & \texttt{normalize="loss"} \text{ (Normalized LR+GD)}\\
                             \|\nabla f(w)\| & \texttt{normalize="grad\_norm"} \end{cases}

    With ``"loss"`` the direction :math:`-\nabla f / f = \sum_i \sigma(-m_i) y_i a_i / \sum_i \log(1 + e^{-m_i})`
    is computed in the log domain, so it stays finite when :math:`f` underflows. With
    ``"grad_norm"`` a zero gradient gives a zero step.

    Args:
        A: inputs ``(..., n, d)``; y: labels ``(..., n)`` in ``{-1, +1}``.
        gamma: step size :math:`\gamma > 0`: a number, or a tensor whose *last* dimension lists
            step sizes (``G`` of them) and whose leading dimensions broadcast with the data's batch
            dimensions. ``gamma`` of shape ``(G,)`` with ``A`` of shape ``(S, n, d)`` runs every step
            size on every data set: trajectories of shape ``(S, G)``.
        iters: number of steps.
        normalize: ``None``, ``"loss"`` or ``"grad_norm"`` (see above).
        w0: start, ``(..., d)`` broadcasting with the trajectories (default 0).
        keep_w: keep every iterate (memory ``iters × batch × d``) instead of the last only.

    Returns:
        :class:`Trajectory` with the loss, the error count and the gradient norm at every step,
        shapes ``(iters + 1, ..., G)`` (``(iters + 1, ...)`` for a number ``gamma``). No host
        synchronisation inside the loop.

    Example::

        >>> A = torch.tensor([[1.0, 0.2], [-0.5, -1.0]], dtype=torch.float64)
        >>> y = torch.tensor([1.0, -1.0], dtype=torch.float64)
        >>> lr_gd(A, y, torch.tensor([0.1, 1e6], dtype=torch.float64), iters=3).errors[-1].tolist()
        [0, 0]
    """
    _check_data(A, y)
    iters = _check_iters(iters)
    if normalize not in _UPDATES:
        raise ValueError(f"normalize must be one of {_NORMALIZE}, got {normalize!r}")
    return _run(A, y, _as_gamma(gamma, A), iters, w0, keep_w, _UPDATES[normalize])


def batch_perceptron(A: torch.Tensor, y: torch.Tensor, *, iters: int, w0: torch.Tensor | None = None,
                     keep_w: bool = False) -> Trajectory:
    r"""The batch perceptron, the :math:`\gamma \to \infty` limit of LR+GD in the scaled variable :math:`v = w/\gamma`:

    .. math::
        w_{t+1} = w_t + \frac1n \sum_{i=1}^n \Bigl(\mathbb 1[m_i(w_t) < 0] + \tfrac12 \mathbb 1[m_i(w_t) = 0]\Bigr) y_i a_i .

    The weight :math:`\tfrac12` at a zero margin is :math:`\sigma(0)`: it makes the first step from
    :math:`w_0 = 0` the same as LR+GD's (divided by :math:`\gamma`). Once every margin is positive the
    iterate stops moving. Shapes as in :func:`lr_gd` with a number ``gamma``; the ``loss`` of the
    returned :class:`Trajectory` is the logistic loss of the iterate (reported, not minimised).
    """
    _check_data(A, y)
    iters = _check_iters(iters)
    return _run(A, y, torch.ones((), dtype=A.dtype, device=A.device), iters, w0, keep_w, _perceptron)


def steps_to_separate(errors: torch.Tensor) -> torch.Tensor:
    """The first step ``t`` with no point on the wrong side (``errors[t] == 0``), per trajectory.

    Args:
        errors: ``(iters + 1, *batch)``, as in :attr:`Trajectory.errors`.

    Returns:
        float tensor ``(*batch)``: the step, or ``inf`` where the data were never separated.
    """
    if not isinstance(errors, torch.Tensor) or errors.dim() < 1:
        got = getattr(errors, "shape", type(errors))
        raise ValueError(f"errors must be a tensor of shape (iters + 1, ...), got {got}")
    hit = errors == 0
    first = hit.to(torch.int64).argmax(0).to(torch.float64)     # argmax returns the first maximum
    return torch.where(hit.any(0), first, torch.full_like(first, math.inf))


class Minimizer(NamedTuple):
    """The result of :func:`logistic_minimizer`: the point, :math:`\\|\\nabla f\\|` there and the size
    of the last Newton step (both tiny only when a finite minimiser exists, i.e. the data are not
    separable)."""

    w: torch.Tensor
    grad_norm: torch.Tensor
    last_step: torch.Tensor


def logistic_minimizer(A: torch.Tensor, y: torch.Tensor, *, iters: int = 60, max_step: float = 5.0) -> Minimizer:
    r"""Minimise :math:`f` by Newton's method with steps capped at ``max_step`` (batched).

    On non-separable data whose inputs span :math:`\mathbb R^d`, :math:`f` is strictly convex and
    coercive, so it has one minimiser :math:`w^\star`, which Newton's method finds to machine precision.
    On separable data there is none: the iterates run off to infinity, the capped step stays large,
    and ``last_step`` says so.
    """
    _check_data(A, y)
    iters = _check_iters(iters)
    batch = torch.broadcast_shapes(A.shape[:-2], y.shape[:-1])
    w = torch.zeros(*batch, A.shape[-1], dtype=A.dtype, device=A.device)
    eye = torch.eye(A.shape[-1], dtype=A.dtype, device=A.device)
    step = torch.zeros(batch, dtype=A.dtype, device=A.device)
    for _ in range(iters):
        grad = logistic_grad(w, A, y)
        hess = logistic_hessian(w, A, y) + 1e-12 * eye
        delta = torch.linalg.solve(hess, grad.unsqueeze(-1)).squeeze(-1)
        step = delta.norm(dim=-1)
        delta = delta * (max_step / step.clamp(min=max_step)).unsqueeze(-1)
        w = w - delta
    return Minimizer(w, logistic_grad(w, A, y).norm(dim=-1), step)


class Dataset(NamedTuple):
    """``n_sets`` data sets from :func:`separable_data`: ``A (n_sets, n, d)`` with :math:`\\max_i \\|a_i\\| = 1`,
    ``y (n_sets, n)``, the planted unit separator ``u (n_sets, d)`` and its margin
    :math:`\\rho = \\min_i y_i \\langle a_i, u\\rangle` ``(n_sets,)`` (negative once labels are flipped)."""

    A: torch.Tensor
    y: torch.Tensor
    u: torch.Tensor
    margin: torch.Tensor


def separable_data(n: int, d: int, margin: float, *, n_sets: int = 1, positive: float = 0.8,
                   offset: float = 0.8, spread: float = 0.15, shift: float = 0.15, flip: float = 0.0,
                   generator: torch.Generator | None = None, dtype: torch.dtype = torch.float64) -> Dataset:
    r"""Linearly separable data sets with a planted separator, built to make the first steps hard.

    Per set: a random orthonormal pair :math:`(u, b)`; labels :math:`+1` with probability ``positive``;
    inputs :math:`a = \text{shift}\cdot y\,u + \text{offset}\cdot b + \text{spread}\cdot \xi/\sqrt d`,
    :math:`\xi \sim \mathcal N(0, I_d)`; points with :math:`y\langle a, u\rangle <` ``margin`` are rejected;
    then every input is divided by the largest norm (so :math:`R = 1`). The classes are imbalanced and
    share an offset orthogonal to :math:`u`, so :math:`\frac1n\sum_i y_i a_i` (the first step of every
    method here) points mostly along :math:`b`, not :math:`u`, and the perceptron needs several
    corrections. ``flip`` > 0 flips the labels of that fraction of points (chosen at random), which
    makes the sets non-separable in practice (check with :func:`logistic_minimizer`).
    """
    for name, v in (("n", n), ("d", d), ("n_sets", n_sets)):
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    if d < 2:
        raise ValueError(f"d must be at least 2 (a separator and an offset direction), got {d}")
    if not 0 < margin < shift + 1:
        raise ValueError(f"margin must be in (0, shift + 1), got {margin!r}")
    if not 0 < positive < 1:
        raise ValueError(f"positive must be in (0, 1), got {positive!r}")
    if not 0 <= flip < 0.5:
        raise ValueError(f"flip must be in [0, 0.5), got {flip!r}")
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(n_sets, d, d, generator=gen, dtype=dtype))
    u, b = q[..., 0], q[..., 1]
    pool = 40 * n
    y = torch.where(torch.rand(n_sets, pool, generator=gen, dtype=dtype) < positive, 1.0, -1.0).to(dtype)
    a = (shift * y.unsqueeze(-1) * u.unsqueeze(1) + offset * b.unsqueeze(1)
         + spread * torch.randn(n_sets, pool, d, generator=gen, dtype=dtype) / math.sqrt(d))
    keep = y * (a @ u.unsqueeze(-1)).squeeze(-1) >= margin
    if int(keep.sum(-1).min()) < n:
        raise ValueError(f"margin {margin} rejects too many points to draw n={n}; lower it")
    order = torch.sort((~keep).to(torch.int8), dim=-1, stable=True).indices[:, :n]   # the first n kept
    a = a.gather(1, order.unsqueeze(-1).expand(-1, -1, d))
    y = y.gather(1, order)
    a = a / a.norm(dim=-1).amax(-1)[:, None, None]
    if flip > 0:
        k = int(round(flip * n))
        idx = torch.rand(n_sets, n, generator=gen).argsort(-1)[:, :k]
        y = y.scatter(1, idx, -y.gather(1, idx))
    rho = (y * (a @ u.unsqueeze(-1)).squeeze(-1)).amin(-1)
    return Dataset(a, y, u, rho)
