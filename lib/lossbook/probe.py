r"""Linear probe: how linearly separable are frozen features?

Fit a multinomial logistic-regression head :math:`p(y \mid h) = \mathrm{softmax}(W h + b)` on
training features by full-batch L-BFGS, minimising

.. math:: \frac1n \sum_{i=1}^n -\log p(y_i \mid h_i) + \frac{\lambda}{2} \lVert W \rVert_F^2 ,

(a strictly convex problem for :math:`\lambda > 0`, so the answer does not depend on the start), and
report the accuracy of the head on held-out features. Features are standardised with the training
statistics first. Runs on the features' device.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

__all__ = ["ProbeResult", "fit_logistic", "knn_accuracy", "linear_probe"]


class ProbeResult(NamedTuple):
    """``accuracy`` (held out) and ``train_accuracy`` as floats; the head ``weight`` (C, d) and
    ``bias`` (C,) act on features standardised with ``mean`` and ``std``."""
    accuracy: float
    train_accuracy: float
    weight: torch.Tensor
    bias: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor


def _check(h: torch.Tensor, y: torch.Tensor, name: str) -> None:
    if h.dim() != 2 or not h.is_floating_point():
        raise ValueError(f"{name} features must be a floating-point (N, d) tensor, got {h.dtype} {tuple(h.shape)}")
    if y.shape != h.shape[:1] or y.dtype != torch.int64:
        raise ValueError(f"{name} labels must be int64 of shape ({h.shape[0]},), got {y.dtype} {tuple(y.shape)}")


def fit_logistic(h: torch.Tensor, y: torch.Tensor, n_classes: int | None = None, *, l2: float = 1e-3,
                 max_iter: int = 100) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Weights ``(C, d)`` and bias ``(C,)`` of L2-regularised multinomial logistic regression on
    ``(h, y)`` (the objective in the module docstring, :math:`\lambda` = ``l2``), by full-batch
    L-BFGS with a strong-Wolfe line search, in float64 for a reproducible optimum."""
    _check(h, y, "training")
    if not l2 >= 0:
        raise ValueError(f"l2 must be >= 0, got {l2!r}")
    if max_iter < 1:
        raise ValueError(f"max_iter must be >= 1, got {max_iter!r}")
    c = int(n_classes) if n_classes is not None else int(y.max()) + 1
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= c):
        raise ValueError(f"labels must lie in [0, {c}), got range [{int(y.min())}, {int(y.max())}]")
    x = h.detach().double()
    w = torch.zeros(c, x.shape[1], dtype=torch.float64, device=x.device, requires_grad=True)
    b = torch.zeros(c, dtype=torch.float64, device=x.device, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, tolerance_grad=1e-9, tolerance_change=1e-12,
                            history_size=20, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(x @ w.T + b, y) + 0.5 * l2 * w.square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach(), b.detach()


def linear_probe(h_train: torch.Tensor, y_train: torch.Tensor, h_test: torch.Tensor, y_test: torch.Tensor,
                 *, n_classes: int | None = None, l2: float = 1e-3, max_iter: int = 100,
                 standardize: bool = True) -> ProbeResult:
    r"""Fit a logistic-regression head on frozen training features and return its test accuracy.

    Args:
        h_train, h_test: features ``(N, d)`` (detached inside; any float dtype, any device).
        y_train, y_test: int64 labels ``(N,)`` in ``[0, n_classes)``.
        n_classes: number of classes (default: the largest training label + 1).
        l2: ridge penalty :math:`\lambda` on the weights (not the bias).
        max_iter: L-BFGS iterations.
        standardize: centre and scale each feature with the training mean and standard deviation.

    Returns:
        a :class:`ProbeResult`; ``accuracy`` is the held-out accuracy.

    Example::

        >>> h = torch.randn(200, 5); y = (h[:, 0] > 0).long()
        >>> linear_probe(h[:100], y[:100], h[100:], y[100:]).accuracy > 0.9
        True
    """
    _check(h_train, y_train, "training")
    _check(h_test, y_test, "test")
    if h_test.shape[1] != h_train.shape[1]:
        raise ValueError(f"h_test must have {h_train.shape[1]} features like h_train, got {h_test.shape[1]}")
    htr, hte = h_train.detach().double(), h_test.detach().double()
    if standardize:
        mean, std = htr.mean(0), htr.std(0).clamp_min(1e-8)
    else:
        mean, std = torch.zeros_like(htr[0]), torch.ones_like(htr[0])
    htr, hte = (htr - mean) / std, (hte - mean) / std
    w, b = fit_logistic(htr, y_train, n_classes, l2=l2, max_iter=max_iter)
    acc = lambda h, y: float(((h @ w.T + b).argmax(1) == y).double().mean())  # noqa: E731
    return ProbeResult(acc(hte, y_test), acc(htr, y_train), w, b, mean, std)


def knn_accuracy(h_train: torch.Tensor, y_train: torch.Tensor, h_test: torch.Tensor, y_test: torch.Tensor,
                 k: int = 10) -> float:
    r"""Accuracy of a cosine :math:`k`-nearest-neighbour vote (majority; ties to the nearest) of each test
    feature among the training features. ``h_*`` ``(N, d)``, ``y_*`` int64 ``(N,)``."""
    if h_train.dim() != 2 or h_test.dim() != 2 or h_train.shape[1] != h_test.shape[1]:
        raise ValueError("h_train and h_test must be (N, d) tensors with the same d")
    if not 1 <= k <= len(h_train):
        raise ValueError(f"k must be in [1, {len(h_train)}], got {k}")
    s = F.normalize(h_test.float(), dim=1) @ F.normalize(h_train.float(), dim=1).T
    top = s.topk(k, dim=1)
    votes = F.one_hot(y_train[top.indices], int(y_train.max()) + 1).float()
    votes = votes.sum(1) + 1e-3 * votes[:, 0]          # ties go to the nearest neighbour's class
    return float((votes.argmax(1) == y_test).float().mean())
