r"""Label-distributionally robust (LDR) losses {cite}`zhu2023ldr`.

For scores :math:`f \in \mathbb R^K` and a label :math:`y`, write the margin-shifted score gaps
:math:`a_k = \delta_{k,y} + f_k - f_y` with :math:`\delta_{k,y} = c\,\mathbb 1[k \ne y]`. The
LDR-KL loss lets an adversary put weights :math:`p \in \Delta_K` on the classes, penalised by
their KL divergence from the uniform distribution :math:`u = \mathbf 1 / K`:

.. math::
    \ell_\lambda(f, y) = \max_{p \in \Delta_K} \sum_k p_k a_k - \lambda\, \mathrm{KL}(p \,\|\, u)
    = \lambda \log \frac1K \sum_{k=1}^K e^{a_k / \lambda},

with maximiser :math:`p^* = \operatorname{softmax}(a / \lambda)`. :math:`\lambda \to 0` gives the
Crammer–Singer hinge :math:`\max_k a_k`, :math:`\lambda \to \infty` the mean gap
:math:`\frac1K \sum_k a_k`, and :math:`c = 0` is :math:`\lambda` times cross-entropy at temperature
:math:`\lambda`, minus :math:`\lambda \log K`.

ALDR-KL also lets the adversary choose :math:`\lambda` per instance, near :math:`\lambda_0`:

.. math::
    \psi(f, y) = \max_{\lambda > 0} \Big[\ell_\lambda(f, y)
    - \frac{\alpha \log K}{2 \lambda_0} (\lambda - \lambda_0)^2\Big],

whose stationary points solve :math:`\lambda = \lambda_0\big(1 - \mathrm{KL}(p^*_\lambda \| u)
/ (\alpha \log K)\big)`; :func:`aldr_kl_lambda` iterates that map.

Public functions: :func:`ldr_kl_loss` / :class:`LDRKLLoss`, :func:`ldr_kl_weights` (the
adversary's :math:`p^*`), :func:`aldr_kl_lambda`, :func:`aldr_kl_loss` / :class:`ALDRKLLoss`, and
:func:`normalize_scores` (the score normalisation of the authors' code).
"""
from __future__ import annotations

import math
import numbers

import torch
from torch import nn

from .._checks import check_reduction as _check_reduction, reduce as _reduce

__all__ = ["ALDRKLLoss", "LDRKLLoss", "aldr_kl_lambda", "aldr_kl_loss", "ldr_kl_loss", "ldr_kl_weights",
           "normalize_scores"]

_NORMALIZE = (None, "softplus", "l1")


# --------------------------------------------------------------------------- checks


def _check_real(name: str, value: float, *, low: float = 0.0, strict: bool = False,
                allow_inf: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or math.isnan(value):
        raise ValueError(f"{name} must be a real number, got {value!r}")
    value = float(value)
    if (math.isinf(value) and not allow_inf) or value < low or (strict and value == low):
        rel = ">" if strict else ">="
        raise ValueError(f"{name} must be {'finite and ' if not allow_inf else ''}{rel} {low}, got {value!r}")
    return value


def _check_normalize(normalize: str | None) -> str | None:
    if normalize not in _NORMALIZE:
        raise ValueError(f"normalize must be one of {_NORMALIZE}, got {normalize!r}")
    return normalize


def _check_logits_target(logits: torch.Tensor, target: torch.Tensor) -> None:
    if logits.dim() != 2 or logits.shape[1] < 2:
        raise ValueError(f"logits must have shape (batch, n_classes) with n_classes >= 2, got {tuple(logits.shape)}")
    if not logits.is_floating_point():
        raise ValueError(f"logits must be a floating-point tensor, got dtype {logits.dtype}")
    if target.dim() != 1 or target.shape[0] != logits.shape[0]:
        raise ValueError(f"target must have shape ({logits.shape[0]},), got {tuple(target.shape)}")
    if target.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        raise ValueError(f"target must hold integer class indices, got dtype {target.dtype}")
    # range check without a host sync on accelerators (gather asserts there)
    if target.device.type == "cpu" and target.numel() and (target.min() < 0 or target.max() >= logits.shape[1]):
        raise ValueError(f"target must hold class indices in [0, {logits.shape[1]})")


def _lam_tensor(lam: float | torch.Tensor, like: torch.Tensor, name: str = "lam") -> torch.Tensor:
    """``lam`` as a (B, 1) tensor of ``like``'s dtype/device (a float is broadcast)."""
    if isinstance(lam, torch.Tensor):
        if lam.dim() > 1 or (lam.dim() == 1 and lam.shape[0] != like.shape[0]):
            raise ValueError(f"{name} must be a float or a tensor of shape ({like.shape[0]},), got {tuple(lam.shape)}")
        if lam.device.type == "cpu" and lam.numel() and bool((lam <= 0).any() | lam.isnan().any()):
            raise ValueError(f"{name} must be > 0 everywhere")
        return lam.detach().to(like).reshape(-1, 1).expand(like.shape[0], 1)
    _check_real(name, lam, strict=True, allow_inf=True)
    return torch.full((like.shape[0], 1), float(lam), dtype=like.dtype, device=like.device)


# --------------------------------------------------------------------------- pieces
def normalize_scores(logits: torch.Tensor, normalize: str | None) -> torch.Tensor:
    r"""The score normalisation of the authors' code, applied row by row before the loss.

    * ``None``: the logits as they are (the loss of the paper's equations).
    * ``"softplus"``: :math:`s_k = \mathrm{softplus}(f_k) / \frac1K \sum_j \mathrm{softplus}(f_j)`,
      positive scores with mean 1 (the authors' LDR-KL).
    * ``"l1"``: :math:`s_k = f_k / \frac1K \sum_j |f_j|`, scores with mean absolute value 1 (the
      authors' ALDR-KL without softplus).

    Both bound the scores (:math:`|s_k| \le K`), hence the score gaps and the loss: a network can no
    longer lower the loss by scaling its logits up.
    """
    _check_normalize(normalize)
    if normalize is None:
        return logits
    tiny = torch.finfo(logits.dtype).tiny
    if normalize == "softplus":
        s = torch.nn.functional.softplus(logits)
        return s / s.mean(dim=1, keepdim=True).clamp(min=tiny)
    return logits / logits.abs().mean(dim=1, keepdim=True).clamp(min=tiny)


def _gaps(logits: torch.Tensor, target: torch.Tensor, margin: float) -> torch.Tensor:
    """:math:`a_k = c 1[k != y] + f_k - f_y`, shape (B, K)."""
    f_y = logits.gather(1, target.long().unsqueeze(1))
    delta = torch.full_like(logits, margin).scatter(1, target.long().unsqueeze(1), 0.0)
    return delta + logits - f_y


class _SoftplusGap(torch.autograd.Function):
    r"""Per row, :math:`\mathrm{softplus}(u)` with :math:`u = c' - z_y + \log \sum_{k \ne y} e^{z_k}`, and
    its gradient in closed form: :math:`\partial/\partial z = \sigma(u)\,(q - e_y)`, :math:`q` the softmax of
    the non-target entries (zero at :math:`y`). Forward keeps one (B, K) log-softmax; backward writes
    one (B, K) tensor, where autograd's generic gather/scatter backward would allocate and fill several."""

    @staticmethod
    def forward(ctx, z: torch.Tensor, idx: torch.Tensor, c_over) -> torch.Tensor:
        k = z.shape[1]
        masked = z.scatter(1, idx, float("-inf"))
        lsm = masked.log_softmax(dim=1)
        j = (idx + 1) % k                                     # any non-target column: R = z_j - log q_j
        rest = (masked.gather(1, j) - lsm.gather(1, j)).squeeze(1)
        u = c_over - z.gather(1, idx).squeeze(1) + rest
        ctx.save_for_backward(lsm, idx, u)
        return torch.nn.functional.softplus(u)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        lsm, idx, u = ctx.saved_tensors
        w = (grad_out * torch.sigmoid(u)).unsqueeze(1)
        grad = lsm.exp().mul_(w)                              # sigma(u) q_k  (q_y = e^{-inf} = 0)
        grad.scatter_add_(1, idx, -w)                         # - sigma(u) at the target
        return grad, None, None


def _ldr_rows(s: torch.Tensor, target: torch.Tensor, lam: float | torch.Tensor, margin: float) -> torch.Tensor:
    r""":math:`\lambda \log \frac1K \sum_k e^{a_k/\lambda}` per row for the gaps :math:`a` of :func:`_gaps`,
    without forming them; ``lam`` a float > 0 or a (B, 1) tensor > 0, where ``inf`` gives the mean-gap
    limit exactly.

    The target's own gap is 0 and every other gap is :math:`c + f_k - f_y`, so with
    :math:`z = f / \lambda` and :math:`R = \log \sum_{k \ne y} e^{z_k}`

    .. math::
        \ell_\lambda = \lambda\, \mathrm{softplus}\Big(\frac{c}{\lambda} - z_y + R\Big) - \lambda \log K ,
        \qquad \frac{\partial \ell_\lambda}{\partial f} = \sigma(\cdot)\,(q - e_y),

    :math:`q` the softmax of the non-target scores: one log-softmax over the (B, K) scores with the
    target masked out, as cheap as cross-entropy's, and a closed-form backward
    (:class:`_SoftplusGap`); exact for any :math:`\lambda` and margin.
    """
    k = s.shape[1]
    idx = target.long().unsqueeze(1)
    if isinstance(lam, torch.Tensor):
        inf = torch.isinf(lam).squeeze(1)
        lam_c = torch.where(torch.isinf(lam), torch.ones_like(lam), lam)
        z, lam_r = s * lam_c.reciprocal(), lam_c.squeeze(1)     # a multiply is cheaper than a divide
    else:
        if math.isinf(lam):
            return margin * (k - 1) / k + s.mean(dim=1) - s.gather(1, idx).squeeze(1)
        inf, lam_r = None, lam
        z = s if lam == 1.0 else s * (1.0 / lam)
    if k == 1:
        return torch.zeros_like(s[:, 0])
    out = lam_r * (_SoftplusGap.apply(z, idx, margin / lam_r) - math.log(k))
    if inf is not None:
        out = torch.where(inf, margin * (k - 1) / k + s.mean(dim=1) - s.gather(1, idx).squeeze(1), out)
    return out


def ldr_kl_weights(logits: torch.Tensor, target: torch.Tensor, *, lam: float | torch.Tensor = 1.0,
                   margin: float = 1.0, normalize: str | None = None) -> torch.Tensor:
    r"""The adversary's class weights :math:`p^* = \operatorname{softmax}(a / \lambda)`, shape (B, K).

    They solve the inner maximisation of :func:`ldr_kl_loss`, and they are its gradient:
    :math:`\partial \ell_\lambda / \partial f_k = p^*_k - \mathbb 1[k = y]` (without normalisation).
    Uniform at :math:`\lambda = \infty`. Detached.
    """
    _check_logits_target(logits, target)
    margin = _check_real("margin", margin)
    s = normalize_scores(logits.detach(), normalize)
    lam_t = _lam_tensor(lam, s)
    a = _gaps(s, target, margin)
    uniform = torch.full_like(a, 1.0 / a.shape[1])
    safe = torch.where(torch.isinf(lam_t), torch.ones_like(lam_t), lam_t)
    return torch.where(torch.isinf(lam_t), uniform, torch.softmax(a / safe, dim=1))


# --------------------------------------------------------------------------- LDR-KL
def ldr_kl_loss(logits: torch.Tensor, target: torch.Tensor, *, lam: float | torch.Tensor = 1.0,
                margin: float = 1.0, normalize: str | None = None, reduction: str = "mean") -> torch.Tensor:
    r"""The LDR-KL loss {cite}`zhu2023ldr` of each row of ``logits`` (B, K) at ``target`` (B,):

    .. math::
        \ell_\lambda(f, y) = \lambda \log\Big(\frac1K \sum_{k=1}^K
        \exp\frac{c\,\mathbb 1[k \ne y] + f_k - f_y}{\lambda}\Big),

    computed with a log-sum-exp (stable for any finite logits and any :math:`\lambda > 0`).

    Args:
        logits: scores :math:`f`, shape ``(B, K)``, floating point, :math:`K \ge 2`.
        target: class indices in ``[0, K)``, shape ``(B,)``.
        lam: :math:`\lambda > 0`, a float or a ``(B,)`` tensor (one per instance, not
            differentiated); ``math.inf`` gives the limit :math:`\frac1K \sum_k a_k` exactly. The
            limit :math:`\lambda \to 0` is the Crammer–Singer hinge :math:`\max_k a_k`, which the
            loss approaches within :math:`\lambda \log K`.
        margin: :math:`c \ge 0`. With ``margin=0`` and ``lam=1`` the loss is cross-entropy minus
            :math:`\log K`.
        normalize: ``None`` (the equation), ``"softplus"`` or ``"l1"``: see :func:`normalize_scores`.
            The authors' experiments use ``"softplus"`` with ``lam=10, margin=0.1``.
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (shape ``(B,)``).

    Example::

        >>> f, y = torch.tensor([[2.0, 0.0, -1.0]]), torch.tensor([0])
        >>> round(float(ldr_kl_loss(f, y, lam=1.0, margin=0.0)), 4)   # CE - log 3
        -0.9288
    """
    _check_reduction(reduction)
    _check_logits_target(logits, target)
    margin = _check_real("margin", margin)
    s = normalize_scores(logits, normalize)
    lam_v = _lam_tensor(lam, s) if isinstance(lam, torch.Tensor) else _check_real("lam", lam, strict=True, allow_inf=True)
    return _reduce(_ldr_rows(s, target, lam_v, margin), reduction)


class LDRKLLoss(nn.Module):
    r"""Module form of :func:`ldr_kl_loss`: ``LDRKLLoss(lam=10, margin=0.1, normalize="softplus")(logits, y)``."""

    def __init__(self, lam: float = 1.0, margin: float = 1.0, normalize: str | None = None,
                 reduction: str = "mean") -> None:
        super().__init__()
        self.lam = _check_real("lam", lam, strict=True, allow_inf=True)
        self.margin = _check_real("margin", margin)
        self.normalize = _check_normalize(normalize)
        self.reduction = _check_reduction(reduction)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return ldr_kl_loss(logits, target, lam=self.lam, margin=self.margin, normalize=self.normalize,
                           reduction=self.reduction)

    def extra_repr(self) -> str:
        return f"lam={self.lam}, margin={self.margin}, normalize={self.normalize!r}, reduction={self.reduction!r}"


# --------------------------------------------------------------------------- ALDR-KL
def aldr_kl_lambda(logits: torch.Tensor, target: torch.Tensor, *, lam0: float = 1.0, alpha: float = 2.0,
                   margin: float = 1.0, normalize: str | None = None, n_iter: int = 1,
                   lam_init: torch.Tensor | None = None) -> torch.Tensor:
    r"""The instance-wise :math:`\lambda` of ALDR-KL, by iterating its closed-form update:

    .. math::
        \lambda \leftarrow T(\lambda) = \lambda_0 \Big(1 - \frac{\mathrm{KL}(p^*_\lambda \,\|\, u)}{\alpha \log K}\Big),
        \qquad p^*_\lambda = \operatorname{softmax}(a / \lambda),

    the maximiser over :math:`\lambda` of :math:`-\lambda\,\mathrm{KL}(p \| u) - \frac{\alpha \log K}{2\lambda_0}
    (\lambda - \lambda_0)^2` at fixed :math:`p = p^*_\lambda`. Its fixed points are the stationary
    points of the ALDR-KL objective in :math:`\lambda`. :math:`T` is increasing, so from
    :math:`\lambda_0` the iterates decrease monotonically towards the largest fixed point; they
    always stay in :math:`[\lambda_0 (1 - 1/\alpha), \lambda_0]`.

    Args:
        logits, target: as in :func:`ldr_kl_loss`.
        lam0: :math:`\lambda_0 > 0`, the reference (and largest) :math:`\lambda`.
        alpha: :math:`\alpha > 1` (so :math:`\lambda` stays positive); the authors use 2.
        margin, normalize: as in :func:`ldr_kl_loss`.
        n_iter: number of applications of :math:`T` (``>= 1``).
        lam_init: optional ``(B,)`` starting values (e.g. each instance's :math:`\lambda` from the
            previous epoch, as the authors' code keeps); default :math:`\lambda_0`.

    Returns:
        ``(B,)`` tensor of :math:`\lambda_i`, detached.
    """
    _check_logits_target(logits, target)
    lam0, alpha, margin, n_iter = _check_aldr(lam0, alpha, margin, n_iter)
    return _iterate_lambda(normalize_scores(logits.detach(), normalize), target, margin, lam0, alpha, n_iter,
                           lam_init)


def _check_aldr(lam0: float, alpha: float, margin: float, n_iter: int) -> tuple[float, float, float, int]:
    lam0 = _check_real("lam0", lam0, strict=True)
    alpha = _check_real("alpha", alpha, low=1.0, strict=True)
    margin = _check_real("margin", margin)
    if isinstance(n_iter, bool) or not isinstance(n_iter, int) or n_iter < 1:
        raise ValueError(f"n_iter must be an integer >= 1, got {n_iter!r}")
    return lam0, alpha, margin, n_iter


def _iterate_lambda(s: torch.Tensor, target: torch.Tensor, margin: float, lam0: float, alpha: float,
                    n_iter: int, lam_init: torch.Tensor | None) -> torch.Tensor:
    r"""n_iter applications of T to the detached scores ``s`` (B, K); returns (B,). The softmax of the
    gaps :math:`a / \lambda` is that of :math:`(s - c e_y) / \lambda` (a shift per row), so the gaps are
    not formed."""
    idx = target.long().unsqueeze(1)
    a = s.detach().scatter_add(1, idx, torch.full(idx.shape, -margin, dtype=s.dtype, device=s.device))
    K = a.shape[1]
    log_k = math.log(K)
    lam = _lam_tensor(lam0 if lam_init is None else lam_init, a, "lam_init")
    for _ in range(n_iter):
        log_p = torch.log_softmax(a * lam.reciprocal(), dim=1)
        kl = (log_p.exp() * (log_p + log_k)).sum(dim=1, keepdim=True).clamp(min=0.0, max=log_k)
        lam = lam0 * (1.0 - kl / (alpha * log_k))
    return lam.squeeze(1)


def aldr_kl_loss(logits: torch.Tensor, target: torch.Tensor, *, lam0: float = 1.0, alpha: float = 2.0,
                 margin: float = 1.0, normalize: str | None = None, n_iter: int = 1,
                 lam_init: torch.Tensor | None = None, reduction: str = "mean") -> torch.Tensor:
    r"""The adaptive LDR-KL loss {cite}`zhu2023ldr` with an instance-wise :math:`\lambda_i`:

    .. math::
        \psi(f, y) = \ell_{\lambda_i}(f, y) - \frac{\alpha \log K}{2 \lambda_0} (\lambda_i - \lambda_0)^2,

    with :math:`\lambda_i` from :func:`aldr_kl_lambda`, held fixed (not differentiated). At a fixed point of the update this is
    exact: the derivative of the objective in :math:`\lambda` vanishes there (envelope theorem), so
    the gradient of :math:`\psi` is that of :math:`\ell_{\lambda_i}`, with class weights
    :math:`p^* = \operatorname{softmax}(a / \lambda_i)`. Arguments as in :func:`aldr_kl_lambda`
    and :func:`ldr_kl_loss`. The authors' experiments use ``lam0=10, alpha=2, margin=0.1``, scores
    normalised by ``"l1"``, and each instance's :math:`\lambda` kept from its previous visit
    (``lam_init``; :class:`ALDRKLLoss` does this when given the instances' indices).

    Example::

        >>> f, y = torch.randn(4, 10), torch.tensor([0, 1, 2, 3])
        >>> aldr_kl_loss(f, y, lam0=1.0, alpha=2.0, n_iter=5).shape
        torch.Size([])
    """
    _check_reduction(reduction)
    _check_logits_target(logits, target)
    lam0, alpha, margin, n_iter = _check_aldr(lam0, alpha, margin, n_iter)
    s = normalize_scores(logits, _check_normalize(normalize))
    lam = _iterate_lambda(s, target, margin, lam0, alpha, n_iter, lam_init)
    return _reduce(_aldr_rows(s, target, margin, lam, lam0, alpha), reduction)


def _aldr_rows(s: torch.Tensor, target: torch.Tensor, margin: float, lam: torch.Tensor, lam0: float,
               alpha: float) -> torch.Tensor:
    """ell_lam - alpha log K / (2 lam0) (lam - lam0)^2 per row, lam (B,) held fixed."""
    lam = lam.detach()
    penalty = alpha * math.log(s.shape[1]) / (2.0 * lam0) * (lam - lam0).square()
    return _ldr_rows(s, target, lam.unsqueeze(1), margin) - penalty


class ALDRKLLoss(nn.Module):
    r"""Module form of :func:`aldr_kl_loss`.

    With ``n_samples`` given, it keeps one :math:`\lambda` per training instance (a buffer) and
    warm-starts each instance's update from its previous value when called as
    ``loss_fn(logits, target, index)``, as the authors' code does; called without ``index`` it
    starts from :math:`\lambda_0` every time. :attr:`last_lambda` holds the batch's
    :math:`\lambda_i` after each call.

    Example::

        >>> loss_fn = ALDRKLLoss(lam0=10.0, alpha=2.0, margin=0.1, normalize="l1", n_iter=3)
        >>> loss_fn(torch.randn(8, 5, requires_grad=True), torch.randint(0, 5, (8,))).backward()
    """

    def __init__(self, lam0: float = 1.0, alpha: float = 2.0, margin: float = 1.0, normalize: str | None = None,
                 n_iter: int = 1, n_samples: int | None = None, reduction: str = "mean") -> None:
        super().__init__()
        self.lam0 = _check_real("lam0", lam0, strict=True)
        self.alpha = _check_real("alpha", alpha, low=1.0, strict=True)
        self.margin = _check_real("margin", margin)
        self.normalize = _check_normalize(normalize)
        if isinstance(n_iter, bool) or not isinstance(n_iter, int) or n_iter < 1:
            raise ValueError(f"n_iter must be an integer >= 1, got {n_iter!r}")
        self.n_iter = n_iter
        self.reduction = _check_reduction(reduction)
        if n_samples is not None and (not isinstance(n_samples, int) or n_samples < 1):
            raise ValueError(f"n_samples must be a positive integer or None, got {n_samples!r}")
        self.register_buffer("lambdas", None if n_samples is None else torch.full((n_samples,), self.lam0))
        self.last_lambda: torch.Tensor | None = None

    def forward(self, logits: torch.Tensor, target: torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:
        lam_init = None
        if index is not None:
            if self.lambdas is None:
                raise ValueError("index needs a loss built with n_samples (one lambda per training instance)")
            lam_init = self.lambdas[index]
        _check_logits_target(logits, target)
        s = normalize_scores(logits, self.normalize)
        lam = _iterate_lambda(s, target, self.margin, self.lam0, self.alpha, self.n_iter, lam_init)
        if index is not None:
            self.lambdas[index] = lam.to(self.lambdas)
        self.last_lambda = lam
        return _reduce(_aldr_rows(s, target, self.margin, lam, self.lam0, self.alpha), self.reduction)

    def extra_repr(self) -> str:
        return (f"lam0={self.lam0}, alpha={self.alpha}, margin={self.margin}, normalize={self.normalize!r}, "
                f"n_iter={self.n_iter}, reduction={self.reduction!r}")
