r"""Discriminative vs. generative linear heads: Gaussian naive Bayes against multiclass logistic
regression, on fixed features {cite}`zheng2023revisiting`.

Both classifiers are *linear heads*: they score class :math:`k` by
:math:`f_k(x) = w_k^\top x + b_k` and predict :math:`\arg\max_k f_k(x)`. They differ in how the
:math:`K(n + 1)` numbers are estimated from :math:`m` labelled points in :math:`\mathbb R^n`:

* **Gaussian naive Bayes** (generative; class-conditional Gaussians with a diagonal covariance
  shared by the classes) fits class priors :math:`\hat\pi_k`, class means :math:`\hat\mu_k` and one
  pooled within-class variance :math:`\hat\sigma_j^2` per feature in closed form, then

  .. math::
      w_{kj} = \frac{\hat\mu_{kj}}{\hat\sigma_j^2}, \qquad
      b_k = \log\hat\pi_k - \sum_{j=1}^n \frac{\hat\mu_{kj}^2}{2\hat\sigma_j^2};

* **multiclass logistic regression** (discriminative) minimises the regularised empirical
  cross-entropy, with scikit-learn's convention for the penalty weight :math:`C`:

  .. math::
      \min_{W, b}\; \frac1m \sum_{i=1}^m \Big[\log \sum_{k} e^{w_k^\top x_i + b_k}
      - w_{y_i}^\top x_i - b_{y_i}\Big] + \frac{1}{2 C m}\, \lVert W \rVert_F^2 .

Everything is batched: the leading dimensions of ``x`` index independent problems (seeds,
training-set sizes), fitted together in one call. Public functions: :func:`gaussian_nb_fit`,
:func:`logistic_regression_fit`, :func:`linear_logits`, :func:`error_rate`,
:func:`paper_gaussian_mixture`, :func:`bayes_error_collinear` and :func:`samples_to_reach`.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import numpy as np
import torch

__all__ = ["LinearHead", "NBParams", "bayes_error_collinear", "error_rate", "gaussian_nb_fit",
           "gaussian_nb_params", "linear_logits", "logistic_regression_fit", "paper_gaussian_mixture",
           "samples_to_reach"]


class LinearHead(NamedTuple):
    """A batch of linear classifiers: ``weight`` (..., n, K) and ``bias`` (..., K)."""

    weight: torch.Tensor
    bias: torch.Tensor


class NBParams(NamedTuple):
    """Fitted Gaussian naive Bayes: ``prior`` (..., K), ``mean`` (..., K, n), shared ``var`` (..., n)."""

    prior: torch.Tensor
    mean: torch.Tensor
    var: torch.Tensor


def _check_xy(x: torch.Tensor, y: torch.Tensor, n_classes: int,
              weight: torch.Tensor | None) -> torch.Tensor:
    """Validate a batch of problems and return the sample weights (ones where none are given)."""
    if isinstance(n_classes, bool) or not isinstance(n_classes, int) or n_classes < 2:
        raise ValueError(f"n_classes must be an integer >= 2, got {n_classes!r}")
    if not x.is_floating_point():
        raise ValueError(f"x must be a floating-point tensor, got dtype {x.dtype}")
    if x.dim() < 2:
        raise ValueError(f"x must have shape (..., m, n), got {tuple(x.shape)}")
    if y.shape != x.shape[:-1]:
        raise ValueError(f"y must have shape {tuple(x.shape[:-1])} (that of x without its last "
                         f"dimension), got {tuple(y.shape)}")
    if y.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        raise ValueError(f"y must hold integer class labels, got dtype {y.dtype}")
    if y.device.type == "cpu" and y.numel() and (int(y.min()) < 0 or int(y.max()) >= n_classes):
        raise ValueError(f"y must hold labels in [0, {n_classes}), got values in "
                         f"[{int(y.min())}, {int(y.max())}]")
    if weight is None:
        return torch.ones(y.shape, dtype=x.dtype, device=x.device)
    if weight.shape != y.shape:
        raise ValueError(f"weight must have the shape of y {tuple(y.shape)}, got {tuple(weight.shape)}")
    if weight.device.type == "cpu" and bool((weight < 0).any()):
        raise ValueError("weight must be non-negative")
    return weight.to(x.dtype)


def gaussian_nb_params(x: torch.Tensor, y: torch.Tensor, n_classes: int, *,
                       weight: torch.Tensor | None = None, var_smoothing: float = 1e-9) -> NBParams:
    r"""Maximum-likelihood Gaussian naive Bayes with a diagonal covariance shared by the classes.

    .. math::
        \hat\pi_k = \frac{m_k}{m}, \qquad \hat\mu_k = \frac{1}{m_k} \sum_{i: y_i = k} x_i, \qquad
        \hat\sigma_j^2 = \frac1m \sum_{i=1}^m (x_{ij} - \hat\mu_{y_i j})^2
        + \epsilon \max_l \widehat{\operatorname{Var}}(x_l) ,

    the pooled within-class variance, which equals :math:`\sum_k \hat\pi_k \hat\sigma_{kj}^2`, the
    prior-weighted average of the per-class variances (how the authors' code pools them).

    Args:
        x: features, shape ``(..., m, n)``; leading dimensions index independent problems.
        y: labels in ``[0, n_classes)``, shape ``(..., m)``.
        n_classes: :math:`K`.
        weight: optional non-negative sample weights ``(..., m)``; 0 drops a point (use it to pad
            problems of different sizes into one batch), integers repeat it.
        var_smoothing: :math:`\epsilon`, added to every variance as a fraction of the largest
            total (not within-class) feature variance, scikit-learn's convention: a feature
            constant within the classes cannot get a zero variance, and with one point per class
            (all within-class variances 0) naive Bayes becomes the nearest-class-mean rule.

    Returns:
        :class:`NBParams`. A class absent from a problem gets prior 0 (so it is never predicted)
        and mean 0.
    """
    w = _check_xy(x, y, n_classes, weight)
    if not (isinstance(var_smoothing, (int, float)) and math.isfinite(var_smoothing) and var_smoothing >= 0):
        raise ValueError(f"var_smoothing must be a finite number >= 0, got {var_smoothing!r}")
    onehot = torch.nn.functional.one_hot(y.long(), n_classes).to(x.dtype) * w.unsqueeze(-1)   # (..., m, K)
    counts = onehot.sum(-2)                                                                  # (..., K)
    total = counts.sum(-1, keepdim=True)
    mean = onehot.transpose(-1, -2) @ x / counts.clamp(min=torch.finfo(x.dtype).tiny).unsqueeze(-1)
    resid = x - torch.gather(mean, -2, y.long().unsqueeze(-1).expand(*y.shape, x.shape[-1]))
    var = (w.unsqueeze(-1) * resid.square()).sum(-2) / total
    spread = (w.unsqueeze(-1) * (x - (w.unsqueeze(-1) * x).sum(-2, keepdim=True) / total.unsqueeze(-1)).square()
              ).sum(-2) / total                                             # total (not within-class) variance
    var = (var + var_smoothing * spread.amax(-1, keepdim=True)).clamp(min=torch.finfo(x.dtype).tiny)
    return NBParams(counts / total, mean, var)


def gaussian_nb_fit(x: torch.Tensor, y: torch.Tensor, n_classes: int, *,
                    weight: torch.Tensor | None = None, var_smoothing: float = 1e-9) -> LinearHead:
    r"""Fit Gaussian naive Bayes (shared diagonal covariance) in closed form; return its linear head.

    With :class:`NBParams` from :func:`gaussian_nb_params`, the log-posterior of class :math:`k` is,
    up to a term common to all classes,

    .. math::
        \log\hat\pi_k - \sum_j \frac{(x_j - \hat\mu_{kj})^2}{2\hat\sigma_j^2}
        = \sum_j \frac{\hat\mu_{kj}}{\hat\sigma_j^2} x_j
        + \Big(\log\hat\pi_k - \sum_j \frac{\hat\mu_{kj}^2}{2\hat\sigma_j^2}\Big) + \text{const},

    so naive Bayes is the linear head :math:`w_{kj} = \hat\mu_{kj} / \hat\sigma_j^2`,
    :math:`b_k = \log\hat\pi_k - \sum_j \hat\mu_{kj}^2 / (2\hat\sigma_j^2)`, in the same hypothesis
    class as logistic regression. Arguments as for :func:`gaussian_nb_params`.

    Example::

        >>> x, y = torch.randn(2, 40, 3), torch.arange(40).remainder(2).expand(2, 40)
        >>> head = gaussian_nb_fit(x, y, 2)      # two problems fitted at once
        >>> head.weight.shape, head.bias.shape
        (torch.Size([2, 3, 2]), torch.Size([2, 2]))
    """
    p = gaussian_nb_params(x, y, n_classes, weight=weight, var_smoothing=var_smoothing)
    scaled = p.mean / p.var.unsqueeze(-2)                                   # (..., K, n)
    bias = torch.log(p.prior) - 0.5 * (scaled * p.mean).sum(-1)            # log 0 = -inf: never predicted
    return LinearHead(scaled.transpose(-1, -2), bias)


def linear_logits(head: LinearHead, x: torch.Tensor) -> torch.Tensor:
    """Scores ``x @ weight + bias``: ``x`` (..., N, n) with the batch dimensions of the head (or
    broadcastable to them, e.g. one shared test set ``(N, n)``); returns (..., N, K)."""
    if x.shape[-1] != head.weight.shape[-2]:
        raise ValueError(f"x must have {head.weight.shape[-2]} features (last dimension), got {x.shape[-1]}")
    return x.to(head.weight.dtype) @ head.weight + head.bias.unsqueeze(-2)


def error_rate(head: LinearHead, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Test 0-1 error of each classifier of the batch: ``x`` (..., N, n), ``y`` (..., N) -> (...)."""
    return (linear_logits(head, x).argmax(-1) != y).to(head.weight.dtype).mean(-1)


def _batched_lbfgs(fun, theta: torch.Tensor, *, max_iter: int, tol: float, history: int = 10,
                   c1: float = 1e-4, max_backtrack: int = 40) -> torch.Tensor:
    r"""Minimise ``B`` independent smooth functions at once: ``fun`` maps ``(B, P)`` to ``(B,)``.

    Each row keeps its own L-BFGS memory, its own step length (Armijo backtracking from 1) and
    its own stopping test (:math:`\lVert \nabla f_b \rVert_\infty <` ``tol``), so one badly
    conditioned problem neither slows the line search of the others nor stops early. A row whose
    line search fails forgets its memory and restarts from a short gradient step; it stops only
    if that fails too. All rows advance in the same tensor operations; a finished row is frozen.
    """
    B, P = theta.shape
    S = theta.new_zeros(history, B, P)
    Y = theta.new_zeros(history, B, P)
    rho = theta.new_zeros(history, B)

    def value_grad(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.enable_grad():
            t = t.detach().requires_grad_(True)
            f = fun(t)
            (g,) = torch.autograd.grad(f.sum(), t)
        return f.detach(), g

    f, g = value_grad(theta)
    active = g.abs().amax(-1) >= tol
    restarted = torch.ones_like(active)                                     # the first step is a fresh start
    for it in range(max_iter):
        if not bool(active.any()):
            break
        # two-loop recursion, vectorised over rows (empty memory slots have rho = 0)
        q = -g
        alpha = theta.new_zeros(history, B)
        order = [(it - 1 - j) % history for j in range(min(it, history))]
        for i in order:
            alpha[i] = rho[i] * (S[i] * q).sum(-1)
            q = q - alpha[i, :, None] * Y[i]
        cautious = 1.0 / g.abs().sum(-1).clamp(min=1.0)                     # step for a row without memory
        if order:
            i = order[0]
            yy = (Y[i] * Y[i]).sum(-1)
            gamma = torch.where((rho[i] > 0) & (yy > 0), 1.0 / (rho[i] * yy).clamp(min=1e-300), cautious)
        else:
            gamma = cautious
        d = gamma[:, None] * q
        for i in reversed(order):
            beta = rho[i] * (Y[i] * d).sum(-1)
            d = d + (alpha[i] - beta)[:, None] * S[i]
        slope = (g * d).sum(-1)
        bad = slope >= 0                                                    # not a descent direction
        d = torch.where(bad[:, None], -g, d)
        slope = torch.where(bad, -(g * g).sum(-1), slope)
        d = d * active[:, None]
        # Armijo backtracking, each row with its own step
        step = theta.new_ones(B)
        todo = active.clone()
        new_f, new_g, new_theta = f.clone(), g.clone(), theta.clone()
        for _ in range(max_backtrack):
            cand = theta + step[:, None] * d
            fc, gc = value_grad(cand)
            ok = todo & torch.isfinite(fc) & (fc <= f + c1 * step * slope)
            new_theta = torch.where(ok[:, None], cand, new_theta)
            new_f = torch.where(ok, fc, new_f)
            new_g = torch.where(ok[:, None], gc, new_g)
            todo = todo & ~ok
            if not bool(todo.any()):
                break
            step = torch.where(todo, step * 0.5, step)
        moved = active & ~todo                                              # rows that found a step
        failed = active & todo
        if bool(failed.any()):                                              # forget their memory, retry
            rho[:, failed] = 0.0
            S[:, failed] = 0.0
            Y[:, failed] = 0.0
        s_vec, y_vec = new_theta - theta, new_g - g
        sy = (s_vec * y_vec).sum(-1)
        slot = it % history
        keep = moved & (sy > 1e-12 * (y_vec * y_vec).sum(-1).sqrt() * (s_vec * s_vec).sum(-1).sqrt())
        S[slot] = torch.where(keep[:, None], s_vec, 0.0)
        Y[slot] = torch.where(keep[:, None], y_vec, 0.0)
        rho[slot] = torch.where(keep, 1.0 / sy.clamp(min=1e-300), 0.0)
        theta, f, g = new_theta, new_f, new_g
        stuck = failed & restarted                                          # failed even on a fresh start
        restarted = failed
        active = active & ~stuck & (g.abs().amax(-1) >= tol)
    return theta.detach()


def logistic_regression_fit(x: torch.Tensor, y: torch.Tensor, n_classes: int, *,
                            weight: torch.Tensor | None = None, C: float = 1.0, max_iter: int = 1000,
                            tol: float = 1e-5) -> LinearHead:
    r"""Multiclass (softmax) logistic regression with an L2 penalty, by full-batch L-BFGS.

    Minimises, for each problem of the batch independently,

    .. math::
        \frac{1}{\sum_i u_i} \sum_{i=1}^m u_i \Big[\log \sum_{k} e^{w_k^\top x_i + b_k}
        - w_{y_i}^\top x_i - b_{y_i}\Big] + \frac{1}{2 C \sum_i u_i} \lVert W \rVert_F^2 ,

    with sample weights :math:`u_i` (1 by default): scikit-learn's
    ``LogisticRegression(C=C)`` objective divided by :math:`C \sum_i u_i` (the bias is not
    penalised). The problems are independent, so their objectives are summed and minimised
    jointly by one L-BFGS run. Internally each problem's features are centred and scaled by its
    own weighted mean and standard deviation (the penalty is rescaled to match, so the minimiser
    is unchanged): this only improves the conditioning.

    Args:
        x: features ``(..., m, n)``; y: labels ``(..., m)``; weight: optional ``(..., m)``.
        n_classes: :math:`K`.
        C: inverse penalty strength (``math.inf``: no penalty; then the minimiser need not exist
            on separable data and the result is wherever L-BFGS stops).
        max_iter: L-BFGS iterations; tol: stop when every gradient entry is below ``tol``.

    Returns:
        :class:`LinearHead` in the original feature coordinates.

    Example::

        >>> x = torch.randn(3, 50, 4, dtype=torch.float64)
        >>> y = (x[..., 0] > 0).long()
        >>> head = logistic_regression_fit(x, y, 2, C=10.0)
        >>> bool((error_rate(head, x, y) < 0.2).all())
        True
    """
    w = _check_xy(x, y, n_classes, weight)
    if not (isinstance(C, (int, float)) and not isinstance(C, bool) and C > 0 and not math.isnan(C)):
        raise ValueError(f"C must be a positive number (math.inf for no penalty), got {C!r}")
    if not (isinstance(max_iter, int) and max_iter >= 1):
        raise ValueError(f"max_iter must be a positive integer, got {max_iter!r}")
    batch, (m, n), K = x.shape[:-2], x.shape[-2:], n_classes
    x, y, w = x.reshape(-1, m, n), y.reshape(-1, m).long(), w.reshape(-1, m)
    total = w.sum(-1, keepdim=True)                                         # (B, 1)
    if bool((total <= 0).any()):
        raise ValueError("every problem needs at least one point of positive weight")
    u = w / total                                                           # weights summing to 1
    center = (u.unsqueeze(-1) * x).sum(-2, keepdim=True)                    # (B, 1, n)
    scale = (u.unsqueeze(-1) * (x - center).square()).sum(-2, keepdim=True).sqrt()   # (B, 1, n)
    # a feature (nearly) constant in a problem gets weight 0: it cannot change the loss, and the
    # penalty would be minimised there; dropping it keeps the rescaled problem well conditioned
    varies = scale > 1e-8 * scale.amax(-1, keepdim=True).clamp(min=torch.finfo(x.dtype).tiny)
    scale = torch.where(varies, scale, torch.ones_like(scale))
    z = torch.where(varies, (x - center) / scale, torch.zeros_like(x))
    # penalty on the original weights W = V / scale: sum_jk V_jk^2 / scale_j^2
    strength = 0.0 if math.isinf(C) else 1.0 / (2.0 * C)
    pen = strength / total.unsqueeze(-1) / scale.transpose(-1, -2).square()  # (B, n, 1)
    onehot = torch.nn.functional.one_hot(y, K).to(x.dtype)

    def objective(theta: torch.Tensor) -> torch.Tensor:                     # (B, (n + 1) K) -> (B,)
        V, c = theta[:, : n * K].view(-1, n, K), theta[:, n * K:].view(-1, 1, K)
        logits = z @ V + c                                                  # (B, m, K)
        nll = torch.logsumexp(logits, -1) - (logits * onehot).sum(-1)      # (B, m)
        return (u * nll).sum(-1) + (pen * V.square()).sum((-1, -2))

    theta = _batched_lbfgs(objective, torch.zeros(x.shape[0], (n + 1) * K, dtype=x.dtype, device=x.device),
                           max_iter=max_iter, tol=tol)
    V, c = theta[:, : n * K].view(-1, n, K), theta[:, n * K:].view(-1, 1, K)
    W = V / scale.transpose(-1, -2)                                         # (B, n, K)
    b = c.squeeze(-2) - (center @ W).squeeze(-2)                            # (B, K)
    return LinearHead(W.reshape(*batch, n, K), b.reshape(*batch, K))


def paper_gaussian_mixture(n: int, n_classes: int, m_per_class: int, *, batch: int = 1,
                           generator: torch.Generator | None = None, dtype: torch.dtype = torch.float32,
                           device: str | torch.device = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    r"""The authors' simulation: :math:`K` Gaussian classes in :math:`\mathbb R^n` whose means all
    lie on the diagonal, with a diagonal covariance shared by the classes.

    Class :math:`k` has mean :math:`a_k \mathbf 1` with :math:`a_0 = -1`, :math:`a_k = 2^{k-1}`
    (:math:`k \ge 1`), and covariance :math:`\operatorname{diag}(n, \dots, n, 1, \dots, 1)`
    (the first :math:`\lfloor n/2 \rfloor` features have variance :math:`n`). For :math:`K > 2`
    every feature is then mapped by :math:`x \mapsto (x - s)/s`, :math:`s = 2^{K-3}`, as the
    authors' data loader does. Every feature carries signal, but half of them are noisy: the
    whitening that naive Bayes estimates feature by feature is what makes the problem easy.

    Returns ``x`` of shape ``(batch, K * m_per_class, n)`` and ``y`` ``(batch, K * m_per_class)``,
    ``m_per_class`` points of each class in class order (balanced; shuffle if order matters).
    """
    if n < 2 or n_classes < 2 or m_per_class < 1 or batch < 1:
        raise ValueError(f"need n >= 2, n_classes >= 2, m_per_class >= 1, batch >= 1; got "
                         f"n={n}, n_classes={n_classes}, m_per_class={m_per_class}, batch={batch}")
    a = torch.tensor([-1.0] + [2.0 ** (k - 1) for k in range(1, n_classes)], dtype=torch.float64)
    std = torch.ones(n, dtype=torch.float64)
    std[: n // 2] = math.sqrt(n)
    where = generator.device if generator is not None else torch.device(device)   # draw where the generator lives
    a, std = a.to(where), std.to(where)
    y = torch.arange(n_classes, device=where).repeat_interleave(m_per_class)
    noise = torch.randn(batch, len(y), n, generator=generator, dtype=torch.float64, device=where)
    x = a[y].unsqueeze(-1) + noise * std
    if n_classes > 2:
        s = 2.0 ** (n_classes - 3)
        x = (x - s) / s
    return x.to(device=device, dtype=dtype), y.expand(batch, -1).to(device)


def bayes_error_collinear(n: int, n_classes: int) -> float:
    r"""Exact Bayes error of :func:`paper_gaussian_mixture` (equal priors).

    All means lie on the line :math:`a_k \mathbf 1` and the covariance :math:`\Sigma` is shared, so
    the Bayes rule depends on :math:`x` only through
    :math:`t = \mathbf 1^\top \Sigma^{-1} x / \rho`, :math:`\rho^2 = \mathbf 1^\top \Sigma^{-1} \mathbf 1
    = \lfloor n/2 \rfloor / n + \lceil n/2 \rceil`, which is :math:`\mathcal N(a_k \rho, 1)` in class
    :math:`k`: a one-dimensional problem, decided by the nearest centre :math:`a_k \rho`. With the
    centres sorted and :math:`d_k` the gaps between neighbours,

    .. math::
        \text{error} = \frac1K \sum_{\text{gaps}} 2\,\Phi\!\big(-\tfrac{d}{2}\big).

    (The affine map applied for :math:`K > 2` changes nothing: it is the same for every class.)
    """
    if n < 2 or n_classes < 2:
        raise ValueError(f"need n >= 2 and n_classes >= 2, got n={n}, n_classes={n_classes}")
    rho = math.sqrt((n // 2) / n + (n - n // 2))
    a = sorted([-1.0] + [2.0 ** (k - 1) for k in range(1, n_classes)])
    gaps = [rho * (a[i + 1] - a[i]) for i in range(n_classes - 1)]
    return sum(math.erfc(d / 2 / math.sqrt(2)) for d in gaps) / n_classes   # 2 Phi(-d/2) = erfc(d / (2 sqrt 2))


def samples_to_reach(sizes: Sequence[float], errors: Sequence[float] | np.ndarray, target: float) -> float:
    r"""The training-set size at which a learning curve comes down to ``target`` for good.

    ``errors`` is the (mean) test error at each of the increasing ``sizes``. Returns the smallest
    size :math:`m` such that the error is :math:`\le` ``target`` at :math:`m` and at every larger
    size of the grid, interpolated linearly in :math:`\log m` between that size and the one before
    it (so the answer does not jump by a whole grid step). ``inf`` if the last point is still above
    ``target``.
    """
    m = np.asarray(sizes, dtype=float)
    e = np.asarray(errors, dtype=float)
    if m.ndim != 1 or e.shape != m.shape or len(m) == 0:
        raise ValueError(f"sizes and errors must be 1-D of the same length, got {m.shape} and {e.shape}")
    if np.any(np.diff(m) <= 0) or m[0] <= 0:
        raise ValueError("sizes must be positive and strictly increasing")
    above = np.nonzero(e > target)[0]
    if len(above) == 0:
        return float(m[0])
    i = int(above[-1])
    if i == len(m) - 1:
        return math.inf
    lo, hi = math.log(m[i]), math.log(m[i + 1])
    frac = (e[i] - target) / (e[i] - e[i + 1])
    return float(math.exp(lo + frac * (hi - lo)))
