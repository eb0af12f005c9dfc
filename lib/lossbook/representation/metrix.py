r"""Metrix: mixup for deep metric learning, with interpolated pair targets
{cite}`venkataramanan2022metrix`.

A pair-based metric-learning loss, for an anchor :math:`a` with positives :math:`P(a)` and
negatives :math:`N(a)` and similarities :math:`s_{ax}`, has the generic form

.. math::
    \ell(a) = \tau\Big(\sum_{p \in P(a)} \rho^+(s_{ap}),\ \sum_{n \in N(a)} \rho^-(s_{an})\Big).

Writing the target of the pair :math:`(a, x)` as :math:`y_{ax} = 1` (positive) or 0 (negative),
the two sums are :math:`\sigma^+ = \sum_x y_{ax}\rho^+(s_{ax})` and
:math:`\sigma^- = \sum_x (1 - y_{ax})\rho^-(s_{ax})`. Metrix mixes two examples,
:math:`v = \lambda x_i + (1 - \lambda) x_j` (inputs, features or embeddings), gives the pair
:math:`(a, v)` the interpolated target :math:`\tilde y_{av} = \lambda y_{a x_i} + (1-\lambda) y_{a x_j}`,
and adds :math:`w\,\tau(\sum_v \tilde y_{av}\rho^+(s_{av}), \sum_v (1-\tilde y_{av})\rho^-(s_{av}))`
to the clean loss. Two instances:

- contrastive: :math:`\rho^+(s) = 1 - s`, :math:`\rho^-(s) = [s - m]_+`, :math:`\tau(x, y) = x + y`;
- multi-similarity: :math:`\rho^+(s) = e^{-\alpha(s - b)}`, :math:`\rho^-(s) = e^{\beta(s - b)}`,
  :math:`\tau(x, y) = \frac1\alpha\log(1 + x) + \frac1\beta\log(1 + y)`.

Everything is computed with weight matrices over the :math:`N \times M` similarity matrix; no
list of positive × negative pairs is built. Retrieval metrics live in :mod:`lossbook.retrieval`.
"""
from __future__ import annotations

import numbers
from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lossbook.retrieval import pair_masks, similarity_matrix

__all__ = ["MetrixLoss", "MixPairs", "interpolate", "metrix_loss", "mixed_pair_weights", "open_set_split",
           "pair_loss", "sample_mix", "utilization"]

_LOSSES = ("contrastive", "multi_similarity")


class MixPairs(NamedTuple):
    """``M`` mixing pairs: indices ``i``, ``j`` into the batch and weights ``lam`` (all ``(M,)``);
    the mixed example is ``lam * x[i] + (1 - lam) * x[j]``."""

    i: torch.Tensor
    j: torch.Tensor
    lam: torch.Tensor


def _positive(name: str, v: float, allow_zero: bool = False) -> float:
    if isinstance(v, bool) or not isinstance(v, numbers.Real) or not (v >= 0 if allow_zero else v > 0):
        raise ValueError(f"{name} must be a {'non-negative' if allow_zero else 'positive'} number, got {v!r}")
    return float(v)


def pair_loss(sim: torch.Tensor, pos_w: torch.Tensor, neg_w: torch.Tensor, *, loss: str = "contrastive",
              margin: float = 0.5, alpha: float = 2.0, beta: float = 50.0, base: float = 0.5) -> torch.Tensor:
    r"""The generic pair-based loss :math:`\tau(\sigma^+, \sigma^-)` of every anchor, with soft targets.

    .. math::
        \sigma^+_a = \sum_x w^+_{ax}\,\rho^+(s_{ax}), \qquad \sigma^-_a = \sum_x w^-_{ax}\,\rho^-(s_{ax}),
        \qquad \ell(a) = \tau(\sigma^+_a, \sigma^-_a).

    With :math:`w^+ = P` and :math:`w^- = N` (the masks of :func:`lossbook.retrieval.pair_masks`)
    this is the ordinary loss; with :math:`w^+ = \tilde y`, :math:`w^- = 1 - \tilde y` on mixed
    examples it is Metrix's mixed loss.

    - ``"contrastive"``: :math:`\rho^+(s) = 1 - s`, :math:`\rho^-(s) = [s - m]_+`, :math:`\tau(x, y) = x + y`.
    - ``"multi_similarity"``: :math:`\rho^+(s) = e^{-\alpha(s - b)}`, :math:`\rho^-(s) = e^{\beta(s - b)}`,
      :math:`\tau(x, y) = \frac1\alpha \log(1 + x) + \frac1\beta \log(1 + y)` (computed as a
      log-sum-exp with :math:`\log w` added to the exponents: stable for large :math:`\beta`).

    Args:
        sim: ``(N, M)`` similarities of N anchors with M examples (cosine in the paper).
        pos_w, neg_w: ``(N, M)`` non-negative weights (bool masks are accepted).
        loss: ``"contrastive"`` or ``"multi_similarity"``.
        margin: contrastive margin :math:`m`.
        alpha, beta, base: multi-similarity scales :math:`\alpha, \beta > 0` and offset :math:`b`.

    Returns:
        ``(N,)`` loss of each anchor, differentiable in ``sim``.

    Example::

        >>> s = torch.tensor([[0.9, 0.7]]); p = torch.tensor([[1.0, 0.0]])
        >>> pair_loss(s, p, 1 - p, margin=0.5)      # (1 - 0.9) + [0.7 - 0.5]_+
        tensor([0.3000])
    """
    if loss not in _LOSSES:
        raise ValueError(f"loss must be one of {_LOSSES}, got {loss!r}")
    if sim.dim() != 2 or not sim.is_floating_point():
        raise ValueError(f"sim must be a floating-point (N, M) matrix, got shape {tuple(sim.shape)}, dtype {sim.dtype}")
    for name, t in (("pos_w", pos_w), ("neg_w", neg_w)):
        if t.shape != sim.shape:
            raise ValueError(f"{name} must have the shape of sim {tuple(sim.shape)}, got {tuple(t.shape)}")
    pos_w, neg_w = pos_w.to(sim.dtype), neg_w.to(sim.dtype)
    if loss == "contrastive":
        return (pos_w * (1 - sim)).sum(1) + (neg_w * F.relu(sim - margin)).sum(1)
    alpha, beta = _positive("alpha", alpha), _positive("beta", beta)

    def log1p_weighted_sum_exp(z: torch.Tensor, wt: torch.Tensor) -> torch.Tensor:
        # log(1 + sum_x w_x e^{z_x}) = logsumexp([0, z_x + log w_x])
        z = torch.where(wt > 0, z + wt.clamp(min=torch.finfo(sim.dtype).tiny).log(),
                        torch.full_like(z, float("-inf")))
        return torch.logsumexp(torch.cat([torch.zeros_like(z[:, :1]), z], 1), dim=1)

    return (log1p_weighted_sum_exp(-alpha * (sim - base), pos_w) / alpha
            + log1p_weighted_sum_exp(beta * (sim - base), neg_w) / beta)


def sample_mix(labels: torch.Tensor, n_mix: int | None = None, *, alpha: float = 2.0,
               generator: torch.Generator | None = None) -> MixPairs:
    r"""Draw ``n_mix`` mixing pairs :math:`(i, j)` with :math:`y_i \ne y_j` and :math:`\lambda \sim \mathrm{Beta}(\alpha, \alpha)`.

    :math:`i` is uniform over the batch and :math:`j` uniform over the examples of another class, so
    for any anchor of :math:`i`'s class the mixed example is a positive–negative mix (the pairing
    the paper uses by default). One :math:`\lambda` per pair.

    Args:
        labels: ``(N,)`` integer labels, at least two classes present.
        n_mix: number of pairs M (default N).
        alpha: Beta parameter (the official embedding-mixup setting is 2).
        generator: optional ``torch.Generator`` (CPU) for reproducibility.

    Returns:
        :class:`MixPairs` of ``(M,)`` tensors on ``labels.device``.
    """
    if labels.dim() != 1 or labels.is_floating_point():
        raise ValueError(f"labels must be a 1-d integer tensor, got shape {tuple(labels.shape)}")
    n = labels.shape[0]
    n_mix = n if n_mix is None else n_mix
    if isinstance(n_mix, bool) or not isinstance(n_mix, int) or n_mix < 1:
        raise ValueError(f"n_mix must be a positive integer, got {n_mix!r}")
    alpha = _positive("alpha", alpha)
    dev = labels.device
    i = torch.randint(n, (n_mix,), generator=generator).to(dev)
    rows = labels[i][:, None] != labels[None, :]                        # (M, N): the other classes
    if labels.device.type == "cpu" and not bool(rows.any(1).all()):
        raise ValueError("labels must contain at least two classes to draw positive-negative mixes")
    u = torch.rand(n_mix, n, generator=generator).to(dev)
    j = torch.where(rows, u, -1.0).argmax(1)                           # uniform over the other classes
    conc = torch.full((n_mix, 2), alpha)
    if generator is None:
        ab = torch._standard_gamma(conc)
    else:   # torch's gamma sampler takes no generator: seed a forked global RNG from it
        seed = int(torch.randint(2**62, (1,), generator=generator))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            ab = torch._standard_gamma(conc)
    lam = (ab[:, 0] / ab.sum(1)).to(dev)
    return MixPairs(i, j, lam)


def interpolate(x: torch.Tensor, mix: MixPairs) -> torch.Tensor:
    r"""The mixed examples :math:`\lambda_k x_{i_k} + (1 - \lambda_k) x_{j_k}`, for inputs, features or
    embeddings of any shape ``(N, ...)``; returns ``(M, ...)``."""
    if x.dim() < 1 or not x.is_floating_point():
        raise ValueError(f"x must be a floating-point tensor of shape (N, ...), got {tuple(x.shape)}")
    lam = mix.lam.to(x.dtype).reshape(-1, *([1] * (x.dim() - 1)))
    return lam * x[mix.i] + (1 - lam) * x[mix.j]


def mixed_pair_weights(labels: torch.Tensor, mix: MixPairs) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Interpolated targets of every (anchor, mixed example) pair: ``(pos_w, neg_w)``, each ``(N, M)``.

    .. math::
        \tilde y_{ak} = \lambda_k \mathbb 1[y_a = y_{i_k}] + (1 - \lambda_k)\mathbb 1[y_a = y_{j_k}],
        \qquad w^+_{ak} = \tilde y_{ak}, \quad w^-_{ak} = 1 - \tilde y_{ak},

    both set to 0 where the anchor is itself one of the two mixed examples (:math:`a \in \{i_k, j_k\}`),
    as an example is never its own positive. For an anchor of :math:`i_k`'s class the mixed example
    is positive with weight :math:`\lambda_k` and negative with weight :math:`1 - \lambda_k`; for an
    anchor of neither class it is a plain negative.
    """
    if labels.dim() != 1:
        raise ValueError(f"labels must be 1-d, got shape {tuple(labels.shape)}")
    lam = mix.lam if mix.lam.is_floating_point() else mix.lam.to(torch.get_default_dtype())
    ya = labels[:, None]
    ar = torch.arange(labels.shape[0], device=labels.device)[:, None]
    valid = ((ar != mix.i[None]) & (ar != mix.j[None])).to(lam.dtype)
    y = torch.where(ya == labels[mix.i][None], lam, 0.0) + torch.where(ya == labels[mix.j][None], 1 - lam, 0.0)
    return y * valid, (1 - y) * valid


def metrix_loss(emb: torch.Tensor, labels: torch.Tensor, *, loss: str = "contrastive", w: float = 1.0,
                mix: MixPairs | None = None, mixed_emb: torch.Tensor | None = None, n_mix: int | None = None,
                alpha: float = 2.0, generator: torch.Generator | None = None, **loss_kw: float) -> torch.Tensor:
    r"""Metrix: clean pair loss plus :math:`w` times the loss on mixed examples with mixed targets.

    .. math::
        L = \frac1N \sum_a \tau\big(\sigma^+(P(a)), \sigma^-(N(a))\big)
          + w\, \frac1N \sum_a \tau\Big(\sum_k \tilde y_{ak}\rho^+(s_{a v_k}),\ \sum_k (1 - \tilde y_{ak})\rho^-(s_{a v_k})\Big).

    Embedding mixup (default): the mixed examples are :math:`v_k = \lambda_k e_{i_k} + (1-\lambda_k) e_{j_k}`
    of the (L2-normalised) batch embeddings ``emb``. For input or feature mixup, pass the pairs
    ``mix`` you mixed the inputs with (:func:`sample_mix`, :func:`interpolate`) and the embeddings of
    the mixed inputs as ``mixed_emb``. ``w = 0`` gives the plain loss.

    Args:
        emb: ``(N, D)`` embeddings of the batch; labels: ``(N,)`` integer labels.
        loss: ``"contrastive"`` or ``"multi_similarity"``; ``loss_kw`` go to :func:`pair_loss`.
        w: weight of the mixed loss (:math:`\ge 0`).
        mix: mixing pairs (drawn with :func:`sample_mix` from ``n_mix``, ``alpha``, ``generator`` if None).
        mixed_emb: ``(M, D)`` embeddings of mixed inputs (input/feature mixup), else None.

    Returns:
        scalar loss.
    """
    if emb.dim() != 2 or not emb.is_floating_point():
        raise ValueError(f"emb must be a floating-point (N, D) tensor, got {tuple(emb.shape)}")
    if labels.dim() != 1 or labels.shape[0] != emb.shape[0]:
        raise ValueError(f"labels must have shape ({emb.shape[0]},), got {tuple(labels.shape)}")
    w = _positive("w", w, allow_zero=True)
    emb = F.normalize(emb, dim=1)
    pos, neg = pair_masks(labels)
    clean = pair_loss(similarity_matrix(emb, normalize=False), pos, neg, loss=loss, **loss_kw).mean()
    if w == 0:
        return clean
    if mixed_emb is not None and mix is None:
        raise ValueError("mixed_emb needs the mix pairs it was made with")
    mix = sample_mix(labels, n_mix, alpha=alpha, generator=generator) if mix is None else mix
    mix = mix._replace(lam=mix.lam.to(emb.dtype))
    v = interpolate(emb, mix) if mixed_emb is None else mixed_emb
    if v.dim() != 2 or v.shape[1] != emb.shape[1] or v.shape[0] != mix.i.shape[0]:
        raise ValueError(f"mixed_emb must have shape ({mix.i.shape[0]}, {emb.shape[1]}), got {tuple(v.shape)}")
    pw, nw = mixed_pair_weights(labels, mix)
    mixed = pair_loss(similarity_matrix(emb, v), pw.to(emb.dtype), nw.to(emb.dtype), loss=loss, **loss_kw).mean()
    return clean + w * mixed


class MetrixLoss(nn.Module):
    """Module wrapper of :func:`metrix_loss` (embedding mixup): ``MetrixLoss("contrastive", w=1.0)(emb, labels)``."""

    def __init__(self, loss: str = "contrastive", *, w: float = 1.0, alpha: float = 2.0, n_mix: int | None = None,
                 generator: torch.Generator | None = None, **loss_kw: float):
        super().__init__()
        if loss not in _LOSSES:
            raise ValueError(f"loss must be one of {_LOSSES}, got {loss!r}")
        self.loss, self.w, self.alpha, self.n_mix, self.generator, self.loss_kw = loss, w, alpha, n_mix, generator, loss_kw

    def forward(self, emb: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return metrix_loss(emb, labels, loss=self.loss, w=self.w, alpha=self.alpha, n_mix=self.n_mix,
                           generator=self.generator, **self.loss_kw)


def utilization(query_emb: torch.Tensor, train_emb: torch.Tensor, *, normalize: bool = True) -> torch.Tensor:
    r"""Utilization: mean distance from each query (test) embedding to its nearest training embedding.

    .. math::
        u(Q) = \frac1{|Q|} \sum_{q \in Q} \min_{x \in X} \lVert f(q) - f(x) \rVert_2 .

    Lower means the test embeddings fall in regions the training examples already occupy.

    Args:
        query_emb: ``(Nq, D)``; train_emb: ``(Nx, D)``; normalize: L2-normalise both first.

    Returns:
        scalar tensor.
    """
    for name, t in (("query_emb", query_emb), ("train_emb", train_emb)):
        if t.dim() != 2 or not t.is_floating_point() or t.shape[0] == 0:
            raise ValueError(f"{name} must be a non-empty floating-point (N, D) tensor, got {tuple(t.shape)}")
    if query_emb.shape[1] != train_emb.shape[1]:
        raise ValueError(f"widths differ: {query_emb.shape[1]} and {train_emb.shape[1]}")
    if normalize:
        query_emb, train_emb = F.normalize(query_emb, dim=1), F.normalize(train_emb, dim=1)
    return torch.cdist(query_emb, train_emb).amin(1).mean()


def open_set_split(x: torch.Tensor, y: torch.Tensor, train_classes: Sequence[int]
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split by class, as metric learning evaluates: ``(x_train, y_train, x_test, y_test)`` with the
    training classes on one side and every other class on the other (disjoint label sets)."""
    if x.shape[0] != y.shape[0] or y.dim() != 1:
        raise ValueError(f"x and y must have matching first dimensions, got {tuple(x.shape)} and {tuple(y.shape)}")
    tr = torch.isin(y, torch.as_tensor(list(train_classes), dtype=y.dtype, device=y.device))
    if not bool(tr.any()) or bool(tr.all()):
        raise ValueError(f"train_classes {list(train_classes)} must leave both sides non-empty")
    return x[tr], y[tr], x[~tr], y[~tr]
