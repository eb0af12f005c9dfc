r"""Robust low-rank matrix recovery by the sub-gradient method (SubGM) on the :math:`\ell_1` loss, with
small initialization and an over-parameterized factor {cite}`ma2023global`.

A rank-:math:`r` positive semidefinite :math:`X^\star = U^\star U^{\star\top} \in \mathbb R^{d\times d}` is
seen through :math:`m` Gaussian linear measurements, a fraction :math:`p` of them grossly corrupted,

.. math::
    y_i = \langle A_i, X^\star\rangle + s_i, \qquad i = 1, \dots, m, \qquad
    s_i \ne 0 \text{ for a fraction } p \text{ of the } i,

and is fitted as :math:`UU^\top` with :math:`U \in \mathbb R^{d\times r'}`, :math:`r' \ge r`, by

.. math::
    f_{\ell_1}(U) = \frac1m \sum_{i=1}^m \bigl|\langle A_i, UU^\top\rangle - y_i\bigr|, \qquad
    f_{\ell_2}(U) = \frac1{2m} \sum_{i=1}^m \bigl(\langle A_i, UU^\top\rangle - y_i\bigr)^2 .

Both (sub)gradients have the form :math:`D = \frac2m \sum_i \psi'(\xi_i)\, A_i U` with residuals
:math:`\xi_i = \langle A_i, UU^\top\rangle - y_i` (for symmetric :math:`A_i`), :math:`\psi' = \operatorname{sign}`
for :math:`\ell_1` and :math:`\psi'(\xi) = \xi` for :math:`\ell_2`. SubGM is

.. math::
    U_{t+1} = U_t - \eta_t D_t, \qquad \eta_t = \eta_0 \rho^t, \qquad U_0 = \alpha B,\;
    B_{ij} \sim \mathcal N(0, 1/d).

Everything is batched: ``A`` has shape ``(..., m, d, d)``, ``y`` ``(..., m)``, factors ``(..., d, k)``, and
``eta0``, ``decay`` broadcast over the batch dimensions, so a sweep over seeds, outlier fractions,
ranks :math:`r'` (a factor padded with zero columns: they stay zero, since :math:`D = GU`) and
initialization scales is one tensor computation per iteration.

Public functions: :func:`make_problem`, :func:`measure`, :func:`recovery_loss`,
:func:`recovery_subgradient`, :func:`small_init`, :func:`step_sizes`, :func:`subgradient_method`,
:func:`relative_error`.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import torch

__all__ = ["RecoveryProblem", "SubGMResult", "make_problem", "measure", "recovery_loss", "recovery_subgradient",
           "relative_error", "small_init", "step_sizes", "subgradient_method"]

_LOSSES = ("l1", "l2")


class RecoveryProblem(NamedTuple):
    """A batch of robust matrix recovery problems made by :func:`make_problem`.

    Attributes:
        A: symmetrized measurement matrices ``(..., m, d, d)``.
        y: measurements ``(..., m)``.
        X_star: the ground truth ``(..., d, d)``.
        U_star: its factor ``(..., d, r)``.
        outliers: boolean mask ``(..., m)`` of the corrupted measurements.
    """

    A: torch.Tensor
    y: torch.Tensor
    X_star: torch.Tensor
    U_star: torch.Tensor
    outliers: torch.Tensor


class SubGMResult(NamedTuple):
    """What :func:`subgradient_method` returns.

    Attributes:
        U: the last iterate ``(..., d, k)``.
        errors: relative errors :math:`\\|U_tU_t^\\top - X^\\star\\|_F / \\|X^\\star\\|_F` at the recorded
            iterations ``(..., n_rec)`` (empty when no ``X_star`` was given).
        iters: the recorded iteration numbers ``t`` ``(n_rec,)``.
        steps: the step sizes :math:`\\eta_t` at those iterations ``(..., n_rec)``.
    """

    U: torch.Tensor
    errors: torch.Tensor
    iters: torch.Tensor
    steps: torch.Tensor


def _as_batch(v: float | torch.Tensor, like: torch.Tensor, name: str) -> torch.Tensor:
    t = torch.as_tensor(v, dtype=like.dtype, device=like.device)
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} must be finite, got {v!r}")
    return t


def _generator(generator: torch.Generator | int | None) -> torch.Generator | None:
    if isinstance(generator, int):
        return torch.Generator().manual_seed(generator)
    return generator


def make_problem(d: int, r: int, m: int, *, batch: Sequence[int] = (), outlier_frac: float | torch.Tensor = 0.0,
                 outlier_scale: float = 100.0, noise_std: float = 0.0, cond: float = 1.0,
                 generator: torch.Generator | int | None = None, dtype: torch.dtype = torch.float64,
                 device: str | torch.device = "cpu") -> RecoveryProblem:
    r"""Draw robust matrix recovery problems: Gaussian measurements of a rank-``r`` PSD matrix, a fraction
    ``outlier_frac`` of them replaced by gross outliers.

    :math:`X^\star = Q\,\mathrm{diag}(\sigma)\,Q^\top` with :math:`Q` a uniformly random orthonormal
    ``d x r`` frame and :math:`\sigma` geometric from 1 down to ``1/cond``. Each :math:`A_i` has i.i.d.
    :math:`\mathcal N(0, 1)` entries and is stored symmetrized, :math:`(A_i + A_i^\top)/2`, which gives the
    same :math:`\langle A_i, X\rangle` for every symmetric :math:`X`. The outliers are a uniformly random
    subset of :math:`\mathrm{round}(p\,m)` measurements to which :math:`s_i \sim \mathcal N(0, \tau^2)`,
    :math:`\tau` = ``outlier_scale``, is added (:math:`s_i = 0` elsewhere; any magnitude, independent of
    the :math:`A_i`); ``noise_std`` adds dense Gaussian noise to every measurement.

    Args:
        d, r, m: dimension, rank and number of measurements (``1 <= r <= d``, ``m >= 1``).
        batch: leading batch shape (independent problems).
        outlier_frac: :math:`p \in [0, 1)`, a float or a tensor broadcastable to ``batch``.
        outlier_scale: :math:`\tau \ge 0`, the standard deviation of the outliers, a float or a tensor
            broadcastable to ``batch``.
        noise_std: standard deviation of dense Gaussian noise (``>= 0``).
        cond: condition number of :math:`X^\star` (``>= 1``).
        generator: a ``torch.Generator`` or integer seed (CPU draws, then moved to ``device``).

    Example::

        >>> P = make_problem(10, 2, 200, batch=(3,), outlier_frac=0.2, generator=0)
        >>> P.A.shape, P.y.shape, int(P.outliers[0].sum())
        (torch.Size([3, 200, 10, 10]), torch.Size([3, 200]), 40)
    """
    for name, v, lo in (("d", d, 1), ("r", r, 1), ("m", m, 1)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ValueError(f"{name} must be an integer >= {lo}, got {v!r}")
    if r > d:
        raise ValueError(f"r must be <= d = {d}, got {r}")
    batch = tuple(int(b) for b in batch)
    if any(b < 1 for b in batch):
        raise ValueError(f"batch must hold positive sizes, got {batch}")
    tau = torch.as_tensor(outlier_scale, dtype=torch.float64)
    if not bool(((tau >= 0) & torch.isfinite(tau)).all()) or not noise_std >= 0:
        raise ValueError(f"outlier_scale and noise_std must be finite and >= 0, got {outlier_scale!r}, {noise_std!r}")
    if not cond >= 1:
        raise ValueError(f"cond must be >= 1, got {cond}")
    p = torch.as_tensor(outlier_frac, dtype=torch.float64)
    if not bool(((p >= 0) & (p < 1)).all()):
        raise ValueError(f"outlier_frac must lie in [0, 1), got {outlier_frac!r}")
    try:
        p = p.expand(batch) if batch else p.reshape(())
        tau = tau.expand(batch) if batch else tau.reshape(())
    except RuntimeError as err:
        raise ValueError(f"outlier_frac {tuple(p.shape)} and outlier_scale {tuple(tau.shape)} must broadcast "
                         f"to batch {batch}") from err
    g = _generator(generator)
    Q, _ = torch.linalg.qr(torch.randn(*batch, d, r, generator=g, dtype=torch.float64))
    sigma = torch.logspace(0, -torch.log10(torch.tensor(float(cond))).item(), r, dtype=torch.float64)
    U_star = Q * sigma.sqrt()
    X_star = U_star @ U_star.transpose(-1, -2)
    G = torch.randn(*batch, m, d, d, generator=g, dtype=torch.float64)
    A = 0.5 * (G + G.transpose(-1, -2))
    clean = (A * X_star.unsqueeze(-3)).sum((-1, -2))
    n_out = torch.round(p * m).long()
    rank = torch.rand(*batch, m, generator=g, dtype=torch.float64).argsort(-1).argsort(-1)
    outliers = rank < n_out.unsqueeze(-1)
    s = tau.unsqueeze(-1) * torch.randn(*batch, m, generator=g, dtype=torch.float64)
    y = clean + torch.where(outliers, s, torch.zeros_like(s))
    if noise_std > 0:
        y = y + noise_std * torch.randn(*batch, m, generator=g, dtype=torch.float64)
    to = dict(dtype=dtype, device=device)
    return RecoveryProblem(A.to(**to), y.to(**to), X_star.to(**to), U_star.to(**to), outliers.to(device))


def _check_A(A: torch.Tensor) -> None:
    if not isinstance(A, torch.Tensor) or A.dim() < 3 or A.shape[-1] != A.shape[-2] or not A.is_floating_point():
        raise ValueError(f"A must be a floating-point tensor of shape (..., m, d, d), got "
                         f"{tuple(getattr(A, 'shape', ()))} {getattr(A, 'dtype', type(A))}")


def _check_U(U: torch.Tensor, A: torch.Tensor) -> None:
    if not isinstance(U, torch.Tensor) or U.dim() < 2 or U.shape[-2] != A.shape[-1]:
        raise ValueError(f"U must have shape (..., d, k) with d = {A.shape[-1]}, got {tuple(getattr(U, 'shape', ()))}")


def _check_y(y: torch.Tensor, A: torch.Tensor) -> None:
    if not isinstance(y, torch.Tensor) or y.dim() < 1 or y.shape[-1] != A.shape[-3]:
        raise ValueError(f"y must have shape (..., m) with m = {A.shape[-3]}, got {tuple(getattr(y, 'shape', ()))}")


def _check_loss(loss: str) -> None:
    if loss not in _LOSSES:
        raise ValueError(f"loss must be one of {_LOSSES}, got {loss!r}")


def measure(A: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
    r"""The measurement operator :math:`\mathcal A(X) = (\langle A_i, X\rangle)_{i=1}^m`, shape ``(..., m)``.

    Args:
        A: ``(..., m, d, d)``; X: ``(..., d, d)`` (batch dimensions broadcast).
    """
    _check_A(A)
    if not isinstance(X, torch.Tensor) or X.dim() < 2 or X.shape[-2:] != A.shape[-2:]:
        raise ValueError(f"X must have shape (..., {A.shape[-1]}, {A.shape[-1]}), got {tuple(getattr(X, 'shape', ()))}")
    return _measure_t(_flat_t(A), X)


def _flat_t(A: torch.Tensor) -> torch.Tensor:
    """``A`` as ``(..., d*d, m)`` (a view): the layout in which both products below are row-vector times matrix."""
    m, d = A.shape[-3], A.shape[-1]
    return A.reshape(*A.shape[:-3], m, d * d).transpose(-1, -2)


def _measure_t(AT: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
    dd = AT.shape[-2]
    return (X.reshape(*X.shape[:-2], 1, dd) @ AT).squeeze(-2)


def _subgradient_t(U: torch.Tensor, AT: torch.Tensor, y: torch.Tensor, loss: str,
                   X: torch.Tensor | None = None) -> torch.Tensor:
    """D = (2/m) sum_i psi'(rho_i) A_i U with A given as (..., d*d, m); ``X = UU^T`` if already computed."""
    m = AT.shape[-1]
    d = U.shape[-2]
    res = _measure_t(AT, U @ U.transpose(-1, -2) if X is None else X) - y
    w = torch.sign(res) if loss == "l1" else res
    Gm = (w.unsqueeze(-2) @ AT.transpose(-1, -2)).reshape(*w.shape[:-1], d, d)
    return (2.0 / m) * (Gm @ U)


def _residuals(U: torch.Tensor, A: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return measure(A, U @ U.transpose(-1, -2)) - y


def recovery_loss(U: torch.Tensor, A: torch.Tensor, y: torch.Tensor, loss: str = "l1") -> torch.Tensor:
    r""":math:`f_{\ell_1}(U) = \frac1m \sum_i |\langle A_i, UU^\top\rangle - y_i|` or
    :math:`f_{\ell_2}(U) = \frac1{2m} \sum_i (\langle A_i, UU^\top\rangle - y_i)^2`, shape ``(...)``.
    Differentiable in ``U`` (autograd gives the sub-gradient with :math:`\operatorname{sign}(0) = 0`)."""
    _check_A(A), _check_U(U, A), _check_y(y, A), _check_loss(loss)
    res = _residuals(U, A, y)
    return res.abs().mean(-1) if loss == "l1" else 0.5 * res.square().mean(-1)


def recovery_subgradient(U: torch.Tensor, A: torch.Tensor, y: torch.Tensor, loss: str = "l1") -> torch.Tensor:
    r"""A sub-gradient of :func:`recovery_loss` at ``U``, shape ``(..., d, k)``:

    .. math::
        D = \frac2m \sum_{i=1}^m \psi'(\xi_i)\, A_i U, \qquad \xi_i = \langle A_i, UU^\top\rangle - y_i,

    with :math:`\psi' = \operatorname{sign}` (``"l1"``; :math:`\operatorname{sign}(0) = 0`) or
    :math:`\psi'(\xi) = \xi` (``"l2"``). ``A`` must be symmetric in its last two dimensions (as
    :func:`make_problem` stores it); for a general :math:`A_i` use :math:`(A_i + A_i^\top)/2`.
    """
    _check_A(A), _check_U(U, A), _check_y(y, A), _check_loss(loss)
    return _subgradient_t(U, _flat_t(A), y, loss)


def small_init(d: int, r_prime: int | torch.Tensor, alpha: float | torch.Tensor, *, batch: Sequence[int] = (),
               width: int | None = None, generator: torch.Generator | int | None = None,
               dtype: torch.dtype = torch.float64, device: str | torch.device = "cpu") -> torch.Tensor:
    r"""The initial factor :math:`U_0 = \alpha B`, :math:`B_{ij} \sim \mathcal N(0, 1/d)`, shape
    ``(*batch, d, width)``.

    ``r_prime`` (an int, or a tensor broadcastable to ``batch``) is the search rank :math:`r'`; the
    columns beyond it are zero, which lets factors of different ranks share one tensor of ``width``
    columns (default ``max r_prime``): a zero column of :math:`U` has a zero column of
    :math:`D = GU`, so it stays zero. ``alpha`` (``> 0``) may be a tensor broadcastable to ``batch``.
    """
    rp = torch.as_tensor(r_prime)
    if rp.is_floating_point() or not bool(((rp >= 1) & (rp <= d)).all()):
        raise ValueError(f"r_prime must hold integers in [1, d = {d}], got {r_prime!r}")
    a = torch.as_tensor(alpha, dtype=torch.float64)
    if not bool(((a > 0) & torch.isfinite(a)).all()):
        raise ValueError(f"alpha must be positive and finite, got {alpha!r}")
    batch = tuple(int(b) for b in batch)
    width = int(rp.max()) if width is None else int(width)
    if width < int(rp.max()) or width > d:
        raise ValueError(f"width must lie in [max r_prime = {int(rp.max())}, d = {d}], got {width}")
    g = _generator(generator)
    B = torch.randn(*batch, d, width, generator=g, dtype=torch.float64) / d ** 0.5
    try:
        mask = torch.arange(width) < rp.reshape(*rp.shape, 1, 1)
        U0 = (a.reshape(*a.shape, 1, 1) * B * mask).expand(*batch, d, width) if batch else a * B * mask
    except RuntimeError as err:
        raise ValueError(f"r_prime {tuple(rp.shape)} and alpha {tuple(a.shape)} must broadcast "
                         f"to batch {batch}") from err
    return U0.to(dtype=dtype, device=device).contiguous()


def step_sizes(iters: int, eta0: float | torch.Tensor, decay: float | torch.Tensor) -> torch.Tensor:
    r"""The geometric schedule :math:`\eta_t = \eta_0 \rho^t`, :math:`t = 0, \dots, \texttt{iters} - 1`,
    shape ``(*broadcast(eta0, decay).shape, iters)``; ``decay`` is :math:`\rho \in (0, 1]`."""
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 1:
        raise ValueError(f"iters must be a positive integer, got {iters!r}")
    e = torch.as_tensor(eta0, dtype=torch.float64)
    q = torch.as_tensor(decay, dtype=torch.float64)
    if not bool(((e > 0) & torch.isfinite(e)).all()):
        raise ValueError(f"eta0 must be positive and finite, got {eta0!r}")
    if not bool(((q > 0) & (q <= 1)).all()):
        raise ValueError(f"decay must lie in (0, 1], got {decay!r}")
    t = torch.arange(iters, dtype=torch.float64)
    return e.unsqueeze(-1) * q.unsqueeze(-1) ** t


def relative_error(U: torch.Tensor, X_star: torch.Tensor) -> torch.Tensor:
    r""":math:`\|UU^\top - X^\star\|_F / \|X^\star\|_F`, shape ``(...)``."""
    if not isinstance(U, torch.Tensor) or U.dim() < 2 or not isinstance(X_star, torch.Tensor) \
            or X_star.shape[-2:] != (U.shape[-2], U.shape[-2]):
        raise ValueError(f"U must be (..., d, k) and X_star (..., d, d), got {tuple(getattr(U, 'shape', ()))} "
                         f"and {tuple(getattr(X_star, 'shape', ()))}")
    diff = U @ U.transpose(-1, -2) - X_star
    return torch.linalg.matrix_norm(diff) / torch.linalg.matrix_norm(X_star)


def subgradient_method(A: torch.Tensor, y: torch.Tensor, U0: torch.Tensor, *, iters: int,
                       eta0: float | torch.Tensor, decay: float | torch.Tensor = 1.0, loss: str = "l1",
                       X_star: torch.Tensor | None = None, record_every: int = 1) -> SubGMResult:
    r"""SubGM :math:`U_{t+1} = U_t - \eta_0\rho^t D_t` (:func:`recovery_subgradient`) from ``U0``, for
    ``iters`` iterations; with ``loss="l2"`` and ``decay=1`` this is plain gradient descent on the
    squared loss.

    Args:
        A: ``(..., m, d, d)`` symmetric; y: ``(..., m)``; U0: ``(..., d, k)`` (batch dimensions broadcast).
        iters: number of iterations.
        eta0, decay: :math:`\eta_0 > 0` and :math:`\rho \in (0, 1]`, floats or tensors broadcastable to the
            batch shape (one schedule per problem).
        X_star: the ground truth ``(..., d, d)``; when given, the relative error is recorded.
        record_every: record at ``t = 0, record_every, ...`` and at ``t = iters``.

    Returns:
        :class:`SubGMResult` ``(U, errors, iters, steps)``. No host synchronisation inside the loop.

    Example::

        >>> P = make_problem(8, 1, 160, outlier_frac=0.3, generator=0)
        >>> U0 = small_init(8, 8, 1e-3, generator=1)
        >>> res = subgradient_method(P.A, P.y, U0, iters=600, eta0=0.3, decay=0.99, X_star=P.X_star)
        >>> bool(res.errors[..., -1] < 1e-2)
        True
    """
    _check_A(A), _check_U(U0, A), _check_y(y, A), _check_loss(loss)
    if isinstance(record_every, bool) or not isinstance(record_every, int) or record_every < 1:
        raise ValueError(f"record_every must be a positive integer, got {record_every!r}")
    if X_star is not None and (not isinstance(X_star, torch.Tensor) or X_star.shape[-2:] != A.shape[-2:]):
        raise ValueError(f"X_star must have shape (..., d, d) with d = {A.shape[-1]}")
    sched = step_sizes(iters, eta0, decay).to(device=U0.device, dtype=U0.dtype)   # (*b, iters)
    AT = _flat_t(A)   # (..., d*d, m): the layout in which both products are fast row-vector GEMMs
    shapes = [U0.shape[:-2], sched.shape[:-1], A.shape[:-3], y.shape[:-1]]
    if X_star is not None:
        shapes.append(X_star.shape[:-2])
    try:
        batch = torch.broadcast_shapes(*shapes)
    except RuntimeError as err:
        raise ValueError(f"the batch shapes of A, y, U0, eta0/decay and X_star do not broadcast: {shapes}") from err
    U = U0.expand(*batch, *U0.shape[-2:])
    sched = sched.expand(*batch, iters)
    # one copy of the measurements per problem in the batch (a broadcast matmul would copy at every step)
    AT = AT.expand(*batch, *AT.shape[-2:]).contiguous()
    y = y.expand(*batch, y.shape[-1])
    rec_t = sorted(set(range(0, iters, record_every)) | {iters})
    rec_set = set(rec_t)
    x_norm = None if X_star is None else torch.linalg.matrix_norm(X_star)
    errs, steps = [], []
    for t in range(iters + 1):
        X = U @ U.transpose(-1, -2)
        if t in rec_set:
            if X_star is not None:
                errs.append((X - X_star).square().sum((-2, -1)).sqrt() / x_norm)
            steps.append(sched[..., min(t, iters - 1)])
        if t == iters:
            break
        eta = sched[..., t]
        U = U - eta.reshape(*eta.shape, 1, 1) * _subgradient_t(U, AT, y, loss, X)
    errors = torch.stack(errs, -1) if errs else torch.empty(0, dtype=U.dtype, device=U.device)
    return SubGMResult(U, errors, torch.tensor(rec_t), torch.stack(steps, -1))
