"""One plain, fast training loop for every chapter.

``fit`` trains on in-memory tensors (a :class:`lossbook.data.TensorData`), evaluates after every
epoch, and returns a :class:`History`. It syncs with the host once per epoch, not per step, so it
runs at the speed of the model on CPU and GPU alike. The progress bar (tqdm) is quiet under CI
and in the book's build.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
from torch import nn

from .data import TensorData, batches
from .runtime import in_ci

__all__ = ["History", "accuracy", "evaluate", "fit", "make_optimizer", "predict"]

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
BatchLoss = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class History:
    """Per-epoch metrics: ``h["test_acc"]`` is a list with one value per epoch."""

    metrics: dict[str, list[float]] = field(default_factory=dict)

    def log(self, **values: float) -> None:
        for k, v in values.items():
            self.metrics.setdefault(k, []).append(float(v))

    def __getitem__(self, key: str) -> list[float]:
        if key not in self.metrics:
            raise KeyError(f"no metric {key!r}; recorded: {sorted(self.metrics)}")
        return self.metrics[key]

    def __contains__(self, key: str) -> bool:
        return key in self.metrics

    def last(self, key: str) -> float:
        return self[key][-1]

    def best(self, key: str, mode: str = "max") -> float:
        if mode not in ("max", "min"):
            raise ValueError(f"mode must be 'max' or 'min', got {mode!r}")
        return max(self[key]) if mode == "max" else min(self[key])

    def __len__(self) -> int:
        return max((len(v) for v in self.metrics.values()), default=0)


def accuracy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Top-1 accuracy as a 0-d tensor (no host sync). Binary scores of shape (N,) or (N, 1)
    count as positive when > 0."""
    if logits.dim() == 1 or (logits.dim() == 2 and logits.shape[1] == 1):
        pred = (logits.reshape(-1) > 0).long()
    else:
        pred = logits.argmax(dim=1)
    return (pred == y.reshape(-1)).float().mean()


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, batch_size: int = 4096) -> torch.Tensor:
    """The model's outputs on ``x`` in eval mode, in batches; restores the previous mode."""
    was_training = model.training
    model.eval()
    out = torch.cat([model(x[i:i + batch_size]) for i in range(0, len(x), batch_size)])
    model.train(was_training)
    return out


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
             loss_fn: LossFn | None = None) -> dict[str, float]:
    """Accuracy (and loss when ``loss_fn`` is given) of ``model`` on ``(x, y)``."""
    logits = predict(model, x)
    out = {"acc": accuracy(logits, y).item()}
    if loss_fn is not None:
        out["loss"] = float(loss_fn(logits, y))
    return out


def make_optimizer(params: Iterable[torch.Tensor], name: str = "adam", *, lr: float = 1e-3,
                   weight_decay: float = 0.0, momentum: float = 0.9) -> torch.optim.Optimizer:
    """``"adam"``, ``"adamw"`` or ``"sgd"`` (with momentum) on ``params``."""
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    raise ValueError(f"optimizer must be 'adam', 'adamw' or 'sgd', got {name!r}")


def _progress(iterable: Iterable, total: int, desc: str, enabled: bool | None):
    enabled = (not in_ci()) if enabled is None else enabled
    if not enabled:
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is in the "book" extra; the loop works without it
        return iterable
    return tqdm(iterable, total=total, desc=desc, leave=False)


def fit(model: nn.Module, loss_fn: LossFn | None, data: TensorData, *, epochs: int,
        batch_size: int = 128, lr: float = 1e-3, optimizer: str | Callable = "adam",
        weight_decay: float = 0.0, schedule: str | None = None,
        batch_loss: BatchLoss | None = None, generator: torch.Generator | None = None,
        device: str | torch.device | None = None, eval_every: int = 1,
        eval_fn: Callable[[nn.Module, TensorData], dict[str, float]] | None = None,
        progress: bool | None = None, desc: str = "train") -> History:
    """Train ``model`` for ``epochs`` passes over ``data.x_train`` and return its :class:`History`.

    Each step minimises ``loss_fn(model(x), y)``, or ``batch_loss(model, x, y)`` when given (for
    objectives that need the model itself, such as adversarial training). ``optimizer`` is a
    name for :func:`make_optimizer` or a callable ``params -> Optimizer``; ``schedule="cosine"``
    anneals the learning rate to zero over the run. After every ``eval_every`` epochs the
    history logs ``epoch``, ``train_loss`` (mean over the epoch's batches), ``train_acc`` and
    ``test_acc`` (in eval mode), plus whatever ``eval_fn(model, data)`` returns.
    """
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    if (loss_fn is None) == (batch_loss is None):
        raise ValueError("give exactly one of loss_fn and batch_loss")
    if schedule not in (None, "cosine"):
        raise ValueError(f"schedule must be None or 'cosine', got {schedule!r}")
    if device is not None:
        model.to(device)
        data = data.to(device)
    opt = (make_optimizer(model.parameters(), optimizer, lr=lr, weight_decay=weight_decay)
           if isinstance(optimizer, str) else optimizer(model.parameters()))
    n_steps = epochs * -(-len(data.y_train) // batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, n_steps) if schedule else None
    step_loss = batch_loss or (lambda m, x, y: loss_fn(m(x), y))
    hist = History()
    for epoch in _progress(range(1, epochs + 1), epochs, desc, progress):
        model.train()
        total = torch.zeros((), device=data.x_train.device)
        n_batches = 0
        for xb, yb in batches(data.x_train, data.y_train, batch_size, generator=generator):
            loss = step_loss(model, xb, yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if sched is not None:
                sched.step()
            total += loss.detach()
            n_batches += 1
        if epoch % eval_every == 0 or epoch == epochs:
            extra = eval_fn(model, data) if eval_fn is not None else {}
            hist.log(epoch=epoch, train_loss=(total / n_batches).item(),
                     train_acc=accuracy(predict(model, data.x_train), data.y_train).item(),
                     test_acc=accuracy(predict(model, data.x_test), data.y_test).item(), **extra)
    return hist
