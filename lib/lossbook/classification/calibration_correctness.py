r"""Correctness-aware (CA) post-hoc calibration (Liu et al., 2024, ``liu2024calibration``), and temperature scaling.

A trained classifier gives logits :math:`z \in \mathbb R^C` for a sample :math:`x` and for a few
transformed *views* :math:`t_1(x), \dots, t_V(x)` of it (rotated, greyscaled, colour-jittered, ...).
A small calibrator :math:`g_\phi` reads how the views' softmax scores sit on the original
prediction's top-:math:`k` classes and returns a per-sample temperature :math:`T(x) > 0`; the
calibrated probabilities are :math:`\operatorname{softmax}(z / T(x))`, so the predicted class never
changes. It is trained on a held-out, in-distribution calibration set with the CA loss, which pulls
the calibrated top-label confidence :math:`\hat p` towards the correctness :math:`c \in \{0, 1\}` of
the prediction:

.. math::

    \mathcal L_{\mathrm{CA}} = \frac{\sum_i w_i\, (c_i - \hat p_i)^2}{\sum_i w_i},\qquad
    w_i = \begin{cases} 1 - a & c_i = 1 \\ a & c_i = 0 \end{cases},\quad a = \tfrac1N \textstyle\sum_i c_i .

The class-balancing weights follow the authors' code; ``balanced=False`` gives the plain top-label
Brier score. The baseline is temperature scaling (one global :math:`T`, fitted by L-BFGS on the
negative log-likelihood of the same calibration set; Guo et al., 2017).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["CorrectnessAwareCalibrator", "brier_loss", "ca_loss", "calibrator_loss", "correctness",
           "correctness_auroc", "fit_calibrator", "fit_temperature", "image_views", "rotate", "view_features"]

_REDUCTIONS = ("mean", "sum", "none")
_KINDS = ("ca", "ca_unweighted", "ce", "mse")


def _check_logits(logits: torch.Tensor, name: str = "logits") -> None:
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or not logits.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor of shape (N, C), got "
                         f"{getattr(logits, 'dtype', type(logits))} {tuple(getattr(logits, 'shape', ()))}")
    if logits.shape[1] < 2:
        raise ValueError(f"{name} must have at least 2 classes, got shape {tuple(logits.shape)}")


def _check_labels(labels: torch.Tensor, logits: torch.Tensor, name: str = "labels") -> None:
    if (not isinstance(labels, torch.Tensor) or labels.dtype != torch.int64
            or labels.shape != logits.shape[:1]):
        raise ValueError(f"{name} must be int64 of shape ({logits.shape[0]},), got "
                         f"{getattr(labels, 'dtype', type(labels))} {tuple(getattr(labels, 'shape', ()))}")


def correctness(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """:math:`c_i = \\mathbb 1[\\arg\\max_k z_{ik} = y_i]` as a bool tensor of shape (N,)."""
    _check_logits(logits)
    _check_labels(labels, logits)
    return logits.argmax(dim=1) == labels


def ca_loss(logits: torch.Tensor, correct: torch.Tensor, *, balanced: bool = True,
            reduction: str = "mean") -> torch.Tensor:
    r"""Correctness-aware loss on calibrated logits.

    .. math::

        \mathcal L_{\mathrm{CA}} = \frac{\sum_i w_i\,(c_i - \hat p_i)^2}{\sum_i w_i},\qquad
        \hat p_i = \max_k \operatorname{softmax}(z_i)_k,

    with :math:`w_i = 1 - a` for a correct prediction and :math:`w_i = a` for a wrong one,
    :math:`a` the fraction of correct predictions in the batch (``balanced=True``, as in the
    authors' code: correct and wrong samples then carry equal total weight, and the loss equals
    :math:`\tfrac12[\operatorname{mean}_{c=1}(1-\hat p)^2 + \operatorname{mean}_{c=0}\hat p^2]`). When
    the batch holds only one kind, or ``balanced=False``, every :math:`w_i = 1` (the top-label Brier
    score).

    Args:
        logits: calibrated logits :math:`z_i / T_i`, shape (N, C).
        correct: (N,) bool or {0, 1}: whether the classifier's prediction on sample i is right.
            (A temperature keeps the argmax, so :math:`\hat p_i` is the confidence in that prediction.)
        balanced: the class-balancing weights above.
        reduction: ``"mean"`` (the weighted mean above), ``"sum"`` (:math:`\sum_i w_i(c_i-\hat p_i)^2`
            with the weights normalised to mean 1) or ``"none"`` (the same per-sample terms, (N,)).

    Example::

        >>> z = torch.tensor([[4.0, 0.0], [1.0, 0.0]]); c = torch.tensor([True, False])
        >>> round(float(ca_loss(z, c)), 4)   # (0.5 (1 - 0.982)^2 + 0.5 (0.731)^2)
        0.2674
    """
    _check_logits(logits)
    if not isinstance(correct, torch.Tensor) or correct.shape != logits.shape[:1]:
        raise ValueError(f"correct must be a tensor of shape ({logits.shape[0]},), got "
                         f"{tuple(getattr(correct, 'shape', ()))}")
    if correct.is_floating_point() and not bool(((correct == 0) | (correct == 1)).all()):
        raise ValueError("correct must hold only 0 and 1 (or bool)")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    conf = logits.softmax(dim=1).amax(dim=1)
    c = correct.to(conf.dtype)
    sq = (c - conf).square()
    if balanced:
        a = c.mean()
        w = torch.where(c > 0, 1 - a, a)
        # one kind only: every weight is 0, fall back to equal weights (no host sync)
        w = torch.where(w.sum() > 0, w, torch.ones_like(w))
        w = w / w.mean()
        sq = w * sq
    if reduction == "none":
        return sq
    return sq.sum() if reduction == "sum" else sq.mean()


def brier_loss(logits: torch.Tensor, labels: torch.Tensor, *, reduction: str = "mean") -> torch.Tensor:
    r"""Multi-class Brier score (the "MSE" calibration objective):
    :math:`\sum_k (\operatorname{softmax}(z_i)_k - \mathbb 1[k = y_i])^2`, averaged over samples."""
    _check_logits(logits)
    _check_labels(labels, logits)
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    per = (logits.softmax(dim=1) - F.one_hot(labels, logits.shape[1]).to(logits.dtype)).square().sum(1)
    if reduction == "none":
        return per
    return per.sum() if reduction == "sum" else per.mean()


def calibrator_loss(cal_logits: torch.Tensor, labels: torch.Tensor, correct: torch.Tensor,
                    kind: str = "ca") -> torch.Tensor:
    """The objective a calibrator is trained with: ``"ca"`` (:func:`ca_loss`, balanced),
    ``"ca_unweighted"`` (top-label Brier), ``"ce"`` (cross-entropy on the true class) or
    ``"mse"`` (:func:`brier_loss`). Mean over the batch."""
    if kind == "ca":
        return ca_loss(cal_logits, correct)
    if kind == "ca_unweighted":
        return ca_loss(cal_logits, correct, balanced=False)
    if kind == "ce":
        _check_labels(labels, cal_logits)
        return F.cross_entropy(cal_logits, labels)
    if kind == "mse":
        return brier_loss(cal_logits, labels)
    raise ValueError(f"kind must be one of {_KINDS}, got {kind!r}")


def view_features(logits: torch.Tensor, view_logits: Sequence[torch.Tensor], k: int = 4) -> torch.Tensor:
    r"""The calibrator's input: for each view :math:`v`, its softmax scores on the original
    prediction's top-:math:`k` classes,

    .. math::

        u_i = \big[\operatorname{softmax}(z^{(v)}_i)_{\pi_i(1)}, \dots,
              \operatorname{softmax}(z^{(v)}_i)_{\pi_i(k)}\big]_{v = 1..V},

    where :math:`\pi_i` ranks the classes by the original logits :math:`z_i`. Shape (N, V k).
    A view that agrees with the original puts its mass on :math:`\pi_i(1)`; a disagreeing one
    spreads it, which is the signal of a likely error.
    """
    _check_logits(logits)
    if len(view_logits) < 1:
        raise ValueError("view_logits must hold at least one view")
    if not 1 <= k <= logits.shape[1]:
        raise ValueError(f"k must be in [1, {logits.shape[1]}], got {k}")
    for v in view_logits:
        _check_logits(v, "each entry of view_logits")
        if v.shape != logits.shape:
            raise ValueError(f"each entry of view_logits must have shape {tuple(logits.shape)}, "
                             f"got {tuple(v.shape)}")
    top = logits.topk(k, dim=1).indices
    return torch.cat([v.softmax(dim=1).gather(1, top) for v in view_logits], dim=1)


class CorrectnessAwareCalibrator(nn.Module):
    r"""Per-sample temperature :math:`T(u) = \exp\!\big(\log(T_{\max}) \tanh(h(u))\big)` from the view
    features :math:`u` (:func:`view_features`), with :math:`h` a one-hidden-layer ReLU network
    (``in_dim -> hidden -> 1``, 5 hidden units by default as in the authors' code).
    :math:`T \in (1/T_{\max}, T_{\max})`, smoothly (the authors clamp to :math:`[0.1, 10]`, which
    stops the gradient at the bounds); the last layer starts at zero, so training starts from
    :math:`T \equiv 1`, the uncalibrated model.

    ``forward(logits, features)`` returns the calibrated logits :math:`z / T(u)`; the prediction
    :math:`\arg\max_k z_k` never changes because :math:`T > 0`.
    """

    def __init__(self, in_dim: int, hidden: int = 5, *, t_max: float = 10.0):
        super().__init__()
        if in_dim < 1 or hidden < 1:
            raise ValueError(f"in_dim and hidden must be positive, got {in_dim} and {hidden}")
        if not (isinstance(t_max, (int, float)) and math.isfinite(t_max) and t_max > 1):
            raise ValueError(f"t_max must be a finite number > 1, got {t_max!r}")
        self.in_dim, self.t_max = in_dim, float(t_max)
        self.net = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Linear(hidden, 1))
        nn.init.zeros_(self.net[2].weight)
        nn.init.zeros_(self.net[2].bias)

    def temperature(self, features: torch.Tensor) -> torch.Tensor:
        """:math:`T(u)`, shape (N,)."""
        if features.dim() != 2 or features.shape[1] != self.in_dim:
            raise ValueError(f"features must have shape (N, {self.in_dim}), got {tuple(features.shape)}")
        return torch.exp(math.log(self.t_max) * torch.tanh(self.net(features).squeeze(1)))

    def forward(self, logits: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        _check_logits(logits)
        if features.shape[:1] != logits.shape[:1]:
            raise ValueError(f"features must have {logits.shape[0]} rows, got {tuple(features.shape)}")
        return logits / self.temperature(features).unsqueeze(1)

    def extra_repr(self) -> str:
        return f"in_dim={self.in_dim}, t_max={self.t_max}"


def fit_calibrator(calibrator: CorrectnessAwareCalibrator, logits: torch.Tensor, features: torch.Tensor,
                   labels: torch.Tensor, *, kind: str = "ca", steps: int = 500, lr: float = 1e-2,
                   batch_size: int | None = None, weight_decay: float = 0.0,
                   generator: torch.Generator | None = None) -> list[float]:
    """Train ``calibrator`` on a calibration set with :func:`calibrator_loss` (``kind``) and Adam;
    full batch when ``batch_size`` is None. The classifier's ``logits`` are fixed (post hoc).
    Returns the loss per step (one host sync at the end)."""
    _check_logits(logits)
    _check_labels(labels, logits)
    if kind not in _KINDS:
        raise ValueError(f"kind must be one of {_KINDS}, got {kind!r}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    correct = logits.argmax(1) == labels
    opt = torch.optim.Adam(calibrator.parameters(), lr=lr, weight_decay=weight_decay)
    n = logits.shape[0]
    losses = []
    calibrator.train()
    for _ in range(steps):
        if batch_size is None or batch_size >= n:
            idx = slice(None)
        else:
            idx = torch.randperm(n, generator=generator)[:batch_size].to(logits.device)
        loss = calibrator_loss(calibrator(logits[idx], features[idx]), labels[idx], correct[idx], kind)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.detach())
    calibrator.eval()
    return torch.stack(losses).tolist()


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor, *, max_iter: int = 200) -> torch.Tensor:
    r"""Temperature scaling: the single :math:`T` minimising the negative log-likelihood
    :math:`-\frac1N\sum_i \log\operatorname{softmax}(z_i/T)_{y_i}` on a calibration set, found by
    L-BFGS (strong-Wolfe line search) on :math:`\log T`. Returns a 0-d tensor."""
    _check_logits(logits)
    _check_labels(labels, logits)
    z = logits.detach().double()
    log_t = torch.zeros((), dtype=torch.float64, device=logits.device, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=1.0, max_iter=max_iter, tolerance_grad=1e-10,
                            tolerance_change=1e-12, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(z / log_t.exp(), labels)
        loss.backward()
        return loss

    opt.step(closure)
    return log_t.detach().exp().to(logits.dtype)


def correctness_auroc(confidence: torch.Tensor, correct: torch.Tensor) -> torch.Tensor:
    """Area under the ROC curve of ``confidence`` as a score for ``correct`` (ties count one half):
    the probability that a random correct prediction is more confident than a random wrong one.
    NaN when either kind is absent. 0-d tensor."""
    if confidence.dim() != 1 or correct.shape != confidence.shape:
        raise ValueError(f"confidence and correct must have the same shape (N,), got "
                         f"{tuple(confidence.shape)} and {tuple(correct.shape)}")
    c = correct.bool()
    pos, neg = confidence[c], confidence[~c]
    if pos.numel() == 0 or neg.numel() == 0:
        return torch.tensor(float("nan"), device=confidence.device)
    # rank-based (Mann-Whitney U) with mid-ranks for ties
    allv = torch.cat([pos, neg]).double()
    order = allv.argsort()
    uniq, inv = torch.unique(allv[order], return_inverse=True)
    position = torch.arange(1, allv.numel() + 1, dtype=torch.float64, device=allv.device)
    sums = torch.zeros(uniq.numel(), dtype=torch.float64, device=allv.device).index_add_(0, inv, position)
    counts = torch.zeros_like(sums).index_add_(0, inv, torch.ones_like(position))
    ranks = torch.empty_like(allv)
    ranks[order] = (sums / counts)[inv]
    n_p, n_n = pos.numel(), neg.numel()
    u = ranks[:n_p].sum() - n_p * (n_p + 1) / 2
    return (u / (n_p * n_n)).to(confidence.dtype)


def rotate(x: torch.Tensor, degrees: float | torch.Tensor) -> torch.Tensor:
    """Rotate an image batch (N, C, H, W) about its centre by ``degrees`` (a number, or one angle
    per image), bilinear with zero fill."""
    if x.dim() != 4 or not x.is_floating_point():
        raise ValueError(f"x must be a float image batch (N, C, H, W), got {x.dtype} {tuple(x.shape)}")
    theta = torch.as_tensor(degrees, dtype=x.dtype, device=x.device) * math.pi / 180
    theta = theta.expand(x.shape[0]) if theta.dim() == 0 else theta
    cos, sin, zero = theta.cos(), theta.sin(), torch.zeros_like(theta)
    mat = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)
    grid = F.affine_grid(mat, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, padding_mode="zeros", align_corners=False)


def image_views(x: torch.Tensor, kinds: Sequence[str] = ("rotate", "blur", "contrast"), *,
                degrees: float = 15.0, contrast: float = 0.6) -> list[torch.Tensor]:
    """Deterministic transformed views of an image batch (N, C, H, W), one tensor per kind:

    - ``"rotate"``: rotation by ``degrees`` about the centre (bilinear, zero fill);
    - ``"blur"``: 3×3 binomial blur per channel;
    - ``"contrast"``: pixels pulled towards each image's mean by the factor ``contrast``;
    - ``"grey"``: luminance copied to every channel (3-channel images only);
    - ``"hflip"``: mirror left-right.

    The paper's views of ImageNet images are rotation, greyscale and colour jitter; on one-channel
    8×8 digits, blur and a contrast change stand in for greyscale and colour jitter.
    """
    if x.dim() != 4 or not x.is_floating_point():
        raise ValueError(f"x must be a float image batch (N, C, H, W), got {x.dtype} {tuple(x.shape)}")
    out = []
    for kind in kinds:
        if kind == "rotate":
            out.append(rotate(x, degrees))
        elif kind == "blur":
            k1 = torch.tensor([1.0, 2.0, 1.0], dtype=x.dtype, device=x.device)
            k2 = (k1[:, None] * k1[None, :] / 16).expand(x.shape[1], 1, 3, 3)
            out.append(F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), k2, groups=x.shape[1]))
        elif kind == "contrast":
            m = x.mean(dim=(1, 2, 3), keepdim=True)
            out.append(m + contrast * (x - m))
        elif kind == "grey":
            if x.shape[1] != 3:
                raise ValueError("'grey' needs 3-channel images")
            w = torch.tensor([0.299, 0.587, 0.114], dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
            out.append((x * w).sum(1, keepdim=True).expand_as(x).contiguous())
        elif kind == "hflip":
            out.append(x.flip(-1))
        else:
            raise ValueError(f"unknown view kind {kind!r}; expected rotate, blur, contrast, grey or hflip")
    return out
