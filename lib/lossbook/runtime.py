"""Run-time switches shared by every chapter: seeding, the device, the SCALE switch, and the
record a chapter leaves of the claims it checked.

A chapter starts with::

    from lossbook import runtime
    rt = runtime.setup(SCALE, seed=SEED, device=DEVICE)
    n_epochs = rt.pick(ci=20, full=200)

and ends with ``runtime.record("classification/comp_sum", scale=SCALE, claims=..., metrics=...)``.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import random
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, TypeVar

import numpy as np
import torch

__all__ = [
    "SCALES",
    "Runtime",
    "check_scale",
    "get_device",
    "hardware",
    "in_ci",
    "compare_claims",
    "in_colab",
    "record",
    "recorded",
    "seed_everything",
    "setup",
]

SCALES = ("ci", "full")
"""The two scales every chapter runs at: ``"ci"`` (seconds on two CPU cores) and ``"full"``
(the paper-sized run, meant for a GPU)."""

T = TypeVar("T")


def check_scale(scale: str) -> str:
    """Return ``scale`` if it is one of :data:`SCALES`, else raise ``ValueError``."""
    if scale not in SCALES:
        raise ValueError(f"SCALE must be one of {SCALES}, got {scale!r}")
    return scale


def seed_everything(seed: int, *, deterministic: bool = True) -> torch.Generator:
    """Seed Python, NumPy and torch (CPU and CUDA); return a CPU ``torch.Generator`` seeded alike.

    With ``deterministic=True``, torch is asked for deterministic kernels where it has them
    (``warn_only``: an op without one warns instead of failing), so CPU runs repeat exactly.
    """
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    seed = int(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def get_device(device: str | torch.device = "auto") -> torch.device:
    """Resolve ``"auto"`` (CUDA when available, else CPU), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.

    Asking for CUDA on a machine without it raises ``RuntimeError`` rather than silently
    falling back, so a full-scale run never crawls on the CPU unnoticed.
    """
    if isinstance(device, torch.device):
        device = str(device)
    if not isinstance(device, str):
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu":
        return torch.device("cpu")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise RuntimeError(f"device={device!r} was asked for but CUDA is not available")
        return torch.device(device)
    raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}")


def in_colab() -> bool:
    """True when running inside Google Colab."""
    import sys

    return "google.colab" in sys.modules


def in_ci() -> bool:
    """True under a CI runner or the book's build (``CI`` or ``LOSSBOOK_QUIET`` set)."""
    return bool(os.environ.get("CI") or os.environ.get("LOSSBOOK_QUIET"))


@dataclass(frozen=True)
class Runtime:
    """What :func:`setup` resolved: the scale, the seed, the device and a seeded generator."""

    scale: str
    seed: int
    device: torch.device
    generator: torch.Generator

    @property
    def full(self) -> bool:
        return self.scale == "full"

    def pick(self, *, ci: T, full: T) -> T:
        """The value for the current scale: ``rt.pick(ci=10, full=200)``."""
        return full if self.full else ci

    def seeds(self, n_ci: int, n_full: int | None = None) -> list[int]:
        """Consecutive seeds starting at ``self.seed``: ``n_ci`` of them at CI scale,
        ``n_full`` (default ``n_ci``) at full scale."""
        n = self.pick(ci=n_ci, full=n_full if n_full is not None else n_ci)
        return list(range(self.seed, self.seed + n))


def setup(scale: str = "ci", *, seed: int = 0, device: str | torch.device = "auto",
          threads: int | None = None) -> Runtime:
    """Validate the scale, seed everything and pick the device; the first call of a chapter.

    ``threads`` caps torch's CPU threads (default: leave torch's choice, except under the
    book's parallel runner, which sets ``LOSSBOOK_THREADS``).
    """
    check_scale(scale)
    threads = threads or int(os.environ.get("LOSSBOOK_THREADS", "0") or 0)
    if threads:
        torch.set_num_threads(threads)
    g = seed_everything(seed)
    return Runtime(scale=scale, seed=int(seed), device=get_device(device), generator=g)


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], capture_output=True,
                             text=True, timeout=5, cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def hardware(device: str | torch.device = "auto") -> str:
    """A one-line description of the hardware a run used (GPU name, or CPU and core count)."""
    dev = get_device(device)
    if dev.type == "cuda":
        return f"{torch.cuda.get_device_name(dev)} (CUDA {torch.version.cuda})"
    return f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores"


def _jsonable(x: Any) -> Any:
    if isinstance(x, Mapping):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, torch.Tensor):
        return _jsonable(x.detach().cpu().tolist())
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, float):
        return round(x, 6)
    return x


def record(chapter: str, *, scale: str, claims: Mapping[str, bool], metrics: Mapping[str, Any],
           device: str | torch.device = "auto", out_dir: str | os.PathLike | None = None) -> dict:
    """Record what a chapter found: each claim it checked (``name -> held``) and its key metrics.

    The record carries the scale, hardware, date, torch version and git commit. It is written
    to ``<out_dir>/<chapter>.json`` where ``out_dir`` defaults to ``$LOSSBOOK_RECORD_DIR``; the
    book's runner sets that variable (CI-scale records feed the table on the book's first
    page), and a full-scale run saved to ``results/`` is shown beside the CI one. With neither
    set, nothing is written and the record is only returned.

    ``chapter`` is ``"<part>/<slug>"``, e.g. ``"classification/comp_sum"``.
    """
    check_scale(scale)
    if chapter.count("/") != 1:
        raise ValueError(f"chapter must be '<part>/<slug>', got {chapter!r}")
    if not claims:
        raise ValueError("claims must name at least one claim checked")
    rec = {
        "chapter": chapter,
        "scale": scale,
        "claims": {str(k): bool(v) for k, v in claims.items()},
        "metrics": _jsonable(dict(metrics)),
        "hardware": hardware(device),
        "date": _dt.date.today().isoformat(),
        "torch": torch.__version__,
        "commit": _git_commit(),
    }
    out_dir = out_dir if out_dir is not None else os.environ.get("LOSSBOOK_RECORD_DIR")
    if out_dir:
        path = Path(out_dir) / f"{chapter}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(rec, indent=2, sort_keys=True) + "\n")
    return rec


def recorded(chapter: str, *, start: str | os.PathLike | None = None) -> dict | None:
    """The full-scale run recorded for ``chapter`` in ``results/<chapter>.json``, or ``None``.

    ``results/`` is looked for in the working directory and its parents (a chapter runs from
    ``chapters/<part>/`` in the repository; on Colab there is usually none).
    """
    here = Path(start or os.getcwd()).resolve()
    for folder in (here, *here.parents):
        path = folder / "results" / f"{chapter}.json"
        if path.is_file():
            return json.loads(path.read_text())
    return None


def compare_claims(ci: Mapping[str, Any], full: Mapping[str, Any] | None) -> list[dict]:
    """Rows (claim, CI verdict, full-scale verdict) for a chapter's table of its two runs."""
    fmt = lambda held: "held" if held else "not held"  # noqa: E731
    rows = []
    for name, held in ci["claims"].items():
        other = (full or {}).get("claims", {}).get(name)
        rows.append({"claim": name, "CI scale (this page)": fmt(held),
                     "full scale": "not run" if other is None else fmt(other)})
    return rows
