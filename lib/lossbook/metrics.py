"""Evaluation metrics shared by chapters: calibration (ECE and reliability bins), top-k accuracy,
and the confusion-matrix metrics (precision, recall, F-beta, balanced accuracy, geometric mean).

Everything is vectorized, stays on the inputs' device and returns tensors (no host syncs), so the
functions can run inside a training loop; call ``float(...)`` when a number is needed.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

__all__ = ["ReliabilityBins", "binary_confusion", "binary_metrics", "expected_calibration_error",
           "reliability_bins", "top_k_accuracy"]


def _check_probs_labels(probs: torch.Tensor, labels: torch.Tensor) -> None:
    if probs.dim() != 2:
        raise ValueError(f"probs must have shape (N, C), got {tuple(probs.shape)}")
    if labels.shape != probs.shape[:1] or labels.dtype != torch.int64:
        raise ValueError(f"labels must be int64 of shape ({probs.shape[0]},), got {labels.dtype} "
                         f"{tuple(labels.shape)}")


class ReliabilityBins(NamedTuple):
    """Per-bin statistics of a reliability diagram: ``edges`` (n_bins + 1,), and per bin the mean
    ``confidence``, the ``accuracy`` and the ``count`` (bins with no sample hold 0)."""
    edges: torch.Tensor
    confidence: torch.Tensor
    accuracy: torch.Tensor
    count: torch.Tensor


def reliability_bins(probs: torch.Tensor, labels: torch.Tensor, n_bins: int = 15) -> ReliabilityBins:
    r"""Bin the top-label confidences :math:`\hat p_i = \max_k p_{ik}` into ``n_bins`` equal-width
    bins on :math:`[0, 1]` (right-closed, the first bin also holds 0) and return, per bin, the
    mean confidence, the accuracy of the top-label prediction, and the number of samples.

    ``probs``: (N, C) probabilities; ``labels``: (N,) int64.
    """
    _check_probs_labels(probs, labels)
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    conf, pred = probs.max(dim=1)
    correct = (pred == labels).to(probs.dtype)
    edges = torch.linspace(0, 1, n_bins + 1, device=probs.device, dtype=probs.dtype)
    idx = (torch.bucketize(conf, edges, right=False) - 1).clamp(0, n_bins - 1)
    count = torch.zeros(n_bins, device=probs.device, dtype=probs.dtype).index_add_(
        0, idx, torch.ones_like(conf))
    sum_conf = torch.zeros_like(count).index_add_(0, idx, conf)
    sum_acc = torch.zeros_like(count).index_add_(0, idx, correct)
    denom = count.clamp_min(1)
    return ReliabilityBins(edges, sum_conf / denom, sum_acc / denom, count)


def expected_calibration_error(probs: torch.Tensor, labels: torch.Tensor, n_bins: int = 15
                               ) -> torch.Tensor:
    r"""Expected calibration error with equal-width bins,
    :math:`\mathrm{ECE} = \sum_b \frac{|B_b|}{N}\,\lvert \mathrm{acc}(B_b) - \mathrm{conf}(B_b)\rvert`
    (Guo et al., 2017), as a 0-d tensor.

    >>> p = torch.tensor([[0.9, 0.1], [0.6, 0.4]]); y = torch.tensor([0, 1])
    >>> round(float(expected_calibration_error(p, y, n_bins=10)), 3)  # |1-.9|/2 + |0-.6|/2
    0.35
    """
    b = reliability_bins(probs, labels, n_bins)
    return ((b.accuracy - b.confidence).abs() * b.count).sum() / b.count.sum().clamp_min(1)


def top_k_accuracy(logits: torch.Tensor, labels: torch.Tensor, k: int = 1) -> torch.Tensor:
    """Fraction of rows whose label is among the ``k`` largest scores (0-d tensor). Ties are broken
    by ``torch.topk``'s order."""
    _check_probs_labels(logits, labels)
    if not 1 <= k <= logits.shape[1]:
        raise ValueError(f"k must be in [1, {logits.shape[1]}], got {k}")
    top = logits.topk(k, dim=1).indices
    return (top == labels[:, None]).any(dim=1).to(logits.dtype if logits.is_floating_point()
                                                  else torch.float32).mean()


def binary_confusion(pred: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``(tn, fp, fn, tp)`` as a float tensor of shape (4,). ``pred`` may be hard (0/1) or soft
    (in [0, 1], e.g. probabilities): soft predictions give the expected counts, which is what a
    differentiable metric-as-loss needs. ``labels``: (N,) of 0/1."""
    if pred.shape != labels.shape:
        raise ValueError(f"pred and labels must have the same shape, got {tuple(pred.shape)} and "
                         f"{tuple(labels.shape)}")
    p = pred.to(torch.promote_types(pred.dtype, torch.float32))
    y = labels.to(p.dtype)
    tp = (p * y).sum()
    fp = (p * (1 - y)).sum()
    fn = ((1 - p) * y).sum()
    tn = ((1 - p) * (1 - y)).sum()
    return torch.stack([tn, fp, fn, tp])


def binary_metrics(pred: torch.Tensor, labels: torch.Tensor, *, beta: float = 1.0,
                   eps: float = 1e-12) -> dict[str, torch.Tensor]:
    r"""Accuracy, precision, recall, specificity, :math:`F_\beta`, balanced accuracy and geometric
    mean :math:`\sqrt{\mathrm{TPR}\cdot\mathrm{TNR}}` from :func:`binary_confusion` (0-d tensors;
    an empty denominator counts as 0)."""
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    tn, fp, fn, tp = binary_confusion(pred, labels)
    tpr = tp / (tp + fn).clamp_min(eps)
    tnr = tn / (tn + fp).clamp_min(eps)
    prec = tp / (tp + fp).clamp_min(eps)
    b2 = beta ** 2
    f = (1 + b2) * tp / ((1 + b2) * tp + b2 * fn + fp).clamp_min(eps)
    return {"accuracy": (tp + tn) / (tn + fp + fn + tp).clamp_min(eps), "precision": prec,
            "recall": tpr, "specificity": tnr, "f_beta": f, "balanced_accuracy": (tpr + tnr) / 2,
            "g_mean": (tpr * tnr).clamp_min(0).sqrt()}
