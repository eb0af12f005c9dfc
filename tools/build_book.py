#!/usr/bin/env python3
"""Build the HTML book from the executed chapters, without executing anything.

    python tools/build_book.py          # -> _build/html (warnings are errors)

Stages the book in ``_build/book/``: the prose pages, ``_toc.yml``, ``references.bib``, the executed
notebooks from ``_build/executed/`` (the papermill-injected parameters cell hidden), a link to
``lib/`` so that ``literalinclude`` shows the library's code, a ``_config.yml`` whose launch
buttons point at the published Colab notebooks, and ``intro.md`` with the table of chapters
generated from the chapters' records (``_build/reports/records/ci``) and the full-scale runs
recorded in ``results/``, and ``performance.md`` with the benchmark tables and figures generated from
``results/benchmarks/`` (``tools/perf_page.py``). Then runs ``jupyter-book build`` and copies the Colab notebooks
(``tools/colab.py``) into the site under the configured folder.
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))

import colab  # noqa: E402
import perf_page  # noqa: E402
from run_chapters import chapter_id, toc_chapters  # noqa: E402

TABLE_MARKER = "<!-- chapter-table -->"


def chapter_title(src: Path) -> str:
    m = re.search(r"^#\s+(.+)$", src.read_text(), re.M)
    return m.group(1).strip() if m else src.stem


def chapter_claim(src: Path) -> str:
    """The sentence after ``**Claim tested.**`` in the chapter."""
    m = re.search(r"\*\*Claim tested\.\*\*\s*(.+?)(?:\n\s*\n|\s\*\*|$)", src.read_text(), re.S)
    if not m:
        raise ValueError(f"{src}: no '**Claim tested.**' sentence")
    return " ".join(m.group(1).split())


def verdict(record: dict | None) -> str:
    if record is None:
        return "not run"
    claims = record["claims"]
    held = sum(claims.values())
    word = "held" if held == len(claims) else "not held" if held == 0 else "partly held"
    return f"{word} ({held}/{len(claims)})"


def chapter_table(records_dir: Path) -> str:
    rows = ["| Part | Chapter | Claim tested | CI scale | Full scale |", "|---|---|---|---|---|"]
    for src in toc_chapters():
        cid = chapter_id(src)
        part = cid.split("/")[0]
        ci = records_dir / f"{cid}.json"
        ci_rec = json.loads(ci.read_text()) if ci.exists() else None
        if ci_rec is None:
            raise FileNotFoundError(f"{cid}: no CI record at {ci} (did the chapter call runtime.record?)")
        full = ROOT / "results" / f"{cid}.json"
        full_rec = json.loads(full.read_text()) if full.exists() else None
        full_txt = verdict(full_rec)
        if full_rec:
            data = full_rec.get("metrics", {}).get("data")
            where = f"{full_rec['hardware']}, {full_rec['date']}" + (f", data: {data}" if data else "")
            full_txt += f"<br><small>{where}</small>"
        claim = chapter_claim(src).replace("|", "\\|")
        rows.append(f"| {part} | {{doc}}`{chapter_title(src)} <chapters/{cid}>` | {claim} | {verdict(ci_rec)} | {full_txt} |")
    return "\n".join(rows)


def staged_config(config: dict) -> dict:
    """The config jupyter-book sees: launch buttons resolve to the published Colab notebooks."""
    cfg = json.loads(json.dumps(config))
    _, branch, folder = colab.colab_location(config)
    cfg.pop("lossbook", None)
    cfg["repository"] = {"url": config["repository"]["url"], "branch": branch, "path_to_book": folder}
    sphinx = cfg.setdefault("sphinx", {})
    sphinx.setdefault("local_extensions", {})["lossbook_sphinx"] = str(ROOT / "tools")
    return cfg


def hide_injected(nb) -> None:
    for cell in nb.cells:
        tags = cell.metadata.get("tags", [])
        if "injected-parameters" in tags and "remove-cell" not in tags:
            cell.metadata["tags"] = [*tags, "remove-cell"]


def stage(executed: Path, stage_dir: Path, records_dir: Path) -> None:
    import nbformat
    import yaml

    if stage_dir.exists():
        shutil.rmtree(stage_dir)
    stage_dir.mkdir(parents=True)
    config = colab.load_config()
    (stage_dir / "_config.yml").write_text(yaml.safe_dump(staged_config(config), sort_keys=False))
    for name in ("_toc.yml", "references.bib", "references.md"):
        shutil.copy(ROOT / name, stage_dir / name)
    if (ROOT / "_static").exists():
        shutil.copytree(ROOT / "_static", stage_dir / "_static")
    # the Performance page: its tables and figures generated from results/benchmarks/*.json
    (stage_dir / "performance.md").write_text(
        perf_page.page((ROOT / "performance.md").read_text(), figures_dir=stage_dir / "figures"))
    intro = (ROOT / "intro.md").read_text()
    if TABLE_MARKER not in intro:
        raise ValueError(f"intro.md must contain {TABLE_MARKER}")
    (stage_dir / "intro.md").write_text(intro.replace(TABLE_MARKER, chapter_table(records_dir)))
    for page in (ROOT / "chapters").glob("*/index.md"):
        dst = stage_dir / page.relative_to(ROOT)
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(page, dst)
    missing = []
    for src in toc_chapters():
        cid = chapter_id(src)
        nb_path = executed / "chapters" / f"{cid}.ipynb"
        if not nb_path.exists():
            missing.append(cid)
            continue
        nb = nbformat.read(nb_path, as_version=4)
        errors = [o for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
        if errors:
            raise RuntimeError(f"{cid}: the executed notebook carries an error: {errors[0].get('ename')}")
        hide_injected(nb)
        dst = stage_dir / "chapters" / f"{cid}.ipynb"
        dst.parent.mkdir(parents=True, exist_ok=True)
        nbformat.write(nb, dst)
    if missing:
        raise FileNotFoundError("not executed (run tools/run_chapters.py first): " + ", ".join(missing))
    (stage_dir / "lib").symlink_to(ROOT / "lib", target_is_directory=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--executed", type=Path, default=ROOT / "_build" / "executed")
    ap.add_argument("--records", type=Path, default=ROOT / "_build" / "reports" / "records" / "ci")
    ap.add_argument("--no-strict", action="store_true", help="do not turn warnings into errors")
    args = ap.parse_args(argv)
    stage_dir = ROOT / "_build" / "book"
    stage(args.executed, stage_dir, args.records)
    if colab.main([]) != 0:
        return 1
    html = ROOT / "_build" / "html"
    # a clean build: Sphinx keeps the search index in the output folder, so reusing the doctrees of
    # unchanged pages after deleting the output would leave those pages out of the search
    for old in (html, ROOT / "_build" / ".doctrees"):
        if old.exists():
            shutil.rmtree(old)
    jb = Path(sys.executable).with_name("jupyter-book")
    cmd = [str(jb), "build", str(stage_dir), "--path-output", str(ROOT), "--builder", "html", "--keep-going"]
    if not args.no_strict:
        cmd.append("-W")
    proc = subprocess.run(cmd, cwd=ROOT)
    if proc.returncode != 0:
        print("jupyter-book build failed (warnings are errors)", file=sys.stderr)
        return proc.returncode
    _, _, folder = colab.colab_location(colab.load_config())
    shutil.copytree(ROOT / "_build" / "colab", html / folder, dirs_exist_ok=True)
    print(f"book: {html / 'index.html'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
