r"""Fitting rates: a power law :math:`y \approx C x^{s}` read off as a straight line in log-log
coordinates, with a bootstrap interval for the exponent :math:`s`.

Theory chapters check a rate ("the error falls like :math:`1/t`", "the iteration count grows like
:math:`1/\rho^2`") by running the method over a sweep of :math:`x` and fitting

.. math::
    \log y_k = b + s \log x_k + \varepsilon_k, \qquad
    \hat s = \frac{\sum_k (u_k - \bar u)(v_k - \bar v)}{\sum_k (u_k - \bar u)^2},\quad
    \hat b = \bar v - \hat s\, \bar u,

with :math:`u_k = \log x_k`, :math:`v_k = \log y_k` (ordinary least squares), and an interval for
:math:`s` from the pairs bootstrap: resample the points :math:`(x_k, y_k)` with replacement, refit,
and take the percentiles of the refitted slopes. Several seeds at the same :math:`x` are simply more
points. The bootstrap is vectorized: all resamples are fitted in one batched tensor operation.

Example::

    >>> fit = loglog_slope([1, 2, 4, 8], [3.0, 1.5, 0.75, 0.375])
    >>> round(fit.slope, 6), round(fit.intercept, 6)
    (-1.0, 1.098612)
    >>> fit.contains(-1.0)
    True
"""
from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
import torch

__all__ = ["LogLogFit", "loglog_slope"]


class LogLogFit(NamedTuple):
    """The result of :func:`loglog_slope`.

    Attributes:
        slope: the fitted exponent :math:`\\hat s`.
        intercept: :math:`\\hat b`, in natural-log units (:math:`y \\approx e^{\\hat b} x^{\\hat s}`).
        interval: ``(low, high)``, the percentile bootstrap interval for the slope.
        level: the interval's nominal coverage.
        n: the number of points fitted.
    """

    slope: float
    intercept: float
    interval: tuple[float, float]
    level: float
    n: int

    def contains(self, value: float) -> bool:
        """Whether ``value`` lies in the bootstrap interval of the slope."""
        return self.interval[0] <= value <= self.interval[1]

    def predict(self, x: Any) -> np.ndarray:
        """The fitted power law :math:`e^{\\hat b} x^{\\hat s}` at ``x`` (a NumPy array)."""
        return np.exp(self.intercept) * np.asarray(x, dtype=float) ** self.slope

    def __str__(self) -> str:
        return (f"slope {self.slope:.3f} [{self.interval[0]:.3f}, {self.interval[1]:.3f}] "
                f"({self.level:.0%} bootstrap, n={self.n})")


def _ols(u: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Batched least-squares line along the last dimension: (slope, intercept)."""
    uc = u - u.mean(-1, keepdim=True)
    vc = v - v.mean(-1, keepdim=True)
    sxx = (uc * uc).sum(-1)
    slope = (uc * vc).sum(-1) / sxx          # nan where every x of a resample is equal
    return slope, v.mean(-1) - slope * u.mean(-1)


def loglog_slope(x: Any, y: Any, *, n_boot: int = 1000, level: float = 0.95,
                 generator: torch.Generator | int | None = None) -> LogLogFit:
    r"""Fit :math:`\log y = b + s \log x` by least squares; bootstrap an interval for :math:`s`.

    Args:
        x, y: positive, finite values (NumPy arrays, tensors on any device, or sequences) of the same
            shape or broadcastable to one; they are flattened, so a ``(seeds, points)`` array of
            ``y`` against a ``(points,)`` array of ``x`` fits every seed's points together.
        n_boot: number of bootstrap resamples (``0``: no interval, ``(nan, nan)``).
        level: coverage of the percentile interval, in ``(0, 1)``.
        generator: a ``torch.Generator`` or an integer seed for the resampling (default: seed 0,
            so that a fit repeats exactly).

    Returns:
        :class:`LogLogFit` ``(slope, intercept, interval, level, n)``.

    Raises:
        ValueError: non-positive or non-finite values, fewer than three points, fewer than two
            distinct ``x``, or a bad ``n_boot``/``level``.
    """
    if isinstance(n_boot, bool) or not isinstance(n_boot, (int, np.integer)) or n_boot < 0:
        raise ValueError(f"n_boot must be a non-negative integer, got {n_boot!r}")
    if not (isinstance(level, (float, int)) and 0.0 < float(level) < 1.0):
        raise ValueError(f"level must be in (0, 1), got {level!r}")
    try:
        xt, yt = _broadcast(x, y)
    except (RuntimeError, ValueError, TypeError) as err:
        raise ValueError(f"x and y must be numeric arrays of the same shape, or broadcastable, "
                         f"got shapes {tuple(np.shape(x))} and {tuple(np.shape(y))}") from err
    for name, t in (("x", xt), ("y", yt)):
        if not bool(torch.isfinite(t).all()) or not bool((t > 0).all()):
            raise ValueError(f"{name} must hold positive, finite values (a log-log fit), got min {float(t.min())}")
    n = xt.numel()
    if n < 3:
        raise ValueError(f"need at least 3 points to fit a slope with an interval, got {n}")
    u, v = xt.log(), yt.log()
    if bool((u == u[0]).all()):
        raise ValueError("x must take at least two distinct values")
    slope, intercept = _ols(u, v)
    if n_boot == 0:
        return LogLogFit(float(slope), float(intercept), (float("nan"), float("nan")), float(level), n)
    if generator is None or isinstance(generator, (int, np.integer)):
        generator = torch.Generator().manual_seed(int(generator or 0))
    idx = torch.randint(0, n, (int(n_boot), n), generator=generator)   # all resamples at once
    boot, _ = _ols(u[idx], v[idx])
    alpha = (1.0 - float(level)) / 2.0
    q = torch.nanquantile(boot, torch.tensor([alpha, 1.0 - alpha], dtype=torch.float64))
    return LogLogFit(float(slope), float(intercept), (float(q[0]), float(q[1])), float(level), n)


def _broadcast(x: Any, y: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Both inputs as flat float64 CPU tensors, broadcast to a common shape."""
    def as_tensor(v: Any) -> torch.Tensor:
        # np.array copies: inputs may be read-only views (np.broadcast_to), which torch warns about
        t = v.detach() if isinstance(v, torch.Tensor) else torch.as_tensor(np.array(v, dtype=float))
        return t.to(device="cpu", dtype=torch.float64)

    xb, yb = torch.broadcast_tensors(as_tensor(x), as_tensor(y))
    return xb.reshape(-1), yb.reshape(-1)
