"""Fixtures for the browser tests: the built site served on 127.0.0.1 and one headless system
Chromium for the whole session (see tools/site_check.py)."""
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))

import site_check  # noqa: E402


@pytest.fixture(scope="session")
def site() -> Path:
    if not (site_check.SITE / "intro.html").exists():
        pytest.fail("the book is not built: run `make build` first (make test does)")
    return site_check.SITE


@pytest.fixture(scope="session")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = site_check.open_browser(pw)
        yield b
        b.close()


@pytest.fixture(scope="session")
def base(site):
    with site_check.serve(site) as url:
        yield url


@pytest.fixture(scope="session")
def contexts(browser):
    """One browser context per (viewport, theme), made on first use."""
    made = {}

    def get(viewport: str = "desktop", theme: str = "light"):
        if (viewport, theme) not in made:
            made[viewport, theme] = site_check.new_context(browser, viewport=viewport, theme=theme)
        return made[viewport, theme]

    yield get
    for ctx in made.values():
        ctx.close()
