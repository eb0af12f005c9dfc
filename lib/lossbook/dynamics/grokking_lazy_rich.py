r"""Grokking as a transition from lazy to rich training: a two-layer network on a quadratic target
{cite}`kumar2024grokking`.

The network has :math:`N` hidden units, no trained read-out, and an output scale :math:`\alpha`:

.. math::
    f(x; W) = \frac{\alpha}{N} \sum_{i=1}^N \phi(w_i \cdot x), \qquad
    \phi(h) = h + \frac{\varepsilon}{2} h^2, \qquad W_{ij} \sim \mathcal N(0, 1),

on inputs :math:`x \sim \mathcal N(0, I_D/D)` with the target :math:`y(x) = \frac12 (\beta\cdot x)^2`,
:math:`\lVert\beta\rVert^2 = D`. Training is full-batch gradient descent on the centred squared loss

.. math::
    \mathcal L(W) = \frac1P \sum_{\mu=1}^P \bigl(f(x_\mu; W) - f(x_\mu; W_0) - y_\mu\bigr)^2, \qquad
    W \leftarrow W - \eta \nabla_W \mathcal L, \quad \eta = c\, N / \alpha^2,

whose update is, for every unit,

.. math::
    \Delta w_i = -\frac{2c}{P\alpha} \sum_\mu r_\mu\, \phi'(w_i\cdot x_\mu)\, x_\mu, \qquad r_\mu = f(x_\mu) - f_0(x_\mu) - y_\mu .

With :math:`\eta \propto N/\alpha^2` the function moves at an :math:`\alpha`-independent speed while the weights
move :math:`\propto 1/\alpha`: large :math:`\alpha` is lazy (a kernel method with the initial NTK), small
:math:`\alpha` learns features. The NTK of this model is closed-form,

.. math::
    K(x, x') = \frac{\alpha^2}{N^2} \sum_i \phi'(w_i\cdot x)\, \phi'(w_i\cdot x')\; x\cdot x' .

Everything is batched over a leading dimension (a sweep over :math:`\alpha` and seeds trained as one tensor
computation). Public functions: :func:`quadratic_task`, :func:`network`, :func:`loss_gradient`,
:func:`two_layer_ntk`, :func:`kernel_regression_mse`, :func:`train_lazy_rich`, :func:`first_below`.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import torch

from lossbook.ntk import kernel_alignment, kernel_distance

__all__ = ["QuadraticTask", "LazyRichRun", "first_below", "kernel_regression_mse", "loss_gradient", "network",
           "quadratic_task", "train_lazy_rich", "two_layer_ntk"]


class QuadraticTask(NamedTuple):
    """A batch of quadratic single-index regression tasks made by :func:`quadratic_task`.

    Attributes:
        x_train ``(S, P, D)``, y_train ``(S, P)``, x_test ``(S, P_test, D)``, y_test ``(S, P_test)``,
        beta ``(S, D)`` with :math:`\\lVert\\beta\\rVert^2 = D`.
    """

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    beta: torch.Tensor


class LazyRichRun(NamedTuple):
    """What :func:`train_lazy_rich` returns (``B`` runs, ``T`` recorded times).

    Attributes:
        times: the recorded times :math:`\\tau = c \\cdot \\text{step}` ``(T,)``.
        train_loss, test_loss: centred MSE ``(B, T)``.
        alignment: centred kernel--target alignment of the NTK on the probe points ``(B, T')`` (empty when
            ``ntk_every=0``), at ``ntk_times`` ``(T',)``.
        kernel_distance: :func:`lossbook.ntk.kernel_distance` between the NTK and the initial NTK ``(B, T')``.
        beta_overlap: :math:`\\beta^\\top (\\sum_i w_i w_i^\\top) \\beta / (D\\, \\mathrm{tr} \\sum_i w_i w_i^\\top)`, the share
            of the weights' second moment along the target direction ``(B, T')`` (:math:`\\approx 1/D` at init).
        w: the final weights ``(B, N, D)``.
    """

    times: torch.Tensor
    train_loss: torch.Tensor
    test_loss: torch.Tensor
    ntk_times: torch.Tensor
    alignment: torch.Tensor
    kernel_distance: torch.Tensor
    beta_overlap: torch.Tensor
    w: torch.Tensor


def _gen(generator: torch.Generator | int | None) -> torch.Generator | None:
    if generator is None or isinstance(generator, torch.Generator):
        return generator
    return torch.Generator().manual_seed(int(generator))


def quadratic_task(d: int, n_train: int, n_test: int, *, n_tasks: int = 1,
                   generator: torch.Generator | int | None = None,
                   dtype: torch.dtype = torch.float32) -> QuadraticTask:
    r"""Draw ``n_tasks`` tasks :math:`x \sim \mathcal N(0, I_D/D)`, :math:`y = \frac12(\beta\cdot x)^2`, :math:`\lVert\beta\rVert^2 = D`.

    Then :math:`\beta\cdot x \sim \mathcal N(0, 1)`, so :math:`\mathbb E y = \frac12` and :math:`\operatorname{Var} y = \frac12`.
    """
    for name, v in (("d", d), ("n_train", n_train), ("n_test", n_test), ("n_tasks", n_tasks)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    g = _gen(generator)
    beta = torch.randn(n_tasks, d, generator=g, dtype=dtype)
    beta = beta * (d ** 0.5) / beta.norm(dim=-1, keepdim=True)
    x_tr = torch.randn(n_tasks, n_train, d, generator=g, dtype=dtype) / d ** 0.5
    x_te = torch.randn(n_tasks, n_test, d, generator=g, dtype=dtype) / d ** 0.5
    target = lambda x: 0.5 * torch.einsum("spd,sd->sp", x, beta) ** 2  # noqa: E731
    return QuadraticTask(x_tr, target(x_tr), x_te, target(x_te), beta)


def _check_wx(w: torch.Tensor, x: torch.Tensor) -> None:
    if not isinstance(w, torch.Tensor) or w.dim() < 2:
        raise ValueError(f"w must be a (..., N, D) tensor, got {getattr(w, 'shape', type(w).__name__)}")
    if not isinstance(x, torch.Tensor) or x.dim() < 2 or x.shape[-1] != w.shape[-1]:
        raise ValueError(f"x must be a (..., P, D) tensor with D = {w.shape[-1]} as in w, got "
                         f"{getattr(x, 'shape', type(x).__name__)}")


def _alpha(alpha: float | torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    a = torch.as_tensor(alpha, dtype=like.dtype, device=like.device)
    if not bool(torch.isfinite(a).all()) or not bool((a > 0).all()):
        raise ValueError(f"alpha must be positive and finite, got {alpha!r}")
    return a


def network(w: torch.Tensor, x: torch.Tensor, alpha: float | torch.Tensor, eps: float) -> torch.Tensor:
    r"""The network :math:`f(x) = \frac{\alpha}{N}\sum_i \phi(w_i\cdot x)`, :math:`\phi(h) = h + \frac\varepsilon2 h^2`.

    Args:
        w: weights ``(..., N, D)``; x: inputs ``(..., P, D)`` (batch dimensions broadcast).
        alpha: output scale, a positive number or a tensor broadcasting against the batch ``(...)``.
        eps: the activation's quadratic coefficient :math:`\varepsilon`.

    Returns:
        ``(..., P)``.
    """
    _check_wx(w, x)
    a = _alpha(alpha, w)
    h = x @ w.transpose(-1, -2)                                  # (..., P, N)
    return a[..., None] * (h + 0.5 * eps * h * h).mean(-1)


def loss_gradient(w: torch.Tensor, x: torch.Tensor, residual: torch.Tensor, alpha: float | torch.Tensor,
                  eps: float) -> torch.Tensor:
    r"""The gradient of :math:`\frac1P\sum_\mu r_\mu^2` with respect to :math:`W`, given the residuals :math:`r`:

    .. math::
        \frac{\partial \mathcal L}{\partial w_i} = \frac{2\alpha}{PN} \sum_\mu r_\mu\, \phi'(w_i\cdot x_\mu)\, x_\mu,
        \qquad \phi'(h) = 1 + \varepsilon h .

    Shapes: ``w (..., N, D)``, ``x (..., P, D)``, ``residual (..., P)``; returns ``(..., N, D)``.
    """
    _check_wx(w, x)
    a = _alpha(alpha, w)
    n, p = w.shape[-2], x.shape[-2]
    h = w @ x.transpose(-1, -2)                                  # (..., N, P)
    g = ((1.0 + eps * h) * residual[..., None, :]) @ x           # (..., N, D)
    return (2.0 / (p * n)) * a[..., None, None] * g


def two_layer_ntk(w: torch.Tensor, x1: torch.Tensor, x2: torch.Tensor | None = None, *,
                  alpha: float | torch.Tensor = 1.0, eps: float) -> torch.Tensor:
    r"""The network's NTK in closed form, :math:`K(x, x') = \frac{\alpha^2}{N^2}\sum_i \phi'(w_i\cdot x)\phi'(w_i\cdot x')\, x\cdot x'`.

    Shapes: ``w (..., N, D)``, ``x1 (..., P1, D)``, ``x2 (..., P2, D)`` (default ``x1``); returns ``(..., P1, P2)``.
    """
    _check_wx(w, x1)
    x2 = x1 if x2 is None else x2
    _check_wx(w, x2)
    a = _alpha(alpha, w)
    n = w.shape[-2]
    d1 = 1.0 + eps * (x1 @ w.transpose(-1, -2))                  # (..., P1, N)
    d2 = d1 if x2 is x1 else 1.0 + eps * (x2 @ w.transpose(-1, -2))
    return (a[..., None, None] / n) ** 2 * (d1 @ d2.transpose(-1, -2)) * (x1 @ x2.transpose(-1, -2))


def kernel_regression_mse(k_train: torch.Tensor, y_train: torch.Tensor, k_test_train: torch.Tensor,
                          y_test: torch.Tensor, *, ridge: float = 0.0) -> torch.Tensor:
    r"""Test MSE of kernel regression :math:`\hat y(x) = k(x)^\top (K + \lambda I)^{-1} y`: where a lazy network ends.

    Gradient flow on the linearized network (centred, so :math:`f - f_0` starts at 0) converges to this
    interpolant with :math:`\lambda = 0` (when :math:`K` is invertible). Shapes ``(..., P, P)``, ``(..., P)``,
    ``(..., Q, P)``, ``(..., Q)``; returns ``(...)``.
    """
    if ridge < 0:
        raise ValueError(f"ridge must be >= 0, got {ridge!r}")
    p = k_train.shape[-1]
    if k_train.dim() < 2 or k_train.shape[-2] != p or y_train.shape[-1] != p or k_test_train.shape[-1] != p \
            or y_test.shape[-1] != k_test_train.shape[-2]:
        raise ValueError(f"shapes must be k_train (..., P, P), y_train (..., P), k_test_train (..., Q, P), y_test (..., Q); "
                         f"got {tuple(k_train.shape)}, {tuple(y_train.shape)}, {tuple(k_test_train.shape)}, {tuple(y_test.shape)}")
    eye = torch.eye(k_train.shape[-1], dtype=k_train.dtype, device=k_train.device)
    scale = k_train.diagonal(dim1=-2, dim2=-1).mean(-1)[..., None, None]
    coef = torch.linalg.solve(k_train + ridge * scale * eye, y_train.unsqueeze(-1))
    pred = (k_test_train @ coef).squeeze(-1)
    return ((pred - y_test) ** 2).mean(-1)


def first_below(curve: torch.Tensor, times: torch.Tensor, threshold: float | torch.Tensor) -> torch.Tensor:
    r"""The first recorded time at which ``curve`` is below ``threshold`` (``inf`` if never), per row.

    ``curve (..., T)``, ``times (T,)``, ``threshold`` broadcasting against ``(...)``; returns ``(...)``.
    """
    if curve.shape[-1] != times.shape[-1]:
        raise ValueError(f"curve has {curve.shape[-1]} points but times has {times.shape[-1]}")
    thr = torch.as_tensor(threshold, dtype=curve.dtype, device=curve.device)
    below = curve < thr[..., None]
    idx = below.to(torch.int64).argmax(-1)
    t = times.to(device=curve.device, dtype=curve.dtype)[idx]
    return torch.where(below.any(-1), t, torch.full_like(t, float("inf")))


def train_lazy_rich(task: QuadraticTask, alphas: Sequence[float] | torch.Tensor, *, width: int, eps: float,
                    steps: int, lr_scale: float = 1.0, log_every: int = 10, ntk_every: int = 0,
                    ntk_points: int = 128, generator: torch.Generator | int | None = None,
                    w0: torch.Tensor | None = None) -> LazyRichRun:
    r"""Full-batch GD on the centred loss for every (scale, task) pair, as one batched computation.

    Run ``b = k·S + s`` trains task ``s`` at scale ``alphas[k]`` with step :math:`\eta = c N/\alpha_k^2`
    (``c = lr_scale``); all scales of a task start from the same weights :math:`W_0` (drawn :math:`\mathcal N(0, 1)`,
    or ``w0 (S, N, D)``). Time is reported as :math:`\tau = c\cdot\text{step}`, so runs with different ``lr_scale``
    are comparable. Every ``ntk_every`` steps the NTK on the first ``ntk_points`` test inputs is compared with
    the target (:func:`lossbook.ntk.kernel_alignment`) and with the initial NTK
    (:func:`lossbook.ntk.kernel_distance`).
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be a non-negative integer, got {steps!r}")
    if isinstance(width, bool) or not isinstance(width, int) or width < 1:
        raise ValueError(f"width must be a positive integer, got {width!r}")
    if not lr_scale > 0:
        raise ValueError(f"lr_scale must be positive, got {lr_scale!r}")
    if log_every < 1 or ntk_every < 0:
        raise ValueError(f"log_every must be >= 1 and ntk_every >= 0, got {log_every!r}, {ntk_every!r}")
    x, y, xt, yt, beta = task
    dev, dt = x.device, x.dtype
    a = _alpha(torch.as_tensor(alphas, dtype=dt).reshape(-1), x).to(dev)
    S, P, D = x.shape
    if w0 is None:
        w0 = torch.randn(S, width, D, generator=_gen(generator), dtype=dt).to(dev)
    if w0.shape != (S, width, D):
        raise ValueError(f"w0 must have shape {(S, width, D)}, got {tuple(w0.shape)}")
    K = a.numel()
    a_b = a.repeat_interleave(S)                                 # (B,)
    rep = lambda t: t.repeat(K, *([1] * (t.dim() - 1)))         # noqa: E731  (S, ...) -> (K*S, ...)
    x_b, y_b, xt_b, yt_b, beta_b = rep(x), rep(y), rep(xt), rep(yt), rep(beta)
    w = rep(w0).clone()
    f0, ft0 = network(w, x_b, a_b, eps), network(w, xt_b, a_b, eps)
    xp, yp = xt_b[:, :ntk_points], yt_b[:, :ntk_points]
    k0 = two_layer_ntk(w, xp, eps=eps) if ntk_every else None   # alignment and distance are scale-free: alpha=1
    step_size = (2.0 * lr_scale / P) / a_b                       # eta * (2 alpha / (P N)) folded: see loss_gradient
    times, tr, te, ntk_t, al, kd, ov = [], [], [], [], [], [], []
    for step in range(steps + 1):
        h = w @ x_b.transpose(-1, -2)                            # (B, N, P)
        r = a_b[:, None] * (h + 0.5 * eps * h * h).mean(-2) - f0 - y_b
        if step % log_every == 0 or step == steps:
            times.append(step * lr_scale)
            tr.append((r * r).mean(-1))
            te.append(((network(w, xt_b, a_b, eps) - ft0 - yt_b) ** 2).mean(-1))
        if ntk_every and (step % ntk_every == 0 or step == steps):
            k = two_layer_ntk(w, xp, eps=eps)
            ntk_t.append(step * lr_scale)
            al.append(kernel_alignment(k, yp))
            kd.append(kernel_distance(k, k0))
            q = w.transpose(-1, -2) @ w                          # sum_i w_i w_i^T  (B, D, D)
            ov.append(torch.einsum("bd,bde,be->b", beta_b, q, beta_b)
                      / (D * q.diagonal(dim1=-2, dim2=-1).sum(-1)))
        if step < steps:
            w = w - step_size[:, None, None] * (((1.0 + eps * h) * r[:, None, :]) @ x_b)
    stack = lambda v: torch.stack(v, -1) if v else torch.empty(len(a_b), 0, dtype=dt, device=dev)  # noqa: E731
    return LazyRichRun(torch.tensor(times, dtype=dt), stack(tr), stack(te), torch.tensor(ntk_t, dtype=dt),
                       stack(al), stack(kd), stack(ov), w)
