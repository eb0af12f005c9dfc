"""The checks must fail on a broken page: a copy of the built site with one chapter page broken
on purpose in each way the browser tests look for."""
import re
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))

import site_check  # noqa: E402

BREAKAGE = """
<p>Math with a TeX error: $$\\frac{1}$$</p>
<p>Math left raw: $$\\frac{1}{$$, a raw role {cite}`nobody`.</p>
<img src="../../_images/no-such-figure.png" alt="missing">
<a href="no-such-page.html">dangling page</a> <a href="#no-such-anchor">dangling anchor</a>
<div style="width: 3000px">a table far wider than the screen</div>
<script>throw new Error("broken on purpose")</script>
"""


@pytest.fixture(scope="module")
def broken_site(site, tmp_path_factory) -> tuple[Path, str]:
    from PIL import Image

    copy = tmp_path_factory.mktemp("site") / "html"
    shutil.copytree(site, copy, ignore=shutil.ignore_patterns("colab"))
    rel = next(p for p in site_check.pages(copy) if p.startswith("chapters/") and not p.endswith("index.html"))
    page = copy / rel
    html = page.read_text()
    page.write_text(html.replace("</main>", BREAKAGE + "</main>", 1))
    # a second chapter page whose math is never typeset: its MathJax script is gone
    other = next(p for p in site_check.pages(copy) if p.startswith("chapters/") and p != rel and not p.endswith("index.html"))
    stripped = re.sub(r"<script[^>]*mathjax@3[^>]*></script>", "", (copy / other).read_text())
    assert stripped != (copy / other).read_text()
    (copy / other).write_text(stripped)
    figures = sorted((copy / "_images").glob("*.png"))
    assert figures, "the built site has no figures to break"
    w, h = Image.open(figures[0]).size
    for f in figures:  # every figure transparent (as with savefig(transparent=True))
        Image.new("RGBA", (w, h), (0, 0, 0, 0)).save(f)
    return copy, rel, other


def test_every_check_fires_on_a_broken_page(broken_site, browser):
    site, rel, other = broken_site
    with site_check.serve(site) as base:
        ctx = site_check.new_context(browser, viewport="desktop", theme="dark")
        page, state, errors = site_check.load(ctx, base + rel)
        page.close()
        ctx.close()
        found = "\n".join(site_check.problems(site, base, state, errors, source="$x$ {cite}`k`"))
    for expected in ("broken on purpose", "image did not load", "untypeset math",
                     "MathJax could not typeset", "raw MyST role",
                     "link to a missing page", "link to a missing anchor", "transparent corner",
                     "wider than the desktop viewport"):
        assert expected in found, f"the check for {expected!r} did not fire:\n{found}"


def test_math_left_untypeset_is_caught(broken_site, browser):
    site, rel, other = broken_site
    with site_check.serve(site) as base:
        ctx = site_check.new_context(browser)
        page, state, errors = site_check.load(ctx, base + other)
        page.close()
        ctx.close()
        found = "\n".join(site_check.problems(site, base, state, errors, source=site_check._source_of(other)))
    assert "untypeset math" in found and "no typeset formula" in found, found


def test_untouched_pages_of_the_broken_copy_still_pass(broken_site, browser):
    site, rel, other = broken_site
    with site_check.serve(site) as base:
        ctx = site_check.new_context(browser)
        page, state, errors = site_check.load(ctx, base + "references.html")
        page.close()
        ctx.close()
        assert site_check.problems(site, base, state, errors) == []
