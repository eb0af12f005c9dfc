r"""Curvature and cost, measured the same way in every chapter: Hessian-vector products by double
backpropagation, the top Hessian eigenvalue by power iteration, and a counter of the forward and
backward passes a training step makes.

The Hessian of a scalar loss :math:`L(\theta)` is never formed. Its product with a vector
:math:`v` is the gradient of a scalar,

.. math::
    H v = \nabla_\theta^2 L(\theta)\, v = \nabla_\theta \big( \nabla_\theta L(\theta)^\top v \big),

so it costs one more backward pass through the graph of the gradient (Pearlmutter's trick).
Power iteration :math:`v \leftarrow H v / \lVert H v \rVert` then converges to the eigenvector of
the eigenvalue of largest magnitude, which near a minimum (where :math:`H` is close to positive
semi-definite) is the top eigenvalue :math:`\lambda_{\max}`: the usual number for "sharpness".

Typical use::

    from lossbook import curvature
    lam = curvature.loss_top_eigenvalue(lambda: F.cross_entropy(model(x), y), model, iters=20)

    with curvature.PassCounter(model) as count:
        train_one_step()
    count.forward, count.backward            # passes through ``model`` since the ``with``

Everything here works on any device and dtype; :func:`hvp` and :class:`PassCounter` never sync
with the host. Power iteration syncs once per iteration only when a tolerance is asked for.
"""
from __future__ import annotations

import math
from typing import Callable, Iterable, Sequence

import torch
from torch import nn

__all__ = ["PassCounter", "hvp", "loss_top_eigenvalue", "top_hessian_eigenvalue"]

Params = Sequence[torch.Tensor]


def _as_params(params: Iterable[torch.Tensor] | nn.Module) -> list[torch.Tensor]:
    if isinstance(params, nn.Module):
        params = params.parameters()
    out = [p for p in params if p.requires_grad]
    if not out:
        raise ValueError("params must contain at least one tensor with requires_grad=True")
    return out


def _check_vec(params: Params, vec: Params, name: str = "vec") -> None:
    if len(vec) != len(params):
        raise ValueError(f"{name} must have one tensor per parameter ({len(params)}), got {len(vec)}")
    for p, v in zip(params, vec):
        if v.shape != p.shape:
            raise ValueError(f"{name} must match the parameter shapes: got {tuple(v.shape)} for a "
                             f"parameter of shape {tuple(p.shape)}")


def _gradient_graph(loss: torch.Tensor, params: Params) -> tuple[torch.Tensor, ...]:
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise ValueError(f"loss must be a scalar tensor, got {type(loss).__name__} "
                         f"{tuple(getattr(loss, 'shape', ()))}")
    if not loss.requires_grad:
        raise ValueError("loss must depend on params (it does not require grad)")
    grads = torch.autograd.grad(loss.reshape(()), params, create_graph=True, allow_unused=True)
    # a parameter the loss does not use has a zero gradient and a zero Hessian block
    return tuple(g if g is not None else torch.zeros_like(p) for g, p in zip(grads, params))


def _hvp_from_grads(grads: Params, params: Params, vec: Params) -> list[torch.Tensor]:
    if not any(g.requires_grad for g in grads):   # the loss is linear in params: H = 0
        return [torch.zeros_like(p) for p in params]
    hv = torch.autograd.grad(grads, params, grad_outputs=list(vec), retain_graph=True, allow_unused=True)
    return [h if h is not None else torch.zeros_like(p) for h, p in zip(hv, params)]


def hvp(loss: torch.Tensor, params: Iterable[torch.Tensor] | nn.Module, vec: Params) -> list[torch.Tensor]:
    r"""Hessian-vector product :math:`H v = \nabla_\theta(\nabla_\theta L^\top v)` by double backprop.

    Args:
        loss: scalar tensor :math:`L(\theta)`, built from ``params`` with autograd on.
        params: the tensors :math:`\theta` (or a module: its parameters that require grad).
        vec: one tensor per parameter, same shapes: the vector :math:`v`.

    Returns:
        A list of tensors shaped like ``params``: the blocks of :math:`H v`.

    The graph of ``loss`` is kept (``retain_graph``), so several products can be taken from one
    forward pass; :func:`top_hessian_eigenvalue` goes further and reuses the gradient's graph.

    Example::

        >>> w = torch.tensor([1.0, 2.0], requires_grad=True)
        >>> hvp((w ** 3).sum(), [w], [torch.tensor([1.0, 1.0])])   # H = diag(6 w)
        [tensor([ 6., 12.])]
    """
    params = _as_params(params)
    vec = list(vec)
    _check_vec(params, vec)
    return _hvp_from_grads(_gradient_graph(loss, params), params, vec)


def _dot(a: Params, b: Params) -> torch.Tensor:
    return sum((x * y).sum() for x, y in zip(a, b))


def _norm(a: Params) -> torch.Tensor:
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(x) for x in a]))


def top_hessian_eigenvalue(loss: torch.Tensor, params: Iterable[torch.Tensor] | nn.Module, *, iters: int = 20,
                           tol: float | None = None, generator: torch.Generator | None = None,
                           init: Params | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
    r"""Largest-magnitude eigenvalue of the Hessian of ``loss``, by power iteration on :func:`hvp`.

    .. math::
        v_{k+1} = \frac{H v_k}{\lVert H v_k \rVert}, \qquad \lambda_k = v_k^\top H v_k
        \;\to\; \lambda_{\max}(H) \text{ (in magnitude)}.

    The gradient is computed once, with its graph; each iteration is then one backward pass
    through that graph. Near a minimum the Hessian is (nearly) positive semi-definite and the
    result is the top eigenvalue, the usual measure of sharpness.

    Args:
        loss: scalar tensor built from ``params``.
        params: tensors or a module.
        iters: maximum number of Hessian-vector products (>= 1).
        tol: stop early when the relative change of the estimate is below ``tol`` (this syncs
            with the host once per iteration); ``None`` runs all ``iters`` without a sync.
        generator: for the random start (a standard normal vector).
        init: a start vector instead of the random one.

    Returns:
        ``(eigenvalue, eigenvector)``: a 0-d tensor (no sync) and a list shaped like ``params``
        with unit norm.
    """
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 1:
        raise ValueError(f"iters must be a positive integer, got {iters!r}")
    if tol is not None and not (isinstance(tol, (int, float)) and tol > 0 and math.isfinite(tol)):
        raise ValueError(f"tol must be None or a positive number, got {tol!r}")
    params = _as_params(params)
    grads = _gradient_graph(loss, params)
    if init is None:
        v = [torch.randn(p.shape, generator=generator, dtype=p.dtype, device="cpu" if generator is None
                         else generator.device).to(p.device) for p in params]
    else:
        v = [t.detach().to(p.device, p.dtype) for t, p in zip(init, params)]
        _check_vec(params, v, "init")
    n = _norm(v)
    v = [x / n for x in v]
    eig = torch.zeros((), dtype=params[0].dtype, device=params[0].device)
    for _ in range(iters):
        hv = [h.detach() for h in _hvp_from_grads(grads, params, v)]
        new = _dot(v, hv)                                   # Rayleigh quotient v^T H v
        n = _norm(hv)
        v = [h / n.clamp_min(torch.finfo(h.dtype).tiny) for h in hv]
        if tol is not None and float((new - eig).abs()) <= tol * float(new.abs()):
            eig = new
            break
        eig = new
    return eig.detach(), v


def loss_top_eigenvalue(loss_fn: Callable[[], torch.Tensor], params: Iterable[torch.Tensor] | nn.Module, *,
                        iters: int = 20, tol: float | None = None,
                        generator: torch.Generator | None = None) -> torch.Tensor:
    """:func:`top_hessian_eigenvalue` of ``loss_fn()`` (a closure that runs the forward pass), as a
    0-d tensor. A module passed as ``params`` is put in eval mode for the measurement (no dropout,
    batch-norm running statistics) and restored afterwards.

    Example::

        lam = loss_top_eigenvalue(lambda: F.cross_entropy(model(x), y), model)
    """
    module = params if isinstance(params, nn.Module) else None
    was_training = module.training if module is not None else False
    if module is not None:
        module.eval()
    try:
        with torch.enable_grad():
            eig, _ = top_hessian_eigenvalue(loss_fn(), params, iters=iters, tol=tol, generator=generator)
    finally:
        if module is not None:
            module.train(was_training)
    return eig


class PassCounter:
    """Count the forward and backward passes through one or more modules.

    A *forward* is a call of a counted module; a *backward* is a backward pass that reaches the
    output of such a call (counted once per ``backward()``/``autograd.grad`` however many loss
    terms use the output). ``forward_samples`` and ``backward_samples`` add up the batch sizes
    (the first dimension of the first input), the unit in which training cost is usually quoted.
    Counting is plain Python arithmetic on shapes: no host sync, any device.

    Use it as a context manager (hooks are removed on exit) or call :meth:`attach` /
    :meth:`detach`; :meth:`reset` zeroes the counts.

    Example::

        >>> model = torch.nn.Linear(3, 2)
        >>> with PassCounter(model) as c:
        ...     model(torch.randn(5, 3)).sum().backward()
        >>> (c.forward, c.backward, c.forward_samples)
        (1, 1, 5)
    """

    def __init__(self, *modules: nn.Module):
        if not modules or not all(isinstance(m, nn.Module) for m in modules):
            raise ValueError("PassCounter needs at least one nn.Module")
        self.modules = modules
        self._handles: list = []
        self.reset()

    def reset(self) -> None:
        self.forward = self.backward = 0
        self.forward_samples = self.backward_samples = 0

    def _on_forward(self, module: nn.Module, args: tuple, output) -> None:
        n = int(args[0].shape[0]) if args and isinstance(args[0], torch.Tensor) and args[0].dim() > 0 else 1
        self.forward += 1
        self.forward_samples += n
        out = output if isinstance(output, torch.Tensor) else next(
            (o for o in (output if isinstance(output, (tuple, list)) else ()) if isinstance(o, torch.Tensor)), None)
        if out is not None and out.requires_grad:
            def on_backward(grad: torch.Tensor, n: int = n) -> None:
                self.backward += 1
                self.backward_samples += n
            out.register_hook(on_backward)

    def attach(self) -> "PassCounter":
        if not self._handles:
            self._handles = [m.register_forward_hook(self._on_forward) for m in self.modules]
        return self

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def __enter__(self) -> "PassCounter":
        return self.attach()

    def __exit__(self, *exc) -> None:
        self.detach()

    def __repr__(self) -> str:
        return (f"PassCounter(forward={self.forward}, backward={self.backward}, "
                f"forward_samples={self.forward_samples}, backward_samples={self.backward_samples})")
