r"""Neural collapse in deep linear unconstrained-feature models {cite}`dang2023neural`.

The *neural collapse* measures NC1–NC3, usable on the features and classifier of any network, and
the closed-form global minimiser of the bias-free deep linear unconstrained-feature model (UFM)
with mean-squared error and weight decay, for balanced and imbalanced classes:

.. math::
    \min_{W_M,\dots,W_1,H}\ \frac1{2N}\,\|W_M\cdots W_1 H - Y\|_F^2
    + \frac{\lambda_W}{2}\sum_{m=1}^M \|W_m\|_F^2 + \frac{\lambda_H}{2}\|H\|_F^2 .

Conventions (PyTorch's, not the paper's): features are *rows*, ``H`` of shape ``(N, d)``; a
classifier is ``(K, d)`` like ``nn.Linear.weight``; labels are integers in ``[0, K)``. Every
function accepts leading batch dimensions (e.g. one run per seed) unless it says otherwise.

Example::

    >>> geo = ufm_geometry([200, 100, 50, 10], depth=1, lam_w=1e-2, lam_h=1e-2)
    >>> geo.collapsed.tolist()
    [False, False, False, True]
"""
from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple, Sequence

import torch

__all__ = ["UFMGeometry", "class_means", "deep_ufm_grads", "deep_ufm_loss", "gram_distance",
           "init_deep_ufm", "nc1", "nc3", "normalized_distance", "simplex_etf_gram", "train_deep_ufm", "ufm_geometry"]


# ----------------------------------------------------------------------------- NC measures
def _check_features_labels(features: torch.Tensor, labels: torch.Tensor, n_classes: int | None) -> int:
    if not isinstance(features, torch.Tensor) or features.dim() < 2:
        raise ValueError(f"features must be a tensor of shape (..., N, d), got {getattr(features, 'shape', features)}")
    if not torch.is_floating_point(features):
        raise ValueError(f"features must be floating point, got {features.dtype}")
    if not isinstance(labels, torch.Tensor) or labels.dim() != 1 or labels.shape[0] != features.shape[-2]:
        raise ValueError(f"labels must be a 1-d integer tensor of length N={features.shape[-2]}, "
                         f"got {getattr(labels, 'shape', labels)}")
    if labels.dtype in (torch.bool,) or torch.is_floating_point(labels) or torch.is_complex(labels):
        raise ValueError(f"labels must be integers, got {labels.dtype}")
    K = int(labels.max()) + 1 if n_classes is None else int(n_classes)
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= K):
        raise ValueError(f"labels must lie in [0, n_classes={K}), got range [{int(labels.min())}, {int(labels.max())}]")
    return K


def class_means(features: torch.Tensor, labels: torch.Tensor, n_classes: int | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Class means :math:`\mu_k = \frac1{n_k}\sum_{i: y_i = k} h_i` and class sizes :math:`n_k`.

    Args:
        features: ``(..., N, d)``, one feature vector per row.
        labels: ``(N,)`` integers in ``[0, K)`` (shared by every batch entry).
        n_classes: ``K`` (default: ``labels.max() + 1``).

    Returns:
        ``(means, counts)``: ``(..., K, d)`` and ``(K,)``; the mean of an empty class is 0.
    """
    K = _check_features_labels(features, labels, n_classes)
    onehot = torch.nn.functional.one_hot(labels.to(features.device), K).to(features.dtype)   # (N, K)
    counts = onehot.sum(0)
    means = onehot.T @ features / counts.clamp(min=1).unsqueeze(-1)                         # (..., K, d)
    return means, counts


def nc1(features: torch.Tensor, labels: torch.Tensor, n_classes: int | None = None, *,
        rtol: float | None = None) -> torch.Tensor:
    r"""NC1, within-class variability relative to between-class variability (Papyan et al.):

    .. math::
        \mathrm{NC1} = \frac1K\,\mathrm{tr}\big(\Sigma_W \Sigma_B^{\dagger}\big),\quad
        \Sigma_W = \frac1N\sum_{i}(h_i-\mu_{y_i})(h_i-\mu_{y_i})^\top,\quad
        \Sigma_B = \frac1K\sum_k(\mu_k-\mu_G)(\mu_k-\mu_G)^\top,

    with :math:`\mu_G` the mean of all :math:`N` features. It is 0 exactly when every feature equals
    its class mean. The pseudo-inverse drops singular values of :math:`\Sigma_B` below
    ``rtol`` times the largest (default :math:`\sqrt{\varepsilon}` of the dtype: :math:`\Sigma_B`
    has rank at most :math:`K-1`, so a round-off level must not be inverted).

    Args:
        features: ``(..., N, d)``; labels: ``(N,)``; n_classes: ``K``.

    Returns:
        a tensor of shape ``(...)``.
    """
    K = _check_features_labels(features, labels, n_classes)
    means, _ = class_means(features, labels, K)
    centred = features - means[..., labels.to(features.device), :]                 # h_i - mu_{y_i}
    N = features.shape[-2]
    sigma_w = centred.transpose(-1, -2) @ centred / N                             # (..., d, d)
    mu_g = features.mean(-2, keepdim=True)
    b = means - mu_g                                                              # (..., K, d)
    if rtol is None:
        rtol = torch.finfo(features.dtype).eps ** 0.5
    b_pinv = torch.linalg.pinv(b.transpose(-1, -2) / math.sqrt(K), rtol=rtol)      # (..., K, d)
    # Sigma_B = B B^T with B = b^T / sqrt(K), so Sigma_B^+ = (B^+)^T B^+ and tr(S_W S_B^+) = tr(B^+ S_W B^+^T)
    return (b_pinv @ sigma_w * b_pinv).sum((-1, -2)) / K


def simplex_etf_gram(n_classes: int, *, dtype: torch.dtype = torch.float64,
                     device: torch.device | str | None = None) -> torch.Tensor:
    r"""The Gram matrix of a simplex equiangular tight frame, :math:`I_K - \frac1K \mathbf 1\mathbf 1^\top`
    (unit-free: compare with :func:`gram_distance`, which normalises both sides)."""
    if not isinstance(n_classes, int) or n_classes < 2:
        raise ValueError(f"n_classes must be an integer >= 2, got {n_classes!r}")
    eye = torch.eye(n_classes, dtype=dtype, device=device)
    return eye - 1.0 / n_classes


def normalized_distance(matrix: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    r"""Scale-free distance of a ``(..., K, K)`` matrix to a ``(K, K)`` target,
    :math:`\| A/\|A\|_F - T/\|T\|_F \|_F \in [0, 2]`, where a zero matrix stays zero when
    normalised (so a zero ``A`` is at distance 1 from a non-zero target, and at 0 from a zero one:
    every class collapsed).

    Used for NC2 (:func:`gram_distance`) and for the generalised NC3 of the imbalanced case, where
    the logits of the class means :math:`W\bar H^\top` should be diagonal with entries
    :attr:`UFMGeometry.logit_diag`.
    """
    if not isinstance(matrix, torch.Tensor) or matrix.dim() < 2 or matrix.shape[-1] != matrix.shape[-2]:
        raise ValueError(f"matrix must be a tensor of shape (..., K, K), got {getattr(matrix, 'shape', matrix)}")
    K = matrix.shape[-1]
    if not isinstance(target, torch.Tensor) or target.shape != (K, K):
        raise ValueError(f"target must be a ({K}, {K}) tensor, got {getattr(target, 'shape', target)}")

    def unit(a: torch.Tensor) -> torch.Tensor:
        return a / torch.linalg.matrix_norm(a).clamp(min=torch.finfo(a.dtype).tiny).unsqueeze(-1).unsqueeze(-1)

    return torch.linalg.matrix_norm(unit(matrix) - unit(target.to(device=matrix.device, dtype=matrix.dtype)))


def gram_distance(vectors: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    r"""NC2-style distance of the Gram matrix of ``vectors`` (rows) to a target geometry:

    .. math::
        \Big\| \frac{VV^\top}{\|VV^\top\|_F} - \frac{T}{\|T\|_F} \Big\|_F \in [0, 2].

    Scale-free, so it compares shapes (angles and length *ratios*), not sizes. With ``T`` the
    identity it measures distance to an orthogonal frame of equal lengths; with
    :func:`simplex_etf_gram` to a simplex ETF; with :attr:`UFMGeometry.mean_gram` to the
    imbalanced-class geometry.

    Args:
        vectors: ``(..., K, d)`` (class means, classifier rows).
        target: ``(K, K)``, symmetric.

    Returns:
        a tensor of shape ``(...)``.
    """
    if not isinstance(vectors, torch.Tensor) or vectors.dim() < 2:
        raise ValueError(f"vectors must be a tensor of shape (..., K, d), got {getattr(vectors, 'shape', vectors)}")
    return normalized_distance(vectors @ vectors.transpose(-1, -2), target)


def nc3(classifier: torch.Tensor, means: torch.Tensor) -> torch.Tensor:
    r"""NC3, self-duality of classifier and class means (Papyan et al.):

    .. math::
        \mathrm{NC3} = \Big\| \frac{W}{\|W\|_F} - \frac{\bar H}{\|\bar H\|_F} \Big\|_F ,

    with :math:`W` the ``(K, d)`` classifier and :math:`\bar H` the ``(K, d)`` class means (rows).
    0 for the balanced collapse; under imbalance the theory predicts :math:`w_k \parallel \mu_k`
    with class-dependent ratios, so NC3 stays positive there (see :attr:`UFMGeometry.logit_diag`).
    """
    if not isinstance(classifier, torch.Tensor) or not isinstance(means, torch.Tensor) or classifier.dim() < 2:
        raise ValueError("classifier and means must be tensors of shape (..., K, d)")
    if classifier.shape[-2:] != means.shape[-2:]:
        raise ValueError(f"classifier and means must have the same (K, d), got {tuple(classifier.shape)} "
                         f"and {tuple(means.shape)}")

    def unit(a: torch.Tensor) -> torch.Tensor:
        return a / torch.linalg.matrix_norm(a).clamp(min=torch.finfo(a.dtype).tiny).unsqueeze(-1).unsqueeze(-1)

    return torch.linalg.matrix_norm(unit(classifier) - unit(means))


# ----------------------------------------------------------------------------- closed form
class UFMGeometry(NamedTuple):
    r"""The global minimiser of the bias-free deep linear UFM with MSE (:func:`ufm_geometry`).

    All entries are per class, shape ``(K,)``, except the two Gram matrices ``(K, K)``.

    Attributes:
        x: the root :math:`x_k^*` of the scalar equation (0 for a collapsed class).
        layer_sv: :math:`s_k`, the singular value of every layer :math:`W_m` along class ``k``'s
            direction, :math:`s_k^{2M} = N\lambda_H x_k^M`.
        classifier_norms_sq: :math:`\|w_k\|^2 = s_k^{2M}`, row ``k`` of :math:`W_M\cdots W_1`.
        mean_norms_sq: :math:`\|\mu_k\|^2 = s_k^{2M}/(s_k^{2M}+N\lambda_H)^2`, the class mean.
        logit_diag: :math:`w_k^\top\mu_k = s_k^{2M}/(s_k^{2M}+N\lambda_H)`, the class's own logit.
        collapsed: ``True`` where the class collapses to 0 (minority collapse).
        classifier_gram: :math:`\mathrm{diag}(\|w_k\|^2)`; mean_gram: :math:`\mathrm{diag}(\|\mu_k\|^2)`.
        loss: the global minimum of the objective (a 0-d tensor),
            :math:`\sum_k \frac{n_k\lambda_H}{2(s_k^{2M}+N\lambda_H)} + \frac{M\lambda_W}{2}\sum_k s_k^2`.
    """

    x: torch.Tensor
    layer_sv: torch.Tensor
    classifier_norms_sq: torch.Tensor
    mean_norms_sq: torch.Tensor
    logit_diag: torch.Tensor
    collapsed: torch.Tensor
    classifier_gram: torch.Tensor
    mean_gram: torch.Tensor
    loss: torch.Tensor


def ufm_geometry(n_per_class: Sequence[int] | torch.Tensor, depth: int, lam_w: float, lam_h: float, *,
                 root: str = "global", dtype: torch.dtype = torch.float64, iters: int = 200) -> UFMGeometry:
    r"""Closed-form global minimiser of the bias-free deep linear UFM with MSE {cite}`dang2023neural`.

    With :math:`N=\sum_k n_k`, :math:`M` = ``depth`` linear layers sharing :math:`\lambda_W`, and
    widths at least :math:`K`, every global minimiser has :math:`h_i = \mu_{y_i}` (NC1),
    orthogonal class means and orthogonal classifier rows (NC2), :math:`w_k\parallel\mu_k` (NC3), with
    lengths fixed per class by :math:`x_k^*`, the minimiser over :math:`x\ge0` of

    .. math::
        f_k(x) = \frac{n_k}{N(1+x^M)} + b\,\frac{x}{N},\qquad b = M N\big(N\lambda_W^M\lambda_H\big)^{1/M},

    i.e. :math:`x_k^*` is 0 or the largest root of :math:`b/n_k = M x^{M-1}/(x^M+1)^2`. For
    :math:`M=1`: :math:`x_k^* = \big(\sqrt{n_k/(N^2\lambda_W\lambda_H)}-1\big)_+`, so class ``k``
    collapses iff :math:`n_k \le N^2\lambda_W\lambda_H`. For :math:`M\ge2` the largest root exists iff
    :math:`b/n_k` is below the maximum of the right side, and it beats :math:`x=0` iff
    :math:`(x_k^*)^M > M-1`; otherwise the class collapses.

    Args:
        n_per_class: the class sizes :math:`n_k` (positive).
        depth: :math:`M\ge1`, the number of linear layers after the free features.
        lam_w, lam_h: weight decay of the layers and of the features (positive).
        root: ``"global"`` (default) gives the global minimiser; ``"largest"`` keeps the largest root
            wherever one exists, even when :math:`x=0` is better (the rule of the authors' synthetic
            script). Each class at its largest root or at 0 is a local minimum of its scalar problem,
            so ``"largest"`` with some classes zeroed describes the other stable critical points.
        dtype: of the outputs; iters: bisection steps for :math:`M\ge2`.
    """
    n = torch.as_tensor(n_per_class, dtype=dtype)
    if n.dim() != 1 or n.numel() < 1 or not bool((n > 0).all()):
        raise ValueError(f"n_per_class must be a non-empty sequence of positive sizes, got {n_per_class!r}")
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
        raise ValueError(f"depth must be an integer >= 1, got {depth!r}")
    for name, v in (("lam_w", lam_w), ("lam_h", lam_h)):
        if not (isinstance(v, (int, float)) and v > 0 and math.isfinite(v)):
            raise ValueError(f"{name} must be a positive number, got {v!r}")
    if root not in ("global", "largest"):
        raise ValueError(f"root must be 'global' or 'largest', got {root!r}")
    M, N, K = depth, float(n.sum()), n.numel()
    b = M * N * (N * lam_w ** M * lam_h) ** (1.0 / M)
    if M == 1:
        x = ((n / b).sqrt() - 1).clamp(min=0)
    else:
        # g(x) = M x^(M-1) / (x^M + 1)^2 rises to its peak at x_p^M = (M-1)/(M+1), then falls to 0:
        # the largest root of g = b/n lies right of x_p, below (M n / b)^(1/(M+1)) (as g < M x^-(M+1)).
        g = lambda t: M * t ** (M - 1) / (t ** M + 1) ** 2                          # noqa: E731
        x_p = ((M - 1) / (M + 1)) ** (1.0 / M)
        target = b / n
        exists = target < g(torch.tensor(x_p, dtype=dtype))
        lo = torch.full_like(n, x_p)
        hi = torch.maximum((M * n / b) ** (1.0 / (M + 1)), lo) + 1.0
        for _ in range(iters):                                                     # vectorised bisection
            mid = 0.5 * (lo + hi)
            above = g(mid) > target
            lo, hi = torch.where(above, mid, lo), torch.where(above, hi, mid)
        largest = 0.5 * (lo + hi)
        keep = exists & (largest ** M > M - 1) if root == "global" else exists
        x = torch.where(keep, largest, torch.zeros_like(largest))
    s2m = N * lam_h * x ** M                                                       # s_k^(2M)
    mean_sq = s2m / (s2m + N * lam_h) ** 2
    return UFMGeometry(x=x, layer_sv=s2m ** (1.0 / (2 * M)), classifier_norms_sq=s2m, mean_norms_sq=mean_sq,
                       logit_diag=s2m / (s2m + N * lam_h), collapsed=x == 0,
                       classifier_gram=torch.diag(s2m), mean_gram=torch.diag(mean_sq),
                       loss=(n * lam_h / (2 * (s2m + N * lam_h))).sum() + M * lam_w / 2 * (s2m ** (1.0 / M)).sum())


# ----------------------------------------------------------------------------- training
def _check_ufm(H: torch.Tensor, weights: Sequence[torch.Tensor], labels: torch.Tensor) -> int:
    if not isinstance(H, torch.Tensor) or H.dim() < 2:
        raise ValueError(f"H must be a tensor of shape (..., N, d), got {getattr(H, 'shape', H)}")
    if len(weights) < 1:
        raise ValueError("weights must hold at least one layer W_1, ..., W_M")
    width = H.shape[-1]
    for m, w in enumerate(weights, 1):
        if w.dim() < 2 or w.shape[-1] != width:
            raise ValueError(f"W_{m} must have shape (..., d_out, {width}), got {tuple(w.shape)}")
        width = w.shape[-2]
    return _check_features_labels(H, labels, width)


def deep_ufm_loss(H: torch.Tensor, weights: Sequence[torch.Tensor], labels: torch.Tensor,
                  lam_w: float, lam_h: float) -> torch.Tensor:
    r"""The regularised MSE objective of the bias-free deep linear UFM, one value per batch entry:

    .. math::
        \frac1{2N}\sum_{i=1}^N\|W_M\cdots W_1 h_i - e_{y_i}\|^2 + \frac{\lambda_W}2\sum_m\|W_m\|_F^2
        + \frac{\lambda_H}2\|H\|_F^2 .

    Args:
        H: ``(..., N, d)`` free features (rows); weights: ``[W_1, ..., W_M]``, ``W_m`` of shape
            ``(..., d_m, d_{m-1})`` with ``d_0 = d`` and ``d_M = K``; labels: ``(N,)``.
    """
    K = _check_ufm(H, weights, labels)
    out = H
    for w in weights:
        out = out @ w.transpose(-1, -2)
    Y = torch.nn.functional.one_hot(labels.to(H.device), K).to(H.dtype)
    N = H.shape[-2]
    fit = ((out - Y) ** 2).sum((-1, -2)) / (2 * N)
    reg_w = sum((w ** 2).sum((-1, -2)) for w in weights)
    return fit + lam_w / 2 * reg_w + lam_h / 2 * (H ** 2).sum((-1, -2))


def deep_ufm_grads(H: torch.Tensor, weights: Sequence[torch.Tensor], labels: torch.Tensor,
                   lam_w: float, lam_h: float) -> tuple[torch.Tensor, list[torch.Tensor]]:
    r"""Gradients of :func:`deep_ufm_loss` in closed form (backpropagation through a linear chain).

    With :math:`P_0 = H`, :math:`P_m = P_{m-1}W_m^\top`, :math:`G_M = (P_M - Y)/N` and
    :math:`G_{m-1} = G_m W_m`: :math:`\nabla_{W_m} = G_m^\top P_{m-1} + \lambda_W W_m` and
    :math:`\nabla_H = G_0 + \lambda_H H`.
    """
    K = _check_ufm(H, weights, labels)
    Y = torch.nn.functional.one_hot(labels.to(H.device), K).to(H.dtype)
    return _grads(H, weights, Y, lam_w, lam_h)


def _grads(H: torch.Tensor, weights: Sequence[torch.Tensor], Y: torch.Tensor, lam_w: float, lam_h: float
           ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The body of :func:`deep_ufm_grads`, unchecked and without host syncs (one-hot targets given)."""
    acts = [H]
    for w in weights:
        acts.append(acts[-1] @ w.transpose(-1, -2))
    G = (acts[-1] - Y) / H.shape[-2]
    grads_w: list[torch.Tensor] = [torch.empty(0)] * len(weights)
    for m in range(len(weights) - 1, -1, -1):
        grads_w[m] = G.transpose(-1, -2) @ acts[m] + lam_w * weights[m]
        G = G @ weights[m]
    return G + lam_h * H, grads_w


def init_deep_ufm(n_per_class: Sequence[int], d: int, depth: int, *, n_runs: int = 1, scale: float = 1.0,
                  generator: torch.Generator | None = None, dtype: torch.dtype = torch.float64,
                  device: torch.device | str | None = None
                  ) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
    r"""Random start for ``n_runs`` independent UFMs at once: labels sorted by class, features and
    layers Gaussian with standard deviation ``scale / sqrt(fan_in)`` (``scale/sqrt(d)`` for ``H``).

    Returns ``(H, [W_1, ..., W_M], labels)`` with ``H`` of shape ``(n_runs, N, d)``, hidden widths
    ``d`` and ``W_M`` of shape ``(n_runs, K, d)``.
    """
    n = [int(v) for v in n_per_class]
    if not n or min(n) < 1:
        raise ValueError(f"n_per_class must be positive class sizes, got {n_per_class!r}")
    K = len(n)
    if d < K:
        raise ValueError(f"d must be at least the number of classes K={K}, got {d}")
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
        raise ValueError(f"depth must be an integer >= 1, got {depth!r}")
    labels = torch.repeat_interleave(torch.arange(K), torch.tensor(n)).to(device)
    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(n_runs, *shape, generator=generator, dtype=dtype).to(device) * scale / math.sqrt(shape[-1])
    H = rnd(sum(n), d)
    weights = [rnd(d, d) for _ in range(depth - 1)] + [rnd(K, d)]
    return H, weights, labels


def train_deep_ufm(H: torch.Tensor, weights: Sequence[torch.Tensor], labels: torch.Tensor, *,
                   lam_w: float, lam_h: float, steps: int, lr: float = 0.5, lr_h: float | None = None,
                   momentum: float = 0.9, record_every: int = 0,
                   record: Callable[[int, torch.Tensor, list[torch.Tensor]], Any] | None = None
                   ) -> tuple[torch.Tensor, list[torch.Tensor], list[Any]]:
    r"""Full-batch gradient descent (heavy ball) on :func:`deep_ufm_loss`, every batch entry at once.

    Update, for each block :math:`\theta\in\{H, W_1,\dots,W_M\}`:
    :math:`v \leftarrow \beta v + \nabla_\theta`, :math:`\theta \leftarrow \theta - \eta_\theta v`, with
    :math:`\eta = ` ``lr`` for the layers and ``lr_h`` (default ``lr``) for the features. The runs
    in a batch do not interact: each follows its own gradient.

    Args:
        H, weights, labels: from :func:`init_deep_ufm` (not modified).
        record_every: call ``record(step, H, weights)`` every this many steps (and at the end),
            collecting its return values.

    Returns:
        ``(H, weights, records)``.
    """
    if steps < 0 or lr <= 0 or not 0 <= momentum < 1:
        raise ValueError(f"need steps >= 0, lr > 0 and momentum in [0, 1), got {steps}, {lr}, {momentum}")
    K = _check_ufm(H, weights, labels)                       # validated once: no host sync inside the loop
    Y = torch.nn.functional.one_hot(labels.to(H.device), K).to(H.dtype)
    lr_h = lr if lr_h is None else lr_h
    H = H.clone()
    weights = [w.clone() for w in weights]
    vel = [torch.zeros_like(H)] + [torch.zeros_like(w) for w in weights]
    rates = [lr_h] + [lr] * len(weights)
    records = []
    for step in range(steps + 1):
        if record_every and record is not None and (step % record_every == 0 or step == steps):
            records.append(record(step, H, weights))
        if step == steps:
            break
        gh, gw = _grads(H, weights, Y, lam_w, lam_h)
        params = [H] + weights
        for p, v, g, r in zip(params, vel, [gh] + gw, rates):
            v.mul_(momentum).add_(g)
            p.sub_(r * v)
    return H, weights, records
