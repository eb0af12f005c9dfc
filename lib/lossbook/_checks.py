"""Argument checks and reductions shared by the loss modules (private: the modules re-export what
they need)."""
from __future__ import annotations

import torch

REDUCTIONS = ("mean", "sum", "none")


def check_reduction(reduction: str) -> str:
    """``reduction`` if it is one of :data:`REDUCTIONS`, else a ``ValueError`` naming it."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    return reduction


def reduce(x: torch.Tensor, reduction: str) -> torch.Tensor:
    """Per-sample losses ``x`` reduced by ``"mean"``, ``"sum"`` or ``"none"`` (checked)."""
    check_reduction(reduction)
    return x.mean() if reduction == "mean" else x.sum() if reduction == "sum" else x
