r"""Neural contextual bandits through online regression :cite:`deb2024contextual`, with the
neural :math:`\varepsilon`-greedy and LinUCB baselines, all vectorized over independent runs.

At round :math:`t` the learner sees a context for each of :math:`K` arms, picks an arm :math:`a_t`
from a distribution :math:`p_t`, and observes only that arm's reward :math:`r_{t,a_t} \in [0, 1]`.
The reduction of Foster & Rakhlin (2020) and Foster & Krishnamurthy (2021) turns any online
regression oracle :math:`\hat y_{t,a}` into such a distribution:

* **SquareCB** (inverse-gap weighting, square loss on rewards): with :math:`b = \arg\max_a \hat y_{t,a}`,

  .. math::
      p_{t,a} = \frac{1}{K + \gamma (\hat y_{t,b} - \hat y_{t,a})} \ (a \ne b), \qquad
      p_{t,b} = 1 - \sum_{a \ne b} p_{t,a};

* **FastCB** (KL / cross-entropy loss on losses :math:`\ell = 1 - r`): with :math:`b = \arg\min_a \hat\ell_{t,a}`,

  .. math::
      p_{t,a} = \frac{\hat\ell_{t,b}}{K \hat\ell_{t,b} + \gamma (\hat\ell_{t,a} - \hat\ell_{t,b})} \ (a \ne b), \qquad
      p_{t,b} = 1 - \sum_{a \ne b} p_{t,a}.

The oracle is a one-hidden-layer network on the disjoint encoding :math:`x_{t,a} = e_a \otimes x_t`
(each arm its own first-layer block, a shared output layer), trained by one online gradient step per
round on the chosen arm's loss, its prediction shifted by a small random perturbation
:math:`\tilde f = f(\theta; x) + \epsilon`, :math:`\epsilon \sim \mathcal N(0, \sigma_p^2)`, fresh each round and arm.

Every tensor carries a leading ``runs`` axis: seeds and hyperparameter values (``gamma``, ``eps``,
``perturb``, ``lr``, ``alpha`` may be given per run) advance together, one tensor operation per round.

Example::

    >>> import torch
    >>> X = torch.randn(100, 4); y = (X[:, 0] > 0).long()
    >>> env = ClassificationBandit(X, y, runs=8, horizon=50, generator=0)
    >>> agent = NeuralCB(8, 4, 2, width=16, loss="kl", explore="fastcb", gamma=10.0, generator=0)
    >>> run_bandit(env, agent).shape
    torch.Size([8, 50])
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

__all__ = ["ClassificationBandit", "LinUCB", "NeuralCB", "fastcb_probs", "igw_probs", "load_bandit_data",
           "run_bandit", "sample_actions"]


def _check_scores(x: torch.Tensor, name: str) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() < 1 or x.shape[-1] < 1:
        raise ValueError(f"{name} must be a tensor of shape (..., K) with K >= 1")
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} must be finite")


def _gamma_like(gamma: Any, ref: torch.Tensor) -> torch.Tensor:
    g = torch.as_tensor(gamma, dtype=ref.dtype, device=ref.device)
    if bool((g < 0).any()) or not bool(torch.isfinite(g).all()):
        raise ValueError(f"gamma must be finite and non-negative, got {gamma!r}")
    return g.unsqueeze(-1) if g.dim() > 0 else g


def igw_probs(preds: torch.Tensor, gamma: float | torch.Tensor) -> torch.Tensor:
    r"""Inverse-gap weighting (SquareCB) over predicted *rewards* ``preds`` of shape ``(..., K)``:

    .. math:: p_a = \frac{1}{K + \gamma(\hat y_b - \hat y_a)},\ a \ne b = \arg\max \hat y, \qquad p_b = 1 - \sum_{a\ne b} p_a.

    ``gamma`` :math:`\ge 0`: a scalar or one value per leading index (shape ``preds.shape[:-1]``).
    :math:`\gamma = 0` is uniform exploration; :math:`\gamma \to \infty` is greedy. Returns ``(..., K)``.
    """
    _check_scores(preds, "preds")
    g = _gamma_like(gamma, preds)
    K = preds.shape[-1]
    best = preds.argmax(-1, keepdim=True)
    gap = preds.gather(-1, best) - preds
    p = 1.0 / (K + g * gap)
    is_best = torch.zeros_like(p, dtype=torch.bool).scatter_(-1, best, True)
    p = p.masked_fill(is_best, 0.0)
    return p.scatter(-1, best, 1.0 - p.sum(-1, keepdim=True))


def fastcb_probs(pred_losses: torch.Tensor, gamma: float | torch.Tensor, *, floor: float = 1e-6) -> torch.Tensor:
    r"""FastCB's first-order inverse-gap weighting over predicted *losses* in :math:`[0, 1]`, shape ``(..., K)``:

    .. math:: p_a = \frac{\hat\ell_b}{K\hat\ell_b + \gamma(\hat\ell_a - \hat\ell_b)},\ a \ne b = \arg\min\hat\ell, \qquad p_b = 1 - \sum_{a\ne b} p_a.

    When the best arm's predicted loss is small the other arms are explored in proportion to it:
    exploration shrinks with the loss of the best policy. ``floor`` keeps :math:`\hat\ell_b > 0`
    (then :math:`0/0` cannot occur). Returns ``(..., K)``.
    """
    _check_scores(pred_losses, "pred_losses")
    if bool(((pred_losses < 0) | (pred_losses > 1)).any()):
        raise ValueError("pred_losses must lie in [0, 1]")
    if not floor > 0:
        raise ValueError(f"floor must be positive, got {floor!r}")
    g = _gamma_like(gamma, pred_losses)
    K = pred_losses.shape[-1]
    best = pred_losses.argmin(-1, keepdim=True)
    lb = pred_losses.gather(-1, best).clamp_min(floor)
    p = lb / (K * lb + g * (pred_losses - pred_losses.gather(-1, best)))
    is_best = torch.zeros_like(p, dtype=torch.bool).scatter_(-1, best, True)
    p = p.masked_fill(is_best, 0.0)
    return p.scatter(-1, best, 1.0 - p.sum(-1, keepdim=True))


def sample_actions(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One arm per row of ``probs`` ``(runs, K)`` by inverse-CDF sampling (one uniform per run)."""
    u = torch.rand(probs.shape[0], 1, generator=generator, device=probs.device, dtype=probs.dtype)
    return (probs.cumsum(-1) < u).sum(-1).clamp_max(probs.shape[-1] - 1)


def _gen(generator: torch.Generator | int | None, device: torch.device | str) -> torch.Generator:
    if isinstance(generator, torch.Generator):
        return generator
    return torch.Generator(torch.device(device)).manual_seed(int(generator or 0))


def _per_run(value: Any, runs: int, name: str, dtype: torch.dtype, device: Any) -> torch.Tensor:
    v = torch.as_tensor(value, dtype=dtype, device=device)
    if v.dim() == 0:
        v = v.expand(runs)
    if v.shape != (runs,):
        raise ValueError(f"{name} must be a scalar or have shape ({runs},), got {tuple(v.shape)}")
    if bool((v < 0).any()) or not bool(torch.isfinite(v).all()):
        raise ValueError(f"{name} must be finite and non-negative")
    return v.clone()


def load_bandit_data(name: str = "digits") -> tuple[torch.Tensor, torch.Tensor]:
    """A bundled scikit-learn classification set (``digits``, ``iris``, ``wine``, ``breast_cancer``) as
    standardized float32 features and integer labels (no download)."""
    from sklearn import datasets

    loaders = {"digits": datasets.load_digits, "iris": datasets.load_iris, "wine": datasets.load_wine,
               "breast_cancer": datasets.load_breast_cancer}
    if name not in loaders:
        raise ValueError(f"name must be one of {sorted(loaders)}, got {name!r}")
    X, y = loaders[name](return_X_y=True)
    X = (X - X.mean(0)) / np.where(X.std(0) > 0, X.std(0), 1.0)
    X = X / np.sqrt(X.shape[1])                        # rows of norm about 1
    return torch.tensor(X, dtype=torch.float32), torch.tensor(y, dtype=torch.long)


class ClassificationBandit:
    r"""The classification-to-bandit conversion: context :math:`x_t` = a sample's features, arms =
    classes, reward :math:`r_{t,a} = \mathbb 1[a = y_t]`. Each run sees its own random order of the data
    (reshuffled after every pass), so the best policy (the Bayes classifier) has reward 1 on
    separable data and the regret is the number of mistakes.

    ``repeats``: the runs form ``repeats`` consecutive blocks of ``runs // repeats`` that see the same
    orders (block ``c``, row ``s`` sees order ``s``): a grid of hyperparameters times seeds, paired by seed."""

    def __init__(self, X: torch.Tensor, y: torch.Tensor, *, runs: int, horizon: int, repeats: int = 1,
                 generator: torch.Generator | int | None = None) -> None:
        if X.dim() != 2 or y.shape != (X.shape[0],):
            raise ValueError(f"X must be (n, d) and y (n,), got {tuple(X.shape)} and {tuple(y.shape)}")
        if runs < 1 or horizon < 1:
            raise ValueError(f"runs and horizon must be positive, got {runs}, {horizon}")
        if repeats < 1 or runs % repeats:
            raise ValueError(f"repeats must be a positive divisor of runs={runs}, got {repeats}")
        if y.dtype not in (torch.int64, torch.int32) or int(y.min()) < 0:
            raise ValueError("y must hold non-negative integer class labels")
        self.X, self.y = X, y
        self.runs, self.horizon = runs, horizon
        self.n_arms = int(y.max()) + 1
        self.dim = X.shape[1]
        g = _gen(generator, "cpu")
        passes, base = math.ceil(horizon / X.shape[0]), runs // repeats
        order = torch.cat([torch.argsort(torch.rand(base, X.shape[0], generator=g), -1) for _ in range(passes)], -1)
        self.order = order[:, :horizon].repeat(repeats, 1).to(X.device)

    def context(self, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Round ``t`` (0-based): contexts ``(runs, d)`` and the labels ``(runs,)`` (kept from the learner)."""
        idx = self.order[:, t]
        return self.X[idx], self.y[idx]


class NeuralCB:
    r"""A neural online-regression oracle plus an exploration rule, ``runs`` independent copies.

    Network (disjoint arm encoding, one hidden layer of width :math:`m`):
    :math:`f(\theta; x_{t,a}) = \frac{1}{\sqrt m} v^\top \mathrm{relu}(W_a x_t + c)`,
    :math:`W_a \sim \mathcal N(0, 2/d)`, :math:`v \sim \mathcal N(0, 1)`; prediction
    :math:`\tilde f = f + \epsilon`, :math:`\epsilon \sim \mathcal N(0, \sigma_p^2)` (``perturb`` = :math:`\sigma_p`).

    * ``loss="square"``: :math:`\hat y = \tilde f` predicts the reward; loss :math:`\frac12(\tilde f - r)^2`.
    * ``loss="kl"``: :math:`\hat y = \mathrm{sigmoid}(\tilde f)`; loss = binary KL (cross-entropy) to :math:`r`;
      :math:`\hat\ell = 1 - \hat y` feeds FastCB.

    ``explore``: ``"igw"`` (SquareCB), ``"fastcb"`` or ``"eps_greedy"`` (greedy with probability
    :math:`1 - \varepsilon`, else uniform). ``gamma`` is scaled as :math:`\gamma_t = \gamma \sqrt{K t}` when
    ``anytime=True`` (the :math:`\sqrt{KT}` tuning, without knowing :math:`T`). One gradient step
    of size ``lr`` per round, on the chosen arm only (manual back-propagation, no autograd).
    ``repeats``: the initial weights are drawn for ``runs // repeats`` runs and tiled, so that every
    block of a hyperparameter grid starts from the same networks (as :class:`ClassificationBandit`).
    """

    def __init__(self, runs: int, dim: int, n_arms: int, *, width: int = 100, loss: str = "square",
                 explore: str = "igw", gamma: Any = 10.0, eps: Any = 0.05, perturb: Any = 0.0, lr: Any = 0.1,
                 anytime: bool = True, repeats: int = 1, generator: torch.Generator | int | None = None,
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> None:
        if loss not in ("square", "kl"):
            raise ValueError(f"loss must be 'square' or 'kl', got {loss!r}")
        if explore not in ("igw", "fastcb", "eps_greedy"):
            raise ValueError(f"explore must be 'igw', 'fastcb' or 'eps_greedy', got {explore!r}")
        if explore == "fastcb" and loss != "kl":
            raise ValueError("explore='fastcb' needs predictions in [0, 1]: use loss='kl'")
        if min(runs, dim, n_arms, width) < 1:
            raise ValueError(f"runs, dim, n_arms and width must be positive, got {runs}, {dim}, {n_arms}, {width}")
        if repeats < 1 or runs % repeats:
            raise ValueError(f"repeats must be a positive divisor of runs={runs}, got {repeats}")
        self.loss, self.explore, self.anytime = loss, explore, anytime
        self.runs, self.dim, self.K, self.m = runs, dim, n_arms, width
        kw = dict(dtype=dtype, device=device)
        self.gamma = _per_run(gamma, runs, "gamma", **kw)
        self.eps = _per_run(eps, runs, "eps", **kw)
        if bool((self.eps > 1).any()):
            raise ValueError("eps must lie in [0, 1]")
        self.perturb = _per_run(perturb, runs, "perturb", **kw)
        self.lr = _per_run(lr, runs, "lr", **kw)
        self.generator = _gen(generator, device)
        g = dict(generator=self.generator, device=self.generator.device)
        base = runs // repeats
        # W[r, a] is arm a's first-layer block, stored transposed (d, m): the forward pass is then one
        # batched row-vector product, several times faster than a batched matrix-vector product
        self.W = (torch.randn(base, n_arms, dim, width, **g) * math.sqrt(2.0 / dim)).to(**kw).repeat(repeats, 1, 1, 1)
        self.c = torch.zeros(runs, width, **kw)
        self.v = torch.randn(base, width, **g).to(**kw).repeat(repeats, 1)
        self.t = 0
        self._cache: tuple[torch.Tensor, ...] | None = None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        r"""Network outputs :math:`f(\theta; x_{t,a})` for every arm, ``(runs, K)``, and the pre-activations ``(runs, K, m)``."""
        pre = torch.matmul(x[:, None, None, :], self.W).squeeze(-2) + self.c.unsqueeze(1)
        return torch.einsum("rkm,rm->rk", pre.relu(), self.v) / math.sqrt(self.m), pre

    def probs(self, x: torch.Tensor) -> torch.Tensor:
        """The distribution over arms for contexts ``x`` ``(runs, d)``; caches what :meth:`update` needs."""
        f, pre = self.forward(x)
        noise = torch.randn(f.shape, generator=self.generator, device=self.generator.device).to(f)
        f_tilde = f + self.perturb.unsqueeze(-1) * noise
        yhat = f_tilde if self.loss == "square" else torch.sigmoid(f_tilde)
        self.t += 1
        gamma = self.gamma * math.sqrt(self.K * self.t) if self.anytime else self.gamma
        if self.explore == "igw":
            p = igw_probs(yhat, gamma)
        elif self.explore == "fastcb":
            p = fastcb_probs((1.0 - yhat).clamp(0.0, 1.0), gamma)
        else:
            greedy = torch.zeros_like(yhat).scatter_(-1, yhat.argmax(-1, keepdim=True), 1.0)
            e = self.eps.unsqueeze(-1)
            p = (1 - e) * greedy + e / self.K
        self._cache = (x, pre, f_tilde)
        return p

    def gradients(self, x: torch.Tensor, pre: torch.Tensor, action: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        r""":math:`\partial f(\theta; x_{t,a}) / \partial (W_a, c, v)` for the chosen arm ``action`` ``(runs,)``:
        :math:`\frac{1}{\sqrt m} (v \odot \mathbb 1[z > 0]) x^\top`, :math:`\frac{1}{\sqrt m} v \odot \mathbb 1[z > 0]`,
        :math:`\frac{1}{\sqrt m}\mathrm{relu}(z)`, with :math:`z = W_a x + c`; the first is returned
        transposed, shape ``(runs, d, m)``, as ``W`` is stored."""
        r = torch.arange(self.runs, device=x.device)
        z = pre[r, action]                                               # (runs, m)
        dc = self.v * (z > 0).to(z) / math.sqrt(self.m)
        return x.unsqueeze(-1) * dc.unsqueeze(1), dc, z.relu() / math.sqrt(self.m)

    def update(self, action: torch.Tensor, reward: torch.Tensor) -> torch.Tensor:
        """One online gradient step on the chosen arm's loss; returns that loss per run."""
        if self._cache is None:
            raise ValueError("call probs() before update()")
        x, pre, f_tilde = self._cache
        r = torch.arange(self.runs, device=x.device)
        ft = f_tilde[r, action]
        reward = reward.to(ft)
        if self.loss == "square":
            dl = ft - reward
            loss = 0.5 * dl * dl
        else:
            dl = torch.sigmoid(ft) - reward
            loss = torch.nn.functional.binary_cross_entropy_with_logits(ft, reward, reduction="none")
        gW, gc, gv = self.gradients(x, pre, action)
        s = (self.lr * dl).unsqueeze(-1)
        self.W[r, action] -= s.unsqueeze(-1) * gW
        self.c -= s * gc
        self.v -= s * gv
        self._cache = None
        return loss


class LinUCB:
    r"""Disjoint LinUCB (Li et al., 2010), ``runs`` copies: per arm a ridge estimate
    :math:`\hat\theta_a = A_a^{-1} b_a`, :math:`A_a = \lambda I + \sum x x^\top`, and the arm
    :math:`\arg\max_a \hat\theta_a^\top x + \alpha\sqrt{x^\top A_a^{-1} x}` (``alpha`` per run allowed).
    :math:`A_a^{-1}` is kept by Sherman–Morrison updates."""

    def __init__(self, runs: int, dim: int, n_arms: int, *, alpha: Any = 1.0, ridge: float = 1.0,
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> None:
        if min(runs, dim, n_arms) < 1 or ridge <= 0:
            raise ValueError(f"runs, dim, n_arms and ridge must be positive, got {runs}, {dim}, {n_arms}, {ridge}")
        kw = dict(dtype=dtype, device=device)
        self.runs, self.K = runs, n_arms
        self.alpha = _per_run(alpha, runs, "alpha", **kw)
        self.Ainv = torch.eye(dim, **kw).expand(runs, n_arms, dim, dim).clone() / ridge
        self.b = torch.zeros(runs, n_arms, dim, **kw)
        self._x: torch.Tensor | None = None

    def probs(self, x: torch.Tensor) -> torch.Tensor:
        """A one-hot distribution on the UCB arm, ``(runs, K)``."""
        Ax = torch.matmul(x[:, None, None, :], self.Ainv).squeeze(-2)     # A^{-1} is symmetric: x^T A^{-1} = (A^{-1} x)^T
        mean = torch.einsum("rki,rki->rk", Ax, self.b)
        bonus = torch.einsum("rki,ri->rk", Ax, x).clamp_min(0).sqrt()
        ucb = mean + self.alpha.unsqueeze(-1) * bonus
        self._x = x
        return torch.zeros_like(ucb).scatter_(-1, ucb.argmax(-1, keepdim=True), 1.0)

    def update(self, action: torch.Tensor, reward: torch.Tensor) -> None:
        if self._x is None:
            raise ValueError("call probs() before update()")
        x, r = self._x, torch.arange(self.runs, device=action.device)
        A = self.Ainv[r, action]                                         # (runs, d, d)
        Ax = torch.einsum("rij,rj->ri", A, x)
        self.Ainv[r, action] = A - Ax.unsqueeze(-1) * Ax.unsqueeze(-2) / (1 + (Ax * x).sum(-1)).view(-1, 1, 1)
        self.b[r, action] += reward.to(x).unsqueeze(-1) * x
        self._x = None


def run_bandit(env: ClassificationBandit, agent: Any, *, generator: torch.Generator | int | None = None,
               horizon: int | None = None, return_exploration: bool = False
               ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    r"""Play ``agent`` (``probs(x) -> (runs, K)``, ``update(action, reward)``) on ``env``; returns the
    per-round regret :math:`1 - r_{t,a_t}` (the best arm's reward is 1), shape ``(runs, T)``:
    its cumulative sum along the last axis is the regret curve. Actions are sampled with ``generator``.
    With ``return_exploration=True`` also the probability of leaving the greedy arm,
    :math:`1 - \max_a p_{t,a}`, per run and round (same shape)."""
    T = env.horizon if horizon is None else int(horizon)
    if not 1 <= T <= env.horizon:
        raise ValueError(f"horizon must lie in [1, {env.horizon}], got {horizon!r}")
    dev = env.X.device
    g = _gen(generator, dev)
    out = torch.empty(env.runs, T, device=dev)
    explore = torch.empty(env.runs, T, device=dev) if return_exploration else None
    for t in range(T):
        x, y = env.context(t)
        p = agent.probs(x)
        if explore is not None:
            explore[:, t] = 1.0 - p.amax(-1)
        a = sample_actions(p, g)
        reward = (a == y).to(x.dtype)
        agent.update(a, reward)
        out[:, t] = 1.0 - reward
    return (out, explore) if explore is not None else out
