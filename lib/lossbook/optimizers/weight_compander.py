r"""Weight compander (WC): train every weight through a bounded S-shaped function
{cite}`cakaj2023compander`.

Each weight :math:`w` of a layer is stored as a free parameter :math:`v` and used as

.. math::
    w = \Psi(v) = a \arctan(v / b), \qquad a, b > 0,

so that :math:`|w| < a\pi/2` always (the magnitude is restricted), and the gradient reaching
:math:`v` is the weight's gradient times

.. math::
    \Psi'(v) = \frac{a/b}{1 + v^2/b^2} = \frac{a}{b} \cos^2(w / a),

largest at :math:`w = 0` and vanishing at the bound: weights near zero move more than large ones.
The paper initialises :math:`v = \Psi^{-1}(w) = b \tan(w / a)` so that the network starts from the
usual initialisation, applies weight decay to :math:`w = \Psi(v)` (not to :math:`v`), trains with
SGD, and leaves biases and normalisation layers alone. Its appendix also tries
:math:`a\,\mathrm{erf}(v/b)` and :math:`a\,\mathrm{arsinh}(v/b)`; both are available (``kind``).

Public API: :func:`compander`, :func:`compander_inverse`, :func:`compander_derivative` (functional
core); :class:`Compander` (an ``nn.Module`` for
``torch.nn.utils.parametrize.register_parametrization``); :func:`register_compander` (one tensor
of one layer); :func:`apply_weight_compander` / :func:`remove_weight_compander` (every
Linear/Conv weight of a model); :func:`compander_penalty` and :func:`param_groups` (weight decay on
:math:`w`, as in the paper); :func:`weight_stats`.
"""
from __future__ import annotations

import math
import numbers
from typing import Iterable, Iterator

import torch
from torch import nn
from torch.nn.utils import parametrize

__all__ = ["Compander", "DEFAULT_LAYERS", "KINDS", "apply_weight_compander", "compander",
           "compander_derivative", "compander_inverse", "compander_penalty", "compandered", "param_groups",
           "register_compander", "remove_weight_compander", "weight_stats"]

KINDS = ("arctan", "erf", "arsinh")
DEFAULT_LAYERS: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_EDGE = 1e-6   # compander_inverse keeps w/a this far (relatively) inside the range of a bounded compander
_BOUND = {"arctan": math.pi / 2, "erf": 1.0, "arsinh": math.inf}   # sup |Psi| / a


def _check_kind(kind: str) -> str:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    return kind


def _check_positive(name: str, value: float | torch.Tensor) -> None:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or not value.is_floating_point():
            raise ValueError(f"{name} must be a positive number or a 1-element float tensor, got {value!r}")
        if value.device.type == "cpu":
            x = float(value.detach())
            if not (math.isfinite(x) and x > 0):
                raise ValueError(f"{name} must be finite and > 0, got {x}")
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def _check_args(t: torch.Tensor, what: str, a, b, kind: str) -> None:
    _check_kind(kind)
    if not isinstance(t, torch.Tensor) or not t.is_floating_point():
        raise ValueError(f"{what} must be a floating-point tensor, got {getattr(t, 'dtype', type(t).__name__)}")
    _check_positive("a", a)
    _check_positive("b", b)


def _psi(v: torch.Tensor, a, b, kind: str) -> torch.Tensor:
    """Psi without argument checks (the parametrization's hot path)."""
    u = v / b
    if kind == "arctan":
        return a * torch.atan(u)
    if kind == "erf":
        return a * torch.erf(u)
    return a * torch.asinh(u)


def _psi_inverse(w: torch.Tensor, a, b, kind: str) -> torch.Tensor:
    r = w / a
    if kind == "arctan":
        return b * torch.tan(r.clamp(-(1 - _EDGE) * math.pi / 2, (1 - _EDGE) * math.pi / 2))
    if kind == "erf":
        return b * torch.erfinv(r.clamp(-1 + _EDGE, 1 - _EDGE))
    return b * torch.sinh(r)


def compander(v: torch.Tensor, a: float | torch.Tensor = 1.0, b: float | torch.Tensor = 0.6, *,
              kind: str = "arctan") -> torch.Tensor:
    r"""The weight compander :math:`w = \Psi(v)`, elementwise {cite}`cakaj2023compander`:

    .. math::
        \Psi(v) = a \arctan(v/b) \quad (\text{or } a\,\mathrm{erf}(v/b),\ a\,\mathrm{arsinh}(v/b)).

    Odd and increasing, with slope :math:`a/b` at 0; :math:`|\Psi| < a\pi/2` (``"arctan"``),
    :math:`< a` (``"erf"``), unbounded but logarithmic (``"arsinh"``).

    Args:
        v: free parameters, any shape, floating point.
        a: scale :math:`a > 0` (sets the bound); float or 1-element tensor, which may require grad
            (learnable compander).
        b: width :math:`b > 0` (with :math:`a`, sets the slope :math:`a/b` at 0).
        kind: ``"arctan"`` (the paper's choice, default), ``"erf"`` or ``"arsinh"``.

    Returns:
        :math:`\Psi(v)`, shape and dtype of ``v``; differentiable in ``v``, ``a`` and ``b``.

    Example::

        >>> compander(torch.tensor([-100.0, 0.0, 0.6]), a=1.0, b=0.6)
        tensor([-1.5648,  0.0000,  0.7854])
    """
    _check_args(v, "v", a, b, kind)
    return _psi(v, a, b, kind)


def compander_inverse(w: torch.Tensor, a: float | torch.Tensor = 1.0, b: float | torch.Tensor = 0.6, *,
                      kind: str = "arctan") -> torch.Tensor:
    r"""The inverse :math:`v = \Psi^{-1}(w)`, used to start training from a given weight:

    .. math::
        \Psi^{-1}(w) = b \tan(w/a) \quad (\text{or } b\,\mathrm{erf}^{-1}(w/a),\ b \sinh(w/a)).

    Values outside the range of a bounded compander are clamped just inside it (use
    :meth:`Compander.right_inverse` for the checked version).
    """
    _check_args(w, "w", a, b, kind)
    return _psi_inverse(w, a, b, kind)


def compander_derivative(w: torch.Tensor, a: float | torch.Tensor = 1.0, b: float | torch.Tensor = 0.6, *,
                         kind: str = "arctan") -> torch.Tensor:
    r""":math:`\Psi'(v)` written as a function of the weight :math:`w = \Psi(v)`:

    .. math::
        \Psi'_{\arctan} = \tfrac{a}{b}\cos^2(w/a), \qquad
        \Psi'_{\mathrm{erf}} = \tfrac{2a}{b\sqrt\pi}\, e^{-\mathrm{erf}^{-1}(w/a)^2}, \qquad
        \Psi'_{\mathrm{arsinh}} = \tfrac{a}{b} \big/ \cosh(w/a).

    This is the factor by which the compander multiplies every weight's gradient,
    :math:`\partial L/\partial v = \Psi'(v)\, \partial L/\partial w`: :math:`a/b` at :math:`w = 0`,
    falling to 0 at the bound of a bounded compander.
    """
    _check_args(w, "w", a, b, kind)
    r = w / a
    if kind == "arctan":
        return (a / b) * torch.cos(r).square()
    if kind == "erf":
        return (2 * a / (b * math.sqrt(math.pi))) * torch.exp(-torch.erfinv(r.clamp(-1, 1)).square())
    return (a / b) / torch.cosh(r)


class Compander(nn.Module):
    r"""The compander as a parametrization: ``register_parametrization(layer, "weight", Compander(a, b))``.

    The layer then stores :math:`v` (``layer.parametrizations.weight.original``) and computes
    ``layer.weight`` :math:`= \Psi(v)` on every access. :meth:`right_inverse` maps the layer's
    current weights to :math:`v = \Psi^{-1}(w)`, so registering leaves the layer's function
    unchanged (the paper's initialisation).

    Args:
        a, b: the compander's parameters (:func:`compander`), the paper's grid is
            :math:`a, b \in \{0.5, \dots, 1.0\}`.
        kind: ``"arctan"`` (default), ``"erf"`` or ``"arsinh"``.
        learnable: learn :math:`a` and :math:`b` by gradient descent too (the paper's "fine"
            learnable version when every layer has its own compander; it starts them at
            :math:`a = 0.5, b = 1`). They are then plain parameters ``a`` and ``b`` of this module,
            updated directly as in the paper (no positivity constraint is imposed); keep them out
            of weight decay (:func:`param_groups` does).

    Example::

        >>> layer = nn.Linear(4, 3)
        >>> w0 = layer.weight.detach().clone()
        >>> _ = parametrize.register_parametrization(layer, "weight", Compander(1.0, 0.6))
        >>> torch.allclose(layer.weight, w0, atol=1e-6)
        True
    """

    def __init__(self, a: float = 1.0, b: float = 0.6, *, kind: str = "arctan", learnable: bool = False) -> None:
        super().__init__()
        _check_positive("a", a)
        _check_positive("b", b)
        self.kind = _check_kind(kind)
        self.learnable = bool(learnable)
        if self.learnable:
            self.a = nn.Parameter(torch.tensor(float(a)))
            self.b = nn.Parameter(torch.tensor(float(b)))
        else:
            self.register_buffer("a", torch.tensor(float(a)))
            self.register_buffer("b", torch.tensor(float(b)))

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        return _psi(v, self.a.to(v.dtype), self.b.to(v.dtype), self.kind)

    @torch.no_grad()
    def right_inverse(self, w: torch.Tensor) -> torch.Tensor:
        a, b = self.a.to(w.dtype), self.b.to(w.dtype)
        bound = _BOUND[self.kind] * a
        if w.device.type == "cpu" and w.numel() and bool(w.abs().max() >= bound):
            raise ValueError(f"the compander bounds |weight| by {float(bound):.4g} but the tensor holds "
                             f"{float(w.abs().max()):.4g}: raise a (or rescale the layer) first")
        return _psi_inverse(w, a, b, self.kind)

    def extra_repr(self) -> str:
        return f"a={float(self.a):.4g}, b={float(self.b):.4g}, kind={self.kind!r}, learnable={self.learnable}"


def register_compander(module: nn.Module, name: str = "weight", *, a: float = 1.0, b: float = 0.6,
                       kind: str = "arctan", learnable: bool = False) -> nn.Module:
    r"""Reparameterize ``module.<name>`` as :math:`\Psi(v)`, in place; returns ``module``.

    Any layer and any floating-point tensor attribute works (the ``weight`` of a Linear, Conv,
    Embedding, ...). The current values are kept (:meth:`Compander.right_inverse`).
    """
    if not isinstance(module, nn.Module):
        raise ValueError(f"module must be an nn.Module, got {type(module).__name__}")
    tensor = getattr(module, name, None)
    if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
        raise ValueError(f"module has no floating-point tensor {name!r} to reparameterize")
    if parametrize.is_parametrized(module, name) and any(
            isinstance(p, Compander) for p in module.parametrizations[name]):
        raise ValueError(f"{name!r} of {type(module).__name__} already has a compander")
    parametrize.register_parametrization(module, name, Compander(a, b, kind=kind, learnable=learnable))
    return module


def apply_weight_compander(model: nn.Module, layer_types: Iterable[type[nn.Module]] = DEFAULT_LAYERS, *,
                           a: float = 1.0, b: float = 0.6, kind: str = "arctan", learnable: bool = False,
                           name: str = "weight") -> list[str]:
    r"""Put a :class:`Compander` on the ``weight`` of every layer of ``model`` that is an instance of
    ``layer_types`` (Linear and Conv1d/2d/3d by default); biases and normalisation layers are left
    alone, as in the paper. Each layer gets its own module, so ``learnable=True`` is the paper's
    "fine" version (one :math:`a, b` pair per layer). Returns the qualified names of the layers.

    Example::

        >>> net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
        >>> apply_weight_compander(net, a=1.0, b=0.6)
        ['0', '2']
    """
    layer_types = tuple(layer_types)
    if not layer_types or not all(isinstance(t, type) and issubclass(t, nn.Module) for t in layer_types):
        raise ValueError(f"layer_types must be nn.Module subclasses, got {layer_types!r}")
    targets = [(n, m) for n, m in model.named_modules() if isinstance(m, layer_types)
               and isinstance(getattr(m, name, None), torch.Tensor)]
    for _, m in targets:
        register_compander(m, name, a=a, b=b, kind=kind, learnable=learnable)
    return [n for n, _ in targets]


def compandered(model: nn.Module, name: str = "weight") -> Iterator[tuple[nn.Module, Compander]]:
    """The ``(layer, compander)`` pairs of ``model`` whose ``name`` tensor carries a :class:`Compander`."""
    for m in model.modules():
        if parametrize.is_parametrized(m, name):
            for p in m.parametrizations[name]:
                if isinstance(p, Compander):
                    yield m, p


def remove_weight_compander(model: nn.Module, name: str = "weight") -> list[str]:
    r"""Undo :func:`apply_weight_compander` after training: each layer gets back a plain parameter
    holding its effective weight :math:`\Psi(v)`, so inference costs nothing extra. Returns the
    qualified names of the layers changed."""
    done = []
    for n, m in model.named_modules():
        if parametrize.is_parametrized(m, name) and any(isinstance(p, Compander) for p in m.parametrizations[name]):
            parametrize.remove_parametrizations(m, name, leave_parametrized=True)
            done.append(n)
    return done


def compander_penalty(model: nn.Module, name: str = "weight") -> torch.Tensor:
    r""":math:`\tfrac12 \sum \|\Psi(v)\|^2` over the compandered tensors of ``model``: weight decay on
    the effective weights, as the paper applies it. Add ``weight_decay * compander_penalty(model)``
    to the loss (its gradient in :math:`v` is :math:`\lambda\,\Psi(v)\,\Psi'(v)`) and give the
    :math:`v` no optimizer weight decay (:func:`param_groups`)."""
    total = None
    for m, _ in compandered(model, name):
        term = getattr(m, name).square().sum()
        total = term if total is None else total + term
    if total is None:
        raise ValueError("model has no compandered tensor: call apply_weight_compander first")
    return 0.5 * total


def param_groups(model: nn.Module, weight_decay: float, *, decay_on: str = "w",
                 name: str = "weight") -> list[dict]:
    r"""Optimizer parameter groups for a compandered model.

    * the free parameters :math:`v`: optimizer weight decay ``weight_decay`` when ``decay_on="v"``,
      0 when ``decay_on="w"`` (the paper's choice for fixed :math:`a, b`: decay the effective weights
      through :func:`compander_penalty` instead);
    * learnable :math:`a, b`: never decayed;
    * everything else (biases, normalisation layers): ``weight_decay``.

    The paper decays :math:`\Psi(v)` when :math:`a, b` are fixed and :math:`v` when they are learned.
    Empty groups are dropped.
    """
    if decay_on not in ("w", "v"):
        raise ValueError(f"decay_on must be 'w' or 'v', got {decay_on!r}")
    if not (isinstance(weight_decay, numbers.Real) and weight_decay >= 0):
        raise ValueError(f"weight_decay must be a number >= 0, got {weight_decay!r}")
    originals, hyper = [], []
    for m, comp in compandered(model, name):
        originals.append(m.parametrizations[name].original)
        hyper += [p for p in comp.parameters()]
    special = {id(p) for p in originals + hyper}
    rest = [p for p in model.parameters() if id(p) not in special]
    groups = [{"params": originals, "weight_decay": weight_decay if decay_on == "v" else 0.0},
              {"params": hyper, "weight_decay": 0.0},
              {"params": rest, "weight_decay": weight_decay}]
    return [g for g in groups if g["params"]]


@torch.no_grad()
def weight_stats(weights: nn.Module | Iterable[torch.Tensor], *, rel_tol: float = 0.01) -> dict[str, float]:
    r"""Summary of a set of (effective) weights.

    ``weights``: a model (the ``weight`` of its Linear/Conv layers, :math:`\Psi(v)` where compandered)
    or an iterable of tensors. Returns ``max_abs``, ``mean_abs``, ``frac_near_zero`` (the fraction with
    :math:`|w| < \text{rel\_tol} \cdot \max|w|` of its own tensor) and the excess ``kurtosis``
    :math:`\mathbb E[w^4]/\mathbb E[w^2]^2 - 3` of the pooled weights (0 for a Gaussian, -1.2 for a
    uniform, -2 for two spikes at :math:`\pm c`, large for a spike at 0 with heavy tails).
    """
    if isinstance(weights, nn.Module):
        tensors = [m.weight for m in weights.modules() if isinstance(m, DEFAULT_LAYERS)]
    else:
        tensors = list(weights)
    if not tensors:
        raise ValueError("weights must contain at least one tensor")
    near = sum(float((t.abs() < rel_tol * t.abs().max()).sum()) for t in tensors)
    flat = torch.cat([t.detach().reshape(-1).double() for t in tensors])
    m2, m4 = flat.square().mean(), flat.pow(4).mean()
    return {"max_abs": float(flat.abs().max()), "mean_abs": float(flat.abs().mean()),
            "frac_near_zero": near / flat.numel(), "kurtosis": float(m4 / m2.square() - 3.0)}
