r"""Learning from aggregate responses: bag-level, instance-level and interpolating losses
{cite}`javanmard2024aggregate`.

The training points are split into bags :math:`B_1, \dots, B_m`; of the responses only the bag
means :math:`\bar y_a = \frac{1}{|B_a|} \sum_{i \in B_a} y_i` are seen. With
:math:`\bar f_a = \frac{1}{|B_a|} \sum_{i \in B_a} f(x_i)`, the two natural squared losses are

.. math::
    \mathcal L_{\rm bag} = \frac1m \sum_a (\bar y_a - \bar f_a)^2, \qquad
    \mathcal L_{\rm ins} = \frac1m \sum_a \frac{1}{|B_a|} \sum_{i \in B_a} (\bar y_a - f(x_i))^2
    = \mathcal L_{\rm bag} + \frac1m \sum_a \frac{1}{|B_a|} \sum_{i \in B_a} (f(x_i) - \bar f_a)^2 ,

so the instance-level loss is the bag-level loss plus a penalty on the spread of the
predictions inside each bag. The interpolating loss weighs that penalty by
:math:`\rho \in [0, 1]`: :math:`\mathcal L_\rho = \mathcal L_{\rm bag} + \rho\, \mathcal R`.

Public functions: :func:`make_bags`, :func:`bag_means`, :func:`bag_loss`, :func:`instance_loss`,
:func:`bag_spread`, :func:`interpolating_loss` / :class:`AggregateLoss` (training objectives for any
model), :func:`aggregate_ols` (the closed-form linear minimiser), :func:`conditional_bias_variance`
(its exact bias and variance given the features) and :func:`interpolating_risk` (its risk in the
proportional limit on an isotropic Gaussian design). Bag aggregation is one ``index_add_`` per
call: no Python loop over bags.
"""
from __future__ import annotations

import math
import numbers

import torch
from torch import nn

from .._checks import check_reduction as _check_reduction, reduce as _reduce

__all__ = ["AggregateLoss", "aggregate_ols", "bag_loss", "bag_means", "bag_spread",
           "conditional_bias_variance", "instance_loss", "interpolating_loss", "interpolating_risk",
           "make_bags"]



# ----------------------------------------------------------------------------------- checks


def _check_rho(rho: float) -> float:
    if isinstance(rho, bool) or not isinstance(rho, numbers.Real) or not math.isfinite(rho) or rho < 0:
        raise ValueError(f"rho must be a finite real number >= 0 (0: bag-level, 1: instance-level), got {rho!r}")
    return float(rho)


def _check_bag_idx(bag_idx: torch.Tensor, n: int, name: str = "pred") -> None:
    if bag_idx.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"bag_idx must be an integer tensor (int64 or int32), got dtype {bag_idx.dtype}")
    if bag_idx.dim() != 1 or bag_idx.numel() != n:
        raise ValueError(f"bag_idx must have shape ({n},) to match {name}, got {tuple(bag_idx.shape)}")
    if bag_idx.device.type == "cpu" and n and int(bag_idx.min()) < 0:
        raise ValueError("bag_idx must hold non-negative bag numbers")


def _pred_1d(pred: torch.Tensor) -> torch.Tensor:
    if not pred.is_floating_point():
        raise ValueError(f"pred must be a floating-point tensor, got dtype {pred.dtype}")
    if pred.dim() == 2 and pred.shape[1] == 1:
        pred = pred.squeeze(1)
    if pred.dim() != 1:
        raise ValueError(f"pred must have shape (n,) or (n, 1), got {tuple(pred.shape)}")
    return pred


# ------------------------------------------------------------------------------------- bags
def make_bags(n: int, k: int, *, generator: torch.Generator | None = None,
              device: str | torch.device | None = None) -> torch.Tensor:
    r"""A random partition of ``n`` points into bags of ``k``: the bag number of each point.

    Point :math:`i` goes to bag :math:`\lfloor \pi(i) / k \rfloor` for a uniform random permutation
    :math:`\pi`, so every bag is a uniform random ``k``-subset (the random bags of the paper's
    analysis). When ``k`` does not divide ``n`` the last bag has ``n mod k`` points.

    Returns:
        int64 tensor of shape ``(n,)`` with values in ``0 .. ceil(n / k) - 1``.

    Example::

        >>> make_bags(6, 3, generator=torch.Generator().manual_seed(0)).bincount().tolist()
        [3, 3]
    """
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or not 1 <= k <= n:
        raise ValueError(f"k must be an integer bag size in [1, n={n}], got {k!r}")
    where = generator.device if generator is not None else (device or "cpu")
    perm = torch.randperm(int(n), generator=generator, device=where)
    return (perm // int(k)).to(device or where)


def bag_means(values: torch.Tensor, bag_idx: torch.Tensor, n_bags: int | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Per-bag means :math:`\frac{1}{|B_a|} \sum_{i \in B_a} v_i` of ``values`` (shape ``(n, ...)``).

    One ``index_add_`` for the sums and one for the counts. ``n_bags`` defaults to
    ``bag_idx.max() + 1`` (a host sync; pass it in training loops on a GPU). Empty bags get
    mean 0 and count 0.

    Returns:
        ``(means, counts)``: ``means`` of shape ``(n_bags, ...)`` in the dtype of ``values``,
        ``counts`` of shape ``(n_bags,)`` in the same dtype.
    """
    if values.dim() < 1:
        raise ValueError(f"values must have shape (n, ...), got {tuple(values.shape)}")
    if not values.is_floating_point():
        raise ValueError(f"values must be a floating-point tensor, got dtype {values.dtype}")
    _check_bag_idx(bag_idx, values.shape[0], "values")
    if n_bags is None:
        n_bags = int(bag_idx.max()) + 1 if bag_idx.numel() else 0
    idx = bag_idx.long()
    sums = values.new_zeros((n_bags,) + tuple(values.shape[1:])).index_add_(0, idx, values)
    counts = values.new_zeros(n_bags).index_add_(0, idx, values.new_ones(values.shape[0]))
    means = sums / counts.clamp(min=1).reshape((-1,) + (1,) * (values.dim() - 1))
    return means, counts


def _bag_terms(pred: torch.Tensor, bag_idx: torch.Tensor, bag_y: torch.Tensor | None, n_bags: int | None = None):
    pred = _pred_1d(pred)
    _check_bag_idx(bag_idx, pred.shape[0])
    if bag_y is not None:
        if bag_y.dim() == 2 and bag_y.shape[1] == 1:
            bag_y = bag_y.squeeze(1)
        if bag_y.dim() != 1:
            raise ValueError(f"bag_y must have shape (n_bags,), one mean response per bag, got {tuple(bag_y.shape)}")
        n_bags = bag_y.shape[0]
        if bag_idx.device.type == "cpu" and bag_idx.numel() and int(bag_idx.max()) >= n_bags:
            raise ValueError(f"bag_idx refers to bag {int(bag_idx.max())} but bag_y has only {n_bags} entries")
    fbar, counts = bag_means(pred, bag_idx, n_bags)
    return pred, fbar, counts, (None if bag_y is None else bag_y.to(pred.dtype))


def bag_loss(pred: torch.Tensor, bag_idx: torch.Tensor, bag_y: torch.Tensor, *,
             reduction: str = "mean") -> torch.Tensor:
    r"""Bag-level squared loss :math:`\frac1m \sum_a (\bar y_a - \bar f_a)^2`.

    Args:
        pred: model outputs :math:`f(x_i)`, shape ``(n,)`` or ``(n, 1)``.
        bag_idx: bag number of each point, int64/int32 of shape ``(n,)``.
        bag_y: mean response of each bag, shape ``(n_bags,)``.
        reduction: ``"mean"`` over bags (default), ``"sum"`` or ``"none"`` (per bag).
    """
    _, fbar, counts, bag_y = _bag_terms(pred, bag_idx, bag_y)
    return _reduce((bag_y - fbar) ** 2, reduction)


def bag_spread(pred: torch.Tensor, bag_idx: torch.Tensor, *, n_bags: int | None = None,
               reduction: str = "mean") -> torch.Tensor:
    r"""The regulariser :math:`\mathcal R = \frac1m \sum_a \frac{1}{|B_a|} \sum_{i \in B_a} (f(x_i) - \bar f_a)^2`:
    the within-bag variance of the predictions, averaged over bags (``reduction="none"``: per bag).
    ``n_bags`` defaults to ``bag_idx.max() + 1`` (a host sync; pass it on a GPU)."""
    pred, fbar, counts, _ = _bag_terms(pred, bag_idx, None, n_bags)
    dev = (pred - fbar[bag_idx.long()]) ** 2
    within = dev.new_zeros(fbar.shape[0]).index_add_(0, bag_idx.long(), dev) / counts.clamp(min=1)
    return _reduce(within, reduction)


def instance_loss(pred: torch.Tensor, bag_idx: torch.Tensor, bag_y: torch.Tensor, *,
                  reduction: str = "mean") -> torch.Tensor:
    r"""Instance-level squared loss :math:`\frac1m \sum_a \frac{1}{|B_a|} \sum_{i \in B_a} (\bar y_a - f(x_i))^2`:
    every point is fitted to its bag's mean response. With equal bag sizes this is
    :math:`\frac1n \sum_i (\bar y_{a(i)} - f(x_i))^2`. Arguments as in :func:`bag_loss`."""
    pred, fbar, counts, bag_y = _bag_terms(pred, bag_idx, bag_y)
    idx = bag_idx.long()
    res = (bag_y[idx] - pred) ** 2
    per_bag = res.new_zeros(fbar.shape[0]).index_add_(0, idx, res) / counts.clamp(min=1)
    return _reduce(per_bag, reduction)


def interpolating_loss(pred: torch.Tensor, bag_idx: torch.Tensor, bag_y: torch.Tensor, rho: float, *,
                       reduction: str = "mean") -> torch.Tensor:
    r"""The interpolating loss :math:`\mathcal L_\rho = \mathcal L_{\rm bag} + \rho\, \mathcal R`
    {cite}`javanmard2024aggregate`.

    .. math::
        \mathcal L_\rho = \frac1m \sum_a \Big[ (\bar y_a - \bar f_a)^2
        + \frac{\rho}{|B_a|} \sum_{i \in B_a} (f(x_i) - \bar f_a)^2 \Big]

    :math:`\rho = 0` is the bag-level loss, :math:`\rho = 1` the instance-level loss (exactly, by
    the bias-variance identity inside a bag). Arguments as in :func:`bag_loss`, plus ``rho >= 0``.

    Example::

        >>> pred, bags = torch.tensor([1.0, 3.0, 2.0, 2.0]), torch.tensor([0, 0, 1, 1])
        >>> interpolating_loss(pred, bags, torch.tensor([1.0, 2.0]), rho=1.0)
        tensor(1.5000)
    """
    rho = _check_rho(rho)
    pred, fbar, counts, bag_y = _bag_terms(pred, bag_idx, bag_y)
    idx = bag_idx.long()
    dev = (pred - fbar[idx]) ** 2
    within = dev.new_zeros(fbar.shape[0]).index_add_(0, idx, dev) / counts.clamp(min=1)
    return _reduce((bag_y - fbar) ** 2 + rho * within, reduction)


class AggregateLoss(nn.Module):
    r"""Module form of :func:`interpolating_loss`: ``AggregateLoss(rho)(pred, bag_idx, bag_y)``.

    ``rho=0`` trains on the bag-level loss, ``rho=1`` on the instance-level loss.
    """

    def __init__(self, rho: float = 0.5, reduction: str = "mean") -> None:
        super().__init__()
        self.rho = _check_rho(rho)
        self.reduction = _check_reduction(reduction)

    def forward(self, pred: torch.Tensor, bag_idx: torch.Tensor, bag_y: torch.Tensor) -> torch.Tensor:
        return interpolating_loss(pred, bag_idx, bag_y, self.rho, reduction=self.reduction)

    def extra_repr(self) -> str:
        return f"rho={self.rho}, reduction={self.reduction!r}"


# ------------------------------------------------------------------------------ linear model
def _check_design(x: torch.Tensor, bag_idx: torch.Tensor, bag_y: torch.Tensor) -> torch.Tensor:
    if x.dim() != 2 or not x.is_floating_point():
        raise ValueError(f"x must be a floating-point matrix of shape (n, d), got {tuple(x.shape)} {x.dtype}")
    _check_bag_idx(bag_idx, x.shape[0], "x")
    if bag_y.dim() != 1:
        raise ValueError(f"bag_y must have shape (n_bags,), got {tuple(bag_y.shape)}")
    return x


def _gram(x: torch.Tensor, bag_idx: torch.Tensor, n_bags: int):
    """(S, C, Xbar, counts): S = Xbar^T Xbar (bag term) and C = Xc^T diag(1/|B|) Xc (within-bag
    spread), so that the normal matrix of L_rho summed over bags is S + rho C."""
    xbar, counts = bag_means(x, bag_idx, n_bags)
    xc = x - xbar[bag_idx.long()]
    w = 1.0 / counts.clamp(min=1)[bag_idx.long()]
    return xbar.T @ xbar, (xc * w[:, None]).T @ xc, xbar, counts


def aggregate_ols(x: torch.Tensor, bag_idx: torch.Tensor, bag_y: torch.Tensor, rho: float | torch.Tensor, *,
                  ridge: float = 0.0) -> torch.Tensor:
    r"""The linear minimiser :math:`\hat\theta_\rho = \arg\min_\theta \mathcal L_\rho(x^\top\theta)`, in closed form.

    With :math:`\bar x_a` the bag means of the features,

    .. math::
        \hat\theta_\rho = \Big( \sum_a \bar x_a \bar x_a^\top
        + \rho \sum_a \frac{1}{|B_a|} \sum_{i \in B_a} (x_i - \bar x_a)(x_i - \bar x_a)^\top
        + \lambda I \Big)^{-1} \sum_a \bar x_a\, \bar y_a ,

    a generalised least-squares problem (``ridge`` :math:`= \lambda` adds :math:`\lambda \|\theta\|^2`
    to the summed loss). Add a column of ones to ``x`` for an intercept: it is fitted by the bag
    term only, since it has no spread inside a bag. When the matrix is singular (e.g. fewer bags
    than features at ``rho=0``) the minimum-norm least-squares solution is returned.

    Args:
        x: features, shape ``(n, d)``, floating point (float64 recommended).
        bag_idx: bag number of each row, shape ``(n,)``.
        bag_y: mean response of each bag, shape ``(n_bags,)``.
        rho: weight of the within-bag spread, ``>= 0``; a float, or a 1-D tensor of ``R`` values
            (all fitted at once: the two Gram matrices are formed once, the ``R`` systems solved
            as a batch).
        ridge: :math:`\lambda \ge 0`.

    Returns:
        :math:`\hat\theta_\rho`, shape ``(d,)`` (``(R, d)`` for a tensor ``rho``), in the dtype of ``x``.
    """
    batched = isinstance(rho, torch.Tensor)
    if batched:
        if rho.dim() != 1 or not rho.is_floating_point():
            raise ValueError(f"rho must be a float or a 1-D floating-point tensor, got {tuple(rho.shape)} {rho.dtype}")
        if rho.device.type == "cpu" and (not torch.isfinite(rho).all() or (rho < 0).any()):
            raise ValueError("rho must be finite and >= 0 (0: bag-level, 1: instance-level)")
    else:
        rho = _check_rho(rho)
    if isinstance(ridge, bool) or not isinstance(ridge, numbers.Real) or not math.isfinite(ridge) or ridge < 0:
        raise ValueError(f"ridge must be a finite real number >= 0, got {ridge!r}")
    x = _check_design(x, bag_idx, bag_y)
    s_bag, spread, xbar, _ = _gram(x, bag_idx, bag_y.shape[0])
    rho_ = rho.to(x.dtype).to(x.device)[:, None, None] if batched else rho
    g = s_bag + rho_ * spread
    if ridge:
        g = g + ridge * torch.eye(x.shape[1], dtype=g.dtype, device=g.device)
    rhs = xbar.T @ bag_y.to(x.dtype)
    rhs = rhs.expand(g.shape[:-1])[..., None]
    # Cholesky when the matrix is safely positive definite; otherwise its pseudo-inverse, which
    # gives the minimum-norm least-squares solution (one host sync to decide: not a training path)
    chol, info = torch.linalg.cholesky_ex(g)
    pivots = torch.diagonal(chol, dim1=-2, dim2=-1)
    scale = torch.diagonal(g, dim1=-2, dim2=-1).amax(-1).clamp(min=torch.finfo(g.dtype).tiny)
    if bool((info == 0).all() and (pivots.amin(-1) ** 2 > 1e3 * torch.finfo(g.dtype).eps * x.shape[1] * scale).all()):
        theta = torch.cholesky_solve(rhs, chol)
    else:
        theta = torch.linalg.pinv(g, hermitian=True) @ rhs
    return theta[..., 0]


def conditional_bias_variance(x: torch.Tensor, bag_idx: torch.Tensor, theta: torch.Tensor, rho: float, *,
                              noise_var: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Exact squared bias and variance of :func:`aggregate_ols`, given the features.

    For responses :math:`y_i = x_i^\top \theta + \varepsilon_i` with independent noise of variance
    :math:`\sigma^2`, the bag means carry noise of variance :math:`\sigma^2 / |B_a|`, and with
    :math:`G_\rho` the matrix of :func:`aggregate_ols` and :math:`S = \sum_a \bar x_a \bar x_a^\top`,

    .. math::
        \mathrm{Bias}^2 = \| (G_\rho^{-1} S - I)\,\theta \|^2, \qquad
        \mathrm{Var} = \sigma^2 \operatorname{tr}\Big( G_\rho^{-1} \Big(\sum_a \frac{\bar x_a \bar x_a^\top}{|B_a|}\Big) G_\rho^{-1} \Big),

    so that :math:`\mathbb E[\|\hat\theta_\rho - \theta\|^2 \mid X] = \mathrm{Bias}^2 + \mathrm{Var}`
    (the excess test risk for isotropic features). Requires :math:`G_\rho` invertible.
    """
    rho = _check_rho(rho)
    if theta.dim() != 1 or theta.shape[0] != x.shape[1]:
        raise ValueError(f"theta must have shape ({x.shape[1]},), got {tuple(theta.shape)}")
    x = _check_design(x, bag_idx, x.new_zeros(int(bag_idx.max()) + 1))
    s_bag, spread, xbar, counts = _gram(x, bag_idx, int(bag_idx.max()) + 1)
    g = s_bag + rho * spread
    ginv_s = torch.linalg.solve(g, s_bag)
    bias2 = ((ginv_s - torch.eye(x.shape[1], dtype=x.dtype, device=x.device)) @ theta.to(x.dtype)).square().sum()
    h = torch.linalg.solve(g, (xbar / counts.clamp(min=1)[:, None]).T)     # G^{-1} Xbar^T diag(1/k)
    var = noise_var * (h @ (xbar @ torch.linalg.inv(g))).trace()
    return bias2, var


# -------------------------------------------------------------------------------- asymptotics
def interpolating_risk(n_over_d: float, k: int, rho: float | torch.Tensor, *, signal: float = 1.0,
                       noise: float = 1.0, iters: int = 200) -> dict[str, torch.Tensor]:
    r"""Limiting bias, variance and risk of :func:`aggregate_ols` on an isotropic Gaussian design.

    Features :math:`x_i \sim \mathcal N(0, I_d)`, responses :math:`y_i = x_i^\top\theta_0 + \varepsilon_i`
    with :math:`\|\theta_0\|^2 = r^2` (``signal``) and noise variance :math:`\sigma^2` (``noise``),
    random bags of size :math:`k`, :math:`n, d \to \infty` with :math:`n/d = \psi`. With
    :math:`\mu = \psi/k` (bags per feature) and :math:`\nu = \psi(1 - 1/k)`, let :math:`\tau > 0` solve

    .. math::
        \frac{\mu\tau}{1 + \tau} + \frac{\nu\rho\tau}{1 + \rho\tau} = 1, \qquad
        p_1 = \frac{1}{1+\tau},\ p_\rho = \frac{\rho}{1 + \rho\tau},\
        a = \frac{\mu p_1}{\mu p_1 + \nu p_\rho},\
        T = \frac{\tau^2}{1 - \tau^2(\mu p_1^2 + \nu p_\rho^2)} .

    Then :math:`\hat\theta_\rho \to a\,\theta_0` along :math:`\theta_0`, and

    .. math::
        \mathrm{Bias}^2 = r^2\big[(1-a)^2 + T(\mu p_1^2 (1-a)^2 + \nu p_\rho^2 a^2)\big], \qquad
        \mathrm{Var} = \sigma^2\, T \mu p_1^2 .

    (Derived in the chapter; at :math:`\rho = 0` it is the ordinary least-squares risk
    :math:`\sigma^2/(\mu - 1)` on :math:`m = n/k` samples, at :math:`\rho = 1` the shrinkage
    :math:`a = 1/k`.) A limit exists when :math:`\mu > 1` (:math:`\rho = 0`) or :math:`\psi > 1`
    (:math:`\rho > 0`); elsewhere the entries are ``inf``.

    Args:
        n_over_d: :math:`\psi = n/d > 0`.
        k: bag size, :math:`\ge 1`.
        rho: scalar or tensor of :math:`\rho \ge 0` (vectorised).
        signal: :math:`r^2 = \|\theta_0\|^2`; ``signal / noise`` is the SNR.
        noise: :math:`\sigma^2`.
        iters: bisection steps for :math:`\tau`.

    Returns:
        dict of float64 tensors shaped like ``rho``: ``bias2``, ``variance``, ``risk`` (their sum,
        the excess test MSE :math:`\|\hat\theta_\rho - \theta_0\|^2`), ``shrinkage`` (:math:`a`), ``tau``.
    """
    for name, v in (("n_over_d", n_over_d), ("signal", signal), ("noise", noise)):
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v) or v < 0 \
                or (name == "n_over_d" and v == 0):
            raise ValueError(f"{name} must be a finite real number {'> 0' if name == 'n_over_d' else '>= 0'}, got {v!r}")
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
        raise ValueError(f"k must be a positive integer bag size, got {k!r}")
    rho_t = torch.as_tensor(rho, dtype=torch.float64)
    if not torch.isfinite(rho_t).all() or (rho_t < 0).any():
        raise ValueError("rho must be finite and >= 0")
    mu, nu = n_over_d / k, n_over_d * (1.0 - 1.0 / k)
    ok = torch.where(rho_t > 0, torch.tensor(mu + nu > 1.0), torch.tensor(mu > 1.0))
    lo, hi = torch.zeros_like(rho_t), torch.ones_like(rho_t)     # bisection on u = tau / (1 + tau)
    for _ in range(iters):
        u = 0.5 * (lo + hi)
        t = u / (1 - u)
        below = mu * u + nu * rho_t * t / (1 + rho_t * t) < 1.0
        lo, hi = torch.where(below, u, lo), torch.where(below, hi, u)
    u = 0.5 * (lo + hi)
    tau = u / (1 - u)
    p1, pr = 1 / (1 + tau), rho_t / (1 + rho_t * tau)
    a = mu * p1 / (mu * p1 + nu * pr)
    big_t = tau ** 2 / (1 - tau ** 2 * (mu * p1 ** 2 + nu * pr ** 2))
    bias2 = signal * ((1 - a) ** 2 + big_t * (mu * p1 ** 2 * (1 - a) ** 2 + nu * pr ** 2 * a ** 2))
    var = noise * big_t * mu * p1 ** 2
    inf = torch.full_like(rho_t, math.inf)
    out = {"bias2": bias2, "variance": var, "risk": bias2 + var, "shrinkage": a, "tau": tau}
    return {key: torch.where(ok, v, inf) for key, v in out.items()}
