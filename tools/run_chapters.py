#!/usr/bin/env python3
"""Execute the book's chapters with papermill, in parallel, and report time and memory.

    python tools/run_chapters.py                       # every chapter in _toc.yml, SCALE="ci"
    python tools/run_chapters.py chapters/classification/comp_sum.md --scale full

Each chapter (a jupytext MyST ``.md``) is converted to a notebook, its parameters cell gets
``SCALE`` (and any ``-p NAME VALUE``) injected, and it runs in a fresh kernel in a worker process
of its own, one per core. Executed notebooks go to ``<out>/chapters/<part>/<slug>.ipynb``. Each
chapter's wall time and peak memory (the kernel's maximum resident set) are printed and merged
into ``_build/reports/timings.json``. A chapter that raises fails the run with its name and the
failing cell's traceback; no chapter is skipped.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def toc_chapters(root: Path = ROOT) -> list[Path]:
    """Chapter sources listed in _toc.yml (part index pages and other prose pages excluded)."""
    files = re.findall(r"file:\s*(chapters/[\w/]+)", (root / "_toc.yml").read_text())
    return [root / f"{f}.md" for f in files if not f.endswith("/index")]


def chapter_id(path: Path) -> str:
    """``<part>/<slug>`` of a chapter source."""
    path = path.resolve()
    return f"{path.parent.name}/{path.stem}"


def _parse_value(v: str):
    try:
        return json.loads(v)
    except json.JSONDecodeError:
        return v


def execute_one(src: Path, out: Path, params: dict, cwd: Path) -> dict:
    """Run one chapter in this process (the worker); returns its report."""
    import jupytext
    import papermill as pm
    from papermill.exceptions import PapermillExecutionError

    nb = jupytext.read(src)
    nb.metadata.setdefault("kernelspec", {"name": "python3", "display_name": "Python 3", "language": "python"})
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp_in = out.with_suffix(".input.ipynb")
    jupytext.write(nb, tmp_in, fmt="ipynb")
    t0 = time.perf_counter()
    status, error = "ok", None
    try:
        pm.execute_notebook(str(tmp_in), str(out), parameters=params, kernel_name="python3",
                            progress_bar=False, cwd=str(cwd), log_output=False)
    except PapermillExecutionError as e:
        status = "error"
        error = f"cell {e.exec_count}: {e.ename}: {e.evalue}\n" + "".join(
            re.sub(r"\x1b\[[0-9;]*m", "", line) + "\n" for line in e.traceback)
    except Exception as e:  # kernel died, bad notebook, missing parameters cell ...
        status, error = "error", f"{type(e).__name__}: {e}"
    finally:
        tmp_in.unlink(missing_ok=True)
    wall = time.perf_counter() - t0
    peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # the kernel's peak RSS
    return {"chapter": chapter_id(src), "status": status, "wall_s": round(wall, 2),
            "peak_mem_mb": round(peak_kb / 1024, 1), "scale": params.get("SCALE"), "error": error}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("chapters", nargs="*", type=Path, help="chapter sources (default: all in _toc.yml)")
    ap.add_argument("--scale", default="ci", choices=["ci", "full"])
    ap.add_argument("-p", "--param", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"),
                    help="extra parameter to inject (VALUE parsed as JSON when it can be)")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--out", type=Path, default=ROOT / "_build" / "executed")
    ap.add_argument("--record-dir", type=Path, default=None,
                    help="where chapters write their records (default _build/reports/records/<scale>)")
    ap.add_argument("--report", type=Path, default=ROOT / "_build" / "reports" / "timings.json",
                    help="JSON file that collects each chapter's wall time and peak memory")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    params = {"SCALE": args.scale, **{k: _parse_value(v) for k, v in args.param}}
    if args.worker:  # one chapter, in a process of its own
        src = args.chapters[0]
        rep = execute_one(src, args.out / "chapters" / f"{chapter_id(src)}.ipynb", params, cwd=src.resolve().parent)
        print("REPORT " + json.dumps(rep))
        return 0

    chapters = [c.resolve() for c in args.chapters] or toc_chapters()
    missing = [c for c in chapters if not c.exists()]
    if missing:
        print("no such chapter: " + ", ".join(map(str, missing)), file=sys.stderr)
        return 2
    jobs = max(1, min(args.jobs, len(chapters)))
    env = dict(os.environ)
    env.setdefault("LOSSBOOK_QUIET", "1" if args.scale == "ci" else "")
    env["LOSSBOOK_THREADS"] = str(max(1, (os.cpu_count() or 1) // jobs))
    # OpenMP sizes its pool at start-up, before torch.set_num_threads runs: without this, each kernel
    # keeps a pool as wide as the machine spinning beside the other chapters
    env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = env["LOSSBOOK_THREADS"]
    env["LOSSBOOK_RECORD_DIR"] = str((args.record_dir or ROOT / "_build" / "reports" / "records" / args.scale).resolve())
    env["PYTHONWARNINGS"] = env.get("PYTHONWARNINGS", "ignore::DeprecationWarning")
    env.setdefault("MPLBACKEND", "module://matplotlib_inline.backend_inline")

    def run(src: Path) -> dict:
        cmd = [sys.executable, __file__, "--worker", str(src), "--scale", args.scale,
               "--out", str(args.out.resolve())]
        for k, v in args.param:
            cmd += ["-p", k, v]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        for line in proc.stdout.splitlines():
            if line.startswith("REPORT "):
                return json.loads(line[7:])
        return {"chapter": chapter_id(src), "status": "error", "wall_s": None, "peak_mem_mb": None,
                "scale": args.scale, "error": proc.stderr[-4000:] or f"worker exited {proc.returncode}"}

    print(f"executing {len(chapters)} chapter(s) at SCALE={args.scale!r}, {jobs} at a time")
    t0 = time.perf_counter()
    reports = []
    with ThreadPoolExecutor(jobs) as pool:
        for rep in pool.map(run, chapters):
            reports.append(rep)
            mark = "ok " if rep["status"] == "ok" else "FAIL"
            print(f"  {mark} {rep['chapter']:<40} {rep['wall_s']!s:>7} s  {rep['peak_mem_mb']!s:>8} MB", flush=True)
    total = time.perf_counter() - t0
    print(f"all chapters: {total:.1f} s wall")

    report_file = args.report
    report_file.parent.mkdir(parents=True, exist_ok=True)
    known = json.loads(report_file.read_text()) if report_file.exists() else {}
    for rep in reports:
        known[f"{rep['chapter']}@{rep['scale']}"] = {k: v for k, v in rep.items() if k != "error"}
    report_file.write_text(json.dumps(known, indent=2, sort_keys=True) + "\n")

    failed = [r for r in reports if r["status"] != "ok"]
    for r in failed:
        print(f"\n=== chapter {r['chapter']} failed (SCALE={r['scale']}) ===\n{r['error']}", file=sys.stderr)
    if not failed and len(reports) <= 3:
        for r in reports:
            print(f"  executed notebook: {args.out / 'chapters' / (r['chapter'] + '.ipynb')}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
