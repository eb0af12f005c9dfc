"""Timing, peak memory and agreement checks for the benchmarks, on the CPU or a CUDA device.

A benchmark *case* names lossbook's implementation and, where there is one, the peer a user would
otherwise call (``torch.nn.functional``, pytorch-metric-learning, LibAUC, a dense reference), and
builds both on the same inputs. :func:`measure` then

1. checks, in float64, that both compute the same values where their definitions agree (largest
   absolute and relative difference of the loss and of its gradients);
2. times each with ``torch.utils.benchmark`` (median of blocked runs; it synchronises CUDA);
3. measures each one's peak memory above what was live before the call: on CUDA the caching
   allocator's peak; on the CPU the peak resident set size (``VmHWM``, reset through
   ``/proc/self/clear_refs``), exact only when glibc hands every tensor-sized block straight back to
   the system. That setting (``MALLOC_MMAP_THRESHOLD_``) turns every allocation into a system call and
   page faults, which would distort the times, so :mod:`benchmarks.run` times in its own process and
   measures CPU memory in a child process started with the setting.
"""
from __future__ import annotations

import gc
import math
import os
import re
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch.utils import benchmark as tbench

MMAP_ENV = "MALLOC_MMAP_THRESHOLD_"
MMAP_BYTES = "65536"


@dataclass
class Impl:
    """One side of a case: what to run (``fn``: the timed work, e.g. forward + backward) and, for the
    agreement check, ``values``: the tensors to compare (loss and gradients), computed fresh."""
    label: str
    fn: Callable[[], object]
    values: Optional[Callable[[], list]] = None


@dataclass
class Case:
    """A benchmark: ``build(device, dtype)`` returns ``(ours, peer)`` (``peer`` may be ``None``).

    ``same_definition`` says whether the two compute the same mathematical quantity (then their
    values are compared in float64); otherwise the peer is only the yardstick of speed.
    """
    suite: str
    name: str
    sizes: dict
    build: Callable[[torch.device, torch.dtype], tuple]
    peer: Optional[str] = None
    same_definition: bool = False
    note: str = ""
    extra: dict = field(default_factory=dict)
    check: bool = True          # run the float64 agreement check for this size (costly for large pair losses)

    @property
    def key(self) -> str:
        return f"{self.suite}/{self.name}[" + ",".join(f"{k}={v}" for k, v in self.sizes.items()) + "]"


def _status_bytes(key: str) -> int:
    with open("/proc/self/status") as f:
        m = re.search(rf"^{key}:\s+(\d+) kB", f.read(), re.M)
    return int(m.group(1)) * 1024


def cpu_peak_supported() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        _status_bytes("VmHWM")
        return True
    except OSError:
        return False


def peak_memory(fn: Callable[[], object], device: torch.device) -> Optional[int]:
    """Bytes allocated by one call of ``fn`` at its peak, above what was live before it (``None`` when
    the platform cannot tell). ``fn`` is called once beforehand so that lazy initialisation is not
    counted."""
    fn()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device) - base)
    if not cpu_peak_supported():
        return None
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = _status_bytes("VmRSS")
    fn()
    return max(0, _status_bytes("VmHWM") - base)


def time_fn(fn: Callable[[], object], min_run_time: float) -> dict:
    """Median, IQR and count of blocked timings of ``fn`` (seconds); at least about five calls even
    when one call outlasts ``min_run_time`` (capped at 30 s of timing)."""
    t = tbench.Timer(stmt="fn()", globals={"fn": fn})
    first = t.timeit(1).median            # also the warm-up
    m = t.blocked_autorange(min_run_time=min(max(min_run_time, 5 * first), 30.0))
    return {"median_s": m.median, "iqr_s": m.iqr, "runs": len(m.times) * m.number_per_run}


def time_pair(fns: list, min_run_time: float, rounds: int = 3) -> list[dict]:
    """Time several callables in alternating rounds (a, b, a, b, ...) so that a slow spell of the
    machine falls on all of them alike; each gets the median over all its blocked runs."""
    timers = [tbench.Timer(stmt="fn()", globals={"fn": fn}) for fn in fns]
    firsts = [t.timeit(1).median for t in timers]
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(rounds):
        for i, t in enumerate(timers):
            budget = min(max(min_run_time, 5 * firsts[i]), 30.0) / rounds
            m = t.blocked_autorange(min_run_time=budget)
            times[i].extend(m.times)
    out = []
    for ts in times:
        q = torch.tensor(ts, dtype=torch.float64).quantile(torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64))
        out.append({"median_s": float(q[1]), "iqr_s": float(q[2] - q[0]), "runs": len(ts)})
    return out


def max_differences(a: list, b: list) -> tuple[float, float]:
    """Largest absolute and relative (to the larger magnitude of the pair, floored at 1e-12)
    difference between two lists of tensors of matching shapes."""
    if len(a) != len(b):
        raise ValueError(f"the two sides return {len(a)} and {len(b)} values")
    max_abs = max_rel = 0.0
    for x, y in zip(a, b):
        x, y = torch.as_tensor(x).double().cpu(), torch.as_tensor(y).double().cpu()
        if x.shape != y.shape:
            raise ValueError(f"shapes differ: {tuple(x.shape)} vs {tuple(y.shape)}")
        d = (x - y).abs()
        scale = torch.maximum(x.abs(), y.abs()).clamp(min=1e-12)
        max_abs = max(max_abs, float(d.max()) if d.numel() else 0.0)
        max_rel = max(max_rel, float((d / scale).max()) if d.numel() else 0.0)
    return max_abs, max_rel


def loss_and_grads(loss_fn: Callable[[], torch.Tensor], inputs: list) -> Callable[[], list]:
    """A ``values`` callable: the loss and its gradients with respect to ``inputs``."""
    def values() -> list:
        loss = loss_fn()
        grads = torch.autograd.grad(loss, inputs)
        return [loss.detach(), *grads]
    return values


def forward_backward(loss_fn: Callable[[], torch.Tensor], inputs: list) -> Callable[[], None]:
    """The timed work of a loss: forward and backward to ``inputs`` (their ``.grad`` is cleared after)."""
    def fn() -> None:
        loss_fn().backward()
        for t in inputs:
            t.grad = None
    return fn


def measure(case: Case, device: torch.device, *, dtype: torch.dtype = torch.float32,
            min_run_time: float = 0.5, check: bool = True, timing: bool = True, memory: bool = True) -> dict:
    """Check, time and measure one case; a JSON-ready record. ``timing`` and ``memory`` can be asked
    for separately: on the CPU :mod:`benchmarks.run` measures memory in a second process, because the
    allocator setting that makes the peak exact also makes every allocation a system call."""
    rec = {"suite": case.suite, "name": case.name, "sizes": case.sizes, "peer": case.peer,
           "same_definition": case.same_definition, "dtype": str(dtype).replace("torch.", ""), "note": case.note,
           **case.extra}
    if case.same_definition and not case.check:
        rec["check"] = "compared at the smallest size"
    if check and case.same_definition and case.check:
        try:
            ours64, peer64 = case.build(device, torch.float64)
            rec["max_abs_diff"], rec["max_rel_diff"] = max_differences(ours64.values(), peer64.values())
            del ours64, peer64
        except (torch.OutOfMemoryError, RuntimeError) as err:
            if not _out_of_memory(err):
                raise
            rec["check"] = "out of memory in float64"
            gc.collect()
    ours, peer = case.build(device, dtype)
    sides = [("ours", ours)] + ([("theirs", peer)] if peer is not None else [])
    for side, impl in sides:
        rec[side] = {"label": impl.label}
    if timing and len(sides) == 2:
        try:                                   # both sides in alternating rounds
            for (side, _), t in zip(sides, time_pair([impl.fn for _, impl in sides], min_run_time)):
                rec[side].update(t)
            timing = False
        except (torch.OutOfMemoryError, RuntimeError) as err:
            if not _out_of_memory(err):
                raise
            gc.collect()                       # one side does not fit: time them one by one below
    for side, impl in sides:
        try:
            if timing:
                rec[side].update(time_fn(impl.fn, min_run_time))
            if "median_s" in rec[side] and not math.isfinite(rec[side]["median_s"]):
                raise RuntimeError(f"{case.key}: non-finite time for {side}")
            if memory:
                rec[side]["peak_bytes"] = peak_memory(impl.fn, device)
        except (torch.OutOfMemoryError, RuntimeError) as err:
            if not _out_of_memory(err):
                raise
            rec[side] = {"label": impl.label, "error": "out of memory"}   # a result too: it did not fit
            gc.collect()
    del ours, peer, sides
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    ratios(rec)
    return rec


def _out_of_memory(err: BaseException) -> bool:
    return isinstance(err, torch.OutOfMemoryError) or "can't allocate memory" in str(err) \
        or "out of memory" in str(err).lower()


def ratios(rec: dict) -> dict:
    """Add lossbook / peer ratios of time and memory to a record (where both sides have them)."""
    o, t = rec.get("ours", {}), rec.get("theirs")
    if t is not None:
        rec["time_ratio"] = o["median_s"] / t["median_s"] if "median_s" in o and t.get("median_s") else None
        po, pt = o.get("peak_bytes"), t.get("peak_bytes")
        rec["memory_ratio"] = po / pt if (po is not None and pt) else None
    return rec


def hardware(device: torch.device) -> str:
    """A short description of the device the benchmarks ran on."""
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    model = "CPU"
    try:
        with open("/proc/cpuinfo") as f:
            m = re.search(r"^model name\s*:\s*(.+)$", f.read(), re.M)
            model = m.group(1).strip() if m else model
    except OSError:
        pass
    return f"{model}, {torch.get_num_threads()} threads"


def mmap_env_ok() -> bool:
    return os.environ.get(MMAP_ENV) == MMAP_BYTES
