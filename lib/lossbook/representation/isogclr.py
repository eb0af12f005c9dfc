r"""Global contrastive losses with per-sample state: SogCLR (one global temperature) and iSogCLR
(an individual, learned temperature per sample) {cite}`qiu2023isogclr`.

For an anchor :math:`x_i` with two views, positive similarity :math:`s_i^+` and negatives
:math:`S_i^-` (the other :math:`2B-2` views of the batch), the robust global contrastive
objective is

.. math::
    F(\theta, \tau) = \frac1n \sum_i \Big[ \tau_i \log \mathbb E_{j \in S_i^-} e^{(s_{ij} - s_i^+)/\tau_i}
                      + \tau_i \rho \Big]
                    = \frac1n \sum_i \Big[ -s_i^+ + \tau_i \log g_i(\theta, \tau_i) + \tau_i\rho \Big],
    \qquad g_i = \mathbb E_{j} e^{s_{ij}/\tau_i},

the dual of a KL-constrained worst case over the negatives (:math:`\tau_i` is the Lagrange
multiplier). ``rho = 0`` with a fixed, shared :math:`\tau` is SogCLR's global contrastive loss.
The inner expectation runs over the whole data set, so each sample keeps a moving average
:math:`u_i \approx g_i` updated from the mini-batch estimate :math:`\hat g_i`:

.. math::
    u_i \leftarrow (1-\gamma) u_i + \gamma \hat g_i, \qquad
    \nabla_\theta \approx -\nabla s_i^+ + \frac{\tau_i}{u_i}\nabla_\theta \hat g_i, \qquad
    \partial_{\tau_i} \approx \log u_i + \rho - \frac{1}{u_i}\,\widehat{\mathbb E}_j\Big[e^{s_{ij}/\tau_i}\frac{s_{ij}}{\tau_i}\Big],

and :math:`\tau_i` takes a momentum step projected onto :math:`[\tau_{\min}, \tau_{\max}]`.
The state (``u``, ``tau``, ``tau_momentum``) lives in registered buffers, so it follows
``.to(device)`` and ``state_dict``; it is read and written by the batch's dataset indices with
``index_copy_`` under ``torch.no_grad``: no host synchronisation, no loop over the batch.
"""
from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F
from torch import nn

from .._checks import reduce as _reduce
from .._checks import check_reduction
from .contrastive_temperature import simclr_masks

__all__ = ["ISogCLRLoss", "SogCLRLoss", "kl_to_uniform", "optimal_tau", "robust_gcl"]

# exp(1/tau) must stay finite in float32 with room for summing a few thousand terms
_TAU_FLOOR = 1.0 / 80.0


def _real(name: str, v: float, lo: float | None = None, hi: float | None = None, *, open_lo: bool = False,
          ) -> float:
    bad = isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v)
    if not bad and lo is not None:
        bad = v <= lo if open_lo else v < lo
    if not bad and hi is not None:
        bad = v > hi
    if bad:
        rng = f"{'(' if open_lo else '['}{lo}, {hi if hi is not None else 'inf'}{']' if hi is not None else ')'}"
        raise ValueError(f"{name} must be a finite real number in {rng}, got {v!r}")
    return float(v)


def _views(z1: torch.Tensor, z2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cosine similarities ``(2B, 2B)`` of ``[z1; z2]`` (at least float32), each row's positive
    similarity ``(2B,)``, and the SimCLR masks."""
    if z1.dim() != 2 or z1.shape != z2.shape or not z1.is_floating_point() or z1.dtype != z2.dtype:
        raise ValueError(f"z1 and z2 must be floating-point (B, d) tensors of the same shape and dtype, got "
                         f"{z1.dtype} {tuple(z1.shape)} and {z2.dtype} {tuple(z2.shape)}")
    if z1.shape[0] < 2:
        raise ValueError(f"the batch must hold at least 2 samples (so each anchor has negatives), got {z1.shape[0]}")
    z = torch.cat([z1, z2])
    if z.dtype in (torch.float16, torch.bfloat16):
        z = z.float()           # exp(s / tau) needs float32 range
    z = F.normalize(z, dim=1)
    sim = z @ z.T
    pos, neg = simclr_masks(z1.shape[0], sim.device)
    pos_sim = sim.masked_fill(~pos, 0.0).sum(1)
    return sim, pos_sim, pos, neg


def robust_gcl(z1: torch.Tensor, z2: torch.Tensor, tau: float | torch.Tensor, rho: float = 0.0, *,
               reduction: str = "mean") -> torch.Tensor:
    r"""The robust contrastive objective of each anchor computed *exactly* on the batch (no moving
    average): for the :math:`2B` views of ``[z1; z2]``,

    .. math::
        F_i = \tau_i \log \frac{1}{2B-2} \sum_{j \in S_i^-} e^{(s_{ij} - s_i^+)/\tau_i} + \tau_i \rho ,

    by a log-sum-exp (stable). Differentiable in the embeddings and in ``tau``. With the whole data
    set as the batch this is the objective that :class:`ISogCLRLoss` (``rho``) and
    :class:`SogCLRLoss` (``rho = 0``, one ``tau``) optimise stochastically.

    Args:
        z1, z2: embeddings ``(B, d)`` of two views (normalised inside).
        tau: a positive float, or a tensor ``(B,)`` of per-sample temperatures (shared by both views).
        rho: the KL radius :math:`\rho \ge 0`.
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (shape ``(2B,)``, view 1 then view 2).
    """
    check_reduction(reduction)
    rho = _real("rho", rho, 0.0)
    sim, pos_sim, _, neg = _views(z1, z2)
    b = z1.shape[0]
    if isinstance(tau, torch.Tensor):
        if tau.shape != (b,) or not tau.is_floating_point():
            raise ValueError(f"a tensor tau must be floating point of shape ({b},), got {tau.dtype} {tuple(tau.shape)}")
        t = tau.to(sim.dtype).repeat(2)
    else:
        t = torch.full((2 * b,), _real("tau", tau, 0.0, open_lo=True), dtype=sim.dtype, device=sim.device)
    h = ((sim - pos_sim[:, None]) / t[:, None]).masked_fill(~neg, float("-inf"))
    f = t * (h.logsumexp(1) - math.log(2 * b - 2) + rho)
    return _reduce(f, reduction)


class SogCLRLoss(nn.Module):
    r"""SogCLR: the global contrastive loss with a fixed temperature, optimised with a per-sample
    moving average of its inner function (no large batch needed) {cite}`qiu2023isogclr`.

    For anchor :math:`i` (each of the two views of sample ``index[i]``), with
    :math:`\hat g_i = \frac{1}{2B-2}\sum_{j\in S_i^-} e^{s_{ij}/\tau}`:

    .. math::
        u_i^{\rm view} = (1-\gamma) u_{\rm index[i]} + \gamma \hat g_i, \qquad
        \mathcal L_i = -s_i^+ + \tau \log u_i^{\rm view} \ \ (\text{value}), \qquad
        \nabla \mathcal L_i = -\nabla s_i^+ + \frac{1}{u_i^{\rm view}}\,\frac{1}{2B-2}\sum_{j} e^{s_{ij}/\tau}\nabla s_{ij},

    the gradient being :math:`-\nabla s_i^+ + \frac{\tau}{u_i}\nabla\hat g_i` (the paper's). The stored
    :math:`u` of a sample becomes the mean of its two views' :math:`u^{\rm view}`; a sample seen for the
    first time (``u == 0``) starts from :math:`\hat g`. State is updated only in training mode.

    Buffers: ``u`` ``(n_data,)``.

    Args:
        n_data: number of samples in the training set (indices run over ``[0, n_data)``).
        gamma: moving-average weight :math:`\gamma \in (0, 1]` of the new estimate.
        tau: the global temperature (``>= 1/80`` so that :math:`e^{1/\tau}` stays finite in float32).
        reduction: ``"mean"`` over the ``2B`` anchors, ``"sum"`` or ``"none"`` (``(2B,)``). LibAUC's
            ``GCLoss_v1`` returns the sum over the two views averaged over the batch, twice our mean.

    Example::

        >>> loss_fn = SogCLRLoss(1000, gamma=0.8, tau=0.1)
        >>> z1, z2 = torch.randn(32, 16, requires_grad=True), torch.randn(32, 16)
        >>> loss_fn(z1, z2, torch.randperm(1000)[:32]).backward()
    """

    def __init__(self, n_data: int, gamma: float = 0.8, tau: float = 0.1, *, reduction: str = "mean") -> None:
        super().__init__()
        if isinstance(n_data, bool) or not isinstance(n_data, numbers.Integral) or n_data < 2:
            raise ValueError(f"n_data must be an integer >= 2, got {n_data!r}")
        self.n_data = int(n_data)
        self.gamma = _real("gamma", gamma, 0.0, 1.0, open_lo=True)
        self.tau = _real("tau", tau, _TAU_FLOOR)
        self.reduction = check_reduction(reduction)
        self.register_buffer("u", torch.zeros(self.n_data))

    def extra_repr(self) -> str:
        return f"n_data={self.n_data}, gamma={self.gamma}, tau={self.tau}"

    # -- shared pieces ------------------------------------------------------------------------------
    def _index(self, index: torch.Tensor, b: int, device: torch.device) -> torch.Tensor:
        if not isinstance(index, torch.Tensor) or index.dtype not in (torch.int64, torch.int32) or index.shape != (b,):
            raise ValueError(f"index must be an int64 tensor of shape ({b},) (the samples' dataset indices), got "
                             f"{getattr(index, 'dtype', type(index))} {tuple(getattr(index, 'shape', ()))}")
        if self.u.device != device:
            raise ValueError(f"the loss's state is on {self.u.device} but the embeddings are on {device}: "
                             f"call loss_fn.to({str(device)!r})")
        if index.device.type == "cpu":  # value checks only where they cost no device sync
            if bool((index < 0).any() | (index >= self.n_data).any()):
                raise ValueError(f"index must lie in [0, {self.n_data}), got values from {int(index.min())} "
                                 f"to {int(index.max())}")
            if index.unique().numel() != b:
                raise ValueError("index must not repeat a sample within a batch (draw batches without replacement)")
        return index.to(device=device, dtype=torch.int64, non_blocking=True)

    def _inner(self, sim: torch.Tensor, neg: torch.Tensor, t: torch.Tensor, index: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Batch estimate ``e`` ``(2B, 2B)`` (exp(s/tau) on the negatives, detached), each view's updated
        ``u`` ``(2B,)``, and the new per-sample value ``(B,)`` for the buffer."""
        b = index.shape[0]
        with torch.no_grad():
            e = torch.exp(sim.detach() / t[:, None]).masked_fill(~neg, 0.0)
            g_hat = e.sum(1) / (2 * b - 2)
            u_old = self.u.index_select(0, index).to(sim.dtype).repeat(2)
            u_view = torch.where(u_old > 0, (1.0 - self.gamma) * u_old + self.gamma * g_hat, g_hat)
            u_new = 0.5 * (u_view[:b] + u_view[b:])
        return e, u_view, u_new

    @staticmethod
    def _surrogate(sim: torch.Tensor, pos_sim: torch.Tensor, e: torch.Tensor, u_view: torch.Tensor,
                   value: torch.Tensor) -> torch.Tensor:
        """Per-anchor losses whose value is ``value`` and whose gradient is
        ``-grad s+ + (1/u) mean_j e_ij grad s_ij``."""
        n_neg = sim.shape[0] - 2
        w = e / u_view[:, None]
        weighted = (w * sim).sum(1) / n_neg
        return value - pos_sim + (weighted - weighted.detach())

    # -- forward ------------------------------------------------------------------------------------
    def _view_temperatures(self, index: torch.Tensor, sim: torch.Tensor) -> torch.Tensor:
        """The temperature of each of the ``2B`` anchors (both views of a sample share it)."""
        return torch.full((sim.shape[0],), self.tau, dtype=sim.dtype, device=sim.device)

    def _value(self, t: torch.Tensor, u_view: torch.Tensor) -> torch.Tensor:
        """The estimate of the per-anchor objective, less ``-s+`` (the loss's value, not its gradient)."""
        return t * u_view.log()

    def _update_temperatures(self, sim: torch.Tensor, e: torch.Tensor, u_view: torch.Tensor, t: torch.Tensor,
                             index: torch.Tensor) -> None:
        """No per-sample temperatures here (see :class:`ISogCLRLoss`)."""

    def forward(self, z1: torch.Tensor, z2: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """Loss of the batch; in training mode updates the per-sample state at ``index``.

        Args:
            z1, z2: embeddings ``(B, d)`` of the two views of samples ``index`` (normalised inside).
            index: int64 ``(B,)`` dataset indices of the samples, distinct, in ``[0, n_data)``.
        """
        sim, pos_sim, _, neg = _views(z1, z2)
        index = self._index(index, z1.shape[0], sim.device)
        t = self._view_temperatures(index, sim)
        e, u_view, u_new = self._inner(sim, neg, t, index)
        loss = self._surrogate(sim, pos_sim, e, u_view, self._value(t, u_view))
        if self.training:
            with torch.no_grad():
                self._update_temperatures(sim, e, u_view, t, index)
                self.u.index_copy_(0, index, u_new.to(self.u.dtype))
        return _reduce(loss, self.reduction)


class ISogCLRLoss(SogCLRLoss):
    r"""iSogCLR: the robust global contrastive loss with an individual temperature per sample,
    learned by a projected momentum step inside ``forward`` {cite}`qiu2023isogclr`.

    On top of :class:`SogCLRLoss` (with :math:`\tau` replaced by the sample's :math:`\tau_i`, shared by
    its two views), each forward pass in training mode computes, per view,

    .. math::
        G_i = \log u_i^{\rm view} + \rho - \frac{1}{u_i^{\rm view}}\frac{1}{2B-2}\sum_{j\in S_i^-}
              e^{s_{ij}/\tau_i}\,\frac{s_{ij}}{\tau_i},

    averages it over the two views, clips it to ``[-grad_clip, grad_clip]`` (the authors' code; ``None``
    to disable), and updates

    .. math::
        m_i \leftarrow (1-\beta) m_i + \beta G_i, \qquad
        \tau_i \leftarrow \Pi_{[\tau_{\min}, \tau_{\max}]}(\tau_i - \eta\, m_i).

    The loss uses the temperatures *before* this step; its value is the estimate
    :math:`-s_i^+ + \tau_i(\log u_i + \rho)` of the per-anchor objective.

    Buffers: ``u`` ``(n_data,)``, ``tau`` ``(n_data,)``, ``tau_momentum`` ``(n_data,)``.

    Args:
        n_data: number of training samples.
        gamma: moving-average weight for ``u``.
        rho: KL radius :math:`\rho \ge 0` of the robust loss.
        tau_init, tau_min, tau_max: initial temperature and the projection box (``tau_min >= 1/80``).
        eta: step size of the temperatures.
        beta: momentum weight of the new :math:`\tau`-gradient (1: plain projected gradient step).
        grad_clip: clip of the :math:`\tau`-gradient, or ``None``.
        reduction: as in :class:`SogCLRLoss`.

    Defaults are the authors' unimodal settings (``rho=0.4, gamma=0.8, tau_init=0.1, beta=0.5,
    eta=0.03``, clip 3, :math:`\tau \in [0.05, 1]`); LibAUC's ``GCLoss_v1`` uses ``rho=0.3, gamma=0.9,
    beta=0.9, eta=0.01, tau_max=0.7`` and no clip.

    Example::

        >>> loss_fn = ISogCLRLoss(1000)
        >>> z1, z2 = torch.randn(32, 16, requires_grad=True), torch.randn(32, 16)
        >>> loss_fn(z1, z2, torch.randperm(1000)[:32]).backward()
        >>> loss_fn.tau.shape
        torch.Size([1000])
    """

    def __init__(self, n_data: int, gamma: float = 0.8, rho: float = 0.4, tau_init: float = 0.1,
                 tau_min: float = 0.05, tau_max: float = 1.0, eta: float = 0.03, beta: float = 0.5, *,
                 grad_clip: float | None = 3.0, reduction: str = "mean") -> None:
        super().__init__(n_data, gamma, tau_init, reduction=reduction)
        self.rho = _real("rho", rho, 0.0)
        self.tau_min = _real("tau_min", tau_min, _TAU_FLOOR)
        self.tau_max = _real("tau_max", tau_max, self.tau_min)
        if not self.tau_min <= float(tau_init) <= self.tau_max:
            raise ValueError(f"tau_init must lie in [tau_min, tau_max] = [{self.tau_min}, {self.tau_max}], got {tau_init!r}")
        self.eta = _real("eta", eta, 0.0)
        self.beta = _real("beta", beta, 0.0, 1.0, open_lo=True)
        self.grad_clip = None if grad_clip is None else _real("grad_clip", grad_clip, 0.0, open_lo=True)
        self.tau_init = self.tau
        del self.tau                                       # the float of SogCLRLoss becomes a per-sample buffer
        self.register_buffer("tau", torch.full((self.n_data,), self.tau_init))
        self.register_buffer("tau_momentum", torch.zeros(self.n_data))

    def extra_repr(self) -> str:
        return (f"n_data={self.n_data}, gamma={self.gamma}, rho={self.rho}, tau=[{self.tau_min}, {self.tau_max}], "
                f"eta={self.eta}, beta={self.beta}, grad_clip={self.grad_clip}")

    def tau_gradient(self, sim: torch.Tensor, e: torch.Tensor, u_view: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        r"""The stochastic :math:`\partial F/\partial\tau_i` per view ``(2B,)`` (before clipping)."""
        n_neg = sim.shape[0] - 2
        return u_view.log() + self.rho - (e * sim.detach()).sum(1) / (n_neg * u_view * t)

    def _view_temperatures(self, index: torch.Tensor, sim: torch.Tensor) -> torch.Tensor:
        return self.tau.index_select(0, index).to(sim.dtype).repeat(2)

    def _value(self, t: torch.Tensor, u_view: torch.Tensor) -> torch.Tensor:
        return t * (u_view.log() + self.rho)

    def _update_temperatures(self, sim: torch.Tensor, e: torch.Tensor, u_view: torch.Tensor, t: torch.Tensor,
                             index: torch.Tensor) -> None:
        """The projected momentum step of each sample's :math:`\tau` (from the temperatures the loss used)."""
        b = index.shape[0]
        g = self.tau_gradient(sim, e, u_view, t)
        g = 0.5 * (g[:b] + g[b:])
        if self.grad_clip is not None:
            g = g.clamp(-self.grad_clip, self.grad_clip)
        m = (1.0 - self.beta) * self.tau_momentum.index_select(0, index).to(sim.dtype) + self.beta * g
        tau_new = (t[:b] - self.eta * m).clamp(self.tau_min, self.tau_max)
        self.tau_momentum.index_copy_(0, index, m.to(self.tau_momentum.dtype))
        self.tau.index_copy_(0, index, tau_new.to(self.tau.dtype))


def kl_to_uniform(z_anchor: torch.Tensor, z_neg: torch.Tensor, tau: torch.Tensor, neg_mask: torch.Tensor | None = None
                  ) -> torch.Tensor:
    r"""For each anchor, :math:`\mathrm{KL}(p_i \,\|\, \mathrm{uniform})` of the softmax
    :math:`p_{ij} \propto e^{s_{ij}/\tau_i}` over its negatives: by
    :math:`\partial F_i / \partial \tau_i = \rho - \mathrm{KL}(p_i\|\mathrm{uniform})`, the optimal
    temperature is where this equals :math:`\rho` (or a bound of the box).

    Args:
        z_anchor: ``(A, d)`` anchors; z_neg: ``(K, d)`` candidates (both normalised inside).
        tau: ``(A,)`` temperatures.
        neg_mask: bool ``(A, K)`` marking each anchor's negatives (default: all).
    Returns:
        ``(A,)`` KL divergences in nats.
    """
    if z_anchor.dim() != 2 or z_neg.dim() != 2 or z_anchor.shape[1] != z_neg.shape[1]:
        raise ValueError(f"z_anchor (A, d) and z_neg (K, d) must share d, got {tuple(z_anchor.shape)} and {tuple(z_neg.shape)}")
    if tau.shape != z_anchor.shape[:1]:
        raise ValueError(f"tau must have shape ({z_anchor.shape[0]},), got {tuple(tau.shape)}")
    s = F.normalize(z_anchor, dim=1) @ F.normalize(z_neg, dim=1).T
    if neg_mask is None:
        neg_mask = torch.ones_like(s, dtype=torch.bool)
    elif neg_mask.shape != s.shape or neg_mask.dtype != torch.bool:
        raise ValueError(f"neg_mask must be a bool tensor of shape {tuple(s.shape)}")
    logit = (s / tau.to(s.dtype)[:, None]).masked_fill(~neg_mask, float("-inf"))
    logp = logit.log_softmax(1)
    k = neg_mask.sum(1).to(s.dtype)
    return (logp.exp() * (logp + k.log()[:, None])).nan_to_num(0.0).sum(1)


def optimal_tau(z_anchor: torch.Tensor, z_neg: torch.Tensor, rho: float, tau_min: float = 0.05, tau_max: float = 1.0,
                neg_mask: torch.Tensor | None = None, *, iters: int = 60) -> torch.Tensor:
    r"""The exact per-anchor minimiser of :math:`\tau \log \mathbb E_j e^{(s_{ij}-s_i^+)/\tau} + \tau\rho` over
    :math:`[\tau_{\min}, \tau_{\max}]` for fixed embeddings: the root of
    :math:`\mathrm{KL}(p_\tau\|\mathrm{uniform}) = \rho` (decreasing in :math:`\tau`), found by bisection in
    :math:`\log\tau`, all anchors at once. Returns ``(A,)``."""
    rho = _real("rho", rho, 0.0)
    lo = torch.full((z_anchor.shape[0],), math.log(tau_min), dtype=z_anchor.dtype, device=z_anchor.device)
    hi = torch.full_like(lo, math.log(tau_max))
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        too_sharp = kl_to_uniform(z_anchor, z_neg, mid.exp(), neg_mask) > rho    # dF/dtau < 0: go up
        lo, hi = torch.where(too_sharp, mid, lo), torch.where(too_sharp, hi, mid)
    return (0.5 * (lo + hi)).exp()
