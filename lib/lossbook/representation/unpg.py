r"""Unified negative pair generation (UNPG) on a margin softmax loss {cite}`jung2022unpg`, with
the CosFace and ArcFace margin heads it is added to, and verification metrics (TAR at fixed FAR).

A margin softmax loss (CosFace, ArcFace) only compares a sample with the *class weights*: its
negative pairs are :math:`\cos\theta_{ij} = \langle \hat x_i, \hat W_j\rangle`, :math:`j \ne y_i`
(classification-loss pair generation, CLPG). A metric loss compares samples with each other: its
negative pairs are the similarities :math:`s_{ab} = \langle \hat x_a, \hat x_b\rangle` of batch
samples of different identities (metric-loss pair generation, MLPG). UNPG appends the MLPG
negatives of the batch, after a box-and-whisker filter, to the softmax denominator of *every*
sample:

.. math::
    \mathcal L_i = -\log \frac{e^{s\,\psi(\theta_{i y_i})}}
        {e^{s\,\psi(\theta_{i y_i})} + \sum_{j \ne y_i} e^{s \cos\theta_{ij}} + \sum_{k=1}^{M} e^{s\, s^n_k}},

:math:`\psi(\theta) = \cos\theta - m` (CosFace) or :math:`\cos(\theta + m)` (ArcFace), and
:math:`\{s^n_k\}` the :math:`M` kept negative pair similarities of the batch (each unordered pair
once). With :math:`M = 0` the loss is the plain margin loss.

Conventions (for comparison with pytorch-metric-learning's ``CosFaceLoss`` / ``ArcFaceLoss``):
class weights here are ``(C, D)`` (one row per class; pml stores ``(D, C)``); the ArcFace margin
``m`` is in **radians** (pml's ``margin`` is in degrees, 28.6° ≈ 0.5 rad); the scale ``s``
multiplies the cosines *after* the margin; the loss is the cross-entropy averaged over the batch.
"""
from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F
from torch import nn

from lossbook._checks import check_reduction, reduce
from lossbook.retrieval import similarity_matrix

__all__ = [
    "ArcFaceHead",
    "CosFaceHead",
    "UNPGLoss",
    "arcface_logits",
    "batch_negative_similarities",
    "cosface_logits",
    "ks_distance",
    "synthetic_identities",
    "tar_at_far",
    "unpg_loss",
    "verification_pairs",
    "whisker_filter",
]


# --------------------------------------------------------------------------- checks
def _real(name: str, v: float, lo: float | None = None, *, allow_inf: bool = False) -> float:
    ok = isinstance(v, numbers.Real) and not isinstance(v, bool)
    ok = ok and (math.isfinite(float(v)) or (allow_inf and float(v) == math.inf))
    if not ok or (lo is not None and not float(v) >= lo):
        raise ValueError(f"{name} must be a real number{'' if lo is None else f' >= {lo}'}, got {v!r}")
    return float(v)


def _check_labels(labels: torch.Tensor, n: int, n_classes: int | None = None) -> None:
    if labels.dim() != 1 or labels.is_floating_point() or labels.dtype == torch.bool or labels.shape[0] != n:
        raise ValueError(f"labels must be a 1-d integer tensor of length {n}, got {labels.dtype} {tuple(labels.shape)}")
    if n_classes is not None and labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= n_classes):
        raise ValueError(f"labels must lie in [0, {n_classes}), got range "
                         f"[{int(labels.min())}, {int(labels.max())}]")


def _check_emb_weight(emb: torch.Tensor, weight: torch.Tensor) -> None:
    if emb.dim() != 2 or not emb.is_floating_point():
        raise ValueError(f"emb must be a floating-point (N, D) matrix, got shape {tuple(emb.shape)}")
    if weight.dim() != 2 or weight.shape[1] != emb.shape[1]:
        raise ValueError(f"weight must be a (C, D={emb.shape[1]}) matrix, got shape {tuple(weight.shape)}")


# --------------------------------------------------------------------------- margin heads
def _cosines(emb: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return F.normalize(emb, dim=1) @ F.normalize(weight, dim=1).T


def cosface_logits(emb: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *, m: float = 0.35) -> torch.Tensor:
    r"""CosFace (large-margin cosine) logits *before* the scale: :math:`\cos\theta_{ij} - m\,\mathbb 1[j = y_i]`.

    .. math:: \cos\theta_{ij} = \frac{\langle x_i, W_j\rangle}{\lVert x_i\rVert\,\lVert W_j\rVert}

    Multiply by the scale ``s`` and apply cross-entropy to get the CosFace loss (pml's
    ``CosFaceLoss(margin=m, scale=s)`` with its weight transposed).

    Args:
        emb: ``(N, D)`` embeddings (normalised here).
        weight: ``(C, D)`` class weights (rows normalised here).
        labels: ``(N,)`` integer labels in ``[0, C)``.
        m: additive cosine margin (official default 0.35).

    Returns:
        ``(N, C)`` margin-adjusted cosines, differentiable in ``emb`` and ``weight``.
    """
    _check_emb_weight(emb, weight)
    _check_labels(labels, emb.shape[0], weight.shape[0])
    m = _real("m", m)
    cos = _cosines(emb, weight)
    # the margin on the target column only: one copy of the (N, C) cosines, no (N, C) one-hot matrix
    return cos.scatter_add(1, labels[:, None], cos.new_full((cos.shape[0], 1), -m))


def arcface_logits(emb: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *, m: float = 0.5,
                   eps: float = 1e-7) -> torch.Tensor:
    r"""ArcFace (additive angular margin) logits *before* the scale: :math:`\cos(\theta_{ij} + m\,\mathbb 1[j = y_i])`.

    :math:`\theta_{iy_i} = \arccos(\cos\theta_{iy_i})` with the cosine clamped to
    :math:`[-1 + \epsilon, 1 - \epsilon]` (the derivative of arccos is infinite at :math:`\pm 1`).
    As in the official UNPG code there is no "easy margin" or monotonic fallback for
    :math:`\theta + m > \pi`. ``m`` is in radians (pml's ``ArcFaceLoss(margin=...)`` takes degrees).

    Args:
        emb: ``(N, D)`` embeddings; weight: ``(C, D)`` class weights; labels: ``(N,)`` in ``[0, C)``.
        m: additive angular margin in radians (default 0.5).
        eps: clamp of the target cosine before arccos.

    Returns:
        ``(N, C)``: the target column replaced by :math:`\cos(\theta + m)`, the others plain cosines.
    """
    _check_emb_weight(emb, weight)
    _check_labels(labels, emb.shape[0], weight.shape[0])
    m = _real("m", m)
    cos = _cosines(emb, weight)
    target = cos.gather(1, labels[:, None]).clamp(-1 + eps, 1 - eps)
    shifted = torch.cos(torch.acos(target) + m)
    return cos.scatter(1, labels[:, None], shifted)


class _MarginHead(nn.Module):
    def __init__(self, in_features: int, n_classes: int, *, s: float, m: float):
        super().__init__()
        if in_features < 1 or n_classes < 2:
            raise ValueError(f"need in_features >= 1 and n_classes >= 2, got {in_features}, {n_classes}")
        self.s, self.m = _real("s", s, 0.0), _real("m", m)
        self.weight = nn.Parameter(torch.empty(n_classes, in_features))
        nn.init.xavier_uniform_(self.weight)


class CosFaceHead(_MarginHead):
    r"""Class weights ``(C, D)`` and :func:`cosface_logits`; ``forward(emb, labels)`` returns the
    ``(N, C)`` margin cosines (unscaled); ``s`` (default 30) is stored for the loss."""

    def __init__(self, in_features: int, n_classes: int, *, s: float = 30.0, m: float = 0.35):
        super().__init__(in_features, n_classes, s=s, m=m)

    def forward(self, emb: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return cosface_logits(emb, self.weight, labels, m=self.m)


class ArcFaceHead(_MarginHead):
    r"""Class weights ``(C, D)`` and :func:`arcface_logits`; ``forward(emb, labels)`` returns the
    ``(N, C)`` margin cosines (unscaled); ``s`` (default 32, the official class default; the
    official training configuration uses 64) is stored for the loss."""

    def __init__(self, in_features: int, n_classes: int, *, s: float = 32.0, m: float = 0.5):
        super().__init__(in_features, n_classes, s=s, m=m)

    def forward(self, emb: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return arcface_logits(emb, self.weight, labels, m=self.m)


# --------------------------------------------------------------------------- MLPG negatives and the filter
def batch_negative_similarities(emb: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    r"""The metric-loss negative pairs of a batch as a similarity matrix and a mask.

    :math:`S_{ab} = \langle \hat x_a, \hat x_b\rangle` and :math:`N_{ab} = \mathbb 1[a < b]\,\mathbb 1[y_a \ne y_b]`:
    each unordered pair of different identities once (the upper triangle), as the official code.

    Args:
        emb: ``(N, D)`` embeddings (normalised here); labels: ``(N,)`` integer labels.

    Returns:
        ``(S, mask)``: ``(N, N)`` cosine similarities (differentiable) and the ``(N, N)`` bool mask.
    """
    if emb.dim() != 2 or not emb.is_floating_point():
        raise ValueError(f"emb must be a floating-point (N, D) matrix, got shape {tuple(emb.shape)}")
    _check_labels(labels, emb.shape[0])
    s = similarity_matrix(emb)
    upper = torch.ones_like(s, dtype=torch.bool).triu(diagonal=1)
    return s, upper & (labels[:, None] != labels[None, :])


def _quartiles(x: torch.Tensor, sel: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Order-statistic quartiles (0-based positions floor(L/4), floor(3L/4)) of the ``L`` entries of
    the 1-d ``x`` selected by ``sel`` (L >= 1). On CUDA: one sort with the unselected entries sent to
    +inf, no host synchronisation. On CPU (where a sync costs nothing) two ``kthvalue`` selections,
    several times faster than the sort."""
    if x.device.type == "cpu":
        v = x[sel]
        n = v.numel()
        return v.kthvalue(n // 4 + 1).values, v.kthvalue((3 * n) // 4 + 1).values
    return _quartiles_by_sort(x, sel)


def _quartiles_by_sort(x: torch.Tensor, sel: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    sorted_x = torch.where(sel, x, torch.full_like(x, math.inf)).sort().values
    count = sel.sum()
    idx = torch.stack([torch.div(count, 4, rounding_mode="floor"), torch.div(3 * count, 4, rounding_mode="floor")])
    q = sorted_x.gather(0, idx.clamp(max=x.numel() - 1))
    return q[0], q[1]


def whisker_filter(sims: torch.Tensor, mask: torch.Tensor | None = None, *, wisk: float = 1.5) -> torch.Tensor:
    r"""Box-and-whisker filter of negative pair similarities: the mask of the values kept.

    With :math:`Q_1, Q_3` the lower and upper quartiles of the selected values and
    :math:`\mathrm{IQR} = Q_3 - Q_1`, keep

    .. math:: Q_1 - w\,\mathrm{IQR} \;\le\; s \;\le\; Q_3 + w\,\mathrm{IQR}.

    The quartiles are order statistics as in the official code: with the :math:`L` selected values
    sorted ascending (0-based), :math:`Q_1 = s_{(\lfloor L/4 \rfloor)}`, :math:`Q_3 = s_{(\lfloor 3L/4 \rfloor)}`.
    The filter is two-sided (the official code drops outliers at both ends; in practice only the
    high end, the suspiciously similar "negatives", has outliers). ``wisk = inf`` keeps everything.
    No gradient flows through the bounds (a mask is not differentiable).

    Args:
        sims: similarities of any shape (e.g. the ``(N, N)`` matrix of :func:`batch_negative_similarities`).
        mask: bool mask of the same shape selecting the negative pairs (default: all entries).
        wisk: whisker length :math:`w \ge 0` in IQRs (official training configuration 1.5; the README's K-FACE model used 1.0).

    Returns:
        bool mask of ``sims``' shape: selected and inside the whiskers.
    """
    wisk = _real("wisk", wisk, 0.0, allow_inf=True)
    if mask is None:
        mask = torch.ones_like(sims, dtype=torch.bool)
    if mask.shape != sims.shape or mask.dtype != torch.bool:
        raise ValueError(f"mask must be a bool tensor of shape {tuple(sims.shape)}, got {mask.dtype} {tuple(mask.shape)}")
    if wisk == math.inf or sims.numel() == 0:
        return mask.clone()
    x = sims.detach().reshape(-1)
    sel = mask.reshape(-1)
    if x.device.type == "cpu" and not bool(sel.any()):
        return mask.clone()
    q1, q3 = _quartiles(x, sel)
    iqr = q3 - q1
    return mask & (sims.detach() >= q1 - wisk * iqr) & (sims.detach() <= q3 + wisk * iqr)


# --------------------------------------------------------------------------- the loss
def _masked_logsumexp(z: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """log sum_{mask} exp(z) over all entries; a very negative finite number (not -inf) when empty,
    so that gradients stay finite."""
    neg_inf = torch.full_like(z, -math.inf)
    top = torch.where(mask, z, neg_inf).amax() if z.numel() else z.new_zeros(())
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top)).detach()
    total = torch.where(mask, torch.exp(z - top), torch.zeros_like(z)).sum()
    return torch.log(total.clamp_min(torch.finfo(z.dtype).tiny)) + top


def unpg_loss(logits: torch.Tensor, labels: torch.Tensor, neg_sims: torch.Tensor | None = None,
              neg_mask: torch.Tensor | None = None, *, s: float = 30.0, reduction: str = "mean") -> torch.Tensor:
    r"""UNPG cross-entropy: margin-softmax logits with the same extra negatives appended to every row.

    .. math::
        \mathcal L_i = \log\Big(\sum_{j=1}^{C} e^{s\,\ell_{ij}} + \sum_{k} e^{s\, s^n_k}\Big) - s\,\ell_{i y_i},

    :math:`\ell` the margin-adjusted cosines (:func:`cosface_logits`, :func:`arcface_logits`) and
    :math:`s^n_k` the entries of ``neg_sims`` selected by ``neg_mask``. Because the appended terms are
    the same for every row, their log-sum-exp is computed once (cost :math:`O(NC + M)`, not
    :math:`O(N(C + M))` as for the concatenated logit matrix) and combined row-wise with ``logaddexp``.
    With no negatives (``neg_sims=None``, an empty tensor, or an all-false mask) this is exactly the
    cross-entropy of ``s * logits``: plain CosFace / ArcFace.

    Args:
        logits: ``(N, C)`` margin-adjusted cosines (unscaled).
        labels: ``(N,)`` integer labels in ``[0, C)``.
        neg_sims: negative pair similarities of any shape, e.g. the ``(N, N)`` matrix of
            :func:`batch_negative_similarities`, or a 1-d vector ``(M,)``. Gradients flow into them.
        neg_mask: bool mask of ``neg_sims``' shape selecting the appended negatives (default: all),
            e.g. :func:`whisker_filter`'s output.
        s: scale (the base head's: CosFace 30, ArcFace 32 or 64).
        reduction: ``"mean"`` (the official), ``"sum"`` or ``"none"`` (per-sample ``(N,)``).

    Example::

        >>> cos = torch.tensor([[0.6, 0.1], [0.0, 0.7]]); y = torch.tensor([0, 1])
        >>> bool(torch.isclose(unpg_loss(cos, y, s=10.0), F.cross_entropy(10 * cos, y), atol=1e-6))
        True
    """
    check_reduction(reduction)
    if logits.dim() != 2 or not logits.is_floating_point():
        raise ValueError(f"logits must be a floating-point (N, C) matrix, got shape {tuple(logits.shape)}")
    _check_labels(labels, logits.shape[0], logits.shape[1])
    s = _real("s", s, 0.0)
    if s <= 0:
        raise ValueError(f"s must be positive, got {s}")
    z = s * logits
    # the (N, C) part is PyTorch's fused cross-entropy (its log-softmax keeps one (N, C) buffer);
    # the appended negatives enter through their single log-sum-exp:
    # log(e^{r_i} + e^{n}) - z_iy = CE_i + softplus(n - r_i), with r_i = CE_i + z_iy the row's log-sum-exp
    ce = F.cross_entropy(z, labels, reduction="none")
    per_sample = ce
    if neg_sims is not None:
        if not neg_sims.is_floating_point():
            raise ValueError("neg_sims must be a floating-point tensor")
        if neg_mask is None:
            neg_mask = torch.ones_like(neg_sims, dtype=torch.bool)
        elif neg_mask.shape != neg_sims.shape or neg_mask.dtype != torch.bool:
            raise ValueError(f"neg_mask must be a bool tensor of shape {tuple(neg_sims.shape)}, "
                             f"got {neg_mask.dtype} {tuple(neg_mask.shape)}")
        if neg_sims.numel():
            row_lse = ce + z.gather(1, labels[:, None]).squeeze(1)
            neg_lse = _masked_logsumexp(s * neg_sims.to(z.dtype), neg_mask)
            per_sample = ce + F.softplus(neg_lse - row_lse)
    return reduce(per_sample, reduction)


class UNPGLoss(nn.Module):
    r"""A margin head (CosFace or ArcFace) with UNPG: ``forward(emb, labels)`` returns the scalar loss.

    Steps: margin cosines from the head; the batch's negative pair similarities
    (:func:`batch_negative_similarities`); the whisker filter (:func:`whisker_filter`, ``wisk``);
    :func:`unpg_loss` with the head's scale. ``unpg=False`` gives the plain margin loss (the baseline).

    Args:
        in_features, n_classes: embedding size ``D`` and number of identities ``C``.
        head: ``"cosface"`` or ``"arcface"``.
        s, m: scale and margin (default: the head's; CosFace 30 / 0.35, ArcFace 32 / 0.5).
        wisk: whisker length (official training configuration: 1.5); ``inf`` disables the filter.
        unpg: append the batch negatives (True) or not (plain CosFace / ArcFace).
    """

    def __init__(self, in_features: int, n_classes: int, *, head: str = "cosface", s: float | None = None,
                 m: float | None = None, wisk: float = 1.5, unpg: bool = True):
        super().__init__()
        heads = {"cosface": CosFaceHead, "arcface": ArcFaceHead}
        if head not in heads:
            raise ValueError(f"head must be one of {tuple(heads)}, got {head!r}")
        kw = {k: v for k, v in (("s", s), ("m", m)) if v is not None}
        self.head = heads[head](in_features, n_classes, **kw)
        self.wisk = _real("wisk", wisk, 0.0, allow_inf=True)
        self.unpg = bool(unpg)

    def forward(self, emb: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        logits = self.head(emb, labels)
        if not self.unpg:
            return unpg_loss(logits, labels, s=self.head.s)
        sims, neg = batch_negative_similarities(emb, labels)
        keep = whisker_filter(sims, neg, wisk=self.wisk)
        return unpg_loss(logits, labels, sims, keep, s=self.head.s)


# --------------------------------------------------------------------------- verification
def verification_pairs(emb: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    r"""All unordered pairs of an evaluation set as ``(scores, same)``: cosine similarities of the
    upper triangle (:math:`a < b`) and whether the two share an identity. ``(N(N-1)/2,)`` each."""
    if emb.dim() != 2 or not emb.is_floating_point():
        raise ValueError(f"emb must be a floating-point (N, D) matrix, got shape {tuple(emb.shape)}")
    _check_labels(labels, emb.shape[0])
    s = similarity_matrix(emb)
    upper = torch.ones_like(s, dtype=torch.bool).triu(diagonal=1)
    return s[upper], (labels[:, None] == labels[None, :])[upper]


def tar_at_far(scores: torch.Tensor, same: torch.Tensor, far: float | list[float] | tuple[float, ...] = 1e-3) -> torch.Tensor:
    r"""True-accept rate at a fixed false-accept rate (1:1 verification).

    The threshold :math:`t` is the :math:`(\lfloor \mathrm{FAR}\cdot n^- \rfloor + 1)`-th largest
    impostor score, and a pair is accepted when its score is *strictly* above :math:`t`, so the
    realised FAR is :math:`\le` the target (ties counted against acceptance):

    .. math:: \mathrm{TAR}(\mathrm{FAR}) = \frac{1}{n^+}\sum_{k:\,\text{genuine}} \mathbb 1[s_k > t].

    Args:
        scores: ``(P,)`` pair scores (higher: more likely the same identity).
        same: ``(P,)`` bool, True for genuine pairs; needs both kinds.
        far: one target FAR in ``(0, 1)`` or a sequence of them.

    Returns:
        ``(K,)`` TARs for the ``K`` targets (a 0-d tensor for one float ``far``), float64, on ``scores``' device.
    """
    if scores.dim() != 1 or not scores.is_floating_point():
        raise ValueError(f"scores must be a 1-d floating-point tensor, got shape {tuple(scores.shape)}")
    if same.shape != scores.shape or same.dtype != torch.bool:
        raise ValueError(f"same must be a bool tensor of shape {tuple(scores.shape)}")
    single = isinstance(far, numbers.Real)
    fars = [far] if single else list(far)
    if not fars or not all(isinstance(f, numbers.Real) and 0 < f < 1 for f in fars):
        raise ValueError(f"far must be in (0, 1) (or a sequence of such), got {far!r}")
    neg = scores[~same].double().sort(descending=True).values
    pos = scores[same].double().sort().values
    if neg.numel() == 0 or pos.numel() == 0:
        raise ValueError("need at least one genuine and one impostor pair")
    k = torch.tensor([min(int(math.floor(f * neg.numel())), neg.numel() - 1) for f in fars], device=neg.device)
    t = neg[k]
    tar = (pos.numel() - torch.searchsorted(pos, t, right=True)).double() / pos.numel()
    return tar[0] if single else tar


def ks_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    r"""Two-sample Kolmogorov–Smirnov distance :math:`\sup_t |F_a(t) - F_b(t)|` of two 1-d samples
    (empirical CDFs evaluated at every pooled value; vectorized with ``searchsorted``). 0-d, float64."""
    if a.dim() != 1 or b.dim() != 1 or a.numel() == 0 or b.numel() == 0:
        raise ValueError("a and b must be non-empty 1-d tensors")
    a, b = a.detach().double().sort().values, b.detach().double().sort().values.to(a.device)
    t = torch.cat([a, b])
    fa = torch.searchsorted(a, t, right=True).double() / a.numel()
    fb = torch.searchsorted(b, t, right=True).double() / b.numel()
    return (fa - fb).abs().max()


# --------------------------------------------------------------------------- synthetic identities
def synthetic_identities(n_ids: int = 300, per_id: int = 20, *, latent_dim: int = 24, out_dim: int = 64,
                         spread: float = 0.6, hidden: int = 128,
                         seed: int | torch.Generator = 0) -> tuple[torch.Tensor, torch.Tensor]:
    r"""A many-identity toy "face" set: Gaussian identity clusters in a latent space, rendered by a
    fixed random nonlinear map, so an embedding has to be *learnt* to undo the map.

    Identity centres :math:`\mu_c \sim \mathcal N(0, I_{d})`, samples :math:`z = \mu_c + \sigma\,\varepsilon`,
    :math:`\varepsilon \sim \mathcal N(0, I_d)`, and inputs
    :math:`x = \tanh(A_2 \tanh(A_1 z))` with fixed Gaussian :math:`A_1` (``hidden × d``, scale
    :math:`1/\sqrt d`) and :math:`A_2` (``out_dim × hidden``, scale :math:`2/\sqrt{\text{hidden}}`).

    Returns:
        ``x`` ``(n_ids·per_id, out_dim)`` float32 and ``y`` ``(n_ids·per_id,)`` int64, identity-major.
        Split by identity (e.g. ``y < 200`` for training) for an open-set verification protocol.
    """
    if n_ids < 2 or per_id < 2 or latent_dim < 1 or out_dim < 1 or hidden < 1:
        raise ValueError("need n_ids >= 2, per_id >= 2 and positive dimensions")
    spread = _real("spread", spread, 0.0)
    g = seed if isinstance(seed, torch.Generator) else torch.Generator().manual_seed(int(seed))
    a1 = torch.randn(hidden, latent_dim, generator=g) / math.sqrt(latent_dim)
    a2 = 2.0 * torch.randn(out_dim, hidden, generator=g) / math.sqrt(hidden)
    mu = torch.randn(n_ids, latent_dim, generator=g)
    y = torch.arange(n_ids).repeat_interleave(per_id)
    z = mu[y] + spread * torch.randn(len(y), latent_dim, generator=g)
    x = torch.tanh(torch.tanh(z @ a1.T) @ a2.T)
    return x, y
