"""Run the benchmarks and record the results.

    python -m benchmarks.run                       # every suite on the CPU -> results/benchmarks/cpu.json
    python -m benchmarks.run --device cuda         # on a GPU -> results/benchmarks/cuda.json
    python -m benchmarks.run --suite contrastive --quick --out /tmp/b.json   # a smoke test

``make bench`` installs the peers (the ``bench`` extra) and runs this, then the book's Performance
page is regenerated from the recorded files at the next ``make build``. On the CPU, peak memory is
measured first, in a child process with glibc's mmap threshold fixed (see :mod:`benchmarks.harness`);
the times are then taken in this process, with the allocator as users have it.
"""
from __future__ import annotations

import argparse
import datetime as dt
import importlib.metadata
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
        return out.stdout.strip() + ("+local changes" if dirty else "") if out.returncode == 0 else "unknown"
    except OSError:
        return "unknown"


def _cases(suites, args, device):
    for suite in args.suite or list(suites):
        for case in suites[suite](device, quick=args.quick):
            if not args.match or args.match in case.name:
                yield case


def main(argv: list[str] | None = None) -> int:
    from . import harness
    from .cases import SUITES

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    ap.add_argument("--suite", action="append", choices=sorted(SUITES), help="run only these suites")
    ap.add_argument("--match", default="", help="run only cases whose name contains this text")
    ap.add_argument("--quick", action="store_true", help="tiny sizes: checks the suite runs, records nothing by default")
    ap.add_argument("--min-run-time", type=float, default=None, help="seconds of timing per side (default 1, quick 0.05)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads on the CPU (default: torch's)")
    ap.add_argument("--out", type=Path, default=None, help="where to write (default results/benchmarks/<device>.json)")
    ap.add_argument("--no-memory", action="store_true", help="skip the CPU memory pass")
    ap.add_argument("--merge", action="store_true",
                    help="replace only the re-run cases in the existing results file (each record keeps its date and commit)")
    ap.add_argument("--memory-only", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device", file=sys.stderr)
        return 2
    min_run = args.min_run_time if args.min_run_time is not None else (0.05 if args.quick else 1.0)
    out = args.out or (None if args.quick else ROOT / "results" / "benchmarks" / f"{device.type}.json")

    if args.memory_only:            # the child: CPU peak memory, with every block of 64 KiB or more mapped
        if not harness.mmap_env_ok():
            print(f"--memory-only needs {harness.MMAP_ENV}={harness.MMAP_BYTES} in the environment", file=sys.stderr)
            return 2
        peaks = {}
        for case in _cases(SUITES, args, device):
            rec = harness.measure(case, device, check=False, timing=False)
            peaks[case.key] = {side: rec[side].get("peak_bytes", rec[side].get("error"))
                               for side in ("ours", "theirs") if side in rec}
        args.memory_only.write_text(json.dumps(peaks))
        return 0

    peaks = {}
    if device.type == "cpu" and not args.no_memory:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "peaks.json"
            child = [sys.executable, "-m", "benchmarks.run", "--memory-only", str(path), "--device", "cpu"]
            for s in args.suite or []:
                child += ["--suite", s]
            child += (["--quick"] if args.quick else []) + (["--match", args.match] if args.match else [])
            child += ["--threads", str(torch.get_num_threads())]
            t = time.perf_counter()
            env = dict(os.environ, **{harness.MMAP_ENV: harness.MMAP_BYTES})
            if subprocess.call(child, cwd=ROOT, env=env) != 0:
                print("the memory pass failed", file=sys.stderr)
                return 1
            peaks = json.loads(path.read_text())
            print(f"memory pass: {len(peaks)} cases in {time.perf_counter() - t:.1f} s", flush=True)

    records = []
    t0 = time.perf_counter()
    for case in _cases(SUITES, args, device):
        t = time.perf_counter()
        rec = harness.measure(case, device, min_run_time=min_run, memory=device.type == "cuda")
        for side, b in peaks.get(case.key, {}).items():
            if isinstance(b, str):                      # the memory pass found it does not fit
                rec[side] = {"label": rec[side]["label"], "error": b}
            elif "error" not in rec[side]:
                rec[side]["peak_bytes"] = b
        harness.ratios(rec)
        records.append(rec)
        ratio = rec.get("time_ratio")
        diff = f" max rel diff {rec['max_rel_diff']:.1e}" if "max_rel_diff" in rec else ""
        mem = rec.get("memory_ratio")
        if "error" in rec["ours"]:
            print(f"{case.key:<70} ours: {rec['ours']['error']}", flush=True)
            continue
        print(f"{case.key:<70} ours {rec['ours']['median_s'] * 1e3:9.3f} ms"
              + (f"  peer: {rec['theirs']['error']}" if "error" in rec.get("theirs", {}) else "")
              + (f"  x{ratio:6.2f} of peer" if ratio else "")
              + (f"  mem x{mem:5.2f}" if mem else "") + diff + f"  ({time.perf_counter() - t:.1f} s)",
              flush=True)

    commit, today = _commit(), dt.date.today().isoformat()
    for rec in records:
        rec["date"], rec["commit"] = today, commit
    if args.merge and out is not None and out.exists():
        keep = {(r["suite"], r["name"], json.dumps(r["sizes"], sort_keys=True)): r
                for r in json.loads(out.read_text())["records"]}
        for rec in records:
            keep[(rec["suite"], rec["name"], json.dumps(rec["sizes"], sort_keys=True))] = rec
        order = list(SUITES)
        records = sorted(keep.values(), key=lambda r: order.index(r["suite"]) if r["suite"] in order else len(order))
    doc = {
        "hardware": harness.hardware(device),
        "device": device.type,
        "date": today,
        "commit": commit,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "peers": {name: _version(name) for name in ("pytorch-metric-learning", "libauc")},
        "min_run_time_s": min_run,
        "cpu_peak_memory": ("VmHWM above VmRSS in a separate process, glibc mmap threshold 64 KiB"
                            if device.type == "cpu" else None),
        "wall_s": round(time.perf_counter() - t0, 1),
        "records": records,
    }
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(doc, indent=1) + "\n")
        print(f"wrote {out} ({len(records)} cases, {doc['wall_s']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
