r"""Threshold-Consistent Margin (TCM) loss and the OPIS threshold-inconsistency score
{cite}`zhang2024tcm`.

TCM is a regulariser added to any base metric-learning loss. On the cosine similarities
:math:`s_{ij}` of a batch, with positive pairs :math:`P` (same class, :math:`i \ne j`) and negative
pairs :math:`N` (different classes), it penalises only the *hard* pairs, positives below the margin
:math:`m^+` and negatives above the margin :math:`m^-`, each term averaged over those hard pairs:

.. math::
    \mathcal L_{TCM} = \lambda^+ \frac{\sum_{(i,j)\in P} (m^+ - s_{ij})\,\mathbb 1[s_{ij} \le m^+]}
                                       {\sum_{(i,j)\in P} \mathbb 1[s_{ij} \le m^+]}
                     + \lambda^- \frac{\sum_{(i,j)\in N} (s_{ij} - m^-)\,\mathbb 1[s_{ij} \ge m^-]}
                                       {\sum_{(i,j)\in N} \mathbb 1[s_{ij} \ge m^-]},

a term being 0 when it has no hard pair. OPIS measures how much the per-class utility of a
fixed similarity threshold :math:`t` deviates from the overall utility, over a calibration range:

.. math::
    \mathrm{OPIS} = \frac1T \sum_{c=1}^T \frac{1}{t_{\max} - t_{\min}} \int_{t_{\min}}^{t_{\max}}
                    \big(U_c(t) - U(t)\big)^2\, dt .
"""
from __future__ import annotations

import numbers

import torch

from lossbook.retrieval import pair_masks, similarity_matrix

__all__ = ["far_threshold_range", "opis", "pair_utility", "tcm_loss"]


def _check(emb: torch.Tensor, labels: torch.Tensor) -> None:
    if emb.dim() != 2 or not emb.is_floating_point():
        raise ValueError(f"emb must be a floating-point (N, D) matrix, got shape {tuple(emb.shape)}")
    if labels.dim() != 1 or labels.is_floating_point() or labels.shape[0] != emb.shape[0]:
        raise ValueError(f"labels must be a 1-d integer tensor of length {emb.shape[0]}, got {tuple(labels.shape)}")


def _real(name: str, v: float, lo: float | None = None) -> float:
    if isinstance(v, bool) or not isinstance(v, numbers.Real) or (lo is not None and not v >= lo):
        raise ValueError(f"{name} must be a real number{'' if lo is None else f' >= {lo}'}, got {v!r}")
    return float(v)


def tcm_loss(emb: torch.Tensor, labels: torch.Tensor, *, lam_pos: float = 1.0, lam_neg: float = 1.0,
             m_pos: float = 0.9, m_neg: float = 0.5) -> torch.Tensor:
    r"""The TCM regulariser :math:`\mathcal L_{TCM}` of a batch (a scalar; add it to a base loss).

    .. math::
        \mathcal L_{TCM} = \lambda^+ \frac{\sum_P (m^+ - s_{ij})\mathbb 1[s_{ij} \le m^+]}{\sum_P \mathbb 1[s_{ij} \le m^+]}
                         + \lambda^- \frac{\sum_N (s_{ij} - m^-)\mathbb 1[s_{ij} \ge m^-]}{\sum_N \mathbb 1[s_{ij} \ge m^-]}

    computed with the masks :math:`P`, :math:`N` over the :math:`N \times N` cosine-similarity matrix
    (ordered pairs, the diagonal excluded). Defaults are those of the official implementation.

    Args:
        emb: ``(N, D)`` embeddings (normalised here).
        labels: ``(N,)`` integer labels.
        lam_pos, lam_neg: weights :math:`\lambda^\pm \ge 0`.
        m_pos, m_neg: margins :math:`m^\pm` on cosine similarity.

    Example::

        >>> e = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]]); y = torch.tensor([0, 0, 1])
        >>> tcm_loss(e, y)     # positive s=0.6 -> 0.3; negatives s=0.8 -> 0.3, s=0 not hard
        tensor(0.6000)
    """
    _check(emb, labels)
    lam_pos, lam_neg = _real("lam_pos", lam_pos, 0.0), _real("lam_neg", lam_neg, 0.0)
    m_pos, m_neg = _real("m_pos", m_pos), _real("m_neg", m_neg)
    s = similarity_matrix(emb)
    pos, neg = pair_masks(labels)
    hard_p = pos & (s <= m_pos)
    hard_n = neg & (s >= m_neg)
    zero = s.new_zeros(())
    t_pos = torch.where(hard_p, m_pos - s, zero).sum() / hard_p.sum().clamp(min=1)
    t_neg = torch.where(hard_n, s - m_neg, zero).sum() / hard_n.sum().clamp(min=1)
    return lam_pos * t_pos + lam_neg * t_neg


def pair_utility(sim: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    r"""F1 of the decision "same class iff :math:`s_{ij} \ge t`" over the pairs selected by the masks.

    .. math::
        \mathrm{F1}(t) = \frac{2\,TP(t)}{2\,TP(t) + FP(t) + FN(t)},\quad TP = \#\{P: s \ge t\},\
        FP = \#\{N: s \ge t\},\ FN = \#\{P: s < t\}.

    Args:
        sim: ``(N, M)`` similarities; pos, neg: ``(N, M)`` bool masks; thresholds: ``(K,)``.

    Returns:
        ``(K,)`` F1 at each threshold (0 where undefined).
    """
    if not (sim.shape == pos.shape == neg.shape):
        raise ValueError("sim, pos and neg must have the same shape")
    if thresholds.dim() != 1:
        raise ValueError("thresholds must be 1-d")
    sp = torch.sort(sim[pos].double()).values
    sn = torch.sort(sim[neg].double()).values
    t = thresholds.to(sp)
    tp = (sp.numel() - torch.searchsorted(sp, t, right=False)).double()   # #{P: s >= t}
    fp = (sn.numel() - torch.searchsorted(sn, t, right=False)).double()   # #{N: s >= t}
    fn = sp.numel() - tp
    den = 2 * tp + fp + fn
    return torch.where(den > 0, 2 * tp / den.clamp(min=1), torch.zeros_like(den))


def far_threshold_range(emb: torch.Tensor, labels: torch.Tensor, far: tuple[float, float] = (1e-2, 1e-1),
                        n: int = 50) -> torch.Tensor:
    r"""``n`` similarity thresholds spanning the range where the overall false-accept rate
    (fraction of negative pairs with :math:`s \ge t`) runs from ``far[1]`` down to ``far[0]``."""
    _check(emb, labels)
    lo, hi = far
    if not (0 < lo < hi < 1) or n < 2:
        raise ValueError(f"far must satisfy 0 < far[0] < far[1] < 1 and n >= 2, got {far}, {n}")
    s = similarity_matrix(emb)
    _, neg = pair_masks(labels)
    q = torch.quantile(s[neg].double(), torch.tensor([1 - hi, 1 - lo], dtype=torch.float64, device=s.device))
    return torch.linspace(float(q[0]), float(q[1]), n, dtype=torch.float64, device=s.device)


def opis(emb: torch.Tensor, labels: torch.Tensor, thresholds: torch.Tensor | None = None) -> float:
    r"""Operating-point-inconsistency score of an embedding on a labelled (test) set.

    .. math::
        \mathrm{OPIS} = \frac1T \sum_c \frac{1}{t_{\max} - t_{\min}}\int_{t_{\min}}^{t_{\max}} (U_c(t) - U(t))^2\,dt,

    with :math:`U_c` the F1 (:func:`pair_utility`) of the pairs whose query is of class :math:`c`
    and :math:`U` that of all pairs; the integral is a trapezoid rule over ``thresholds`` (default
    :func:`far_threshold_range`, overall FAR in :math:`[10^{-2}, 10^{-1}]`). Lower is more consistent.
    """
    _check(emb, labels)
    if thresholds is None:
        thresholds = far_threshold_range(emb, labels)
    s = similarity_matrix(emb).double()
    thresholds = thresholds.to(s)
    pos, neg = pair_masks(labels)
    u_all = pair_utility(s, pos, neg, thresholds)
    width = float(thresholds[-1] - thresholds[0])
    out = []
    for c in torch.unique(labels):
        rows = labels == c
        d2 = (pair_utility(s[rows], pos[rows], neg[rows], thresholds) - u_all) ** 2
        out.append(float(torch.trapezoid(d2, thresholds)) / width if width > 0 else float(d2.mean()))
    return float(sum(out) / len(out))
