r"""FedLD: federated learning through a decomposition of the global loss {cite}`zeng2024fedld`.

With client weights :math:`p_i` (:math:`\sum_i p_i = 1`), client losses :math:`L_i` and the global
loss :math:`L = \sum_j p_j L_j`, the loss of the aggregated model :math:`\bar w` splits exactly into

.. math::
    L(\bar w) = \underbrace{\sum_i p_i L_i(w_i)}_{\text{local}}
      + \underbrace{\sum_i p_i \big[L(w_i) - L_i(w_i)\big]}_{\text{distribution shift}}
      + \underbrace{L(\bar w) - \sum_i p_i L(w_i)}_{\text{aggregation}} .

FedLD lowers the second term with a *margin-control* penalty in local training
(:func:`margin_control_loss`) and the third with a *principal-gradient* server rule
(:func:`principal_gradient_aggregate`, :func:`fedld_aggregate`). :func:`loss_decomposition`
evaluates the three terms from the matrix :math:`L_j(w_i)`; :mod:`lossbook.fedsim` runs the rounds.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch

__all__ = ["LossDecomposition", "fedld_aggregate", "loss_decomposition", "margin_control_loss",
           "principal_gradient_aggregate", "principal_gradient_weights"]


class LossDecomposition(NamedTuple):
    """The three terms of the global loss and their sum, each of shape ``(...)``."""

    local: torch.Tensor
    shift: torch.Tensor
    aggregation: torch.Tensor
    total: torch.Tensor


def loss_decomposition(client_losses: torch.Tensor, global_losses: torch.Tensor,
                       p: torch.Tensor) -> LossDecomposition:
    r"""Split the global loss of the aggregated model into local, distribution-shift and aggregation terms.

    .. math::
        \text{local} = \sum_i p_i L_i(w_i), \quad
        \text{shift} = \sum_i p_i \big[L(w_i) - L_i(w_i)\big], \quad
        \text{aggregation} = L(\bar w) - \sum_i p_i L(w_i),

    with :math:`L(w) = \sum_j p_j L_j(w)`. The three add up to :math:`L(\bar w)` whatever the
    weights (the sum telescopes); with :math:`\bar w = \sum_i p_i w_i` and :math:`L` convex the
    aggregation term is :math:`\le 0` (Jensen).

    Args:
        client_losses: :math:`L_j(w_i)` at ``[..., i, j]``: client model :math:`i` on client
            :math:`j`'s data, shape ``(..., m, m)``.
        global_losses: :math:`L_j(\bar w)`, shape ``(..., m)``.
        p: client weights, shape ``(..., m)`` (broadcast against ``global_losses``), non-negative
            (normally summing to 1).

    Returns:
        :class:`LossDecomposition` ``(local, shift, aggregation, total)``, each ``(...)``; ``total``
        is :math:`L(\bar w) = \sum_j p_j L_j(\bar w)`.

    Example::

        >>> Lc = torch.tensor([[0.1, 2.0], [3.0, 0.2]]); Lg = torch.tensor([0.5, 0.6])
        >>> d = loss_decomposition(Lc, Lg, torch.tensor([0.5, 0.5]))
        >>> torch.allclose(d.local + d.shift + d.aggregation, d.total)
        True
    """
    if client_losses.dim() < 2 or client_losses.shape[-1] != client_losses.shape[-2]:
        raise ValueError(f"client_losses must have shape (..., m, m), got {tuple(client_losses.shape)}")
    m = client_losses.shape[-1]
    if global_losses.shape != client_losses.shape[:-1]:
        raise ValueError(f"global_losses must have shape {tuple(client_losses.shape[:-1])}, "
                         f"got {tuple(global_losses.shape)}")
    try:
        p = p.expand_as(global_losses)
    except RuntimeError:
        raise ValueError(f"p must have shape (..., m={m}) broadcastable to {tuple(global_losses.shape)}, "
                         f"got {tuple(p.shape)}") from None
    if p.device.type == "cpu" and bool((p < 0).any()):
        raise ValueError("p must be non-negative")
    p = p.to(client_losses.dtype)
    own = client_losses.diagonal(dim1=-2, dim2=-1)                      # L_i(w_i)
    global_of_client = (client_losses * p.unsqueeze(-2)).sum(-1)       # L(w_i) = sum_j p_j L_j(w_i)
    total = (p * global_losses).sum(-1)                                # L(w_bar)
    local = (p * own).sum(-1)
    shift = (p * (global_of_client - own)).sum(-1)
    aggregation = total - (p * global_of_client).sum(-1)
    return LossDecomposition(local, shift, aggregation, total)


def margin_control_loss(logits: torch.Tensor, target: torch.Tensor, *, lam: float = 0.03) -> torch.Tensor:
    r"""Cross-entropy plus FedLD's margin-control penalty, per batch.

    .. math::
        \ell(Z, y) = \frac1B \sum_{b=1}^B -\log \sigma(z_b)_{y_b}
            + \lambda \log\Big(1 + \sum_{b=1}^B \sum_{c=1}^C \sigma(z_b)_c^2\Big),

    :math:`\sigma` the softmax: the penalty is the log of one plus the squared Frobenius norm of
    the batch's probability matrix, as in the authors' code. It is smallest when every prediction
    is uniform, so it caps the confidence (the margin) a client can build on its own labels.

    Args:
        logits: ``(..., B, C)``; leading dimensions are independent batches (e.g. clients).
        target: class indices ``(..., B)``, int64. Values are checked on CPU only (no host sync).
        lam: :math:`\lambda \ge 0`; 0.03 in the paper's code, 0 gives plain cross-entropy.

    Returns:
        ``(...)``: one loss per batch (a scalar for a single ``(B, C)`` batch).
    """
    if not logits.is_floating_point() or logits.dim() < 2:
        raise ValueError(f"logits must be a floating tensor of shape (..., B, C), got {logits.dtype} "
                         f"{tuple(logits.shape)}")
    if target.shape != logits.shape[:-1]:
        raise ValueError(f"target must have shape {tuple(logits.shape[:-1])}, got {tuple(target.shape)}")
    if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not math.isfinite(lam) or lam < 0:
        raise ValueError(f"lam must be a finite number >= 0, got {lam!r}")
    target = target.long()
    C = logits.shape[-1]
    if target.device.type == "cpu" and target.numel() and (target.min() < 0 or target.max() >= C):
        raise ValueError(f"target must hold class indices in [0, {C})")
    logp = torch.log_softmax(logits, dim=-1)
    ce = -logp.gather(-1, target.unsqueeze(-1)).squeeze(-1).mean(-1)
    if lam == 0:
        return ce
    sq = torch.exp(2 * logp).sum((-2, -1))                                # ||softmax(Z)||_F^2
    return ce + lam * torch.log1p(sq)


def principal_gradient_weights(updates: torch.Tensor, *, k_proportion: float = 0.8,
                               rtol: float = 1e-6) -> torch.Tensor:
    r"""The client weights :math:`c` of FedLD's principal-gradient rule: the aggregate is :math:`G^\top c`.

    Client updates :math:`g_i = w_i - w` are the rows of :math:`G \in \mathbb R^{m \times D}`.
    Eigendecompose :math:`\tfrac1m G G^\top = \sum_j s_j e_j e_j^\top` (:math:`s_1 \ge s_2 \ge \dots`),
    take the principal directions :math:`v_j = G^\top e_j` (:math:`\|v_j\|^2 = m s_j`) for
    :math:`j \le k = \lfloor k_{\mathrm{prop}}\, m \rfloor`, and let each client contribute

    .. math::
        \tilde g_i = \sum_{j \le k} \frac{s_j}{\sum_l s_l}\, \|g_i\|\,
            \operatorname{sign}\langle g_i, v_j\rangle \frac{v_j}{\|v_j\|},
        \qquad \Delta = \frac1m \sum_i \tilde g_i .

    Since :math:`\langle g_i, v_j\rangle = m s_j (e_j)_i`, this is :math:`\Delta = G^\top c` with

    .. math::
        c = \sum_{j \le k} e_j\, \frac{s_j}{\sum_l s_l} \frac{1}{\sqrt{m s_j}}
            \cdot \frac1m \sum_i \|g_i\| \operatorname{sign}(e_j)_i .

    The official code also flips :math:`v_j` when most clients point against it; the flip changes
    both the sign and the direction, so it cancels in :math:`\tilde g_i` and is omitted. Directions
    with :math:`s_j \le` ``rtol`` :math:`\cdot s_1` carry no signal (their :math:`e_j` is numerical
    noise) and are dropped; their share :math:`s_j / \sum_l s_l` is at most ``rtol``.

    Args:
        updates: :math:`G`, shape ``(..., m, D)``; leading dimensions are independent problems.
        k_proportion: share of principal directions kept, in ``(0, 1]``; 0.8 in the paper's code
            (at least one direction is kept).

    Returns:
        ``c``, shape ``(..., m)``, in the dtype of ``updates`` (the eigenproblem is solved in float64).
    """
    if updates.dim() < 2 or not updates.is_floating_point():
        raise ValueError(f"updates must be a floating tensor of shape (..., m, D), got {updates.dtype} "
                         f"{tuple(updates.shape)}")
    if not (isinstance(k_proportion, (int, float)) and 0 < k_proportion <= 1):
        raise ValueError(f"k_proportion must be in (0, 1], got {k_proportion!r}")
    m = updates.shape[-2]
    k = max(1, int(m * k_proportion))
    G = updates.double()
    s, E = torch.linalg.eigh(G @ G.transpose(-1, -2) / m)            # ascending
    s, E = s.flip(-1).clamp_min(0), E.flip(-1)
    share = s / s.sum(-1, keepdim=True).clamp_min(torch.finfo(s.dtype).tiny)
    s_k, E_k = s[..., :k], E[..., :, :k]
    keep = s_k > rtol * s[..., :1]
    norms = G.norm(dim=-1)                                           # ||g_i||
    vote = (norms.unsqueeze(-1) * torch.sign(E_k)).mean(-2)          # (1/m) sum_i ||g_i|| sign(e_j)_i
    coef = torch.where(keep, share[..., :k] * vote / torch.sqrt(m * s_k).clamp_min(1e-300), 0.0)
    return (E_k @ coef.unsqueeze(-1)).squeeze(-1).to(updates.dtype)


def principal_gradient_aggregate(updates: torch.Tensor, *, k_proportion: float = 0.8) -> torch.Tensor:
    r"""FedLD's server update :math:`\Delta = \frac1m\sum_i \tilde g_i = G^\top c` for updates ``(..., m, D)``
    -> ``(..., D)``; see :func:`principal_gradient_weights` for :math:`\tilde g_i` and :math:`c`."""
    c = principal_gradient_weights(updates, k_proportion=k_proportion)
    return (c.unsqueeze(-1) * updates).sum(-2)


def fedld_aggregate(updates: torch.Tensor, p: torch.Tensor, *, round: int, k_proportion: float = 0.8,
                    warmup_rounds: int = 1) -> torch.Tensor:
    r"""FedLD's server rule in the form :func:`lossbook.fedsim.simulate` expects.

    For updates ``(R, m, D)`` of one parameter tensor: the plain mean :math:`\frac1m\sum_i g_i`
    in the first ``warmup_rounds`` rounds and for tensors with one entry, else
    :func:`principal_gradient_aggregate`. Like the authors' code it ignores the data weights
    ``p``: every client counts alike (its weight is set by its update, through :math:`c`).
    """
    if updates.dim() != 3:
        raise ValueError(f"updates must have shape (R, m, D), got {tuple(updates.shape)}")
    if round < warmup_rounds or updates.shape[-1] == 1:
        return updates.mean(1)
    return principal_gradient_aggregate(updates, k_proportion=k_proportion)
