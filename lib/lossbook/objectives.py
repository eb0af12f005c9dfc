r"""Toy objectives for optimizer chapters and tests: a quadratic with a chosen spectrum and the
Rosenbrock function.

Each comes in two forms: a plain function of a point ``x`` of shape ``(..., d)`` (vectorized over
leading dimensions, differentiable) and an ``nn.Module`` that owns the point as its only
parameter, so that any ``torch.optim.Optimizer`` can be run on it::

    obj = Quadratic(log_spectrum(50, condition=1e3), generator=torch.Generator().manual_seed(0))
    opt = torch.optim.SGD(obj.parameters(), lr=1.0)
    for _ in range(100):
        opt.zero_grad(); obj().backward(); opt.step()
    obj.gap()          # f(x) - min f, a 0-d tensor

Both minima are known in closed form (value 0), so progress can be measured exactly.
"""
from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["Quadratic", "Rosenbrock", "log_spectrum", "quadratic", "random_rotation", "rosenbrock"]


def log_spectrum(dim: int, condition: float, *, largest: float = 1.0,
                 dtype: torch.dtype = torch.float64) -> torch.Tensor:
    r"""``dim`` eigenvalues spaced evenly in log scale from ``largest`` down to ``largest / condition``.

    .. math:: \lambda_k = L\, \kappa^{-(k-1)/(d-1)}, \qquad k = 1, \dots, d,

    with :math:`L` = ``largest`` and :math:`\kappa` = ``condition`` (the condition number of the
    quadratic built from them). ``dim=1`` gives ``[largest]``.
    """
    if not isinstance(dim, int) or dim < 1:
        raise ValueError(f"dim must be a positive integer, got {dim!r}")
    if not condition >= 1:
        raise ValueError(f"condition must be >= 1, got {condition!r}")
    if not largest > 0:
        raise ValueError(f"largest must be > 0, got {largest!r}")
    if dim == 1:
        return torch.tensor([float(largest)], dtype=dtype)
    return largest * torch.logspace(0.0, -math.log10(condition), dim, dtype=dtype)


def random_rotation(dim: int, *, generator: torch.Generator | None = None,
                    dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """A ``(dim, dim)`` orthogonal matrix drawn uniformly (Haar), via QR with the sign fix."""
    if not isinstance(dim, int) or dim < 1:
        raise ValueError(f"dim must be a positive integer, got {dim!r}")
    z = torch.randn(dim, dim, generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(z)
    return (q * torch.sign(torch.diagonal(r))).to(dtype)


def quadratic(x: torch.Tensor, hessian: torch.Tensor, minimizer: torch.Tensor | None = None) -> torch.Tensor:
    r"""The quadratic :math:`f(x) = \tfrac12 (x - x^\star)^\top A (x - x^\star)` at ``x``.

    Args:
        x: points, shape ``(..., d)``.
        hessian: :math:`A`, shape ``(d, d)``, symmetric (positive semi-definite for a minimum).
        minimizer: :math:`x^\star`, shape ``(d,)``; zero when ``None``.

    Returns:
        values of shape ``x.shape[:-1]``; the gradient is :math:`A (x - x^\star)`.
    """
    if hessian.dim() != 2 or hessian.shape[0] != hessian.shape[1]:
        raise ValueError(f"hessian must be a square (d, d) matrix, got {tuple(hessian.shape)}")
    d = hessian.shape[0]
    if x.dim() < 1 or x.shape[-1] != d:
        raise ValueError(f"x must have shape (..., {d}) to match hessian, got {tuple(x.shape)}")
    e = x if minimizer is None else x - minimizer
    return 0.5 * ((e @ hessian) * e).sum(-1)


def rosenbrock(x: torch.Tensor, a: float = 1.0, b: float = 100.0) -> torch.Tensor:
    r"""The (chained) Rosenbrock function at ``x``, shape ``(..., d)`` with ``d >= 2``:

    .. math:: f(x) = \sum_{i=1}^{d-1} \big[ b\,(x_{i+1} - x_i^2)^2 + (a - x_i)^2 \big].

    Its global minimum 0 is at :math:`x = (a, a^2)` for ``d = 2`` and at the all-ones point for
    ``a = 1`` (any ``d``). The valley :math:`x_{i+1} = x_i^2` is curved and, for large ``b``,
    narrow: the classic hard case for first-order methods.

    Returns:
        values of shape ``x.shape[:-1]``.
    """
    if x.dim() < 1 or x.shape[-1] < 2:
        raise ValueError(f"x must have shape (..., d) with d >= 2, got {tuple(x.shape)}")
    if not b >= 0:
        raise ValueError(f"b must be >= 0, got {b!r}")
    head, tail = x[..., :-1], x[..., 1:]
    return (b * (tail - head**2) ** 2 + (a - head) ** 2).sum(-1)


class Quadratic(nn.Module):
    r"""A quadratic :math:`\tfrac12 (x - x^\star)^\top A (x - x^\star)` with :math:`A = Q \operatorname{diag}(\lambda) Q^\top`
    and a chosen spectrum, owning the point :math:`x` as its parameter.

    Args:
        eigenvalues: :math:`\lambda`, shape ``(d,)`` (e.g. from :func:`log_spectrum`).
        rotate: if True (default) :math:`Q` is a random rotation, so the Hessian is not diagonal
            and coordinate-wise methods (Adam) gain nothing from the axes; if False, :math:`Q = I`.
        minimizer: :math:`x^\star`; default a standard-normal draw.
        x0: the starting point; default :math:`x^\star` plus a standard-normal draw.
        generator: for the rotation and the draws.
        dtype: of the parameter and buffers (default float32).

    ``obj()`` evaluates at the parameter, ``obj(x)`` at other points ``(..., d)``;
    :meth:`gap` is :math:`f(x) - \min f = f(x)`.
    """

    def __init__(self, eigenvalues: torch.Tensor, *, rotate: bool = True, minimizer: torch.Tensor | None = None,
                 x0: torch.Tensor | None = None, generator: torch.Generator | None = None,
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        lam = torch.as_tensor(eigenvalues, dtype=torch.float64)
        if lam.dim() != 1 or lam.numel() < 1 or not torch.isfinite(lam).all():
            raise ValueError(f"eigenvalues must be a non-empty finite 1-d tensor, got shape {tuple(lam.shape)}")
        d = lam.numel()
        q = random_rotation(d, generator=generator) if rotate else torch.eye(d, dtype=torch.float64)
        a = (q * lam) @ q.T
        a = 0.5 * (a + a.T)
        x_star = torch.randn(d, generator=generator, dtype=torch.float64) if minimizer is None else \
            torch.as_tensor(minimizer, dtype=torch.float64)
        start = x_star + torch.randn(d, generator=generator, dtype=torch.float64) if x0 is None else \
            torch.as_tensor(x0, dtype=torch.float64)
        for name, t in (("minimizer", x_star), ("x0", start)):
            if t.shape != (d,):
                raise ValueError(f"{name} must have shape ({d},), got {tuple(t.shape)}")
        self.register_buffer("hessian", a.to(dtype))
        self.register_buffer("eigenvalues", lam.to(dtype))
        self.register_buffer("minimizer", x_star.to(dtype))
        self.x = nn.Parameter(start.to(dtype).clone())

    def forward(self, x: torch.Tensor | None = None) -> torch.Tensor:
        return quadratic(self.x if x is None else x, self.hessian, self.minimizer)

    def gap(self) -> torch.Tensor:
        """:math:`f(x) - \\min f` at the parameter (detached, 0-d)."""
        return self.forward().detach()

    @property
    def condition(self) -> float:
        lam = self.eigenvalues
        return float(lam.max() / lam.min())


class Rosenbrock(nn.Module):
    r"""The Rosenbrock function (see :func:`rosenbrock`) owning its point as a parameter.

    Args:
        dim: ``d >= 2``.
        a, b: the constants (defaults 1 and 100).
        x0: starting point; default the classic :math:`(-1.2, 1, -1.2, 1, \dots)`.
        dtype: of the parameter (default float32).
    """

    def __init__(self, dim: int = 2, *, a: float = 1.0, b: float = 100.0, x0: torch.Tensor | None = None,
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        if not isinstance(dim, int) or dim < 2:
            raise ValueError(f"dim must be an integer >= 2, got {dim!r}")
        if dim > 2 and a != 1.0:
            raise ValueError("for dim > 2 only a = 1 has a known minimizer (the all-ones point)")
        self.a, self.b = float(a), float(b)
        if x0 is None:
            x0 = torch.tensor([-1.2, 1.0] * (dim // 2) + [-1.2] * (dim % 2))
        x0 = torch.as_tensor(x0)
        if x0.shape != (dim,):
            raise ValueError(f"x0 must have shape ({dim},), got {tuple(x0.shape)}")
        self.x = nn.Parameter(x0.to(dtype).clone())
        star = torch.tensor([self.a, self.a**2]) if dim == 2 else torch.ones(dim)
        self.register_buffer("minimizer", star.to(dtype))

    def forward(self, x: torch.Tensor | None = None) -> torch.Tensor:
        return rosenbrock(self.x if x is None else x, self.a, self.b)

    def gap(self) -> torch.Tensor:
        """:math:`f(x) - \\min f = f(x)` at the parameter (detached, 0-d)."""
        return self.forward().detach()
