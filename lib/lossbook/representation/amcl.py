r"""Adaptive Multi-head Contrastive Learning (AMCL) for SimCLR {cite}`wang2024amcl`.

:math:`C` projection heads share one encoder; head :math:`c` gives unit-norm embeddings
:math:`z^{(c)}`. A shared small MLP :math:`\varphi` turns every pair of embeddings into its own
temperature, bounded in :math:`(\tau_{\min}, \tau_{\max})`:

.. math::
    \tau_{ij} = \tau_{\min} + (\tau_{\max} - \tau_{\min})\,
                \mathrm{sigmoid}\big(-\varphi(z_i)^\top \varphi(z_j)\big).

For anchor :math:`i` with positive :math:`i^+` and its :math:`k` most similar negatives
:math:`\mathcal K_i`, with :math:`s_{ij} = z_i^\top z_j` and
:math:`\Omega(\tau) = \tfrac{d}{2}\log\tau + \tfrac1\tau`,

.. math::
    \ell^{(c)}_i = -\frac{s_{ii^+}}{\tau_{ii^+}} + \frac1k \sum_{j \in \mathcal K_i} \frac{s_{ij}}{\tau_{ij}}
                   + \beta\,\Omega(\tau_{ii^+}) - \beta \sum_{j \in \mathcal K_i}\Big(\log\tau_{ij} + \frac1{\tau_{ij}}\Big),

averaged over the :math:`2N` anchors (both views) and summed over the heads. This is the form of the
official implementation (``LeiWangR/cl``, ``amcl/losses.py``); everything here is computed with masks
over the :math:`C \times 2N \times 2N` similarity and temperature matrices (no pair lists).

Pieces: :class:`MultiHeadProjector` (the :math:`C` heads in batched matrix products),
:class:`PairTemperature` (:math:`\varphi` and the bound), :func:`amcl_loss` (the objective),
:func:`amcl_temperatures` (the temperatures the loss uses, for inspection), :class:`AMCLLoss`
(the loss with its temperature network, as a module).
"""
from __future__ import annotations

import math
import numbers
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .._checks import check_reduction
from .contrastive_temperature import simclr_masks

__all__ = ["AMCLLoss", "AMCLNet", "AMCLTemperatures", "MultiHeadProjector", "PairTemperature", "amcl_loss",
           "amcl_temperatures", "omega"]


def _posint(name: str, v: int) -> int:
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
        raise ValueError(f"{name} must be a positive integer, got {v!r}")
    return int(v)


class MultiHeadProjector(nn.Module):
    r""":math:`C` independent SimCLR projection heads (linear, ReLU, linear) evaluated at once.

    The weights of all heads are stacked, ``(C, in_dim, hidden)`` and ``(C, hidden, out_dim)``, and applied
    with two ``einsum`` calls: no Python loop over the heads. Each head is initialised like ``nn.Linear``.

    Args:
        in_dim: size of the representation :math:`h`.
        hidden: hidden units of each head.
        out_dim: size :math:`d` of each head's embedding.
        heads: number of heads :math:`C`.

    Shapes: ``forward(h)``: ``(N, in_dim) -> (N, C, out_dim)`` (not normalised; the loss normalises).

    Example::

        >>> MultiHeadProjector(64, 32, 16, heads=3)(torch.randn(5, 64)).shape
        torch.Size([5, 3, 16])
    """

    def __init__(self, in_dim: int, hidden: int, out_dim: int, heads: int = 3) -> None:
        super().__init__()
        in_dim, hidden, out_dim = _posint("in_dim", in_dim), _posint("hidden", hidden), _posint("out_dim", out_dim)
        self.heads = _posint("heads", heads)
        b1, b2 = 1.0 / math.sqrt(in_dim), 1.0 / math.sqrt(hidden)
        self.w1 = nn.Parameter(torch.empty(heads, in_dim, hidden).uniform_(-b1, b1))
        self.b1 = nn.Parameter(torch.empty(heads, hidden).uniform_(-b1, b1))
        self.w2 = nn.Parameter(torch.empty(heads, hidden, out_dim).uniform_(-b2, b2))
        self.b2 = nn.Parameter(torch.empty(heads, out_dim).uniform_(-b2, b2))
        self.in_dim, self.out_dim = in_dim, out_dim

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if h.dim() != 2 or h.shape[1] != self.in_dim:
            raise ValueError(f"h must have shape (N, {self.in_dim}), got {tuple(h.shape)}")
        a = torch.relu(torch.einsum("ni,cih->nch", h, self.w1) + self.b1)
        return torch.einsum("nch,cho->nco", a, self.w2) + self.b2


class PairTemperature(nn.Module):
    r"""The pair-adaptive temperature :math:`\tau_{ij} = \tau_{\min} + (\tau_{\max} - \tau_{\min})\,
    \mathrm{sigmoid}(-\varphi(z_i)^\top\varphi(z_j))`, with :math:`\varphi` a two-layer MLP
    ``dim -> hidden -> dim`` shared by all heads (the paper's :math:`\sigma(r) = \iota/(1 + e^{r}) + \eta`
    with :math:`\iota = \tau_{\max} - \tau_{\min}`, :math:`\eta = \tau_{\min}`).

    Shapes: ``forward(a, b)``: ``(..., N, dim)`` and ``(..., M, dim)`` -> ``(..., N, M)``, all pairs of rows.
    Half-precision inputs are computed in float32 (:math:`1/\tau` reaches :math:`1/\tau_{\min}`).

    Example::

        >>> t = PairTemperature(8)(torch.randn(4, 8), torch.randn(6, 8))
        >>> t.shape, bool(((t > 1e-5) & (t < 2.0)).all())
        (torch.Size([4, 6]), True)
    """

    def __init__(self, dim: int, hidden: int | None = None, *, tau_min: float = 1e-5, tau_max: float = 2.0) -> None:
        super().__init__()
        dim = _posint("dim", dim)
        hidden = dim if hidden is None else _posint("hidden", hidden)
        if not (isinstance(tau_min, numbers.Real) and isinstance(tau_max, numbers.Real) and 0 < tau_min < tau_max
                and math.isfinite(tau_max)):
            raise ValueError(f"need 0 < tau_min < tau_max < inf, got tau_min={tau_min!r}, tau_max={tau_max!r}")
        self.tau_min, self.tau_max, self.dim = float(tau_min), float(tau_max), dim
        self.phi = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, dim))

    def score(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        r"""The pair scores :math:`r_{ij} = \varphi(a_i)^\top \varphi(b_j)`, ``(..., N, M)``."""
        for name, t in (("a", a), ("b", b)):
            if t.dim() < 2 or t.shape[-1] != self.dim or not t.is_floating_point():
                raise ValueError(f"{name} must be a floating-point (..., n, {self.dim}) tensor, got {tuple(t.shape)}")
        dt = torch.promote_types(a.dtype, torch.float32)
        pa = self.phi(a.to(dt)) if a.dtype != dt else self.phi(a)
        pb = pa if b is a else (self.phi(b.to(dt)) if b.dtype != dt else self.phi(b))
        return pa @ pb.transpose(-1, -2)

    def forward(self, a: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
        return self.tau_min + (self.tau_max - self.tau_min) * torch.sigmoid(-self.score(a, a if b is None else b))


def omega(tau: torch.Tensor, dim: int) -> torch.Tensor:
    r"""The regulariser :math:`\Omega(\tau) = \frac{d}{2}\log\tau + \frac1\tau` (element-wise)."""
    return 0.5 * dim * torch.log(tau) + torch.reciprocal(tau)


def _heads(z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
    """``[z1; z2]`` normalised, as ``(C, 2N, d)``."""
    if z1.shape != z2.shape or z1.dim() not in (2, 3) or not z1.is_floating_point():
        raise ValueError(f"z1 and z2 must be floating-point tensors of the same shape (N, d) or (N, C, d), "
                         f"got {tuple(z1.shape)} and {tuple(z2.shape)}")
    if z1.shape[0] < 2:
        raise ValueError(f"need at least 2 images per batch, got {z1.shape[0]}")
    z = torch.cat([z1, z2], dim=0)
    if z.dim() == 2:
        z = z[:, None]
    return F.normalize(z, dim=-1).transpose(0, 1)


class _Parts(NamedTuple):
    sim: torch.Tensor
    tau: torch.Tensor
    pos: torch.Tensor
    top: torch.Tensor
    k: int


def _parts(z1: torch.Tensor, z2: torch.Tensor, temp_net: PairTemperature, topk: int) -> _Parts:
    if not isinstance(temp_net, PairTemperature):
        raise ValueError(f"temp_net must be a PairTemperature, got {type(temp_net).__name__}")
    topk = _posint("topk", topk)
    z = _heads(z1, z2)                                        # (C, 2N, d)
    if z.shape[-1] != temp_net.dim:
        raise ValueError(f"embeddings have dimension {z.shape[-1]} but temp_net expects {temp_net.dim}")
    tau = temp_net(z)                                         # (C, 2N, 2N), float32 or wider
    sim = (z @ z.transpose(-1, -2)).to(tau.dtype)
    n = z1.shape[0]
    pos, neg = simclr_masks(n, z.device)
    k = min(topk, 2 * n - 2)
    idx = sim.detach().masked_fill(~neg, float("-inf")).topk(k, dim=-1, sorted=False).indices
    top = torch.zeros_like(sim, dtype=torch.bool).scatter_(-1, idx, True)   # the k hardest negatives of each row
    return _Parts(sim, tau, pos, top, k)


def amcl_loss(z1: torch.Tensor, z2: torch.Tensor, temp_net: PairTemperature, *, beta: float = 0.01,
              topk: int = 100, reduction: str = "mean") -> torch.Tensor:
    r"""The AMCL objective on two views, for one or several heads.

    .. math::
        \ell^{(c)}_i = -\frac{s_{ii^+}}{\tau_{ii^+}} + \frac1k \sum_{j \in \mathcal K_i} \frac{s_{ij}}{\tau_{ij}}
                       + \beta\,\Omega(\tau_{ii^+}) - \beta \sum_{j \in \mathcal K_i}\Big(\log\tau_{ij} + \frac1{\tau_{ij}}\Big)

    with :math:`s` the cosine similarities of head :math:`c` over the :math:`2N` views ``[z1; z2]`` (row
    :math:`i` and :math:`i \pm N` are positives, every other row a negative), :math:`\tau` from
    ``temp_net`` on the same normalised embeddings, :math:`\mathcal K_i` the :math:`k = \min(\texttt{topk},
    2N - 2)` most similar negatives of anchor :math:`i` (selected without gradient), and
    :math:`\Omega(\tau) = \frac d2 \log\tau + \frac1\tau` with :math:`d` the embedding size.

    Args:
        z1, z2: embeddings of the two views, ``(N, C, d)`` (C heads) or ``(N, d)`` (one head); normalised here.
        temp_net: the shared :class:`PairTemperature` (its ``dim`` must be ``d``).
        beta: weight :math:`\beta \ge 0` of the temperature regulariser.
        topk: number of hardest negatives kept per anchor.
        reduction: ``"mean"``: mean over the :math:`2N` anchors, *summed over the heads* (the paper's
            multi-head objective); ``"sum"``: sum over anchors and heads; ``"none"``: the ``(2N, C)`` losses.

    Example::

        >>> tn = PairTemperature(16)
        >>> amcl_loss(torch.randn(8, 3, 16), torch.randn(8, 3, 16), tn, topk=4).shape
        torch.Size([])
    """
    check_reduction(reduction)
    if isinstance(beta, bool) or not isinstance(beta, numbers.Real) or not beta >= 0 or not math.isfinite(beta):
        raise ValueError(f"beta must be a finite number >= 0, got {beta!r}")
    sim, tau, pos, top, k = _parts(z1, z2, temp_net, topk)
    d = z1.shape[-1]
    zero = sim.new_zeros(())
    inv = torch.reciprocal(tau)
    # positive pair: -s/tau + beta * Omega(tau); top-k negatives: s/(k tau) - beta (log tau + 1/tau)
    pos_term = torch.where(pos, -sim * inv + beta * (0.5 * d * torch.log(tau) + inv), zero).sum(-1)
    neg_term = torch.where(top, sim * inv / k - beta * (torch.log(tau) + inv), zero).sum(-1)
    loss = (pos_term + neg_term).transpose(0, 1)                   # (2N, C)
    if reduction == "none":
        return loss
    return loss.mean(0).sum() if reduction == "mean" else loss.sum()


class AMCLTemperatures(NamedTuple):
    """The temperatures :func:`amcl_loss` uses: ``positive`` ``(2N, C)`` on each anchor's positive pair,
    ``topk`` ``(2N, C, k)`` on its ``k`` hardest negatives, ``negatives`` ``(2N, C, 2N - 2)`` on all of them."""
    positive: torch.Tensor
    topk: torch.Tensor
    negatives: torch.Tensor


@torch.no_grad()
def amcl_temperatures(z1: torch.Tensor, z2: torch.Tensor, temp_net: PairTemperature, *,
                      topk: int = 100) -> AMCLTemperatures:
    """The pair temperatures of a batch, split into positives, top-k negatives and all negatives (no gradient)."""
    sim, tau, pos, top, k = _parts(z1, z2, temp_net, topk)
    c, m = tau.shape[:2]
    _, neg = simclr_masks(m // 2, tau.device)
    t = tau.transpose(0, 1)                                        # (2N, C, 2N)
    return AMCLTemperatures(t[pos[:, None].expand_as(t)].view(m, c),
                            t[top.transpose(0, 1)].view(m, c, k),
                            t[neg[:, None].expand_as(t)].view(m, c, m - 2))


class AMCLLoss(nn.Module):
    r""":func:`amcl_loss` with its temperature network as a submodule (so that the optimizer and
    ``state_dict`` see :math:`\varphi`). ``forward(z1, z2)`` takes ``(N, C, d)`` or ``(N, d)`` embeddings.

    Defaults are those of the official implementation's loss (:math:`\beta = 0.01`, top-100,
    :math:`\tau \in (10^{-5}, 2)`, :math:`\varphi` with ``dim`` hidden units).
    """

    def __init__(self, dim: int, *, beta: float = 0.01, topk: int = 100, tau_min: float = 1e-5,
                 tau_max: float = 2.0, hidden: int | None = None, reduction: str = "mean") -> None:
        super().__init__()
        self.temp = PairTemperature(dim, hidden, tau_min=tau_min, tau_max=tau_max)
        self.beta, self.topk, self.reduction = beta, _posint("topk", topk), check_reduction(reduction)

    def forward(self, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
        return amcl_loss(z1, z2, self.temp, beta=self.beta, topk=self.topk, reduction=self.reduction)


class AMCLNet(nn.Module):
    r"""An encoder :math:`f` with :math:`C` projection heads and the shared temperature network: the
    multi-head counterpart of :class:`lossbook.encoders.ContrastiveNet`.

    ``forward(x)`` returns the unit-norm embeddings ``(N, C, out_dim)``; :meth:`features` the
    representation :math:`h = f(x)` ``(N, in_dim)`` that a probe is fitted on; ``temp`` is the
    :class:`PairTemperature` (a submodule, so that one optimizer over ``parameters()`` trains it too).

    Args:
        encoder: any module mapping a batch to ``(N, in_dim)``.
        in_dim, hidden, out_dim, heads: sizes of the :class:`MultiHeadProjector`.
        tau_min, tau_max, temp_hidden: the :class:`PairTemperature` (``temp_hidden`` defaults to ``out_dim``).
    """

    def __init__(self, encoder: nn.Module, in_dim: int, hidden: int, out_dim: int, heads: int = 3, *,
                 tau_min: float = 1e-5, tau_max: float = 2.0, temp_hidden: int | None = None) -> None:
        super().__init__()
        self.encoder = encoder
        self.proj = MultiHeadProjector(in_dim, hidden, out_dim, heads)
        self.temp = PairTemperature(out_dim, temp_hidden, tau_min=tau_min, tau_max=tau_max)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.proj(self.encoder(x)), dim=-1)
