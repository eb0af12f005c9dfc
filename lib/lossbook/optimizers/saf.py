r"""Sharpness-Aware Training for Free (SAF) and its memory-efficient variant MESA
{cite}`du2022saf`, with Sharpness-Aware Minimization (SAM) {cite}`foret2021sam` as the baseline.

SAM minimises the loss at the worst nearby point, :math:`L(\theta + \rho\, g / \lVert g \rVert)`
with :math:`g = \nabla L(\theta)`, and pays a second forward and backward pass per step for it.
SAF keeps the base optimizer and its single pass and adds a *trajectory loss* to the objective:
the tempered KL divergence from the outputs the network gave each training sample
:math:`\tilde E` epochs ago to the outputs it gives now,

.. math::
    \mathcal L_{\mathrm{SAF}}(\theta) = \mathcal L_{\mathrm{CE}}(\theta)
    + \lambda\, \frac{\tau^2}{|B|} \sum_{i \in B}
      \mathrm{KL}\Big(\mathrm{softmax}\big(\hat y_i^{(e-\tilde E)}/\tau\big) \,\Big\|\,
      \mathrm{softmax}\big(f_\theta(x_i)/\tau\big)\Big),

switched on for epochs :math:`E_{\mathrm{start}} < e < E_{\mathrm{end}}` (0-based). MESA replaces the
recorded outputs by those of an exponential moving average (EMA) of the weights: no per-sample
memory, one extra forward pass.

Public pieces:

- :func:`trajectory_loss`: the tempered KL term (the :math:`\tau^2` factor included);
- :class:`OutputMemory`: the per-sample ring buffer of past logits, on the device, indexed by sample id;
- :class:`SAFLoss`: cross-entropy plus the trajectory loss, recording the outputs as it goes;
- :class:`EMATeacher` and :class:`MESALoss`: the EMA variant;
- :class:`SAM`: the two-pass baseline, a ``torch.optim.Optimizer`` wrapping a base optimizer.

None of them syncs with the host during a training step; all are device- and dtype-agnostic.
"""
from __future__ import annotations

import copy
import math
import numbers
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["EMATeacher", "MESALoss", "OutputMemory", "SAFLoss", "SAM", "trajectory_loss"]

_REDUCTIONS = ("mean", "sum", "none")
_NEVER = -(2 ** 62)   # the stamp of an entry never written: no epoch - lag can equal it


def _positive(name: str, value, *, allow_zero: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) \
            or (value < 0 if allow_zero else value <= 0):
        kind = "non-negative" if allow_zero else "positive"
        raise ValueError(f"{name} must be a finite {kind} number, got {value!r}")
    return float(value)


def _int(name: str, value, *, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _check_logits(logits: torch.Tensor, name: str = "logits") -> None:
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or not logits.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor of shape (B, C), got "
                         f"{getattr(logits, 'dtype', type(logits).__name__)} {tuple(getattr(logits, 'shape', ()))}")


def trajectory_loss(logits: torch.Tensor, past_logits: torch.Tensor, *, temperature: float = 5.0,
                    weight: torch.Tensor | None = None, reduction: str = "mean") -> torch.Tensor:
    r"""The SAF trajectory loss: tempered KL from the past outputs to the current ones.

    .. math::
        \ell_i = \tau^2\, \mathrm{KL}\big(p_i^{\mathrm{past}} \,\|\, p_i\big)
        = \tau^2 \sum_c p^{\mathrm{past}}_{ic}\big(\log p^{\mathrm{past}}_{ic} - \log p_{ic}\big),
        \qquad p_i = \mathrm{softmax}(z_i/\tau),\; p_i^{\mathrm{past}} = \mathrm{softmax}(z_i^{\mathrm{past}}/\tau).

    The past logits are a fixed target (no gradient flows into them). The gradient with respect to
    the current logits is :math:`\tau\,(p_i - p_i^{\mathrm{past}})`; the :math:`\tau^2` keeps the
    term's scale independent of :math:`\tau`, as in knowledge distillation. Computed with
    ``log_softmax`` (stable for any logits, in float32 at least).

    Args:
        logits: current outputs :math:`z`, shape ``(B, C)``.
        past_logits: reference outputs, shape ``(B, C)`` (recorded epochs ago for SAF, an EMA
            teacher's for MESA).
        temperature: :math:`\tau > 0` (SAF's default 5).
        weight: optional ``(B,)`` weights (e.g. a 0/1 mask of samples with a valid record); with
            ``reduction="mean"`` the result is the weighted mean, :math:`\sum_i w_i \ell_i / \sum_i w_i`
            (0 when all weights are 0).
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (shape ``(B,)``).

    Example::

        >>> z = torch.tensor([[2.0, 0.0, -1.0]])
        >>> trajectory_loss(z, z)
        tensor(0.)
    """
    _check_logits(logits)
    _check_logits(past_logits, "past_logits")
    if past_logits.shape != logits.shape:
        raise ValueError(f"past_logits must have the shape of logits {tuple(logits.shape)}, "
                         f"got {tuple(past_logits.shape)}")
    tau = _positive("temperature", temperature)
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    work = torch.promote_types(logits.dtype, torch.float32)
    log_p = F.log_softmax(logits.to(work) / tau, dim=1)
    log_q = F.log_softmax(past_logits.detach().to(work) / tau, dim=1)
    per_sample = tau * tau * (log_q.exp() * (log_q - log_p)).sum(dim=1)
    if weight is not None:
        if weight.shape != per_sample.shape:
            raise ValueError(f"weight must have shape ({logits.shape[0]},), got {tuple(weight.shape)}")
        w = weight.to(work)
        per_sample = per_sample * w
        if reduction == "mean":
            return (per_sample.sum() / w.sum().clamp_min(1e-12)).to(logits.dtype)
    out = per_sample.mean() if reduction == "mean" else per_sample.sum() if reduction == "sum" else per_sample
    return out.to(logits.dtype)


class OutputMemory(nn.Module):
    r"""Per-sample logits recorded at the last :math:`\tilde E + 1` epochs, kept on the device.

    A ring buffer of shape ``(lag + 1, n_samples, n_classes)``: epoch ``e`` writes slot
    ``e % (lag + 1)`` and reads slot ``(e - lag) % (lag + 1)``, which holds what was recorded
    ``lag`` epochs before. A second buffer stamps each entry with the epoch that wrote it, so
    :meth:`get` can say which reads are valid (a sample not seen at epoch ``e - lag``, e.g. after a
    dropped last batch, gets ``valid = False`` instead of a stale record). Both are buffers: they
    move with ``.to(device)`` and round-trip through ``state_dict``.

    Memory: ``(lag + 1) * n_samples * n_classes`` numbers (SAF's cost; MESA avoids it).

    Args:
        n_samples: size of the training set; sample ids are ``0 .. n_samples - 1``.
        n_classes: number of outputs per sample.
        lag: :math:`\tilde E \ge 1`, how many epochs back the reference is.
        device, dtype: where and how to store the logits (float32 by default).
    """

    def __init__(self, n_samples: int, n_classes: int, lag: int = 3, *,
                 device: str | torch.device | None = None, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.n_samples = _int("n_samples", n_samples, minimum=1)
        self.n_classes = _int("n_classes", n_classes, minimum=1)
        self.lag = _int("lag", lag, minimum=1)
        self.register_buffer("logits", torch.zeros(self.lag + 1, self.n_samples, self.n_classes,
                                                   device=device, dtype=dtype))
        self.register_buffer("stamp", torch.full((self.lag + 1, self.n_samples), _NEVER, device=device,
                                                 dtype=torch.int64))   # no epoch wrote it yet

    def _check(self, index: torch.Tensor, epoch: int) -> None:
        if not isinstance(index, torch.Tensor) or index.dtype != torch.int64 or index.dim() != 1:
            raise ValueError(f"index must be a 1-d int64 tensor of sample ids, got "
                             f"{getattr(index, 'dtype', type(index).__name__)} {tuple(getattr(index, 'shape', ()))}")
        _int("epoch", epoch)

    @torch.no_grad()
    def put(self, index: torch.Tensor, logits: torch.Tensor, epoch: int) -> None:
        """Record ``logits`` (``(B, C)``, detached) for the samples ``index`` (``(B,)``) at ``epoch``."""
        self._check(index, epoch)
        _check_logits(logits)
        if logits.shape != (index.shape[0], self.n_classes):
            raise ValueError(f"logits must have shape ({index.shape[0]}, {self.n_classes}), got {tuple(logits.shape)}")
        slot = epoch % (self.lag + 1)
        self.logits[slot, index] = logits.detach().to(self.logits.dtype)
        self.stamp[slot, index] = epoch

    def get(self, index: torch.Tensor, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(past_logits, valid)`` for ``index`` at ``epoch``: the logits recorded at ``epoch - lag``
        (``(B, C)``) and a boolean ``(B,)`` mask of the entries that really were written then."""
        self._check(index, epoch)
        slot = (epoch - self.lag) % (self.lag + 1)
        return self.logits[slot, index], self.stamp[slot, index] == epoch - self.lag

    def extra_repr(self) -> str:
        return f"n_samples={self.n_samples}, n_classes={self.n_classes}, lag={self.lag}"


class _Scheduled(nn.Module):
    def __init__(self, lam: float, temperature: float, start_epoch: int, end_epoch: int | None,
                 label_smoothing: float):
        super().__init__()
        self.lam = _positive("lam", lam, allow_zero=True)
        self.temperature = _positive("temperature", temperature)
        self.start_epoch = _int("start_epoch", start_epoch)
        self.end_epoch = None if end_epoch is None else _int("end_epoch", end_epoch)
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing!r}")
        self.label_smoothing = float(label_smoothing)

    def active(self, epoch: int) -> bool:
        """Whether the trajectory term is on at ``epoch`` (0-based): ``start_epoch < epoch < end_epoch``."""
        return epoch > self.start_epoch and (self.end_epoch is None or epoch < self.end_epoch)

    def _ce(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        _check_logits(logits)
        if target.shape != logits.shape[:1] or target.dtype != torch.int64:
            raise ValueError(f"target must be int64 class ids of shape ({logits.shape[0]},), got "
                             f"{target.dtype} {tuple(target.shape)}")
        return F.cross_entropy(logits, target, label_smoothing=self.label_smoothing)


class SAFLoss(_Scheduled):
    r"""Cross-entropy plus SAF's trajectory loss, with the per-sample memory of past outputs.

    .. math::
        \mathcal L = \mathrm{CE}(z, y) + \lambda\, \mathbb 1[E_{\mathrm{start}} < e < E_{\mathrm{end}}]\;
        \frac{1}{|B|}\sum_{i\in B} \tau^2\,\mathrm{KL}\big(\mathrm{softmax}(\hat y_i^{(e-\tilde E)}/\tau)
        \,\big\|\, \mathrm{softmax}(z_i/\tau)\big)

    Every call records the current logits of the batch (at every epoch, also before
    ``start_epoch``), so the reference :math:`\tilde E` epochs back exists once the term switches
    on. :math:`\lambda` is constant while the term is on (no ramp), as in the authors' code.

    Args:
        n_samples, n_classes: sizes of the :class:`OutputMemory`.
        lam: :math:`\lambda` (authors: 0.3 on ImageNet with ResNets; their script's default 0.16).
        temperature: :math:`\tau` (5).
        lag: :math:`\tilde E` (2 or 3; the script's default 3).
        start_epoch: :math:`E_{\mathrm{start}}` (5); the term is on for epochs ``> start_epoch``.
        end_epoch: switch the term off from this epoch on (``None``: never).
        label_smoothing: passed to the cross-entropy (the authors use 0.1 on ImageNet).
        device: where the memory lives.

    Call as ``loss_fn(logits, target, index, epoch)`` with ``index`` the int64 sample ids of the
    batch (on the memory's device). The last call's two terms are kept, detached, in ``last_ce``
    and ``last_trajectory`` (tensors: reading them syncs, so read them once per epoch at most).
    """

    def __init__(self, n_samples: int, n_classes: int, *, lam: float = 0.3, temperature: float = 5.0,
                 lag: int = 3, start_epoch: int = 5, end_epoch: int | None = None,
                 label_smoothing: float = 0.0, device: str | torch.device | None = None):
        super().__init__(lam, temperature, start_epoch, end_epoch, label_smoothing)
        self.memory = OutputMemory(n_samples, n_classes, lag, device=device)
        self.last_ce: torch.Tensor | None = None
        self.last_trajectory: torch.Tensor | None = None

    def forward(self, logits: torch.Tensor, target: torch.Tensor, index: torch.Tensor, epoch: int) -> torch.Tensor:
        ce = self._ce(logits, target)
        self.memory.put(index, logits, epoch)
        loss = ce
        traj = torch.zeros((), device=logits.device, dtype=logits.dtype)
        if self.lam > 0 and self.active(epoch) and epoch >= self.memory.lag:
            past, valid = self.memory.get(index, epoch)
            traj = trajectory_loss(logits, past.to(logits.dtype), temperature=self.temperature, weight=valid)
            loss = ce + self.lam * traj
        self.last_ce, self.last_trajectory = ce.detach(), traj.detach()
        return loss

    def extra_repr(self) -> str:
        return (f"lam={self.lam}, temperature={self.temperature}, lag={self.memory.lag}, "
                f"start_epoch={self.start_epoch}, end_epoch={self.end_epoch}")


class EMATeacher(nn.Module):
    r"""An exponential moving average of a model's weights, used as MESA's reference.

    .. math::
        v_t = \beta\, v_{t-1} + (1 - \beta)\, \theta_t

    Floating-point buffers (e.g. batch-norm statistics) are averaged alike; integer buffers are
    copied. The copy stays in eval mode and never requires grad; calling the teacher runs it under
    ``torch.no_grad()``. :meth:`update` uses fused in-place ops (no host sync).

    Args:
        model: the network being trained (deep-copied at construction).
        decay: :math:`\beta \in [0, 1)`. The mean age of the average is :math:`\beta / (1 - \beta)`
            steps; the authors use 0.9998 on ImageNet (about 5000 steps per epoch).
    """

    def __init__(self, model: nn.Module, decay: float = 0.999):
        super().__init__()
        if isinstance(decay, bool) or not isinstance(decay, numbers.Real) or not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {decay!r}")
        self.decay = float(decay)
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """One EMA step towards ``model``'s current weights."""
        mine = [p for p in self.module.parameters()]
        theirs = [p.detach() for p in model.parameters()]
        if len(mine) != len(theirs):
            raise ValueError("model must have the same parameters as the teacher's copy")
        torch._foreach_lerp_(mine, theirs, 1.0 - self.decay)
        for b_mine, b_theirs in zip(self.module.buffers(), model.buffers()):
            if b_mine.is_floating_point():
                b_mine.lerp_(b_theirs, 1.0 - self.decay)
            else:
                b_mine.copy_(b_theirs)

    def train(self, mode: bool = True) -> "EMATeacher":   # the copy always stays in eval mode
        super().train(mode)
        self.module.eval()
        return self

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)

    def extra_repr(self) -> str:
        return f"decay={self.decay}"


class MESALoss(_Scheduled):
    r"""Cross-entropy plus the trajectory loss towards an EMA teacher (MESA).

    .. math::
        \mathcal L = \mathrm{CE}(z, y) + \lambda\, \mathbb 1[E_{\mathrm{start}} < e < E_{\mathrm{end}}]\;
        \frac{1}{|B|}\sum_{i\in B} \tau^2\,\mathrm{KL}\big(\mathrm{softmax}(f_{v}(x_i)/\tau)
        \,\big\|\, \mathrm{softmax}(z_i/\tau)\big)

    with :math:`v` the EMA of the weights (:class:`EMATeacher`). Memory: one copy of the weights
    instead of SAF's per-sample record. Cost: one extra forward pass (no backward) per step while
    the term is on. Call :meth:`update` after every optimizer step.

    Args:
        model: the network being trained (the teacher starts as a copy of it).
        decay: the teacher's EMA decay.
        lam: :math:`\lambda` (authors: 0.8 for MESA on ImageNet).
        temperature, start_epoch, end_epoch, label_smoothing: as for :class:`SAFLoss`.

    Call as ``loss_fn(logits, target, x, epoch)`` with ``x`` the batch's inputs.
    """

    def __init__(self, model: nn.Module, *, decay: float = 0.999, lam: float = 0.8, temperature: float = 5.0,
                 start_epoch: int = 5, end_epoch: int | None = None, label_smoothing: float = 0.0):
        super().__init__(lam, temperature, start_epoch, end_epoch, label_smoothing)
        self.teacher = EMATeacher(model, decay)
        self.last_ce: torch.Tensor | None = None
        self.last_trajectory: torch.Tensor | None = None

    def update(self, model: nn.Module) -> None:
        self.teacher.update(model)

    def forward(self, logits: torch.Tensor, target: torch.Tensor, x: torch.Tensor, epoch: int) -> torch.Tensor:
        ce = self._ce(logits, target)
        _int("epoch", epoch)
        loss = ce
        traj = torch.zeros((), device=logits.device, dtype=logits.dtype)
        if self.lam > 0 and self.active(epoch):
            traj = trajectory_loss(logits, self.teacher(x).to(logits.dtype), temperature=self.temperature)
            loss = ce + self.lam * traj
        self.last_ce, self.last_trajectory = ce.detach(), traj.detach()
        return loss

    def extra_repr(self) -> str:
        return (f"lam={self.lam}, temperature={self.temperature}, start_epoch={self.start_epoch}, "
                f"end_epoch={self.end_epoch}")


class SAM(torch.optim.Optimizer):
    r"""Sharpness-Aware Minimization {cite}`foret2021sam` around any base optimizer.

    Each step takes the gradient at the worst point of a small ball instead of at the weights:

    .. math::
        \hat\epsilon = \rho\, \frac{\nabla L(\theta)}{\lVert \nabla L(\theta) \rVert_2}, \qquad
        \theta \leftarrow \mathrm{BaseStep}\big(\theta,\; \nabla L(\theta + \hat\epsilon)\big),

    the first-order solution of :math:`\max_{\lVert\epsilon\rVert \le \rho} L(\theta + \epsilon)`. The
    norm is taken over all parameters together. Cost: two forward and two backward passes.

    Two ways to use it::

        # 1. a closure that zeroes the gradients, runs forward and backward, returns the loss
        def closure():
            opt.zero_grad()
            loss = loss_fn(model(x), y)
            loss.backward()
            return loss
        loss = opt.step(closure)            # calls the closure twice

        # 2. by hand
        loss_fn(model(x), y).backward(); opt.first_step(zero_grad=True)
        loss_fn(model(x), y).backward(); opt.second_step(zero_grad=True)

    Args:
        params: parameters or parameter groups (a group may set its own ``rho``).
        base_optimizer: the optimizer class (or factory ``param_groups -> Optimizer``) that takes
            the actual step, e.g. ``torch.optim.SGD``.
        rho: radius :math:`\rho \ge 0` of the ball (0.05 in the SAM paper); ``rho=0`` is the base
            optimizer with two passes.
        foreach: move to the perturbed point with multi-tensor (``torch._foreach_*``) kernels, one
            launch per group instead of one per parameter; ``None`` (default) uses them when every
            parameter with a gradient sits on one device. The result equals the per-parameter loop.
        **kwargs: the base optimizer's hyper-parameters (``lr``, ``momentum``, ...).

    ``param_groups`` and ``state`` are shared with the base optimizer, so learning-rate schedulers
    and ``state_dict``/``load_state_dict`` see (and restore) the base optimizer's state too.
    """

    def __init__(self, params, base_optimizer: Callable[..., torch.optim.Optimizer] = torch.optim.SGD, *,
                 rho: float = 0.05, foreach: bool | None = None, **kwargs):
        _positive("rho", rho, allow_zero=True)
        if foreach not in (None, True, False):
            raise ValueError(f"foreach must be None, True or False, got {foreach!r}")
        self.foreach = foreach
        super().__init__(params, dict(rho=float(rho), **kwargs))
        for group in self.param_groups:
            _positive("rho", group["rho"], allow_zero=True)
        self.base_optimizer = base_optimizer(self.param_groups, **kwargs)
        self._link()

    def _link(self) -> None:
        self.param_groups = self.base_optimizer.param_groups = self.param_groups
        self.base_optimizer.state = self.state

    @torch.no_grad()
    def _grad_norm(self) -> torch.Tensor:
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        if not grads:
            raise RuntimeError("SAM.first_step found no gradients: run backward() first")
        device = grads[0].device
        return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g).to(device) for g in grads]))

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> None:
        r"""Move to :math:`\theta + \hat\epsilon` (remembering :math:`\theta`)."""
        norm = self._grad_norm()
        for group in self.param_groups:
            scale = group["rho"] / (norm + 1e-12)
            live = [p for p in group["params"] if p.grad is not None]
            use_foreach = self.foreach if self.foreach is not None else \
                len({(p.device, p.dtype) for p in live}) == 1
            if use_foreach and live:
                for p in group["params"]:
                    if p.grad is None:
                        self.state[p].pop("old_p", None)
                olds = torch._foreach_mul(live, 1.0)                      # copies of theta, one launch
                for p, old in zip(live, olds):
                    self.state[p]["old_p"] = old
                step = torch._foreach_mul([p.grad for p in live], scale.to(live[0].device, live[0].dtype))
                torch._foreach_add_(live, step)
                continue
            for p in group["params"]:
                state = self.state[p]
                if p.grad is None:
                    state.pop("old_p", None)
                    continue
                state["old_p"] = p.detach().clone()
                p.add_(p.grad * scale.to(p.device, p.dtype))
        if zero_grad:
            self.zero_grad(set_to_none=True)

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> None:
        r"""Return to :math:`\theta` and take the base optimizer's step with the gradient computed
        at :math:`\theta + \hat\epsilon`."""
        back, olds = [], []
        for group in self.param_groups:
            for p in group["params"]:
                old = self.state[p].pop("old_p", None)
                if old is not None:
                    back.append(p)
                    olds.append(old)
        if back and self.foreach is not False and len({(p.device, p.dtype) for p in back}) == 1:
            torch._foreach_copy_(back, olds)                       # one launch for all parameters
        else:
            for p, old in zip(back, olds):
                p.copy_(old)
        self.base_optimizer.step()
        if zero_grad:
            self.zero_grad(set_to_none=True)

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor:   # type: ignore[override]
        """A full SAM step: ``closure()`` at :math:`\\theta`, :meth:`first_step`, ``closure()`` at the
        perturbed point, :meth:`second_step`. Returns the loss at :math:`\\theta`."""
        if closure is None:
            raise ValueError("SAM.step needs a closure that zeroes the gradients, recomputes the loss "
                             "and calls backward() (or use first_step/second_step)")
        with torch.enable_grad():
            loss = closure()
        self.first_step()
        with torch.enable_grad():
            closure()
        self.second_step()
        return loss

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self._link()
