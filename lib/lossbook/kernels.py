r"""Gaussian kernels and the kernel (Parzen-window) estimators built on them, shared by the chapters.

Everything here works on samples stored as rows: ``x`` of shape ``(N, d)``, or ``(N,)`` for ``N``
scalar samples (a 1-D tensor is *always* read as ``N`` one-dimensional points, never as one
``N``-dimensional point). The Gaussian kernel is

.. math::
    \kappa_\sigma(u, v) = \exp\!\Big(-\frac{\lVert u - v\rVert^2}{2\sigma^2}\Big),

left unnormalised: every estimator below is a ratio in which the normalising constant of the
Parzen window cancels.

Public functions:

* :func:`sq_distances`, :func:`gaussian_gram`, :func:`median_bandwidth` -- Gram matrices and the
  median heuristic for the width;
* :func:`kde` -- a Gaussian kernel density estimate, evaluated at query points;
* :func:`cs_divergence` -- the Cauchy-Schwarz divergence between two samples;
* :func:`cs_qmi` -- the Cauchy-Schwarz quadratic mutual information of paired samples;
* :func:`conditional_cs_divergence` -- the CS divergence between two conditionals
  :math:`p(y \mid x)` and :math:`q(\hat y \mid x)` sampled at the same inputs
  {cite}`yu2024csib`.

All are vectorised (no loop over samples), differentiable, and keep the device and dtype of
their input. Logarithms are natural (divide by :math:`\ln 2` for bits).
"""
from __future__ import annotations

import math
import numbers

import torch

__all__ = ["conditional_cs_divergence", "cs_divergence", "cs_qmi", "gaussian_gram", "kde",
           "median_bandwidth", "sq_distances"]

_NORMALIZERS = ("kde", "sum_sq")


def _as_samples(x: torch.Tensor, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if x.dim() == 1:
        x = x.unsqueeze(1)
    if x.dim() != 2:
        raise ValueError(f"{name} must have shape (N,) or (N, d), got {tuple(x.shape)}")
    if x.shape[0] < 1:
        raise ValueError(f"{name} must hold at least one sample")
    return x


def _check_sigma(sigma: float | torch.Tensor, name: str = "sigma") -> None:
    if isinstance(sigma, torch.Tensor):
        if sigma.numel() != 1:
            raise ValueError(f"{name} must be a scalar, got shape {tuple(sigma.shape)}")
        if sigma.device.type == "cpu" and not bool(sigma > 0):
            raise ValueError(f"{name} must be positive, got {float(sigma)}")
        return
    if isinstance(sigma, bool) or not isinstance(sigma, numbers.Real) or not math.isfinite(sigma) or sigma <= 0:
        raise ValueError(f"{name} must be a positive finite number, got {sigma!r}")


def _same_n(*pairs: tuple[str, torch.Tensor]) -> None:
    n = {name: t.shape[0] for name, t in pairs}
    if len(set(n.values())) != 1:
        raise ValueError("the samples must be paired (same number of rows), got "
                         + ", ".join(f"{k}: {v}" for k, v in n.items()))


def sq_distances(x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
    r"""Squared Euclidean distances :math:`D_{ij} = \lVert x_i - y_j\rVert^2`, shape ``(N, M)``.

    Computed as :math:`\lVert x_i\rVert^2 + \lVert y_j\rVert^2 - 2 x_i^\top y_j` and clamped at 0
    (round-off can make it slightly negative); the diagonal of ``sq_distances(x)`` is exactly 0.
    """
    x = _as_samples(x, "x")
    y = x if y is None else _as_samples(y, "y")
    if y.shape[1] != x.shape[1]:
        raise ValueError(f"x and y must have the same dimension, got {x.shape[1]} and {y.shape[1]}")
    d = (x * x).sum(1, keepdim=True) + (y * y).sum(1).unsqueeze(0) - 2.0 * x @ y.T
    d = d.clamp_min(0.0)
    if y is x:
        d = d - torch.diag_embed(d.diagonal())
    return d


def gaussian_gram(x: torch.Tensor, y: torch.Tensor | None = None, sigma: float | torch.Tensor = 1.0) -> torch.Tensor:
    r"""Gaussian Gram matrix :math:`K_{ij} = \exp(-\lVert x_i - y_j\rVert^2 / 2\sigma^2)`, shape ``(N, M)``.

    Args:
        x: ``(N, d)`` or ``(N,)`` samples.
        y: ``(M, d)`` or ``(M,)`` samples; ``None`` for ``x`` itself (then ``K`` is symmetric
            with unit diagonal).
        sigma: kernel width, positive.

    Example:
        >>> gaussian_gram(torch.tensor([0.0, 1.0]), sigma=1.0)
        tensor([[1.0000, 0.6065],
                [0.6065, 1.0000]])
    """
    _check_sigma(sigma)
    return torch.exp(sq_distances(x, y) / (-2.0 * sigma ** 2))


def median_bandwidth(x: torch.Tensor, y: torch.Tensor | None = None, *, floor: float = 1e-2) -> torch.Tensor:
    r"""The median heuristic: :math:`\sigma = \operatorname{median}_{i<j} \lVert z_i - z_j\rVert` over
    the distinct pairs of the pooled sample :math:`z = (x, y)`, floored at ``floor``.

    For an even number of pairs this is the lower of the two middle distances (``torch.median``).
    Returned as a detached 0-dim tensor (a width is a hyper-parameter, not something to
    differentiate through). Needs at least two samples.
    """
    z = _as_samples(x, "x")
    if y is not None:
        z = torch.cat([z, _as_samples(y, "y")])
    if z.shape[0] < 2:
        raise ValueError("median_bandwidth needs at least two samples")
    d = sq_distances(z.detach())
    iu = torch.triu_indices(*d.shape, offset=1, device=d.device)
    return d[iu[0], iu[1]].sqrt().median().clamp_min(floor)


def kde(query: torch.Tensor, samples: torch.Tensor, sigma: float | torch.Tensor = 1.0) -> torch.Tensor:
    r"""Gaussian kernel density estimate at the query points,

    .. math::
        \hat p(u) = \frac{1}{N (2\pi\sigma^2)^{d/2}} \sum_{i=1}^N \kappa_\sigma(u, x_i),

    shape ``(M,)`` for ``M`` query points. This one is normalised: it integrates to 1.
    """
    samples = _as_samples(samples, "samples")
    d = samples.shape[1]
    return gaussian_gram(query, samples, sigma).mean(1) / (2 * math.pi * sigma ** 2) ** (d / 2)


def cs_divergence(x: torch.Tensor, y: torch.Tensor, sigma: float | torch.Tensor = 1.0) -> torch.Tensor:
    r"""Cauchy-Schwarz divergence between the distributions of two samples,

    .. math::
        D_{CS}(p \Vert q) = -\log \frac{\left(\int p q\right)^2}{\int p^2 \int q^2}
        \approx \log \frac{1}{N^2}\sum_{ij} K^{xx}_{ij} + \log \frac{1}{M^2}\sum_{ij} K^{yy}_{ij}
        - 2 \log \frac{1}{NM}\sum_{ij} K^{xy}_{ij},

    with Parzen windows of width :math:`\sigma` (the plug-in estimator; with the kernel of width
    :math:`\sigma` in the Gram matrices, the windows have width :math:`\sigma/\sqrt 2`).
    Symmetric, zero when the samples coincide, and :math:`\ge 0` (the Gram matrix of the pooled
    sample is positive semi-definite). ``x``: ``(N, d)``; ``y``: ``(M, d)``.
    """
    x, y = _as_samples(x, "x"), _as_samples(y, "y")
    _check_sigma(sigma)
    return (gaussian_gram(x, None, sigma).mean().log() + gaussian_gram(y, None, sigma).mean().log()
            - 2 * gaussian_gram(x, y, sigma).mean().log())


def cs_qmi(x: torch.Tensor, t: torch.Tensor, sigma_x: float | torch.Tensor = 1.0,
           sigma_t: float | torch.Tensor | None = None, *, normalized: bool = False) -> torch.Tensor:
    r"""Cauchy-Schwarz quadratic mutual information of paired samples :math:`(x_i, t_i)`,

    .. math::
        I_{CS}(x; t) = D_{CS}\big(p(x, t) \Vert p(x) p(t)\big)
        \approx \log \frac{\operatorname{tr}(K_x K_t)}{N^2}
        + \log \frac{\mathbf 1^\top K_x \mathbf 1\, \mathbf 1^\top K_t \mathbf 1}{N^4}
        - 2 \log \frac{\mathbf 1^\top K_x K_t \mathbf 1}{N^3},

    with product Gaussian kernels (:math:`K_x` of width ``sigma_x`` on ``x``, :math:`K_t` of width
    ``sigma_t``, default ``sigma_x``, on ``t``). It is :math:`\ge 0`, and 0 when either Gram matrix
    is constant. ``normalized=True`` returns
    :math:`I_{CS}(x;t) / \sqrt{I_{CS}(x;x)\, I_{CS}(t;t)}`, the scale-free form the CS-IB code
    uses as its compression term {cite}`yu2024csib`.

    Args:
        x: ``(N, d_x)`` or ``(N,)``; t: ``(N, d_t)`` or ``(N,)``, paired with ``x`` row by row.
    """
    x, t = _as_samples(x, "x"), _as_samples(t, "t")
    _same_n(("x", x), ("t", t))
    sigma_t = sigma_x if sigma_t is None else sigma_t
    kx, kt = gaussian_gram(x, None, sigma_x), gaussian_gram(t, None, sigma_t)

    def qmi(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        joint = (a * b).mean()                              # tr(A B) / N^2 for symmetric A, B
        marg = a.mean() * b.mean()                          # (1'A1)(1'B1) / N^4
        cross = (a.mean(0) * b.mean(0)).mean()              # 1'A B 1 / N^3
        return joint.log() + marg.log() - 2 * cross.log()

    i_xt = qmi(kx, kt)
    if not normalized:
        return i_xt
    return i_xt / (qmi(kx, kx) * qmi(kt, kt)).sqrt()


def conditional_cs_divergence(x: torch.Tensor, y: torch.Tensor, y_hat: torch.Tensor,
                              sigma_x: float | torch.Tensor = 1.0, sigma_y: float | torch.Tensor | None = None,
                              *, normalizer: str = "kde") -> torch.Tensor:
    r"""CS divergence between the conditionals :math:`p(y \mid x)` and :math:`q(\hat y \mid x)`,
    sampled as triples :math:`(x_i, y_i, \hat y_i)` at the same inputs {cite}`yu2024csib`.

    With :math:`K` the Gram matrix of ``x`` (width ``sigma_x``), :math:`L^1`, :math:`L^2` those of
    ``y`` and ``y_hat`` and :math:`L^{21}_{ji} = \kappa(\hat y_j, y_i)` (width ``sigma_y``,
    default ``sigma_x``),

    .. math::
        \hat D_{CS} = \log \sum_j \frac{\sum_i K_{ji} L^1_{ji}}{w_j}
        + \log \sum_j \frac{\sum_i K_{ji} L^2_{ji}}{w_j}
        - 2 \log \sum_j \frac{\sum_i K_{ji} L^{21}_{ji}}{w_j},

    where ``normalizer="kde"`` uses :math:`w_j = (\sum_i K_{ji})^2`, the plug-in Parzen
    estimate of :math:`p(x_j)^2` (the conditional CS divergence estimator), and
    ``normalizer="sum_sq"`` uses :math:`w_j = \sum_i K_{ji}^2`, as the CS-IB authors' script
    does. It is 0 when ``y_hat == y``. As ``sigma_x -> 0`` (:math:`K \to I`) it tends to
    :math:`-2 \log \frac1N \sum_j \kappa(\hat y_j, y_j)`, a correntropy loss; as
    ``sigma_x -> inf`` to the unconditional :func:`cs_divergence` of ``y`` and ``y_hat``.

    Args:
        x: ``(N, d)`` inputs; y, y_hat: ``(N,)`` or ``(N, k)`` targets and predictions.
        normalizer: ``"kde"`` (default) or ``"sum_sq"``.
    """
    if normalizer not in _NORMALIZERS:
        raise ValueError(f"normalizer must be one of {_NORMALIZERS}, got {normalizer!r}")
    x, y, y_hat = _as_samples(x, "x"), _as_samples(y, "y"), _as_samples(y_hat, "y_hat")
    _same_n(("x", x), ("y", y), ("y_hat", y_hat))
    if y.shape[1] != y_hat.shape[1]:
        raise ValueError(f"y and y_hat must have the same dimension, got {y.shape[1]} and {y_hat.shape[1]}")
    sigma_y = sigma_x if sigma_y is None else sigma_y
    k = gaussian_gram(x, None, sigma_x)
    w = k.sum(1) ** 2 if normalizer == "kde" else (k * k).sum(1)

    def term(lm: torch.Tensor) -> torch.Tensor:
        return ((k * lm).sum(1) / w).sum().log()

    return (term(gaussian_gram(y, None, sigma_y)) + term(gaussian_gram(y_hat, None, sigma_y))
            - 2 * term(gaussian_gram(y_hat, y, sigma_y)))
