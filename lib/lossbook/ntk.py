r"""Empirical neural tangent kernels (NTK) and kernel comparisons, via ``torch.func``.

For a network :math:`f(x;\theta)` with parameters :math:`\theta \in \mathbb R^p`, the per-sample
Jacobian is :math:`J(x) = \partial f(x;\theta) / \partial\theta` and the empirical NTK is the Gram
matrix of Jacobians,

.. math::
    K_\theta(x, x') = \sum_{j=1}^p \frac{\partial f(x;\theta)}{\partial\theta_j}
                     \frac{\partial f(x';\theta)}{\partial\theta_j} = J(x)\,J(x')^\top .

Under gradient flow on :math:`\mathcal L = \frac1P\sum_\mu \ell(f(x_\mu), y_\mu)`, every output moves
as :math:`\dot f(x) = -\frac1P \sum_\mu K_\theta(x, x_\mu)\, \ell'(f(x_\mu), y_\mu)`: the NTK is the
kernel the network uses at time :math:`t`. It stays at :math:`K_{\theta_0}` in the *lazy* regime and
moves when the network learns features. Two numbers summarise that motion:

.. math::
    A(K, y) = \frac{y^\top \bar K y}{\lVert \bar K\rVert_F\, \lVert y\rVert^2},\quad \bar K = HKH,\ H = I - \tfrac1P \mathbf 1\mathbf 1^\top
    \qquad\text{(kernel--target alignment, centred)},

.. math::
    d(K_1, K_2) = 1 - \frac{\langle K_1, K_2\rangle_F}{\lVert K_1\rVert_F \lVert K_2\rVert_F}
    \qquad\text{(kernel distance)}.

:math:`A \in [-1, 1]` is the cosine between :math:`\bar K` and the rank-one kernel :math:`yy^\top` (for centred
:math:`y`); :math:`d = 0` when the kernels agree up to scale. Public functions:
:func:`per_sample_jacobian`, :func:`empirical_ntk`, :func:`module_ntk`, :func:`kernel_alignment`,
:func:`kernel_distance`.
"""
from __future__ import annotations

from typing import Callable, Mapping

import torch
from torch import nn
from torch.func import functional_call, jacrev, vmap

__all__ = ["empirical_ntk", "kernel_alignment", "kernel_distance", "module_ntk", "per_sample_jacobian"]

Params = Mapping[str, torch.Tensor]


def _check_params(params: Params) -> None:
    if not isinstance(params, Mapping) or not params:
        raise ValueError("params must be a non-empty mapping name -> tensor (e.g. dict(model.named_parameters()))")
    for k, v in params.items():
        if not isinstance(v, torch.Tensor):
            raise ValueError(f"params[{k!r}] must be a tensor, got {type(v).__name__}")


def per_sample_jacobian(fn: Callable[[Params, torch.Tensor], torch.Tensor], params: Params,
                        x: torch.Tensor) -> dict[str, torch.Tensor]:
    r"""Jacobians :math:`\partial f(x_\mu;\theta)/\partial\theta` of every sample, vectorized with ``vmap``.

    Args:
        fn: ``fn(params, x_single) -> output``, the network on ONE sample (no batch dimension), returning
            a scalar or a vector of ``O`` outputs.
        params: name -> tensor, the point :math:`\theta` at which to differentiate.
        x: inputs ``(P, ...)``; the first dimension indexes the samples.

    Returns:
        name -> Jacobian of shape ``(P, *out_shape, *param.shape)``.

    Example::

        >>> w = {"w": torch.tensor([1.0, 2.0])}
        >>> per_sample_jacobian(lambda p, x: (p["w"] * x).sum(), w, torch.ones(3, 2))["w"].shape
        torch.Size([3, 2])
    """
    _check_params(params)
    if not isinstance(x, torch.Tensor) or x.dim() < 1 or x.shape[0] == 0:
        raise ValueError(f"x must be a tensor with a non-empty leading sample dimension, got "
                         f"{getattr(x, 'shape', type(x).__name__)}")
    return vmap(jacrev(fn), in_dims=(None, 0))(dict(params), x)


def empirical_ntk(fn: Callable[[Params, torch.Tensor], torch.Tensor], params: Params, x1: torch.Tensor,
                  x2: torch.Tensor | None = None, *, trace_outputs: bool = False) -> torch.Tensor:
    r"""The empirical NTK :math:`K(x_\mu, x'_\nu) = \sum_j \partial_j f(x_\mu)\, \partial_j f(x'_\nu)`.

    Args:
        fn: ``fn(params, x_single) -> output`` (scalar or a vector of ``O`` outputs).
        params: name -> tensor.
        x1: inputs ``(P1, ...)``; x2: inputs ``(P2, ...)`` (default ``x1``: the Gram matrix).
        trace_outputs: for vector outputs, sum the kernel over the output index (``(P1, P2)``) instead
            of returning every output pair.

    Returns:
        ``(P1, P2)`` for scalar outputs (or with ``trace_outputs``), else ``(P1, P2, O, O)`` with
        entry ``[μ, ν, a, b] = ∂f_a(x_μ)·∂f_b(x_ν)``.

    Example::

        >>> fn = lambda p, x: (p["w"] * x).sum()        # linear model: K = x x'^T
        >>> x = torch.tensor([[1.0, 0.0], [1.0, 2.0]])
        >>> empirical_ntk(fn, {"w": torch.zeros(2)}, x)
        tensor([[1., 1.],
                [1., 5.]])
    """
    j1 = per_sample_jacobian(fn, params, x1)
    j2 = j1 if x2 is None else per_sample_jacobian(fn, params, x2)
    n1, n2 = x1.shape[0], (x1 if x2 is None else x2).shape[0]
    out_shape = None
    total = None
    for name, p in params.items():
        a, b = j1[name], j2[name]
        o = a.shape[1:a.dim() - p.dim()]                       # output shape of fn
        if out_shape is None:
            out_shape = o
        a = a.reshape(n1, -1, p.numel())                      # (P1, O, p)
        b = b.reshape(n2, -1, p.numel())
        k = torch.einsum("map,nbp->mnab", a, b)                  # (P1, P2, O, O)
        total = k if total is None else total + k
    assert total is not None and out_shape is not None
    if len(out_shape) == 0:
        return total[..., 0, 0]
    if trace_outputs:
        return total.diagonal(dim1=-2, dim2=-1).sum(-1)
    return total


def module_ntk(model: nn.Module, x1: torch.Tensor, x2: torch.Tensor | None = None, *,
               trace_outputs: bool = False) -> torch.Tensor:
    r"""The empirical NTK of an ``nn.Module`` with respect to all of its trainable parameters.

    The module is called on single samples through ``torch.func.functional_call`` (a batch of one, then the
    batch dimension is dropped), so it must treat samples independently (no batch norm in training mode).
    Shapes as in :func:`empirical_ntk`.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be an nn.Module, got {type(model).__name__}")
    params = {k: v.detach() for k, v in model.named_parameters() if v.requires_grad}

    def fn(p: Params, x: torch.Tensor) -> torch.Tensor:
        out = functional_call(model, p, (x.unsqueeze(0),))
        return out.squeeze(0)

    return empirical_ntk(fn, params, x1, x2, trace_outputs=trace_outputs)


def _check_square(K: torch.Tensor, name: str) -> None:
    if not isinstance(K, torch.Tensor) or K.dim() < 2 or K.shape[-1] != K.shape[-2]:
        raise ValueError(f"{name} must be a (..., P, P) tensor of square kernel matrices, got "
                         f"{getattr(K, 'shape', type(K).__name__)}")


def kernel_alignment(K: torch.Tensor, y: torch.Tensor, *, center: bool = True) -> torch.Tensor:
    r"""Kernel--target alignment :math:`A(K, y) = y^\top \bar K y / (\lVert\bar K\rVert_F\,\lVert y\rVert^2)`.

    With ``center=True`` (default), :math:`\bar K = HKH` and :math:`y \leftarrow Hy`, :math:`H = I - \mathbf 1\mathbf 1^\top/P`,
    so a constant offset in the kernel or the target does not count as alignment (centred kernel alignment
    against the ideal kernel :math:`yy^\top`); ``center=False`` uses :math:`K` and :math:`y` as they are.

    Args:
        K: kernel matrices ``(..., P, P)``; y: targets ``(..., P)`` (batch dimensions broadcast).

    Returns:
        ``(...)``, values in ``[-1, 1]`` (in ``[0, 1]`` for positive semidefinite ``K``).

    Example::

        >>> y = torch.tensor([1.0, -1.0, 2.0])
        >>> float(kernel_alignment(torch.outer(y, y), y, center=False))
        1.0
    """
    _check_square(K, "K")
    if not isinstance(y, torch.Tensor) or y.dim() < 1 or y.shape[-1] != K.shape[-1]:
        raise ValueError(f"y must be a (..., P) tensor with P = {K.shape[-1]} matching K, got "
                         f"{getattr(y, 'shape', type(y).__name__)}")
    if center:
        K = K - K.mean(-1, keepdim=True)
        K = K - K.mean(-2, keepdim=True)
        y = y - y.mean(-1, keepdim=True)
    num = torch.einsum("...i,...ij,...j->...", y, K, y)
    den = torch.linalg.matrix_norm(K) * (y * y).sum(-1)
    return num / den


def kernel_distance(K1: torch.Tensor, K2: torch.Tensor) -> torch.Tensor:
    r"""Kernel distance :math:`d(K_1, K_2) = 1 - \langle K_1, K_2\rangle_F / (\lVert K_1\rVert_F\lVert K_2\rVert_F)`.

    Scale-free: :math:`d(cK, K) = 0` for :math:`c > 0`; :math:`d \in [0, 1]` for positive semidefinite kernels.

    Args:
        K1, K2: kernel matrices ``(..., P, Q)`` of the same shape (batch dimensions broadcast).

    Example::

        >>> K = torch.eye(3)
        >>> round(float(kernel_distance(K, 2 * K)), 6), round(float(kernel_distance(K, torch.ones(3, 3))), 4)
        (0.0, 0.4226)
    """
    for name, K in (("K1", K1), ("K2", K2)):
        if not isinstance(K, torch.Tensor) or K.dim() < 2:
            raise ValueError(f"{name} must be a (..., P, Q) tensor, got {getattr(K, 'shape', type(K).__name__)}")
    if K1.shape[-2:] != K2.shape[-2:]:
        raise ValueError(f"K1 and K2 must have the same matrix shape, got {tuple(K1.shape)} and {tuple(K2.shape)}")
    inner = (K1 * K2).sum((-2, -1))
    return 1.0 - inner / (torch.linalg.matrix_norm(K1) * torch.linalg.matrix_norm(K2))
