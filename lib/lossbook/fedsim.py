r"""Federated learning simulated in one process: clients, rounds and server aggregation, vectorized.

All clients of all replicates (independent runs, e.g. seeds) train *at once*: their parameters are
stacked along a leading dimension and the model is evaluated with :func:`torch.func.vmap` over
:func:`torch.func.functional_call`, so a round costs a handful of batched kernels whatever the
number of clients. No federated framework, no processes, no copies of ``nn.Module``.

The pieces:

* :func:`dirichlet_label_split` — label skew: for every class :math:`c`, client shares
  :math:`q_c \sim \mathrm{Dir}(\alpha \mathbf 1_m)`; small :math:`\alpha` gives each client few
  classes, large :math:`\alpha` approaches an IID split.
* :class:`Federation` — the training set with one client assignment per replicate, and the
  client weights :math:`p_i = n_i / n`.
* :func:`local_train` — :math:`\tau` local SGD steps (momentum, weight decay) on every client,
  started from its replicate's global model.
* :func:`fedavg` — the server rule of FedAvg, :math:`w \leftarrow w + \sum_i p_i (w_i - w)`.
* :func:`loss_matrix` — :math:`L_j(w_i)`: every client model on every client's data.
* :func:`simulate` — the rounds, with a pluggable local loss and server rule;
  :func:`side_by_side` runs several methods in the same batched simulation, paired.

Shapes: ``R`` replicates, ``m`` clients, ``N`` training points. Parameters are dictionaries
``name -> tensor``; global ones have shape ``(R, *shape)``, client ones ``(R, m, *shape)``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, vmap

__all__ = [
    "Aggregator",
    "Federation",
    "FedHistory",
    "cross_entropy",
    "dirichlet_label_split",
    "federate",
    "fedavg",
    "label_counts",
    "local_train",
    "loss_matrix",
    "side_by_side",
    "simulate",
    "stack_params",
]

Params = dict[str, torch.Tensor]
LocalLoss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Aggregator = Callable[..., torch.Tensor]
"""A server rule: ``aggregate(updates, p, *, round) -> update``, with client updates
``(R, m, D)`` (one flattened parameter tensor), client weights ``p`` ``(R, m)`` and the round index;
returns the global update ``(R, D)``."""


# --------------------------------------------------------------------------- partitioning
def dirichlet_label_split(y: torch.Tensor | np.ndarray, n_clients: int, alpha: float, *, seed: int = 0,
                          min_size: int = 1, max_tries: int = 1000) -> torch.Tensor:
    r"""Assign each point to a client with Dirichlet label skew.

    For each class :math:`c`, draw :math:`q_c \sim \mathrm{Dir}(\alpha, \dots, \alpha)` over the
    ``n_clients`` clients and cut the (shuffled) points of class :math:`c` into consecutive pieces
    of sizes :math:`\lfloor n_c \sum_{l \le i} q_{c,l} \rfloor - \lfloor n_c \sum_{l < i} q_{c,l} \rfloor`.
    Splits in which a client gets fewer than ``min_size`` points are redrawn (the usual recipe of
    non-IID benchmarks), at most ``max_tries`` times.

    Args:
        y: integer labels, shape ``(N,)``.
        n_clients: number of clients :math:`m \ge 1`.
        alpha: concentration :math:`\alpha > 0` (0.1: a few classes per client; 100: nearly IID).
        seed: seed of the NumPy generator; the split is a deterministic function of it.
        min_size: least number of points per client.

    Returns:
        ``owner``, int64 ``(N,)`` with values in ``[0, n_clients)``.
    """
    y = np.asarray(y.cpu() if isinstance(y, torch.Tensor) else y)
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"y must be a 1-D integer array of labels, got shape {y.shape} and dtype {y.dtype}")
    if isinstance(n_clients, bool) or not isinstance(n_clients, (int, np.integer)) or n_clients < 1:
        raise ValueError(f"n_clients must be a positive integer, got {n_clients!r}")
    if not (isinstance(alpha, (int, float)) and np.isfinite(alpha) and alpha > 0):
        raise ValueError(f"alpha must be a positive finite number, got {alpha!r}")
    if min_size * n_clients > len(y):
        raise ValueError(f"min_size * n_clients = {min_size * n_clients} exceeds the {len(y)} points")
    rng = np.random.default_rng(seed)
    classes = np.unique(y)
    for _ in range(max_tries):
        owner = np.empty(len(y), dtype=np.int64)
        for c in classes:  # a loop over classes, not samples
            idx = rng.permutation(np.flatnonzero(y == c))
            q = rng.dirichlet(np.full(n_clients, float(alpha)))
            cuts = np.floor(np.cumsum(q)[:-1] * len(idx)).astype(np.int64)
            for i, part in enumerate(np.split(idx, cuts)):
                owner[part] = i
        if np.bincount(owner, minlength=n_clients).min() >= min_size:
            return torch.from_numpy(owner)
    raise ValueError(f"no split with at least {min_size} points per client in {max_tries} draws "
                     f"(alpha={alpha}, n_clients={n_clients}); lower min_size or raise alpha")


def label_counts(owner: torch.Tensor, y: torch.Tensor, n_clients: int, n_classes: int) -> torch.Tensor:
    """Points of each class held by each client: int64 ``(n_clients, n_classes)``."""
    if owner.shape != y.shape or owner.dim() != 1:
        raise ValueError(f"owner and y must both have shape (N,), got {tuple(owner.shape)} and {tuple(y.shape)}")
    flat = owner.long() * n_classes + y.long()
    return torch.bincount(flat, minlength=n_clients * n_classes).view(n_clients, n_classes)


@dataclass(frozen=True)
class Federation:
    """A training set held by ``m`` clients, with one assignment per replicate.

    ``x`` ``(N, ...)``, ``y`` ``(N,)`` int64 are shared; ``owner`` ``(R, N)`` says which client holds
    each point in each replicate. Derived: ``order`` (points sorted by client, per replicate),
    ``counts`` :math:`n_i` ``(R, m)``, ``starts`` (offset of each client in ``order``) and the
    client weights :math:`p_i = n_i / N`.
    """

    x: torch.Tensor
    y: torch.Tensor
    owner: torch.Tensor
    n_clients: int
    n_classes: int
    order: torch.Tensor = field(init=False)
    counts: torch.Tensor = field(init=False)
    starts: torch.Tensor = field(init=False)

    def __post_init__(self):
        counts = F.one_hot(self.owner, self.n_clients).sum(1)
        object.__setattr__(self, "order", torch.argsort(self.owner, dim=1, stable=True))
        object.__setattr__(self, "counts", counts)
        object.__setattr__(self, "starts", counts.cumsum(1) - counts)

    @property
    def replicates(self) -> int:
        return self.owner.shape[0]

    @property
    def p(self) -> torch.Tensor:
        r"""Client weights :math:`p_i = n_i / N`, ``(R, m)``, in the dtype of ``x``."""
        return (self.counts / self.counts.sum(1, keepdim=True)).to(self.x.dtype)

    def to(self, device: str | torch.device) -> "Federation":
        return federate(self.x.to(device), self.y.to(device), self.owner.to(device), self.n_clients, self.n_classes)


def federate(x: torch.Tensor, y: torch.Tensor, owner: torch.Tensor, n_clients: int,
             n_classes: int) -> Federation:
    """Check and bundle a training set and its client assignments (``owner`` ``(N,)`` or ``(R, N)``)."""
    if owner.dim() == 1:
        owner = owner.unsqueeze(0)
    if owner.dim() != 2 or owner.shape[1] != len(x) or len(y) != len(x) or y.dim() != 1:
        raise ValueError(f"need x (N, ...), y (N,) and owner (N,) or (R, N) with one N; got x {tuple(x.shape)}, "
                         f"y {tuple(y.shape)}, owner {tuple(owner.shape)}")
    owner = owner.to(device=x.device, dtype=torch.int64)
    if owner.min() < 0 or owner.max() >= n_clients:
        raise ValueError(f"owner must hold client ids in [0, {n_clients})")
    if (F.one_hot(owner, n_clients).sum(1) == 0).any():
        raise ValueError("every client must hold at least one point in every replicate")
    if y.min() < 0 or y.max() >= n_classes:
        raise ValueError(f"y must hold labels in [0, {n_classes})")
    return Federation(x, y.to(torch.int64), owner, int(n_clients), int(n_classes))


# --------------------------------------------------------------------------- models as stacked parameters
def stack_params(make_model: Callable[[], nn.Module], seeds: Sequence[int], *,
                 device: str | torch.device | None = None) -> tuple[nn.Module, Params]:
    """One freshly initialised model per seed, its parameters stacked along dim 0: ``(R, *shape)``.

    Returns the last model (a template for :func:`torch.func.functional_call`, on ``device``) and
    the stacked parameters. Models with buffers (e.g. BatchNorm statistics) are refused: their
    running statistics would need their own aggregation rule.
    """
    if len(seeds) == 0:
        raise ValueError("seeds must not be empty")
    stacks: dict[str, list[torch.Tensor]] = {}
    for s in seeds:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(s))
            model = make_model()
        if any(True for _ in model.buffers()):
            raise ValueError("make_model must build a model without buffers (no BatchNorm): "
                             "use a normalisation-free or GroupNorm network")
        for k, v in model.named_parameters():
            stacks.setdefault(k, []).append(v.detach())
    model = model.to(device) if device is not None else model
    params = {k: torch.stack(v).to(device if device is not None else v[0].device) for k, v in stacks.items()}
    return model, params


def _is_plain_mlp(model: nn.Module) -> bool:
    return isinstance(model, nn.Sequential) and all(isinstance(l, (nn.Flatten, nn.Linear, nn.ReLU)) for l in model)


def _forward(model: nn.Module, params: Params, x: torch.Tensor, *, shared_x: bool = False) -> torch.Tensor:
    """``model`` evaluated with each of the stacked parameter sets ``params`` (leading dim K):
    on its own batch ``x[k]`` (``shared_x=False``) or on one common batch ``x`` (``shared_x=True``).

    A plain MLP (``nn.Sequential`` of Flatten/Linear/ReLU, e.g. :class:`lossbook.models.MLP`) takes a
    fast path of batched matrix products; any other model goes through ``vmap(functional_call)``.
    """
    if _is_plain_mlp(model):
        h = x.flatten(1 if shared_x else 2)
        for name, layer in model.named_children():
            if isinstance(layer, nn.Linear):
                w = params[f"{name}.weight"].transpose(1, 2)                 # (K, in, out)
                h = h @ w
                if layer.bias is not None:
                    h = h + params[f"{name}.bias"].unsqueeze(1)
            elif isinstance(layer, nn.ReLU):
                h = torch.relu(h)
        return h
    f = lambda prm, xb: functional_call(model, prm, (xb,))  # noqa: E731
    return vmap(f, in_dims=(0, None if shared_x else 0), randomness="different")(params, x)


def cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    r"""Mean cross-entropy over the batch, per client: logits ``(..., B, C)``, target ``(..., B)`` ->
    ``(...)``. :math:`\frac1B\sum_b -\log \mathrm{softmax}(z_b)_{y_b}`."""
    lp = torch.log_softmax(logits, dim=-1)
    return -lp.gather(-1, target.unsqueeze(-1)).squeeze(-1).mean(-1)


# --------------------------------------------------------------------------- clients
def local_train(model: nn.Module, global_params: Params, fed: Federation, *, steps: int, batch_size: int,
                lr: float, momentum: float = 0.0, weight_decay: float = 0.0,
                loss_fn: LocalLoss = cross_entropy, generator: torch.Generator | None = None,
                batch_groups: int = 1) -> Params:
    r"""``steps`` local SGD steps on every client of every replicate, all at once.

    Client :math:`i` of replicate :math:`r` starts at that replicate's global model and takes steps
    on mini-batches of ``batch_size`` points drawn uniformly, with replacement, from its own data
    (so a client with fewer points than a batch still takes full steps). The update is PyTorch's
    SGD: :math:`d = \nabla + \lambda w`, :math:`b \leftarrow \mu b + d` (:math:`b = d` at the first
    step), :math:`w \leftarrow w - \eta b`; momentum starts from zero every round, as a fresh local
    optimizer would.

    Args:
        loss_fn: per-client loss, logits ``(K, B, C)`` and targets ``(K, B)`` -> ``(K,)``, with
            ``K = R m`` (replicate-major).
        batch_groups: ``G`` dividing ``R``; replicates ``r`` and ``r + R/G`` draw the same batch
            positions (for methods run side by side on the same splits, see :func:`side_by_side`).

    Returns:
        client parameters, ``name -> (R, m, *shape)``.
    """
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps and batch_size must be >= 1, got {steps} and {batch_size}")
    if lr <= 0 or momentum < 0 or weight_decay < 0:
        raise ValueError(f"need lr > 0, momentum >= 0, weight_decay >= 0; got {lr}, {momentum}, {weight_decay}")
    R, m = fed.replicates, fed.n_clients
    if batch_groups < 1 or R % batch_groups:
        raise ValueError(f"batch_groups must divide the {R} replicates, got {batch_groups}")
    K = R * m
    w = {k: v.detach().unsqueeze(1).expand(R, m, *v.shape[1:]).reshape(K, *v.shape[1:]).clone().requires_grad_()
         for k, v in global_params.items()}
    buf: dict[str, torch.Tensor] = {}
    counts = fed.counts.unsqueeze(-1).to(fed.x.dtype)
    starts = fed.starts.unsqueeze(-1)
    for step in range(steps):
        u = torch.rand(R // batch_groups, m, batch_size, generator=generator,
                       device=generator.device if generator else None).repeat(batch_groups, 1, 1)
        pos = starts + (u.to(fed.x.device, fed.x.dtype) * counts).long().clamp_max(fed.counts.unsqueeze(-1) - 1)
        idx = fed.order.gather(1, pos.view(R, m * batch_size)).view(K, batch_size)
        logits = _forward(model, w, fed.x[idx])
        loss = loss_fn(logits, fed.y[idx]).sum()        # clients are independent: one backward for all
        grads = torch.autograd.grad(loss, list(w.values()))
        with torch.no_grad():
            for (k, p), g in zip(w.items(), grads):
                d = g + weight_decay * p if weight_decay else g
                if momentum:
                    buf[k] = d.clone() if step == 0 else buf[k].mul_(momentum).add_(d)
                    d = buf[k]
                p.sub_(lr * d)
    return {k: v.detach().view(R, m, *v.shape[1:]) for k, v in w.items()}


# --------------------------------------------------------------------------- server
def fedavg(updates: torch.Tensor, p: torch.Tensor, *, round: int = 0) -> torch.Tensor:
    r"""FedAvg's server rule: :math:`\Delta = \sum_i p_i\, \Delta_i`, updates ``(R, m, D)``, ``p`` ``(R, m)``."""
    if updates.dim() != 3 or p.shape != updates.shape[:2]:
        raise ValueError(f"updates must be (R, m, D) and p (R, m); got {tuple(updates.shape)} and {tuple(p.shape)}")
    return torch.einsum("rm,rmd->rd", p.to(updates.dtype), updates)


# --------------------------------------------------------------------------- evaluation
@torch.no_grad()
def loss_matrix(model: nn.Module, params: Params, fed: Federation, *, chunk: int = 4096) -> torch.Tensor:
    r"""Cross-entropy of each stacked model on each client's training data.

    ``params`` with shapes ``(R, m, *shape)`` (client models) give ``(R, m, m)`` with entry
    ``[r, i, j]`` :math:`= L_j(w_i)`; shapes ``(R, *shape)`` (one model per replicate) give
    ``(R, m)`` with :math:`L_j(w)`. :math:`L_j` is the mean loss over client :math:`j`'s points.
    """
    R, m = fed.replicates, fed.n_clients
    first = next(iter(params.values()))
    ref = next(iter(model.parameters()))
    per_client = first.dim() == ref.dim() + 2
    K = R * m if per_client else R
    flat = {k: v.reshape(K, *v.shape[(2 if per_client else 1):]) for k, v in params.items()}
    n = len(fed.y)
    sums = torch.zeros(R, m if per_client else 1, m, dtype=fed.x.dtype, device=fed.x.device)
    onehot = F.one_hot(fed.owner, m).to(fed.x.dtype)                       # (R, N, m)
    for a in range(0, n, chunk):
        xb, yb = fed.x[a:a + chunk], fed.y[a:a + chunk]
        logits = _forward(model, flat, xb, shared_x=True)                  # (K, n_b, C)
        ce = F.cross_entropy(logits.flatten(0, 1), yb.repeat(K), reduction="none").view(R, -1, len(yb))
        sums += ce @ onehot[:, a:a + chunk]
    out = sums / fed.counts.unsqueeze(1).to(sums.dtype)
    return out if per_client else out.squeeze(1)


@torch.no_grad()
def _test_metrics(model: nn.Module, params: Params, x: torch.Tensor, y: torch.Tensor,
                  chunk: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    correct, loss = 0.0, 0.0
    for a in range(0, len(y), chunk):
        logits = _forward(model, params, x[a:a + chunk], shared_x=True)     # (R, n_b, C)
        yb = y[a:a + chunk]
        correct = correct + (logits.argmax(-1) == yb).sum(-1)
        loss = loss + F.cross_entropy(logits.transpose(1, 2), yb.expand(len(logits), -1), reduction="none").sum(-1)
    return correct / len(y), loss / len(y)


def side_by_side(methods: Sequence[tuple[LocalLoss, Aggregator]], replicates_each: int,
                 n_clients: int) -> tuple[LocalLoss, Aggregator]:
    """Run several methods in one batched simulation: replicates ``g * replicates_each`` to
    ``(g + 1) * replicates_each - 1`` use ``methods[g] = (local_loss, aggregate)``.

    Returns the combined local loss and server rule for :func:`simulate`. Give it a federation whose
    owners are repeated once per method (``owner.repeat(len(methods), 1)``), ``seeds`` repeated
    alike, and ``batch_groups=len(methods)``: each method then sees the same splits, initial models
    and mini-batches, and the comparison between methods is paired.
    """
    if not methods or replicates_each < 1:
        raise ValueError("need at least one method and replicates_each >= 1")
    K_each = replicates_each * n_clients

    def local_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if logits.shape[0] != K_each * len(methods):
            raise ValueError(f"expected {K_each * len(methods)} clients in all, got {logits.shape[0]}")
        return torch.cat([f(logits[g * K_each:(g + 1) * K_each], target[g * K_each:(g + 1) * K_each])
                          for g, (f, _) in enumerate(methods)])

    def aggregate(updates: torch.Tensor, p: torch.Tensor, *, round: int = 0) -> torch.Tensor:
        r = replicates_each
        return torch.cat([agg(updates[g * r:(g + 1) * r], p[g * r:(g + 1) * r], round=round)
                          for g, (_, agg) in enumerate(methods)])

    return local_loss, aggregate


# --------------------------------------------------------------------------- rounds
@dataclass
class FedHistory:
    """What :func:`simulate` records. Per round ``(R, rounds)``: ``test_acc``, ``test_loss``.
    Per tracked round (listed in ``tracked``): ``client_losses`` ``(T, R, m, m)`` with
    :math:`L_j(w_i)` for the round's client models, and ``global_losses`` ``(T, R, m)`` with
    :math:`L_j(\\bar w)` for the aggregated model. ``p`` ``(R, m)``: client weights."""

    test_acc: torch.Tensor
    test_loss: torch.Tensor
    tracked: list[int]
    client_losses: torch.Tensor
    global_losses: torch.Tensor
    p: torch.Tensor
    params: Params

    def select(self, replicates: slice) -> "FedHistory":
        """The record of a subset of the replicates (e.g. one method of a :func:`side_by_side` run)."""
        return FedHistory(self.test_acc[replicates], self.test_loss[replicates], list(self.tracked),
                          self.client_losses[:, replicates], self.global_losses[:, replicates], self.p[replicates],
                          {k: v[replicates] for k, v in self.params.items()})


def simulate(make_model: Callable[[], nn.Module], fed: Federation, test: tuple[torch.Tensor, torch.Tensor], *,
             rounds: int, local_steps: int, batch_size: int, lr: float, momentum: float = 0.0,
             weight_decay: float = 0.0, local_loss: LocalLoss = cross_entropy, aggregate: Aggregator = fedavg,
             seeds: Sequence[int] | None = None, track_every: int = 1, eval_chunk: int = 4096,
             batch_groups: int = 1,
             on_round: Callable[..., None] | None = None, progress: bool | None = None,
             desc: str = "rounds") -> FedHistory:
    r"""Run ``rounds`` rounds of federated training for all replicates of ``fed`` at once.

    Each round: every client trains locally from the global model (:func:`local_train` with
    ``local_loss``), the server forms the updates :math:`\Delta_i = w_i - w` and sets
    :math:`w \leftarrow w + \mathrm{aggregate}(\Delta, p)`, one parameter tensor at a time (the
    tensor flattened to ``(R, m, D)``). With the default :func:`fedavg` this is FedAvg with
    full participation.

    Args:
        make_model: builds the network (no buffers); replicate ``r`` is initialised with
            ``torch.manual_seed(seeds[r])`` (default ``seeds = 0..R-1``), and its sampling uses a
            generator seeded with ``seeds[0]``.
        test: ``(x_test, y_test)`` for the global model's accuracy after each round.
        track_every: record the loss matrices every this many rounds (and at the last round).
        batch_groups: passed to :func:`local_train`.
        eval_chunk: points per forward pass in evaluations (lower it for large models: every
            stacked model sees the chunk at once).
        on_round: called as ``on_round(round=t, global_params=..., client_params=..., new_params=...)``.
    """
    if rounds < 1 or track_every < 1 or eval_chunk < 1:
        raise ValueError(f"rounds, track_every and eval_chunk must be >= 1, got {rounds}, {track_every}, {eval_chunk}")
    R, m = fed.replicates, fed.n_clients
    seeds = list(range(R)) if seeds is None else list(seeds)
    if len(seeds) != R:
        raise ValueError(f"need one seed per replicate ({R}), got {len(seeds)}")
    device = fed.x.device
    model, params = stack_params(make_model, seeds, device=device)
    gen = torch.Generator(device=device).manual_seed(int(seeds[0]) + 7919)
    x_test, y_test = test[0].to(device), test[1].to(device)
    p = fed.p
    acc, tl, tracked, cl, gl = [], [], [], [], []
    from .train import _progress  # the shared progress bar (quiet in CI)

    for t in _progress(range(rounds), rounds, desc, progress):
        clients = local_train(model, params, fed, steps=local_steps, batch_size=batch_size, lr=lr,
                              momentum=momentum, weight_decay=weight_decay, loss_fn=local_loss, generator=gen,
                              batch_groups=batch_groups)
        new = {}
        for k, w in params.items():
            upd = (clients[k] - w.unsqueeze(1)).reshape(R, m, -1)
            new[k] = w + aggregate(upd, p, round=t).view_as(w)
        if (t + 1) % track_every == 0 or t == rounds - 1:
            tracked.append(t)
            cl.append(loss_matrix(model, clients, fed, chunk=eval_chunk))
            gl.append(loss_matrix(model, new, fed, chunk=eval_chunk))
        if on_round is not None:
            on_round(round=t, global_params=params, client_params=clients, new_params=new)
        params = new
        a, lo = _test_metrics(model, params, x_test, y_test, chunk=eval_chunk)
        acc.append(a)
        tl.append(lo)
    return FedHistory(torch.stack(acc, 1).cpu(), torch.stack(tl, 1).cpu(), tracked, torch.stack(cl).cpu(),
                      torch.stack(gl).cpu(), p.cpu(), params)
