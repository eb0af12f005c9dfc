#!/usr/bin/env python3
"""The book's Performance page, generated from the recorded benchmark results.

``performance.md`` holds the prose and the marker ``<!-- performance-results -->``; at build time
:func:`render` replaces the marker by one section per results file in ``results/benchmarks/``
(hardware, date, commit; a table per suite of lossbook against each peer: time, peak memory, their
ratios and the float64 agreement; a figure of time against size). Nothing on the page is typed by
hand: rerun ``make bench`` and rebuild.

    python tools/perf_page.py --out /tmp/perf      # write the page and its figures somewhere to look at
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MARKER = "<!-- performance-results -->"
RESULTS = ROOT / "results" / "benchmarks"
SLOW = 1.2  # the rule: slower than the fastest peer by more than this is fixed or explained

SUITE_TITLES = {
    "classification": "Classification losses (forward + backward)",
    "contrastive": "Contrastive losses (forward + backward)",
    "metric": "Metric-learning losses (forward + backward)",
    "isogclr": "Global contrastive loss with individual temperatures (forward + backward + state update)",
    "unpg": "Margin softmax and negative-pair losses (forward + backward)",
    "optimizers": "Optimizers and inverse-Hessian products",
}


def load(results_dir: Path = RESULTS) -> list[dict]:
    """Every results file, CPU first, each checked for the fields the page needs."""
    docs = []
    for path in sorted(results_dir.glob("*.json"), key=lambda p: (p.stem != "cpu", p.stem)):
        doc = json.loads(path.read_text())
        for key in ("hardware", "date", "commit", "torch", "records"):
            if key not in doc:
                raise ValueError(f"{path}: no {key!r}")
        for rec in doc["records"]:
            for key in ("suite", "name", "sizes", "ours"):
                if key not in rec:
                    raise ValueError(f"{path}: a record without {key!r}: {rec}")
        doc["_file"] = path.name
        docs.append(doc)
    return docs


def fmt_time(s: float | None) -> str:
    if s is None:
        return "–"
    if s >= 1.0:
        return f"{s:.2f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.3g} ms"
    return f"{s * 1e6:.3g} µs"


def fmt_bytes(b: int | None) -> str:
    if b is None:
        return "–"
    if b == 0:
        return "< 64 KiB"          # below what the CPU measurement resolves (see the harness)
    if b < 1 << 20:
        return f"{b / 1024:.0f} KiB"
    if b < 1 << 30:
        return f"{b / (1 << 20):.1f} MiB"
    return f"{b / (1 << 30):.2f} GiB"


def fmt_ratio(r: float | None) -> str:
    if r is None:
        return "–"
    txt = f"{r:.2f}×" if r >= 0.1 else f"{r:.2g}×"
    return f"**{txt}**" if r > SLOW else txt


def fmt_sizes(sizes: dict) -> str:
    return ", ".join(f"{k}={v:,}" if isinstance(v, int) else f"{k}={v}" for k, v in sizes.items())


def fmt_diff(rec: dict) -> str:
    if "max_rel_diff" in rec:
        return f"{rec['max_rel_diff']:.0e}"
    if rec.get("check"):
        return rec["check"]
    return "not compared" if rec.get("theirs") else "–"


def fmt_side_time(side: dict | None) -> str:
    if not side:
        return "–"
    return side["error"] if "error" in side else fmt_time(side.get("median_s"))


def _cell(txt: str) -> str:
    return str(txt).replace("|", "\\|")


def peer_list(records: list[dict]) -> str:
    """What each method of a table is compared with (kept out of the table so that it fits a page)."""
    pairs: dict[str, list[str]] = {}
    for r in records:
        if r.get("peer") and r["name"] not in pairs.get(r["peer"], []):
            pairs.setdefault(r["peer"], []).append(r["name"])
    if len(pairs) == 1:
        return f"Compared with {next(iter(pairs))}."
    return "Compared with:\n\n" + "\n".join(f"- {peer}: {', '.join(names)}" for peer, names in pairs.items())


def table(records: list[dict]) -> str:
    rows = ["| Method | Sizes | Time: lossbook / peer | Ratio | Peak memory: lossbook / peer | Ratio | Agreement |",
            "|---|---|---|---|---|---|---|"]
    for r in records:
        th = r.get("theirs") or {}
        mem_ratio = r.get("memory_ratio") if r["ours"].get("peak_bytes") else None
        rows.append("| " + " | ".join(_cell(x) for x in (
            r["name"], fmt_sizes(r["sizes"]),
            f"{fmt_side_time(r['ours'])} / {fmt_side_time(th)}", fmt_ratio(r.get("time_ratio")),
            f"{fmt_bytes(r['ours'].get('peak_bytes'))} / {fmt_bytes(th.get('peak_bytes'))}", fmt_ratio(mem_ratio),
            fmt_diff(r))) + " |")
    return "\n".join(rows)


def figure(doc: dict, path: Path) -> bool:
    """Time against size, lossbook (solid) and peer (dashed), one panel per suite that varies one size."""
    import matplotlib
    import matplotlib.ticker
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = []
    for suite, axis in (("classification", "C"), ("contrastive", "N"), ("metric", "N")):
        recs = [r for r in doc["records"] if r["suite"] == suite and axis in r["sizes"]
                and "median_s" in r["ours"]]
        if recs:
            panels.append((suite, axis, recs))
    if not panels:
        return False
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.4), squeeze=False, facecolor="white")
    for ax, (suite, axis, recs) in zip(axes[0], panels):
        groups: dict[tuple, list] = {}
        for r in recs:
            other = tuple((k, v) for k, v in r["sizes"].items() if k != axis)
            groups.setdefault((r["name"], other), []).append(r)
        # a peer shared by several of our methods (cross-entropy for every classification loss) is drawn
        # once, in black; a peer of one method in that method's colour
        users: dict[tuple, set] = {}
        for (name, other), rs in groups.items():
            for r in rs:
                users.setdefault((r.get("peer"), other), set()).add(name)
        drawn = set()
        for (name, other), rs in sorted(groups.items()):
            if len(rs) < 2:
                continue
            rs = sorted(rs, key=lambda r: r["sizes"][axis])
            x = [r["sizes"][axis] for r in rs]
            label = name + (" (" + ", ".join(f"{k}={v}" for k, v in other) + ")" if other else "")
            line, = ax.plot(x, [r["ours"]["median_s"] * 1e3 for r in rs], "o-", lw=1.5, ms=3, label=label)
            peer = [(r["sizes"][axis], r["theirs"]["median_s"] * 1e3) for r in rs if "median_s" in (r.get("theirs") or {})]
            key = (rs[0].get("peer"), other)
            shared = len(users.get(key, ())) > 1
            if peer and not (shared and key in drawn):
                ax.plot(*zip(*peer), "s--", lw=1.2 if shared else 1, ms=3, color="black" if shared else line.get_color(),
                        label=f"{key[0]}" if shared else None)
                drawn.add(key)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ticks = sorted({r["sizes"][axis] for r in recs})
        ax.set_xticks(ticks, [f"{t:,}" for t in ticks])
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.set_xlabel(axis)
        ax.set_ylabel("ms per call")
        ax.set_title(suite, fontsize=10)
        ax.grid(alpha=0.3, which="major")
        ax.legend(fontsize=6, loc="upper left")
    fig.suptitle(f"solid: lossbook, dashed: peer (missing where the peer ran out of memory) — {doc['hardware']}",
                 fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, facecolor="white")
    plt.close(fig)
    return True


def notes(records: list[dict]) -> str:
    """The recorded explanation of every case where lossbook is slower than its peer by more than SLOW."""
    lines = []
    seen = set()
    for r in records:
        if (r.get("time_ratio") or 0) > SLOW or (r.get("memory_ratio") or 0) > SLOW:
            why = r.get("why") or r.get("note") or "no explanation recorded"
            key = (r["suite"], r["name"], why)
            if key in seen:
                continue
            seen.add(key)
            lines.append(f"- **{r['name']}**: {why}")
    return "\n".join(lines)


def render(results_dir: Path = RESULTS, figures_dir: Path | None = None, figure_prefix: str = "figures") -> str:
    """The generated part of the page (markdown); figures are written into ``figures_dir``."""
    docs = load(results_dir)
    if not docs:
        return "No benchmark results are recorded yet: run `make bench`."
    out = []
    for doc in docs:
        peers = ", ".join(f"{k} {v}" for k, v in (doc.get("peers") or {}).items() if v)
        out.append(f"## {doc['hardware']}\n")
        out.append(f"Recorded {doc['date']} at commit `{doc['commit']}` with torch {doc['torch']}"
                   + (f", {peers}" if peers else "") + f"; {doc.get('threads', '?')} threads; "
                   f"file `results/benchmarks/{doc['_file']}`. Times are medians of repeated calls; "
                   f"peak memory is what one call allocates above what was live before it. Ratios are "
                   f"lossbook ÷ peer (below 1: lossbook is faster or smaller); bold ratios exceed {SLOW}. "
                   f"Agreement is the largest relative difference of loss and gradients in float64 where "
                   f"the two compute the same quantity.\n")
        if figures_dir is not None:
            name = f"performance-{Path(doc['_file']).stem}.png"
            if figure(doc, figures_dir / name):
                out.append(f"```{{figure}} {figure_prefix}/{name}\n:name: perf-{Path(doc['_file']).stem}\n\n"
                           f"Time per call against problem size on {doc['hardware']} (log–log).\n```\n")
        suites = []
        for r in doc["records"]:
            if r["suite"] not in suites:
                suites.append(r["suite"])
        for suite in suites:
            recs = [r for r in doc["records"] if r["suite"] == suite]
            out.append(f"### {SUITE_TITLES.get(suite, suite)}\n")
            out.append(peer_list(recs) + "\n")
            out.append(table(recs) + "\n")
            why = notes(recs)
            if why:
                out.append("Where lossbook is slower or larger than the peer, and why:\n\n" + why + "\n")
    return "\n".join(out)


def page(template: str, results_dir: Path = RESULTS, figures_dir: Path | None = None) -> str:
    if MARKER not in template:
        raise ValueError(f"performance.md must contain {MARKER}")
    return template.replace(MARKER, render(results_dir, figures_dir))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", type=Path, default=RESULTS)
    ap.add_argument("--out", type=Path, required=True, help="folder for performance.md and figures/")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    text = page((ROOT / "performance.md").read_text(), args.results, args.out / "figures")
    (args.out / "performance.md").write_text(text)
    print(args.out / "performance.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
