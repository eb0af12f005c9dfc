r"""Policy optimisation for adversarial linear MDPs with a simulator :cite:`dai2023refined`, and the
:math:`K^{2/3}`-tuned exponential-weights baseline of Luo, Wei and Lee (2021).

The MDP is layered: steps :math:`h = 1..H`, :math:`S` states per step, :math:`A` actions, fixed
transitions :math:`P_h(s'\mid s,a)` and adversarial losses :math:`\ell_{k,h}(s,a)\in[0,1]` that change
with the episode :math:`k`. It is written in linear form with one-hot features
:math:`\phi(s,a) = e_{(s,a)} \in \mathbb R^{SA}`, so :math:`Q_{k,h}(s,a) = \phi(s,a)^\top\theta_{k,h}` exactly.

Per state the policy is FTRL on the estimated Q-functions,

.. math::
    \pi_k(\cdot\mid s) = \arg\min_{p\in\Delta_A}\ \Big\langle p, \sum_{\tau<k}\hat Q_\tau(s,\cdot)\Big\rangle + \psi(p),

with the log-barrier :math:`\psi(p) = \frac1\eta\sum_a \log\frac1{p_a}` (the paper) or the negative
entropy :math:`\psi(p) = \frac1\eta\sum_a p_a\log p_a` (the baseline, mixed with :math:`\gamma` uniform
exploration). The estimator is :math:`\hat\theta_{k,h} = \Sigma_{k,h}^{-1}\phi(s_{k,h},a_{k,h})L_{k,h}` with
:math:`L_{k,h}` the realised loss-to-go of a roll-out of :math:`\pi_k` and
:math:`\Sigma_{k,h} = \mathbb E_{\pi_k}[\phi\phi^\top] = \mathrm{diag}(q_{k,h})` (occupancy measure), which
the simulator gives exactly here. All functions hold ``R`` independent runs in one tensor.
"""
from __future__ import annotations

import math

import torch

__all__ = ["LayeredMDP", "logbarrier_ftrl", "exp_weights", "occupancy", "best_fixed_policy_loss",
           "q_estimate", "run_policy_optimization"]


def logbarrier_ftrl(cum_loss: torch.Tensor, eta: torch.Tensor | float, iters: int = 10) -> torch.Tensor:
    r"""Log-barrier FTRL on the simplex over the last axis:
    :math:`p = \arg\min_p \langle p, \hat L\rangle + \frac1\eta\sum_a\log\frac1{p_a}`.

    Closed form :math:`p_a = 1/(\eta(\hat L_a + \lambda))` with :math:`\lambda` the root of
    :math:`\sum_a p_a = 1`, found by Newton's method from :math:`\lambda_0 = 1/\eta - \min_a\hat L_a`
    (where :math:`\sum_a p_a \ge 1`; the iteration increases monotonically to the root since the sum is
    convex and decreasing in :math:`\lambda`; 8 steps reach round-off even for :math:`\eta\hat L` spread over
    :math:`10^3`). ``eta`` broadcasts against ``cum_loss[..., 0]``.
    """
    if cum_loss.ndim < 1 or cum_loss.shape[-1] < 1:
        raise ValueError(f"cum_loss needs a last (action) axis, got shape {tuple(cum_loss.shape)}")
    eta = torch.as_tensor(eta, dtype=cum_loss.dtype, device=cum_loss.device)
    if bool((eta <= 0).any()):
        raise ValueError("eta must be positive")
    eta = eta.unsqueeze(-1) if eta.ndim else eta
    L = cum_loss - cum_loss.amin(-1, keepdim=True)             # shift: lambda now starts at 1/eta
    lam = torch.ones_like(L[..., :1]) / eta
    for _ in range(iters):
        r = 1.0 / (L + lam)                                     # = eta * p
        lam = lam + (r.sum(-1, keepdim=True) - eta) / (r * r).sum(-1, keepdim=True)
    p = 1.0 / (eta * (L + lam))
    return p / p.sum(-1, keepdim=True)                          # remove the last round-off


def exp_weights(cum_loss: torch.Tensor, eta: torch.Tensor | float, gamma: torch.Tensor | float = 0.0) -> torch.Tensor:
    r"""Negative-entropy FTRL (exponential weights) mixed with uniform exploration:
    :math:`p = (1-\gamma)\,\mathrm{softmax}(-\eta\hat L) + \gamma/A`."""
    eta = torch.as_tensor(eta, dtype=cum_loss.dtype, device=cum_loss.device)
    gamma = torch.as_tensor(gamma, dtype=cum_loss.dtype, device=cum_loss.device)
    if bool((eta <= 0).any()) or bool((gamma < 0).any()) or bool((gamma > 1).any()):
        raise ValueError("need eta > 0 and gamma in [0, 1]")
    eta = eta.unsqueeze(-1) if eta.ndim else eta
    gamma = gamma.unsqueeze(-1) if gamma.ndim else gamma
    return (1 - gamma) * torch.softmax(-eta * cum_loss, -1) + gamma / cum_loss.shape[-1]


class LayeredMDP:
    r"""A random layered tabular MDP (one-hot linear MDP) with an oblivious adversary.

    ``P``: ``(H, S, A, S)`` transitions, ``rho``: ``(S,)`` initial law. Losses of episode ``k``:
    :math:`\ell_{k} = \mathrm{clip}(\bar\ell + \tfrac{\Delta}{2} c_k (\ell^{(1)} - \ell^{(0)}) + \text{noise}_k, 0, 1)`
    where :math:`c_k=\pm1` switches sign on a doubling schedule (:math:`k = 2^j`), so the best action
    in hindsight keeps changing: an adversarial (non-stationary, oblivious) sequence.
    """

    def __init__(self, H: int = 4, S: int = 3, A: int = 4, *, seed: int = 0, noise: float = 0.2,
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float64):
        if min(H, S, A) < 1 or A < 2:
            raise ValueError(f"need H, S >= 1 and A >= 2, got H={H}, S={S}, A={A}")
        g = torch.Generator().manual_seed(seed)
        self.H, self.S, self.A, self.noise = H, S, A, noise
        self.device, self.dtype = torch.device(device), dtype
        P = torch.rand(H, S, A, S, generator=g, dtype=dtype) ** 3
        self.P = (P / P.sum(-1, keepdim=True)).to(self.device)
        self.rho = torch.full((S,), 1.0 / S, dtype=dtype, device=self.device)
        self.l0 = torch.rand(H, S, A, generator=g, dtype=dtype).to(self.device)
        self.l1 = torch.rand(H, S, A, generator=g, dtype=dtype).to(self.device)
        self._seed = seed

    def losses(self, K: int) -> torch.Tensor:
        """The loss tables of episodes ``1..K``, shape ``(K, H, S, A)``, fixed in advance (oblivious)."""
        g = torch.Generator().manual_seed(self._seed + 1)
        k = torch.arange(1, K + 1)
        sign = torch.where(torch.floor(torch.log2(k.double())) % 2 == 0, 1.0, -1.0).to(self.dtype)
        noise = self.noise * (torch.rand(K, self.H, self.S, self.A, generator=g, dtype=self.dtype) - 0.5)
        mid, diff = (self.l0 + self.l1) / 2, (self.l1 - self.l0) / 2
        return (mid + sign.view(-1, 1, 1, 1).to(self.device) * diff + noise.to(self.device)).clamp(0, 1)


def occupancy(mdp: LayeredMDP, pi: torch.Tensor) -> torch.Tensor:
    r"""Occupancy measure :math:`q_h(s,a) = \Pr_\pi[s_h=s, a_h=a]` for policies ``pi`` ``(..., H, S, A)``."""
    q = []
    d = mdp.rho.expand(pi.shape[:-3] + (mdp.S,))
    for h in range(mdp.H):
        qh = d.unsqueeze(-1) * pi[..., h, :, :]
        q.append(qh)
        d = torch.einsum("...sa,sat->...t", qh, mdp.P[h])
    return torch.stack(q, -3)


def best_fixed_policy_loss(mdp: LayeredMDP, loss_sum: torch.Tensor) -> torch.Tensor:
    r""":math:`\min_\pi \sum_k V^\pi_1(\ell_k)`, by backward dynamic programming on the summed losses
    ``loss_sum`` ``(..., H, S, A)`` (the value is linear in the losses, so the sum suffices)."""
    V = torch.zeros(loss_sum.shape[:-3] + (mdp.S,), dtype=loss_sum.dtype, device=loss_sum.device)
    for h in reversed(range(mdp.H)):
        Q = loss_sum[..., h, :, :] + torch.einsum("sat,...t->...sa", mdp.P[h], V)
        V = Q.amin(-1)
    return (V * mdp.rho).sum(-1)


def q_estimate(mdp: LayeredMDP, pi: torch.Tensor, loss: torch.Tensor, q: torch.Tensor,
               generator: torch.Generator | None = None, u: torch.Tensor | None = None) -> torch.Tensor:
    r"""The simulator estimator :math:`\hat Q_{k,h}(s,a) = \phi(s,a)^\top\Sigma_{k,h}^{-1}\phi(s_{k,h},a_{k,h})L_{k,h}`
    from one roll-out of ``pi`` (``(R, H, S, A)``) per run; with one-hot features it is
    :math:`\mathbb 1[s_{k,h}=s,a_{k,h}=a]\,L_{k,h}/q_{k,h}(s,a)`, unbiased for :math:`Q^{\pi_k}_{k,h}`. The roll-out uses the uniforms ``u`` ``(R, H, 2)`` if given (common
    random numbers across methods), else draws them from ``generator``."""
    R, H, S, A = pi.shape
    ar = torch.arange(R, device=pi.device)
    if u is None:
        u = torch.rand(R, H, 2, generator=generator, dtype=pi.dtype).to(pi.device)
    elif u.shape != (R, H, 2):
        raise ValueError(f"u must have shape {(R, H, 2)}, got {tuple(u.shape)}")
    s = torch.searchsorted(mdp.rho.cumsum(0), u[:, 0, 0].contiguous()).clamp(max=S - 1)
    states, actions, lh = [], [], []
    for h in range(H):
        a = (u[:, h, 1:2] > pi[ar, h, s].cumsum(-1)).sum(-1).clamp(max=A - 1)
        states.append(s), actions.append(a), lh.append(loss[h, s, a] if loss.ndim == 3 else loss[ar, h, s, a])
        if h + 1 < H:
            cdf = mdp.P[h, s, a].cumsum(-1)
            s = (u[:, h + 1, 0:1] > cdf).sum(-1).clamp(max=S - 1)
    lh = torch.stack(lh, 1)                                    # (R, H)
    togo = lh.flip(1).cumsum(1).flip(1)
    Qhat = torch.zeros_like(pi)
    hh = torch.arange(H, device=pi.device).expand(R, H)
    st, at = torch.stack(states, 1), torch.stack(actions, 1)
    rr = ar.unsqueeze(1).expand(R, H)
    Qhat[rr, hh, st, at] = togo / q[rr, hh, st, at]
    return Qhat


def run_policy_optimization(mdp: LayeredMDP, K: list[int] | torch.Tensor, *,
                            method: str | tuple[str, ...] = "logbarrier", seeds: int = 4, seed: int = 0,
                            c_eta: float = 20.0) -> torch.Tensor:
    r"""Regret :math:`\sum_{k\le K}V^{\pi_k}_1(\ell_k) - \min_\pi\sum_{k\le K}V^\pi_1(\ell_k)` for each horizon in
    ``K`` and each of ``seeds`` runs, shape ``(seeds, len(K))``, or ``(len(method), seeds, len(K))`` when
    ``method`` is a tuple. All runs (methods x seeds x horizons) play together for :math:`\max K`
    episodes on the same losses, and run ``(seed, K)`` of every method rolls out with the same uniforms
    (common random numbers, a paired design); each run is tuned for its own :math:`K` and its regret read at :math:`K`.

    ``"logbarrier"`` (the paper): :math:`\eta = c\sqrt{\log K/K}/H`, no explicit exploration.
    ``"expweights"`` (the :math:`K^{2/3}` baseline): :math:`\eta = c K^{-2/3}/H`,
    :math:`\gamma = K^{-1/3}` uniform exploration. Exact expected losses (occupancies) give the regret.
    """
    methods = (method,) if isinstance(method, str) else tuple(method)
    if not methods or any(m not in ("logbarrier", "expweights") for m in methods):
        raise ValueError(f"method must be 'logbarrier', 'expweights' or a tuple of them, got {method!r}")
    Ks = torch.as_tensor(K, dtype=mdp.dtype)
    if Ks.ndim != 1 or len(Ks) == 0 or bool((Ks < 1).any()) or seeds < 1:
        raise ValueError("K must be a non-empty list of positive horizons and seeds >= 1")
    Kmax, n = int(Ks.max()), seeds * len(Ks)
    Kr = Ks.repeat(seeds).to(mdp.device)                        # run r = seed * len(K) + i, per method
    logb = torch.tensor([m == "logbarrier" for m in methods], device=mdp.device).repeat_interleave(n)
    Kr = Kr.repeat(len(methods))
    R = Kr.numel()
    eta = torch.where(logb, torch.sqrt(torch.log(Kr) / Kr), Kr ** (-2.0 / 3.0)) * c_eta / mdp.H
    gamma = torch.where(logb, 0.0, Kr ** (-1.0 / 3.0))
    lb, ew = logb.nonzero().squeeze(1), (~logb).nonzero().squeeze(1)
    g = torch.Generator().manual_seed(seed)
    losses = mdp.losses(Kmax)
    cum_hat = torch.zeros(R, mdp.H, mdp.S, mdp.A, dtype=mdp.dtype, device=mdp.device)
    pi = torch.empty_like(cum_hat)
    learner_loss = torch.zeros(R, dtype=mdp.dtype, device=mdp.device)
    for k in range(Kmax):
        if len(lb):
            pi[lb] = logbarrier_ftrl(cum_hat[lb], eta[lb].view(-1, 1, 1))
        if len(ew):
            pi[ew] = exp_weights(cum_hat[ew], eta[ew].view(-1, 1, 1), gamma[ew].view(-1, 1, 1))
        q = occupancy(mdp, pi)
        active = (k < Kr).to(mdp.dtype)
        learner_loss += active * (q * losses[k]).sum((-3, -2, -1))
        u = torch.rand(n, mdp.H, 2, generator=g, dtype=mdp.dtype).to(mdp.device).repeat(len(methods), 1, 1)
        cum_hat += q_estimate(mdp, pi, losses[k], q, u=u)
    cum_true = losses.cumsum(0)[(Kr - 1).long()]                # (R, H, S, A)
    reg = (learner_loss - best_fixed_policy_loss(mdp, cum_true)).view(len(methods), seeds, len(Ks))
    return reg[0] if isinstance(method, str) else reg
