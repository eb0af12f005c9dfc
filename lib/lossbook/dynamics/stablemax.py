r"""Softmax Collapse, StableMax and ⊥Grad: grokking at the edge of numerical stability
{cite}`prieto2025grokking`.

*Softmax Collapse (SC).* Cross-entropy is computed as
:math:`\ell(z, y) = \log\sum_k e^{z_k - z_{\max}} - (z_y - z_{\max})`. When the correct class
leads every other logit by a wide gap, the terms :math:`e^{z_k - z_{\max}}`, :math:`k \ne y`, are
*absorbed* by the leading 1 in floating point: :math:`1 + \delta = 1` once
:math:`\delta \le u` (the unit round-off, :math:`2^{-24}` in float32). The computed loss is then
exactly 0, and so is the gradient :math:`p_y - 1` of the correct logit. With :math:`K` classes and
equal gaps :math:`g`, collapse is certain beyond

.. math::
    g^\star = \log(K - 1) + \log(1/u) \qquad (\approx \log(K-1) + 16.6 \text{ in float32}).

*StableMax.* Replace :math:`e^x` by the function

.. math::
    s(x) = \begin{cases} x + 1, & x \ge 0,\\ \dfrac{1}{1 - x}, & x < 0, \end{cases}\qquad
    \operatorname{StableMax}(z)_i = \frac{s(z_i)}{\sum_j s(z_j)},

which grows linearly rather than exponentially, so probabilities approach 1 only polynomially
in the gap. The loss is :math:`-\log \operatorname{StableMax}(z)_y`; it is absorbed only once
:math:`\sum_{k\ne y} s(z_k) / s(z_y) \le u`, which in float32 takes logits of order
:math:`10^4` to :math:`10^8` rather than softmax's gap of about 20.

*⊥Grad.* Remove, tensor by tensor, the component of the gradient along the weights (the
direction that only rescales a homogeneous network's logits, "naïve loss minimisation"), and by
default restore the gradient's norm, as the authors' code does:

.. math::
    g_\perp = g - \frac{\langle \theta, g\rangle}{\lVert\theta\rVert^2}\,\theta,\qquad
    \tilde g = \frac{\lVert g\rVert}{\lVert g_\perp\rVert}\, g_\perp .

Public names: :func:`stablemax_s`, :func:`stablemax`, :func:`log_stablemax`,
:func:`stablemax_cross_entropy` / :class:`StableMaxCrossEntropy`, :func:`softmax_collapse`,
:func:`softmax_collapse_fraction`, :func:`absorption_gap`, :func:`orthogonal_gradient`,
:func:`orthogonalize_gradients_`, :class:`OrthoGrad`, :func:`nlm_cosine`,
:func:`modular_arithmetic`, :func:`homogeneous_mlp`.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from lossbook.data import TensorData

from .._checks import reduce as _reduce

__all__ = ["OrthoGrad", "StableMaxCrossEntropy", "absorption_gap", "homogeneous_mlp", "log_stablemax",
           "modular_arithmetic", "nlm_cosine", "orthogonal_gradient", "orthogonalize_gradients_",
           "StackedMLP", "softmax_collapse", "softmax_collapse_fraction", "stablemax", "stablemax_cross_entropy",
           "stablemax_s"]

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_float(x: torch.Tensor, name: str) -> None:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got "
                         f"{x.dtype if isinstance(x, torch.Tensor) else type(x).__name__}")


def _check_dim(x: torch.Tensor, dim: int) -> int:
    if x.dim() == 0:
        raise ValueError("the input must have at least one dimension, got a 0-d tensor")
    if not -x.dim() <= dim < x.dim():
        raise ValueError(f"dim must be in [{-x.dim()}, {x.dim() - 1}], got {dim}")
    return dim


def _check_logits_target(logits: torch.Tensor, target: torch.Tensor) -> None:
    _check_float(logits, "logits")
    if logits.dim() < 2:
        raise ValueError(f"logits must have shape (..., N, K) with K classes, got {tuple(logits.shape)}")
    if target.dtype in _FLOATS or target.dtype == torch.bool:
        raise ValueError(f"target must hold integer class indices, got dtype {target.dtype}")
    if target.shape != logits.shape[:-1]:
        raise ValueError(f"target must have shape {tuple(logits.shape[:-1])} (logits without the class "
                         f"dimension), got {tuple(target.shape)}")
    k = logits.shape[-1]
    # the range check reads values back, so only on the CPU (on CUDA, gather fails on a bad index)
    if target.device.type == "cpu" and target.numel() and (int(target.min()) < 0 or int(target.max()) >= k):
        raise ValueError(f"target must lie in [0, {k - 1}], got values in "
                         f"[{int(target.min())}, {int(target.max())}]")


# ----------------------------------------------------------------------------------------------
# StableMax
# ----------------------------------------------------------------------------------------------

def stablemax_s(x: torch.Tensor) -> torch.Tensor:
    r"""The elementwise map :math:`s(x) = x + 1` for :math:`x \ge 0` and :math:`1/(1 - x)` for
    :math:`x < 0` {cite}`prieto2025grokking`: positive, increasing, :math:`C^1` at 0
    (:math:`s(0) = s'(0) = 1`, like :math:`e^x`), and linear rather than exponential for large
    :math:`x`.

    Args:
        x: any floating-point tensor.

    Returns:
        :math:`s(x)`, same shape and dtype.

    Example::

        >>> stablemax_s(torch.tensor([-1.0, 0.0, 2.0]))
        tensor([0.5000, 1.0000, 3.0000])
    """
    _check_float(x, "x")
    # both branches stay finite for every x (clamping), so autograd never meets 0 * inf
    return torch.where(x >= 0, x.clamp(min=0) + 1, 1 / (1 - x.clamp(max=0)))


def log_stablemax(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    r""":math:`\log \operatorname{StableMax}(x)_i = \log s(x_i) - \log\sum_j s(x_j)`, computed
    from :math:`\log s(x) = \operatorname{log1p}(x)` for :math:`x \ge 0` and
    :math:`-\operatorname{log1p}(-x)` for :math:`x < 0`, accurate at both ends of the range.

    Args:
        x: logits, any shape; ``dim``: the class dimension.

    Returns:
        log-probabilities, same shape and dtype as ``x``.
    """
    _check_float(x, "x")
    _check_dim(x, dim)
    log_s = torch.where(x >= 0, torch.log1p(x.clamp(min=0)), -torch.log1p((-x).clamp(min=0)))
    return log_s - torch.log(stablemax_s(x).sum(dim=dim, keepdim=True))


def stablemax(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    r""":math:`\operatorname{StableMax}(x)_i = s(x_i) / \sum_j s(x_j)` along ``dim``
    {cite}`prieto2025grokking`: a probability vector, increasing in each logit; unlike softmax it
    is *not* shift-invariant.

    Example::

        >>> stablemax(torch.tensor([0.0, 1.0, -1.0]))
        tensor([0.2857, 0.5714, 0.1429])
    """
    _check_float(x, "x")
    _check_dim(x, dim)
    sx = stablemax_s(x)
    return sx / sx.sum(dim=dim, keepdim=True)


def stablemax_cross_entropy(logits: torch.Tensor, target: torch.Tensor, *, reduction: str = "mean",
                            compute_dtype: torch.dtype | None = torch.float64) -> torch.Tensor:
    r"""StableMax cross-entropy :math:`\ell(z, y) = -\log \operatorname{StableMax}(z)_y`
    {cite}`prieto2025grokking`.

    The authors' code evaluates this loss in float64 whatever the model's precision; so does
    this function by default (``compute_dtype=torch.float64``). Pass ``compute_dtype=None`` to
    stay in the logits' dtype. The result is returned in the logits' dtype; the gradient flows
    through the higher-precision computation.

    Args:
        logits: ``(..., N, K)`` scores.
        target: ``(..., N)`` integer classes in ``[0, K)``.
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (over all leading dimensions).
        compute_dtype: floating dtype for the computation, or ``None``.

    Example::

        >>> z = torch.tensor([[2.0, 0.0, -1.0]])
        >>> round(float(stablemax_cross_entropy(z, torch.tensor([0]))), 4)   # -log(3 / 4.5)
        0.4055
    """
    _check_logits_target(logits, target)
    if compute_dtype is not None and compute_dtype not in _FLOATS:
        raise ValueError(f"compute_dtype must be a floating dtype or None, got {compute_dtype!r}")
    z = logits.to(compute_dtype) if compute_dtype is not None else logits
    nll = -log_stablemax(z, dim=-1).gather(-1, target.long().unsqueeze(-1)).squeeze(-1)
    return _reduce(nll, reduction).to(logits.dtype)


class StableMaxCrossEntropy(nn.Module):
    """Module form of :func:`stablemax_cross_entropy`."""

    def __init__(self, *, reduction: str = "mean", compute_dtype: torch.dtype | None = torch.float64):
        super().__init__()
        _reduce(torch.zeros(1), reduction)  # validates
        self.reduction, self.compute_dtype = reduction, compute_dtype

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return stablemax_cross_entropy(logits, target, reduction=self.reduction,
                                       compute_dtype=self.compute_dtype)


# ----------------------------------------------------------------------------------------------
# Softmax Collapse
# ----------------------------------------------------------------------------------------------

def softmax_collapse(logits: torch.Tensor, target: torch.Tensor, *,
                     dtype: torch.dtype | None = torch.float32) -> torch.Tensor:
    r"""Per sample, whether softmax cross-entropy evaluated in ``dtype`` is exactly 0.

    Computed the way PyTorch trains, :math:`\ell = \log\sum_k e^{z_k - z_{\max}} + z_{\max} - z_y`.
    It is 0 exactly when :math:`z_y = z_{\max}` and the other classes' terms are absorbed by
    the 1 of the leading class; then :math:`p_y` rounds to 1 and the correct logit's gradient
    :math:`p_y - 1` is exactly 0 too: the sample has stopped teaching the network. This is the
    paper's Softmax Collapse.

    Args:
        logits: ``(..., N, K)``; target: ``(..., N)`` integer classes.
        dtype: the precision the loss is computed in (``None``: the logits' own).

    Returns:
        a bool tensor of shape ``(..., N)``.
    """
    _check_logits_target(logits, target)
    z = logits.detach().to(dtype) if dtype is not None else logits.detach()
    nll = -torch.log_softmax(z, dim=-1).gather(-1, target.long().unsqueeze(-1)).squeeze(-1)
    return nll == 0


def softmax_collapse_fraction(logits: torch.Tensor, target: torch.Tensor, *,
                              dtype: torch.dtype | None = torch.float32) -> torch.Tensor:
    """Fraction of samples in Softmax Collapse (see :func:`softmax_collapse`), averaged over the
    last (sample) dimension: shape ``(...)``, a 0-d tensor for a single batch."""
    return softmax_collapse(logits, target, dtype=dtype).float().mean(-1)


def absorption_gap(n_classes: int, dtype: torch.dtype = torch.float32) -> float:
    r"""The logit gap :math:`g^\star = \log(K - 1) + \log(1/u)` beyond which Softmax Collapse is
    certain: with the correct class at least :math:`g` above each of the other :math:`K-1`,
    their terms sum to at most :math:`(K-1)e^{-g} \le u` and :math:`1 + \sum` rounds to 1 in
    ``dtype`` (:math:`u = \epsilon_{\text{mach}}/2`, the unit round-off), in whatever order the sum
    is taken. Below :math:`\log(1/u)` = ``absorption_gap(2, dtype)`` collapse is impossible (a
    single term already survives); in between, it depends on the order of the summation.

    Example::

        >>> round(absorption_gap(2), 2), round(absorption_gap(113), 2)     # float32
        (16.64, 21.35)
    """
    if not isinstance(n_classes, int) or n_classes < 2:
        raise ValueError(f"n_classes must be an integer >= 2, got {n_classes!r}")
    if dtype not in _FLOATS:
        raise ValueError(f"dtype must be a floating dtype, got {dtype!r}")
    u = torch.finfo(dtype).eps / 2
    return math.log(n_classes - 1) + math.log(1 / u)


# ----------------------------------------------------------------------------------------------
# ⊥Grad
# ----------------------------------------------------------------------------------------------

def orthogonal_gradient(grad: torch.Tensor, weight: torch.Tensor, *, rescale: bool = True,
                        eps: float = 1e-30, batch_dims: int = 0) -> torch.Tensor:
    r"""The ⊥Grad direction for one parameter tensor {cite}`prieto2025grokking`:

    .. math::
        g_\perp = g - \frac{\langle \theta, g\rangle}{\lVert\theta\rVert^2 + \varepsilon}\,\theta,
        \qquad \tilde g = \frac{\lVert g\rVert}{\lVert g_\perp\rVert + \varepsilon}\, g_\perp
        \ \ (\text{if } \texttt{rescale}).

    Args:
        grad, weight: tensors of the same shape.
        rescale: restore the original gradient norm (the authors' code does; the paper's equation
            is the bare projection). When ``grad`` is (numerically) parallel to ``weight``, the
            rescaled result is amplified round-off of norm :math:`\lVert g\rVert`, as in that code.
        eps: guards the two divisions (a zero weight leaves the gradient unchanged).
        batch_dims: how many leading dimensions index *independent* models (for several seeds
            trained as one stacked tensor); inner products are taken over the remaining dimensions.

    Returns:
        the projected (and rescaled) gradient, same shape and dtype as ``grad``.
    """
    if grad.shape != weight.shape:
        raise ValueError(f"grad and weight must have the same shape, got {tuple(grad.shape)} "
                         f"and {tuple(weight.shape)}")
    if not isinstance(batch_dims, int) or not 0 <= batch_dims <= grad.dim():
        raise ValueError(f"batch_dims must be an integer in [0, {grad.dim()}], got {batch_dims!r}")
    if not eps > 0:
        raise ValueError(f"eps must be positive, got {eps!r}")
    dims = tuple(range(batch_dims, grad.dim()))
    if not dims:                      # every entry is its own model: a scalar's radial part is all of it
        w, g = weight.unsqueeze(-1), grad.unsqueeze(-1)
        dims = (-1,)
    else:
        w, g = weight, grad
    out_dtype = g.dtype
    if g.dtype in (torch.float16, torch.bfloat16):   # the inner products and eps need float32 range
        g = g.float()
    w = w.to(g.dtype)
    coef = (w * g).sum(dims, keepdim=True) / ((w * w).sum(dims, keepdim=True) + eps)
    g_perp = g - coef * w
    if rescale:
        scale = torch.linalg.vector_norm(g, dim=dims, keepdim=True) / (
            torch.linalg.vector_norm(g_perp, dim=dims, keepdim=True) + eps)
        g_perp = g_perp * scale
    return g_perp.reshape(grad.shape).to(out_dtype)


@torch.no_grad()
def orthogonalize_gradients_(params: Iterable[torch.Tensor], *, rescale: bool = True, eps: float = 1e-30,
                             batch_dims: int = 0) -> None:
    """Replace each ``p.grad`` in place by :func:`orthogonal_gradient` ``(p.grad, p)``: the ⊥Grad step
    that any optimizer can be run after. Parameters without a gradient are skipped."""
    for p in params:
        if p.grad is not None:
            p.grad.copy_(orthogonal_gradient(p.grad, p, rescale=rescale, eps=eps, batch_dims=batch_dims))


class OrthoGrad(torch.optim.Optimizer):
    r"""⊥Grad {cite}`prieto2025grokking`: project every gradient orthogonally to its parameter
    tensor (:func:`orthogonal_gradient`), then take a step of a base optimizer.

    ``OrthoGrad(model.parameters(), torch.optim.AdamW, lr=1e-2, weight_decay=0.0)`` is the
    paper's ⊥AdamW. The base optimizer shares this optimizer's ``param_groups`` (so learning-rate
    schedulers see one set of groups) and holds the state; :meth:`state_dict` and
    :meth:`load_state_dict` save and restore both, with the ⊥Grad options (``rescale``,
    ``ortho_eps``, ``batch_dims``) stored per group.

    Args:
        params: parameters or parameter groups.
        base_optimizer: the optimizer class to wrap (default ``torch.optim.SGD``).
        rescale: restore each gradient's norm after the projection (the authors' code does).
        ortho_eps: guard in the projection's divisions.
        batch_dims: leading dimensions that index independent models (see :func:`orthogonal_gradient`).
        **base_kwargs: passed to ``base_optimizer`` (``lr``, ``betas``, ...).
    """

    def __init__(self, params: Iterable[Any], base_optimizer: Callable[..., torch.optim.Optimizer] = torch.optim.SGD,
                 *, rescale: bool = True, ortho_eps: float = 1e-30, batch_dims: int = 0, **base_kwargs: Any):
        if not (isinstance(base_optimizer, type) and issubclass(base_optimizer, torch.optim.Optimizer)):
            raise ValueError(f"base_optimizer must be a torch.optim.Optimizer subclass, got {base_optimizer!r}")
        if not ortho_eps > 0:
            raise ValueError(f"ortho_eps must be positive, got {ortho_eps!r}")
        if not isinstance(batch_dims, int) or batch_dims < 0:
            raise ValueError(f"batch_dims must be a non-negative integer, got {batch_dims!r}")
        super().__init__(params, dict(rescale=bool(rescale), ortho_eps=float(ortho_eps), batch_dims=batch_dims))
        self.base_optimizer = base_optimizer(self.param_groups, **base_kwargs)
        self._sync()

    def _sync(self) -> None:
        self.param_groups = self.base_optimizer.param_groups
        self.state = self.base_optimizer.state
        self.defaults = {**self.base_optimizer.defaults, **self.defaults}

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if hasattr(self, "base_optimizer"):
            for k, v in self.defaults.items():
                param_group.setdefault(k, v)
            self.base_optimizer.add_param_group(param_group)
        else:
            super().add_param_group(param_group)

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            orthogonalize_gradients_(group["params"], rescale=group["rescale"], eps=group["ortho_eps"],
                                     batch_dims=group["batch_dims"])
        self.base_optimizer.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base_optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return self.base_optimizer.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.base_optimizer.load_state_dict(state_dict)
        self._sync()


def nlm_cosine(params: Iterable[torch.Tensor], *, batch_dims: int = 0) -> torch.Tensor:
    r"""Cosine between the descent direction :math:`-\nabla_\theta L` and the weights
    :math:`\theta`, all parameter tensors concatenated (read from ``p.grad``).

    For a network that is positively homogeneous in its parameters (ReLU MLP without biases,
    :math:`f(c\theta) = c^L f(\theta)`), :math:`\theta` is exactly the naïve-loss-minimisation
    direction: moving along it multiplies all logits by a common factor without changing any
    prediction. A value near 1 means the update is mostly logit scaling.

    Args:
        params: parameters with ``.grad`` set; those without are skipped.
        batch_dims: leading dimensions indexing independent models (one cosine per model).
    """
    params = [p for p in params if p.grad is not None]
    if not params:
        raise ValueError("no parameter has a gradient: call backward() first")
    flat = lambda t: t.reshape(*t.shape[:batch_dims], -1)
    w = torch.cat([flat(p.detach()) for p in params], -1)
    g = torch.cat([flat(p.grad) for p in params], -1)
    return F.cosine_similarity(-g, w, dim=-1, eps=1e-30)


# ----------------------------------------------------------------------------------------------
# The task and the model
# ----------------------------------------------------------------------------------------------

def modular_arithmetic(p: int = 113, *, op: str = "add", train_frac: float = 0.4,
                       seed: int | torch.Generator = 0) -> TensorData:
    r"""All pairs :math:`(a, b) \in \{0..p-1\}^2` with label :math:`a \circ b \bmod p` (``op`` one of
    ``"add"``, ``"sub"``, ``"mul"``), inputs the concatenated one-hot codes (dimension :math:`2p`),
    split at random into a training fraction ``train_frac`` and a test set.
    """
    if not isinstance(p, int) or p < 2:
        raise ValueError(f"p must be an integer >= 2, got {p!r}")
    if op not in ("add", "sub", "mul"):
        raise ValueError(f"op must be 'add', 'sub' or 'mul', got {op!r}")
    if not 0 < train_frac < 1:
        raise ValueError(f"train_frac must be in (0, 1), got {train_frac!r}")
    a, b = torch.cartesian_prod(torch.arange(p), torch.arange(p)).T
    y = {"add": a + b, "sub": a - b, "mul": a * b}[op] % p
    x = torch.cat([F.one_hot(a, p), F.one_hot(b, p)], 1).float()
    gen = seed if isinstance(seed, torch.Generator) else torch.Generator().manual_seed(int(seed))
    perm = torch.randperm(p * p, generator=gen)
    n_train = int(train_frac * p * p)
    tr, te = perm[:n_train], perm[n_train:]
    return TensorData(x[tr], y[tr], x[te], y[te], n_classes=p, name=f"modular_{op}_{p}")


def homogeneous_mlp(in_dim: int, hidden: Iterable[int], out_dim: int) -> nn.Sequential:
    """A ReLU MLP without biases (as in the paper's modular-arithmetic runs): positively homogeneous,
    so scaling all weights by ``c`` scales the logits by ``c ** (len(hidden) + 1)``."""
    widths = [in_dim, *hidden, out_dim]
    if any(not isinstance(w, int) or w < 1 for w in widths):
        raise ValueError(f"layer widths must be positive integers, got {widths}")
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(a, b, bias=False))
        if i < len(widths) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class StackedMLP(nn.Module):
    r"""``n_models`` independent bias-free ReLU MLPs held as stacked weight tensors, evaluated in one
    batched matrix product per layer: ``forward(x)`` maps ``(N, in_dim)`` (shared inputs) or
    ``(n_models, N, in_dim)`` to ``(n_models, N, out_dim)``. Each model is initialised like
    ``nn.Linear`` (uniform in :math:`\pm 1/\sqrt{\text{fan-in}}`). Used to train several seeds at
    once: the summed loss gives each model its own gradient, so an elementwise optimizer (SGD, Adam)
    treats them exactly as separate runs, and :class:`OrthoGrad` does too with ``batch_dims=1``.
    """

    def __init__(self, n_models: int, in_dim: int, hidden: Iterable[int], out_dim: int, *,
                 generator: torch.Generator | None = None):
        super().__init__()
        widths = [in_dim, *hidden, out_dim]
        if not isinstance(n_models, int) or n_models < 1 or any(not isinstance(w, int) or w < 1 for w in widths):
            raise ValueError(f"n_models and layer widths must be positive integers, got {n_models!r}, {widths}")
        self.weights = nn.ParameterList(
            nn.Parameter((torch.rand(n_models, a, b, generator=generator) * 2 - 1) / math.sqrt(a))
            for a, b in zip(widths[:-1], widths[1:]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x if x.dim() == 3 else x.unsqueeze(0).expand(self.weights[0].shape[0], -1, -1)
        for i, w in enumerate(self.weights):
            h = torch.bmm(h, w)
            if i < len(self.weights) - 1:
                h = torch.relu(h)
        return h
