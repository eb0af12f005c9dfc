"""Checks on the built book and the Colab notebooks (run by `make test` after `make build`)."""
import json
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))

import colab  # noqa: E402
from run_chapters import chapter_id, toc_chapters  # noqa: E402

HTML = ROOT / "_build" / "html"
CONFIG = colab.load_config()
CHAPTERS = [chapter_id(c) for c in toc_chapters()]

pytestmark = pytest.mark.skipif(not (HTML / "intro.html").exists(), reason="book not built: run make build")


def page(cid: str) -> str:
    return (HTML / "chapters" / f"{cid}.html").read_text()


@pytest.mark.parametrize("cid", CHAPTERS)
def test_chapter_page_renders_math_figures_and_citations(cid):
    html = page(cid)
    assert 'class="math' in html or "\\(" in html, "no typeset math"
    assert re.search(r"<img[^>]+src=\"[^\"]+\.(png|svg)", html), "no figure"
    assert "bibtex" in html or 'href="../../references.html' in html, "no citation link"
    assert "Traceback" not in html and 'class="output traceback' not in html
    assert "google.colab" not in html, "the Colab set-up cell shows on the page"
    assert "# Parameters" not in html, "papermill's injected parameters cell shows on the page"


@pytest.mark.parametrize("cid", CHAPTERS)
def test_launch_button_opens_the_generated_colab_notebook(cid):
    url = colab.colab_url(CONFIG, cid)
    assert url in page(cid), f"no launch link {url}"
    _, _, folder = colab.colab_location(CONFIG)
    assert (HTML / folder / "chapters" / f"{cid}.ipynb").exists(), "the link's notebook is not published"


@pytest.mark.parametrize("cid", CHAPTERS)
def test_colab_notebook_starts_with_setup_and_has_no_raw_myst(cid):
    nb = json.loads((ROOT / "_build" / "colab" / "chapters" / f"{cid}.ipynb").read_text())
    first = nb["cells"][0]
    assert first["cell_type"] == "code" and colab.pip_spec(CONFIG) in "".join(first["source"])
    md = "\n".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "markdown")
    assert not colab.RAW_LEFT.search(md), colab.RAW_LEFT.search(md)
    assert "literalinclude" not in md and ":label:" not in md
    assert "```python\n" in md, "the library code is not shown"
    assert not any(c.get("outputs") for c in nb["cells"] if c["cell_type"] == "code")
    params = [c for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert params and 'SCALE = "ci"' in "".join(params[0]["source"])


def test_intro_table_lists_every_chapter_with_its_verdict():
    html = (HTML / "intro.html").read_text()
    for cid in CHAPTERS:
        assert f'href="chapters/{cid}.html"' in html, f"{cid} missing from the table"
    assert html.count("held (") >= len(CHAPTERS)


def test_references_page_lists_cited_works():
    html = re.sub(r"\s+", " ", (HTML / "references.html").read_text()).lower()
    bib = colab.parse_bib((ROOT / "references.bib").read_text())
    for src in toc_chapters():
        for group in re.findall(r"\{cite(?::\w+)?\}`([^`]+)`", src.read_text()):
            for key in (k.strip() for k in group.split(",")):
                title = " ".join(bib[key]["title"].split()).lower()
                assert title in html, f"{key} ({title}) not on the references page"


def test_timings_report_has_every_chapter_within_budget():
    rep = json.loads((ROOT / "_build" / "reports" / "timings.json").read_text())
    for cid in CHAPTERS:
        r = rep[f"{cid}@ci"]
        assert r["status"] == "ok" and r["peak_mem_mb"] > 0
        assert r["wall_s"] <= 20, f"{cid} took {r['wall_s']} s at SCALE=ci (budget 20 s, two chapters at a time on 2 cores)"


def test_performance_page_shows_every_recorded_benchmark():
    import html as html_lib

    import perf_page
    text = html_lib.unescape(re.sub(r"<[^>]+>", "", (HTML / "performance.html").read_text()))
    docs = perf_page.load()
    if not docs:
        assert "make bench" in text
    for doc in docs:
        assert doc["hardware"] in text and doc["date"] in text and doc["commit"] in text
        for r in doc["records"]:
            row = f"{r['name']} {perf_page.fmt_sizes(r['sizes'])} {perf_page.fmt_side_time(r['ours'])}"
            assert " ".join(row.split()) in " ".join(text.split()), f"not on the Performance page: {row}"
            if r.get("theirs"):
                assert perf_page.fmt_side_time(r["theirs"]) in text
