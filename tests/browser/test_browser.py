"""The rendered book, opened in headless Chromium as a reader meets it (run by `make test` after
the book is built; `make browser-tests` alone). Every page is checked on a desktop screen in the
light and the dark theme and on a phone screen; screenshots go to _build/screenshots/."""
import re
import sys
from pathlib import Path
from urllib.parse import urlparse

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))

import colab  # noqa: E402
import site_check  # noqa: E402
from run_chapters import chapter_id, toc_chapters  # noqa: E402

PAGES = site_check.pages(site_check.SITE) if site_check.SITE.exists() else ["(book not built)"]
CHAPTERS = [chapter_id(c) for c in toc_chapters()]


@pytest.mark.parametrize("viewport,theme", site_check.CHECKS, ids=lambda v: v)
@pytest.mark.parametrize("rel", PAGES)
def test_page_reads_cleanly(site, base, contexts, rel, viewport, theme):
    page, state, errors = site_check.load(contexts(viewport, theme), base + rel)
    page.close()
    found = site_check.problems(site, base, state, errors, source=site_check._source_of(rel), viewport=viewport)
    assert not found, f"{rel} [{viewport}, {theme}]:\n  " + "\n  ".join(found)


@pytest.mark.parametrize("cid", CHAPTERS)
def test_chapter_page_typesets_math_boxes_and_citations(site, base, contexts, cid):
    source = (ROOT / "chapters" / f"{cid}.md").read_text()
    page, state, _ = site_check.load(contexts(), base + f"chapters/{cid}.html")
    page.close()
    assert state["math"] >= 5, f"only {state['math']} typeset formulas"
    if "{prf:" in source:
        assert state["proofs"] >= 1
    assert state["citations"] >= 1


@pytest.mark.parametrize("cid", CHAPTERS)
def test_launch_button_opens_the_published_colab_notebook(site, base, contexts, cid):
    page, state, _ = site_check.load(contexts(), base + f"chapters/{cid}.html")
    page.close()
    assert len(state["colab"]) == 1, f"expected one Colab launch link, found {state['colab']}"
    url = urlparse(state["colab"][0])
    assert state["colab"][0] == colab.colab_url(colab.load_config(), cid)
    _, branch, folder = colab.colab_location(colab.load_config())
    published = url.path.split(f"/blob/{branch}/", 1)[1]
    assert published == f"{folder}/chapters/{cid}.ipynb"
    assert (site / published).exists(), f"the launch link's notebook {published} is not in the site"


def _search_results(contexts, base: str, term: str) -> list[str]:
    page = contexts().new_page()
    page.goto(base + "intro.html")
    page.locator(".search-button__button:visible").first.click()  # the sidebar's search field
    box = page.locator("#pst-search-dialog input[name=q]")
    box.wait_for(state="visible")
    box.fill(term)
    box.press("Enter")
    page.wait_for_url(re.compile(r"search\.html\?q="))
    # Sphinx lists the hits one by one and only then retitles the results "Search Results"
    page.wait_for_function("() => { const h = document.querySelector('#search-results h2'); "
                           "return h !== null && h.innerText.trim() === 'Search Results'; }", timeout=20_000)
    hrefs = page.eval_on_selector_all("#search-results a", "as => as.map(a => a.href)")
    page.close()
    return hrefs


@pytest.mark.parametrize("cid", CHAPTERS)
def test_search_from_the_landing_page_finds_the_chapter(site, base, contexts, cid):
    title = re.search(r"^# (.+)$", (ROOT / "chapters" / f"{cid}.md").read_text(), re.M).group(1)
    words = [w for w in re.split(r"[:\s]+", title) if w]
    term = next(w for w in words if w.lower() not in {"the", "a", "an"})  # the method's name opens the title
    hits = _search_results(contexts, base, term)
    assert any(h.split("?")[0].split("#")[0].endswith(f"chapters/{cid}.html") for h in hits), \
        f"searching {term!r} did not find {cid}: {hits[:10]}"


def test_screenshots_for_review(site, base, browser):
    saved = site_check.take_screenshots(browser, base, site)
    assert len(saved) == 2 * len(site_check.VIEWPORTS) * len(site_check.screenshot_targets(site))
    for p in saved:
        assert p.stat().st_size > 10_000, f"{p.name} looks blank"
