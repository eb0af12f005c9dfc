r"""The Z-loss and its spherical relatives (de Brébisson and Vincent, 2016; ``debrebisson2016zloss``).

A classifier outputs a score vector :math:`o \in \mathbb R^D` (pre-activations, no softmax) and the
target is a class :math:`c`. A loss is *spherical* (Vincent et al., 2015) when it depends on
:math:`o` only through three numbers,

.. math::
    o_c, \qquad s = \sum_{k=1}^D o_k, \qquad q = \sum_{k=1}^D o_k^2 .

The Z-loss standardises the target score with the mean and standard deviation of the output
vector, :math:`\mu = s / D` and :math:`\sigma^2 = q / D - \mu^2`, and applies a scaled softplus:

.. math::
    z_c = \frac{o_c - \mu}{\sigma}, \qquad
    \mathcal L_Z(o, c) = \frac1a \operatorname{softplus}\big(a (b - z_c)\big)
                       = \frac1a \log\big(1 + e^{a (b - z_c)}\big).

It is unchanged when :math:`o` is replaced by :math:`\alpha o + \beta` with :math:`\alpha > 0`.
When :math:`o = W h` is a linear layer with :math:`D` rows, :math:`s = \bar w^\top h` with
:math:`\bar w = W^\top \mathbf 1` and :math:`q = h^\top Q h` with :math:`Q = W^\top W`, so a spherical
loss, its gradient with respect to :math:`h`, *and* an exact SGD step on :math:`W` cost a number of
operations independent of :math:`D`. :class:`FactoredSphericalLinear` implements that step.

Public functions: :func:`z_loss` / :class:`ZLoss`, :func:`z_loss_from_stats`,
:func:`spherical_stats`, :func:`log_spherical_softmax_loss`, :func:`log_taylor_softmax_loss`
and the output layer :class:`FactoredSphericalLinear`. Targets are int64 class indices.
"""
from __future__ import annotations

import math
import numbers
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .._checks import check_reduction as _check_reduction, reduce as _reduce

__all__ = ["FactoredSphericalLinear", "ZLoss", "log_spherical_softmax_loss", "log_taylor_softmax_loss",
           "spherical_softmax", "spherical_stats", "taylor_softmax", "z_loss", "z_loss_from_stats"]


StatsLoss = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor]


def _softplus(x: torch.Tensor) -> torch.Tensor:
    # torch's default switches to the identity above 20 (an error of e^-20 ~ 2e-9); 50 is exact in float64
    return F.softplus(x, beta=1.0, threshold=50.0)


def _check_positive(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite positive number, got {value!r}")
    return float(value)


def _check_real(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite real number, got {value!r}")
    return float(value)


def _check_logits_target(logits: torch.Tensor, target: torch.Tensor) -> None:
    if not logits.is_floating_point():
        raise ValueError(f"logits must be a floating-point tensor, got dtype {logits.dtype}")
    if logits.dim() != 2 or logits.shape[1] < 2:
        raise ValueError(f"logits must have shape (N, D) with D >= 2 classes, got {tuple(logits.shape)}")
    if target.dtype != torch.int64 or target.shape != logits.shape[:1]:
        raise ValueError(f"target must be int64 class indices of shape ({logits.shape[0]},), "
                         f"got {target.dtype} {tuple(target.shape)}")
    if target.device.type == "cpu" and target.numel() and (target.min() < 0 or target.max() >= logits.shape[1]):
        raise ValueError(f"target must hold class indices in [0, {logits.shape[1]})")


def spherical_stats(logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""The three numbers a spherical loss sees: :math:`(o_c,\ s = \sum_k o_k,\ q = \sum_k o_k^2)`.

    Args:
        logits: ``(N, D)`` scores :math:`o`.
        target: ``(N,)`` int64 classes :math:`c`.

    Returns:
        three ``(N,)`` tensors, differentiable in ``logits``.
    """
    _check_logits_target(logits, target)
    o_c = logits.gather(1, target[:, None]).squeeze(1)
    return o_c, logits.sum(1), logits.square().sum(1)


def z_loss_from_stats(o_c: torch.Tensor, s: torch.Tensor, q: torch.Tensor, n_classes: int, *,
                      a: float = 1.0, b: float = 0.0, reduction: str = "mean") -> torch.Tensor:
    r"""The Z-loss computed from the spherical statistics alone (the :math:`O(d^2)` path):

    .. math::
        \mu = \frac sD, \quad \sigma^2 = \frac qD - \mu^2, \quad z_c = \frac{o_c - \mu}{\sigma},
        \quad \mathcal L_Z = \frac1a \operatorname{softplus}\big(a (b - z_c)\big).

    :math:`\sigma^2` is formed as :math:`q / D - \mu^2`, which loses precision by cancellation when
    :math:`|\mu| \gg \sigma`; :func:`z_loss` works on the full vector and does not.

    Args:
        o_c, s, q: ``(N,)`` statistics from :func:`spherical_stats` (or from ``h`` and ``Q``).
        n_classes: :math:`D`.
        a, b: sharpness (> 0) and target z-score, see :func:`z_loss`.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.
    """
    a, b = _check_positive("a", a), _check_real("b", b)
    if isinstance(n_classes, bool) or not isinstance(n_classes, numbers.Integral) or n_classes < 2:
        raise ValueError(f"n_classes must be an integer >= 2, got {n_classes!r}")
    mu = s / n_classes
    var = (q / n_classes - mu.square()).clamp(min=torch.finfo(q.dtype).tiny)
    z_c = (o_c - mu) / torch.sqrt(var)
    return _reduce(_softplus(a * (b - z_c)) / a, reduction)


def z_loss(logits: torch.Tensor, target: torch.Tensor, *, a: float = 1.0, b: float = 0.0,
           reduction: str = "mean") -> torch.Tensor:
    r"""The Z-loss {cite}`debrebisson2016zloss`:

    .. math::
        \mathcal L_Z(o, c) = \frac1a \log\Big(1 + \exp\big(a\,(b - z_c)\big)\Big), \qquad
        z_c = \frac{o_c - \mu(o)}{\sigma(o)},

    with :math:`\mu, \sigma` the mean and (population) standard deviation of the :math:`D` scores
    (computed two-pass; the variance is floored at the smallest normal number, so a constant score
    vector gives :math:`z_c = 0` rather than NaN). Invariant to :math:`o \mapsto \alpha o + \beta`
    for :math:`\alpha > 0`, to rounding. The gradient carries a factor :math:`1/\sigma`: nearly
    constant score vectors get large gradients. Since
    :math:`|z_c| \le \sqrt{D - 1}`, the loss is bounded below by
    :math:`\frac1a \operatorname{softplus}(a (b - \sqrt{D-1}))`: ``b`` sets the z-score beyond which
    the loss stops pushing, ``a`` how sharply it stops.

    Args:
        logits: ``(N, D)`` scores, ``D >= 2``; any floating dtype (half types computed in float32).
        target: ``(N,)`` int64 classes (values checked for CPU tensors only: no host sync on GPU).
        a: sharpness, > 0. The authors' public example code uses ``a = 1, b = 0``; the paper tunes both.
        b: target z-score, any real.
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (shape ``(N,)``).

    Example::

        >>> o = torch.tensor([[2.0, 0.0, -1.0]]); c = torch.tensor([0])
        >>> torch.allclose(z_loss(o, c), z_loss(3 * o - 7, c))
        True
    """
    _check_logits_target(logits, target)
    a, b = _check_positive("a", a), _check_real("b", b)
    _check_reduction(reduction)
    x = logits if logits.dtype in (torch.float32, torch.float64) else logits.float()
    z_c = _TargetZScore.apply(x, target[:, None])
    return _reduce(_softplus(a * (b - z_c)) / a, reduction)


class _TargetZScore(torch.autograd.Function):
    r""":math:`z_c = (o_c - \mu)/\sigma` per row, with its gradient in closed form,

    .. math::
        \frac{\partial z_c}{\partial o_k} = \frac{\mathbb 1[k = c] - 1/D}{\sigma}
        - \frac{z_c\,(o_k - \mu)}{D\,\sigma^2},

    two passes over the (N, D) scores (centre, then one ``addcmul``) where autograd through the mean
    and the variance makes several. The variance is floored at the smallest normal number."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        var, mu = torch.var_mean(x, dim=1, correction=0)
        sigma = torch.sqrt(var.clamp(min=torch.finfo(x.dtype).tiny))
        z_c = (x.gather(1, idx).squeeze(1) - mu) / sigma
        ctx.save_for_backward(x, idx, mu, sigma, z_c)
        return z_c

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        x, idx, mu, sigma, z_c = ctx.saved_tensors
        d = x.shape[1]
        slope = -g * z_c / (d * sigma.square())               # times (o_k - mu), centred first: with
        bias = -g / (d * sigma)                                # |mu| >> sigma, slope * mu would cancel
        grad = torch.addcmul(bias[:, None], x - mu[:, None], slope[:, None])
        grad.scatter_add_(1, idx, (g / sigma)[:, None])
        return grad, None


class ZLoss(nn.Module):
    """Module form of :func:`z_loss`: ``ZLoss(a=1.0, b=0.0)(logits, target)``."""

    def __init__(self, a: float = 1.0, b: float = 0.0, reduction: str = "mean") -> None:
        super().__init__()
        self.a, self.b = _check_positive("a", a), _check_real("b", b)
        self.reduction = _check_reduction(reduction)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return z_loss(logits, target, a=self.a, b=self.b, reduction=self.reduction)

    def extra_repr(self) -> str:
        return f"a={self.a}, b={self.b}, reduction={self.reduction!r}"


def log_spherical_softmax_loss(logits: torch.Tensor, target: torch.Tensor, *, eps: float = 1e-2,
                               reduction: str = "mean") -> torch.Tensor:
    r"""Log-spherical-softmax loss {cite}`vincent2015efficient`, a spherical competitor:

    .. math::
        p_k = \frac{o_k^2 + \epsilon}{\sum_j (o_j^2 + \epsilon)} = \frac{o_k^2 + \epsilon}{q + D\epsilon},
        \qquad \mathcal L = -\log p_c .

    Invariant to scaling only as :math:`\epsilon \to 0`, and not to shifts. ``eps > 0`` keeps
    :math:`p_c > 0`.
    """
    _check_logits_target(logits, target)
    eps = _check_positive("eps", eps)
    _check_reduction(reduction)
    x = logits if logits.dtype in (torch.float32, torch.float64) else logits.float()
    o_c = x.gather(1, target[:, None]).squeeze(1)
    loss = torch.log(x.square().sum(1) + x.shape[1] * eps) - torch.log(o_c.square() + eps)
    return _reduce(loss, reduction)


def log_taylor_softmax_loss(logits: torch.Tensor, target: torch.Tensor, *, reduction: str = "mean") -> torch.Tensor:
    r"""Log-Taylor-softmax loss {cite}`debrebisson2016exploration`, the second spherical competitor:
    the exponential of the softmax replaced by its second-order Taylor polynomial, which is
    positive for every real :math:`o_k`:

    .. math::
        p_k = \frac{1 + o_k + o_k^2 / 2}{\sum_j (1 + o_j + o_j^2 / 2)} = \frac{1 + o_k + o_k^2/2}{D + s + q / 2},
        \qquad \mathcal L = -\log p_c .
    """
    _check_logits_target(logits, target)
    _check_reduction(reduction)
    x = logits if logits.dtype in (torch.float32, torch.float64) else logits.float()
    o_c = x.gather(1, target[:, None]).squeeze(1)
    # the denominator from the row sums s and q (the (N, D) polynomial is not formed: 2-3x faster)
    s, q = x.sum(1), x.square().sum(1)
    loss = torch.log(x.shape[1] + s + 0.5 * q) - torch.log(1.0 + o_c + 0.5 * o_c.square())   # both >= 1/2
    return _reduce(loss, reduction)


def spherical_softmax(logits: torch.Tensor, *, eps: float = 1e-2) -> torch.Tensor:
    r"""The probabilities behind :func:`log_spherical_softmax_loss`,
    :math:`p_k = (o_k^2 + \epsilon) / \sum_j (o_j^2 + \epsilon)`, shape ``(N, D)``.

    They rank classes by :math:`|o_k|`, not by :math:`o_k`: predict (and compute top-k) from
    these, not from the raw scores.
    """
    if not logits.is_floating_point() or logits.dim() != 2:
        raise ValueError(f"logits must be a floating (N, D) tensor, got {logits.dtype} {tuple(logits.shape)}")
    eps = _check_positive("eps", eps)
    p = logits.square() + eps
    return p / p.sum(1, keepdim=True)


def taylor_softmax(logits: torch.Tensor) -> torch.Tensor:
    r"""The probabilities behind :func:`log_taylor_softmax_loss`,
    :math:`p_k = (1 + o_k + o_k^2/2) / \sum_j (1 + o_j + o_j^2/2)`, shape ``(N, D)``.

    Not monotone in :math:`o_k` (smallest at :math:`o_k = -1`): predict from these.
    """
    if not logits.is_floating_point() or logits.dim() != 2:
        raise ValueError(f"logits must be a floating (N, D) tensor, got {logits.dtype} {tuple(logits.shape)}")
    p = 1.0 + logits + 0.5 * logits.square()
    return p / p.sum(1, keepdim=True)


class FactoredSphericalLinear:
    r"""A linear output layer :math:`o = W h` (:math:`W \in \mathbb R^{D \times d}`) trained with a
    spherical loss by *exact* SGD at a cost independent of :math:`D` {cite}`vincent2015efficient`.

    :math:`W` is never stored: it is kept as :math:`W = V U + \mathbf 1 \omega^\top` with
    :math:`V \in \mathbb R^{D \times d}`, :math:`U \in \mathbb R^{d \times d}`, :math:`\omega \in \mathbb R^d`,
    together with :math:`U^{-1}`, :math:`P = V^\top V` and :math:`\bar v = V^\top \mathbf 1`. For a
    batch :math:`H \in \mathbb R^{m \times d}` with targets :math:`c_i`, a spherical loss has
    :math:`\partial L / \partial o_{ik} = \alpha_i + \beta_i o_{ik} + \gamma_i [k = c_i]`, so

    .. math::
        W \leftarrow W - \eta\, G^\top H
          = \underbrace{W (I - \eta H^\top \operatorname{diag}(\beta) H)}_{U \leftarrow U M,\ \omega \leftarrow M^\top \omega}
            - \eta\, \mathbf 1 (H^\top \alpha)^\top - \eta \sum_i \gamma_i e_{c_i} h_i^\top ,

    where the last term changes at most :math:`m` rows of :math:`V` (through :math:`U^{-1}`, updated
    by the Woodbury identity). One :meth:`step` costs :math:`O(m d^2 + d^3 + m^3)`; the naive step
    costs :math:`O(m D d)`. Every ``renorm_every`` steps :math:`V U` is folded back into :math:`V`
    (:math:`O(D d^2)`, amortised) to keep :math:`U` well conditioned.

    Args:
        weight: initial :math:`W`, shape ``(D, d)`` (copied).
        loss: a spherical loss ``f(o_c, s, q, D) -> (m,)`` per-example values, e.g.
            ``lambda oc, s, q, D: z_loss_from_stats(oc, s, q, D, a=1, b=0, reduction="none")``.
        lr: the SGD step size :math:`\eta` (on the batch-mean loss).
        renorm_every: steps between two foldings of :math:`U` into :math:`V` (0: never).
    """

    def __init__(self, weight: torch.Tensor, loss: StatsLoss, *, lr: float = 0.1, renorm_every: int = 100) -> None:
        if weight.dim() != 2 or not weight.is_floating_point():
            raise ValueError(f"weight must be a floating (D, d) tensor, got {weight.dtype} {tuple(weight.shape)}")
        if isinstance(renorm_every, bool) or not isinstance(renorm_every, numbers.Integral) or renorm_every < 0:
            raise ValueError(f"renorm_every must be a non-negative integer, got {renorm_every!r}")
        self.lr = _check_positive("lr", lr)
        self.loss = loss
        self.renorm_every = int(renorm_every)
        self.n_classes, d = weight.shape
        self.V = weight.detach().clone()
        eye = torch.eye(d, dtype=weight.dtype, device=weight.device)
        self.U, self.U_inv = eye.clone(), eye.clone()
        self.omega = torch.zeros(d, dtype=weight.dtype, device=weight.device)
        self._steps = 0
        self._refresh()

    def _refresh(self) -> None:
        self.P = self.V.T @ self.V          # O(D d^2): at start and at each renormalisation only
        self.v_bar = self.V.sum(0)

    def renormalize(self) -> None:
        """Fold :math:`U` into :math:`V` (``V <- V U``, ``U <- I``): :math:`O(D d^2)`."""
        self.V = self.V @ self.U
        self.U = torch.eye(self.U.shape[0], dtype=self.U.dtype, device=self.U.device)
        self.U_inv = self.U.clone()
        self._refresh()

    @property
    def weight(self) -> torch.Tensor:
        """The current :math:`W = V U + \\mathbf 1 \\omega^\\top`, materialised (:math:`O(D d^2)`: for checks)."""
        return self.V @ self.U + self.omega

    def gram(self) -> tuple[torch.Tensor, torch.Tensor]:
        r""":math:`(Q, \bar w) = (W^\top W, W^\top \mathbf 1)` from the factors, in :math:`O(d^3)`."""
        U, w = self.U, self.omega
        vu = self.v_bar @ U                                     # (V U)^T 1
        Q = U.T @ self.P @ U + torch.outer(vu, w) + torch.outer(w, vu) + self.n_classes * torch.outer(w, w)
        return Q, vu + self.n_classes * w

    def stats(self, h: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        r""":math:`(o_c, s, q)` for a batch ``h`` of shape ``(m, d)`` without forming :math:`o`:
        :math:`o_c = w_c^\top h`, :math:`s = \bar w^\top h`, :math:`q = h^\top Q h`."""
        if h.dim() != 2 or h.shape[1] != self.U.shape[0]:
            raise ValueError(f"h must have shape (m, {self.U.shape[0]}), got {tuple(h.shape)}")
        if target.dtype != torch.int64 or target.shape != h.shape[:1]:
            raise ValueError(f"target must be int64 of shape ({h.shape[0]},), got {target.dtype} {tuple(target.shape)}")
        if target.device.type == "cpu" and target.numel() and (target.min() < 0 or target.max() >= self.n_classes):
            raise ValueError(f"target must hold class indices in [0, {self.n_classes})")
        Q, w_bar = self.gram()
        w_c = self.V[target] @ self.U + self.omega               # (m, d): the target rows of W
        return (h * w_c).sum(1), h @ w_bar, ((h @ Q) * h).sum(1)

    def step(self, h: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One exact SGD step on the batch-mean loss. Returns ``(loss, dloss/dh)`` (``dloss/dh`` of
        shape ``(m, d)``, to backpropagate into the network below). Cost independent of ``D``."""
        h = h.detach().to(self.V.dtype).requires_grad_(True)
        o_c, s, q = self.stats(h, target)
        loss = self.loss(o_c, s, q, self.n_classes).mean()
        grads = torch.autograd.grad(loss, (h, o_c, s, q), allow_unused=True)
        g_h, gamma, alpha, half_beta = (torch.zeros_like(v) if g is None else g for g, v in zip(grads, (h, o_c, s, q)))
        with torch.no_grad():
            H, eta = h.detach(), self.lr
            beta = 2.0 * half_beta
            # M = I - eta H^T diag(beta) H and its inverse by Woodbury (an m x m solve)
            BH = beta[:, None] * H
            M = torch.eye(H.shape[1], dtype=H.dtype, device=H.device) - eta * H.T @ BH
            small = torch.eye(H.shape[0], dtype=H.dtype, device=H.device) - eta * BH @ H.T
            M_inv = torch.eye(H.shape[1], dtype=H.dtype, device=H.device) + eta * H.T @ torch.linalg.solve(small, BH)
            self.U = self.U @ M
            self.U_inv = M_inv @ self.U_inv
            self.omega = M.T @ self.omega - eta * (H.T @ alpha)
            # the sparse part: rows c_i of W get -eta gamma_i h_i, i.e. rows c_i of V get that times U^{-1}
            rows, inv = torch.unique(target, return_inverse=True)
            delta = torch.zeros(rows.shape[0], H.shape[1], dtype=H.dtype, device=H.device)
            delta.index_add_(0, inv, (-eta * gamma)[:, None] * H)
            delta = delta @ self.U_inv
            v_rows = self.V[rows]
            cross = v_rows.T @ delta
            self.P += cross + cross.T + delta.T @ delta
            self.v_bar += delta.sum(0)
            self.V.index_add_(0, rows, delta)
            self._steps += 1
            if self.renorm_every and self._steps % self.renorm_every == 0:
                self.renormalize()
        return loss.detach(), g_h
