r"""Cauchy-Schwarz divergence information bottleneck (CS-IB) for regression {cite}`yu2024csib`.

A network encodes the input :math:`x` into a representation :math:`t` and decodes a prediction
:math:`\hat y` from it. CS-IB trains it on the information-bottleneck Lagrangian with both terms
written in Cauchy-Schwarz quantities and estimated from the batch with Gaussian Gram matrices,

.. math::
    \mathcal L = D_{CS}\big(p(y \mid x) \,\Vert\, q_\theta(\hat y \mid x)\big) + \beta\, I_{CS}(x; t),

no variational bound and no Gaussian decoder. The estimators live in :mod:`lossbook.kernels`;
this module holds the objective (:func:`cs_ib_terms`, :func:`cs_ib_loss`), the baselines it is
compared with (:func:`vib_loss`, a variational IB), an encoder-decoder network
(:class:`IBRegressor`), a small training loop (:func:`fit_regressor`) and the FGSM attack on a
regressor (:func:`fgsm`).
"""
from __future__ import annotations

import math
import numbers
from typing import Callable, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lossbook.kernels import conditional_cs_divergence, cs_qmi

__all__ = ["IBOutput", "IBRegressor", "cs_ib_loss", "cs_ib_terms", "fgsm", "fit_regressor", "vib_loss"]


def _check_nonneg(value: float, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


class IBOutput(NamedTuple):
    """What :class:`IBRegressor` returns: the representation ``t`` (N, k) used downstream, the
    prediction ``y_hat`` (N,), and the encoder's mean and log-variance (N, k)."""

    t: torch.Tensor
    y_hat: torch.Tensor
    mu: torch.Tensor
    logvar: torch.Tensor


class IBRegressor(nn.Module):
    r"""Encoder :math:`x \to t` and decoder :math:`t \to \hat y` (ReLU MLPs), as in the CS-IB code.

    The encoder ends in two linear heads, a mean :math:`\mu(x)` and a log-variance. With
    ``stochastic=False`` (CS-IB, and plain MSE) :math:`t = \mu(x)`; with ``stochastic=True``
    (the variational IB) :math:`t = \mu + e^{\log\sigma^2/2}\,\varepsilon` in training mode and
    :math:`t = \mu` in eval mode.

    Args:
        in_dim: input features; hidden: encoder widths; k: dimension of ``t``;
        dec_hidden: decoder widths (default: the last encoder width).
    """

    def __init__(self, in_dim: int, hidden: Sequence[int] = (128, 128), k: int = 128, *,
                 dec_hidden: Sequence[int] | None = None, stochastic: bool = False):
        super().__init__()
        dec_hidden = tuple(hidden[-1:]) if dec_hidden is None else tuple(dec_hidden)
        if in_dim < 1 or k < 1 or any(h < 1 for h in (*hidden, *dec_hidden)):
            raise ValueError(f"layer widths must be positive, got in_dim={in_dim}, hidden={tuple(hidden)}, "
                             f"k={k}, dec_hidden={dec_hidden}")
        widths = [in_dim, *hidden]
        enc: list[nn.Module] = [nn.Flatten()]
        for a, b in zip(widths[:-1], widths[1:]):
            enc += [nn.Linear(a, b), nn.ReLU()]
        self.encoder = nn.Sequential(*enc)
        self.mean = nn.Linear(widths[-1], k)
        self.logvar = nn.Linear(widths[-1], k)
        dec: list[nn.Module] = []
        widths = [k, *dec_hidden]
        for a, b in zip(widths[:-1], widths[1:]):
            dec += [nn.Linear(a, b), nn.ReLU()]
        dec.append(nn.Linear(widths[-1], 1))
        self.decoder = nn.Sequential(*dec)
        self.stochastic = stochastic

    def forward(self, x: torch.Tensor) -> IBOutput:
        h = self.encoder(x)
        mu, logvar = self.mean(h), self.logvar(h)
        t = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu) if (self.stochastic and self.training) else mu
        return IBOutput(t, self.decoder(t).squeeze(-1), mu, logvar)


def cs_ib_terms(x: torch.Tensor, y: torch.Tensor, y_hat: torch.Tensor, t: torch.Tensor, *,
                sigma_x: float = 1.0, sigma_y: float | None = None, sigma_t: float | None = None,
                normalized: bool = True, normalizer: str = "kde") -> tuple[torch.Tensor, torch.Tensor]:
    r"""The two CS-IB terms on a batch: the prediction term
    :math:`\hat D_{CS}(p(y \mid x) \Vert q(\hat y \mid x))` and the compression term
    :math:`\hat I_{CS}(x; t)` (normalised by default, as in the authors' code).

    Widths: ``sigma_x`` for the input kernel of both terms, ``sigma_y`` (default ``sigma_x``) for
    targets and predictions, ``sigma_t`` (default ``sigma_x``) for the representation; the
    authors use 1 for all, on standardised inputs. ``normalizer`` is passed to
    :func:`lossbook.kernels.conditional_cs_divergence`.

    Shapes: x ``(N, d)``, y and y_hat ``(N,)``, t ``(N, k)``. Returns two 0-dim tensors.
    """
    x = x.flatten(1)
    pred = conditional_cs_divergence(x, y, y_hat, sigma_x, sigma_y, normalizer=normalizer)
    comp = cs_qmi(x, t, sigma_x, sigma_t, normalized=normalized)
    return pred, comp


def cs_ib_loss(x: torch.Tensor, y: torch.Tensor, y_hat: torch.Tensor, t: torch.Tensor, *, beta: float = 1e-2,
               **kw) -> torch.Tensor:
    r"""The CS-IB objective :math:`\hat D_{CS}(p(y \mid x) \Vert q(\hat y \mid x)) + \beta\, \hat I_{CS}(x; t)`.

    ``beta >= 0`` weighs compression (the authors sweep :math:`10^{-4}` to 1, default
    :math:`10^{-2}`); other keywords go to :func:`cs_ib_terms`.

    Example:
        >>> model = IBRegressor(10, (64, 64), 32)
        >>> out = model(x)
        >>> loss = cs_ib_loss(x, y, out.y_hat, out.t, beta=1e-2)
    """
    beta = _check_nonneg(beta, "beta")
    pred, comp = cs_ib_terms(x, y, y_hat, t, **kw)
    return pred + beta * comp if beta else pred


def vib_loss(y: torch.Tensor, y_hat: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor, *,
             beta: float = 1e-3) -> torch.Tensor:
    r"""Variational IB for regression {cite}`alemi2017vib`: a Gaussian decoder (mean squared error)
    plus :math:`\beta\,\mathrm{KL}\big(\mathcal N(\mu, \operatorname{diag} e^{\log\sigma^2}) \Vert \mathcal N(0, I)\big)`,

    .. math::
        \frac1N \sum_i (y_i - \hat y_i)^2 + \frac{\beta}{N} \sum_i \tfrac12 \sum_k
        \big(\mu_{ik}^2 + \sigma_{ik}^2 - \log \sigma_{ik}^2 - 1\big).
    """
    beta = _check_nonneg(beta, "beta")
    if y.shape != y_hat.shape:
        raise ValueError(f"y and y_hat must have the same shape, got {tuple(y.shape)} and {tuple(y_hat.shape)}")
    kl = 0.5 * (mu.pow(2) + logvar.exp() - logvar - 1).sum(-1).mean()
    return F.mse_loss(y_hat, y) + beta * kl


def fgsm(model: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, y: torch.Tensor, eps: float) -> torch.Tensor:
    r"""Fast gradient sign attack on a regressor: :math:`x' = x + \epsilon\,\operatorname{sign}\nabla_x (y - f(x))^2`,
    every sample against its own squared error. ``model(x)`` returns the predictions (N,) (wrap
    an :class:`IBRegressor` as ``lambda x: m(x).y_hat``). Returns detached ``x'``."""
    eps = _check_nonneg(eps, "eps")
    x = x.detach().clone().requires_grad_(True)
    err = (model(x).reshape(-1) - y.reshape(-1)).pow(2).sum()
    (grad,) = torch.autograd.grad(err, x)
    return (x + eps * grad.sign()).detach()


def fit_regressor(model: nn.Module, objective: Callable[[IBOutput, torch.Tensor, torch.Tensor], torch.Tensor],
                  x: torch.Tensor, y: torch.Tensor, *, epochs: int, batch_size: int = 128, lr: float = 1e-3,
                  step_size: int | None = None, gamma: float = 0.6,
                  generator: torch.Generator | None = None) -> list[float]:
    """Adam on ``objective(model(xb), xb, yb)`` over shuffled mini-batches (full batches only:
    a kernel estimate on a one-point remainder is meaningless, so the last partial batch is
    dropped). ``step_size`` enables the authors' StepLR schedule (``gamma`` every ``step_size``
    epochs). Leaves the model in eval mode; returns the mean training loss of each epoch."""
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    if not 2 <= batch_size <= len(x):
        raise ValueError(f"batch_size must be in [2, {len(x)}], got {batch_size}")
    opt = torch.optim.Adam(model.parameters(), lr=lr, fused=x.device.type in ("cpu", "cuda"))
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size, gamma) if step_size else None
    n_batches = len(x) // batch_size
    losses = []
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=generator).to(x.device)
        total = torch.zeros((), device=x.device)
        for b in range(n_batches):
            idx = order[b * batch_size:(b + 1) * batch_size]
            xb, yb = x[idx], y[idx]
            loss = objective(model(xb), xb, yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.detach()
        if sched is not None:
            sched.step()
        losses.append(total / n_batches)
    model.eval()
    return [float(v) for v in torch.stack(losses).cpu()]
