"""Open the built book in headless Chromium and check every page as a reader meets it.

    python tools/site_check.py                  # check _build/html, screenshots to _build/screenshots
    python tools/site_check.py --site DIR --no-screenshots

The browser is the system's Chromium (Debian's ``chromium`` package, or ``$LOSSBOOK_CHROMIUM``)
driven by Playwright; nothing downloads a browser of its own. The site is served from a local
HTTP server on 127.0.0.1. The one resource the pages load from outside, MathJax from its CDN, is
answered from the copy of MathJax 3 that the ``django-static-mathjax`` package ships, so the math
is typeset offline exactly as readers see it online; every other outside request is refused (and
shows up as a console error, so a page that starts depending on one fails).

For each page, :func:`check_page` returns the problems it finds (an empty list when the page is
fine): console errors and uncaught exceptions, images that did not load, math left untypeset
(raw ``$$``, ``\\(`` or ``\\begin`` in the visible text) or typeset with a TeX error, raw MyST (``{cite}``, ``{prf:...}``,
``{eq}``), figures with transparent corners (unreadable on the dark theme), figures shrunk to less than half
their size on a desktop screen (unreadable labels), pages wider than the screen, internal links to
a missing page or anchor. Used by ``tests/browser``.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import http.server
import os
import re
import shutil
import socketserver
import sys
import threading
from pathlib import Path
from urllib.parse import unquote, urlparse

ROOT = Path(__file__).resolve().parent.parent
SITE = ROOT / "_build" / "html"
SHOTS = ROOT / "_build" / "screenshots"
MATHJAX_CDN = "https://cdn.jsdelivr.net/npm/mathjax@3/"
VIEWPORTS = {"desktop": (1280, 900), "phone": (390, 844)}
RAW_MYST = re.compile(r"\{(cite(:\w+)?|prf:\w+|eq|numref|ref|doc)\}`")
MIN_FIGURE_SCALE = 0.5  # on a desktop screen a figure shrunk below half its size has unreadable labels
RAW_MATH = re.compile(r"\$\$|\\begin\{|\\\(|\\\[")


def chromium_path() -> str:
    """The system Chromium: ``$LOSSBOOK_CHROMIUM`` or the first of chromium/chromium-browser."""
    path = os.environ.get("LOSSBOOK_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not path:
        raise RuntimeError("no system Chromium found: install Debian's `chromium` package "
                           "(apt-get install chromium) or set LOSSBOOK_CHROMIUM")
    return path


def mathjax_dir() -> Path:
    """MathJax 3's ``es5`` bundle as shipped by the ``django-static-mathjax`` package."""
    import importlib.util

    spec = importlib.util.find_spec("mathjax")
    for loc in (spec.submodule_search_locations or []) if spec else []:
        d = Path(loc) / "static" / "mathjax"
        if (d / "es5" / "tex-mml-chtml.js").exists():
            return d
    raise RuntimeError("MathJax not found: pip install django-static-mathjax (in the test extra)")


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # keep test output clean
        pass


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):  # a browser that hangs up early is not an error
        pass


@contextlib.contextmanager
def serve(site: Path):
    """Serve ``site`` on 127.0.0.1 (a free port) in a thread; yields the base URL."""
    handler = functools.partial(_Quiet, directory=str(site))
    with _Server(("127.0.0.1", 0), handler) as httpd:
        t = threading.Thread(target=httpd.serve_forever, daemon=True)
        t.start()
        try:
            yield f"http://127.0.0.1:{httpd.server_address[1]}/"
        finally:
            httpd.shutdown()


def pages(site: Path) -> list[str]:
    """Every HTML page of the site, as paths relative to it (Sphinx's own genindex excluded)."""
    skip = {"genindex.html"}
    return sorted(str(p.relative_to(site)) for p in site.rglob("*.html")
                  if p.name not in skip and "_static" not in p.parts and "_sources" not in p.parts
                  and not is_redirect(p))


def is_redirect(path: Path) -> bool:
    """Sphinx's ``index.html`` that only forwards to the root page."""
    return 'http-equiv="Refresh"' in path.read_text(errors="replace")[:2000].replace("refresh", "Refresh")


@functools.lru_cache(maxsize=None)
def _anchors(path: Path) -> frozenset[str]:
    text = path.read_text(errors="replace")
    return frozenset(re.findall(r"\bid=\"([^\"]+)\"", text)) | frozenset(re.findall(r"\bname=\"([^\"]+)\"", text))


def broken_links(site: Path, base: str, hrefs: list[str]) -> list[str]:
    """Links (as the browser resolved them) that point inside the site, at a file or an anchor
    that does not exist."""
    out = []
    for href in hrefs:
        if not href.startswith(base):
            continue
        url = urlparse(href)
        rel, frag = unquote(url.path.lstrip("/")), unquote(url.fragment)
        target = site / rel
        if target.is_dir():
            target = target / "index.html"
        if not target.exists():
            out.append(f"link to a missing page: {href[len(base):]}")
        elif frag and target.suffix == ".html" and frag not in _anchors(target):
            out.append(f"link to a missing anchor: {href[len(base):]}")
    return out


_PAGE_STATE_JS = """
async () => {
  if (window.MathJax && MathJax.startup && MathJax.startup.promise) { await MathJax.startup.promise; }
  const imgs = [...document.images];
  await Promise.all(imgs.map(i => i.complete ? null : new Promise(r => { i.onload = i.onerror = r; })));
  const visible = document.querySelector('main') || document.body;
  const clone = visible.cloneNode(true);
  clone.querySelectorAll('pre, code, script, style, .highlight, mjx-container, .MathJax').forEach(e => e.remove());
  const figures = imgs.filter(i => i.naturalWidth > 0 && /_images\\//.test(i.src)).map(i => {
    const c = document.createElement('canvas');
    c.width = i.naturalWidth; c.height = i.naturalHeight;
    const g = c.getContext('2d');
    g.drawImage(i, 0, 0);
    const w = c.width - 1, h = c.height - 1;
    const alpha = [[0, 0], [w, 0], [0, h], [w, h]].map(([x, y]) => g.getImageData(x, y, 1, 1).data[3]);
    return {src: i.src, minAlpha: Math.min(...alpha), scale: i.width / i.naturalWidth};
  });
  return {
    text: clone.innerText,
    broken: imgs.filter(i => !(i.naturalWidth > 0)).map(i => i.getAttribute('src')),
    figures,
    math: document.querySelectorAll('mjx-container').length,
    mathErrors: [...document.querySelectorAll('mjx-merror')].map(e => e.getAttribute('data-mjx-error') || e.textContent),
    hrefs: [...document.querySelectorAll('a[href]')].map(a => a.href),
    colab: [...document.querySelectorAll('a[href*="colab.research.google.com"]')].map(a => a.href),
    proofs: document.querySelectorAll('div.proof, div.admonition.theorem, div.admonition.definition, div.admonition.algorithm, div[class*="proof"]').length,
    citations: document.querySelectorAll('a[href*="references.html#"]').length,
    overflow: document.documentElement.scrollWidth - document.documentElement.clientWidth,
  };
}
"""


def open_browser(playwright):
    return playwright.chromium.launch(executable_path=chromium_path(), headless=True,
                                      args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])


def new_context(browser, *, viewport: str = "desktop", theme: str = "light"):
    """A browser context whose MathJax requests are served locally and whose other outside requests
    are refused; ``theme`` is the book theme's stored choice ("light" or "dark")."""
    w, h = VIEWPORTS[viewport]
    ctx = browser.new_context(viewport={"width": w, "height": h}, color_scheme=theme,
                              device_scale_factor=1, is_mobile=viewport == "phone")
    mj = mathjax_dir()

    def route(r):
        url = r.request.url
        if url.startswith(MATHJAX_CDN):
            f = mj / url[len(MATHJAX_CDN):].split("?")[0]
            if f.is_file():
                return r.fulfill(path=str(f), content_type="application/javascript" if f.suffix == ".js" else None)
            return r.fulfill(status=404)
        if url.startswith("http://127.0.0.1"):
            return r.continue_()
        return r.abort()

    ctx.route("**/*", route)
    ctx.add_init_script(f"try {{ localStorage.setItem('theme', '{theme}'); localStorage.setItem('mode', '{theme}'); }} catch (e) {{}}")
    return ctx


def load(ctx, url: str) -> tuple[object, dict, list[str]]:
    """Open ``url``; return the page, its state (see ``_PAGE_STATE_JS``) and the console errors."""
    page = ctx.new_page()
    errors: list[str] = []
    page.on("console", lambda m: errors.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(f"uncaught exception: {e}"))
    page.goto(url, wait_until="load")
    state = page.evaluate(_PAGE_STATE_JS)
    return page, state, errors


def problems(site: Path, base: str, state: dict, errors: list[str], *, source: str | None = None,
             viewport: str = "desktop") -> list[str]:
    """What a reader would stumble on in one loaded page (see the module docstring)."""
    out = list(errors)
    out += [f"image did not load: {s}" for s in state["broken"]]
    if viewport == "desktop":
        out += [f"figure shown at {o['scale']:.0%} of its size, its text too small to read (fewer panels per row?): "
                f"{o['src']}" for o in state["figures"] if o["scale"] < MIN_FIGURE_SCALE]
    if state["overflow"] > 1:
        out.append(f"the page is {state['overflow']} px wider than the {viewport} viewport (a wide table or equation?)")
    out += [f"figure with a transparent corner (unreadable on a dark theme): {o['src']}"
            for o in state["figures"] if o["minAlpha"] < 255]
    out += [f"math MathJax could not typeset: {e}" for e in state["mathErrors"]]
    for m in RAW_MATH.finditer(state["text"]):
        out.append(f"untypeset math: …{state['text'][max(0, m.start() - 30):m.end() + 30]!r}…")
        break
    for m in RAW_MYST.finditer(state["text"]):
        out.append(f"raw MyST role in the text: …{state['text'][max(0, m.start() - 20):m.end() + 30]!r}…")
        break
    if source is not None:
        if re.search(r"\$[^$\s][^$]*\$|\$\$", source) and state["math"] == 0:
            out.append("the source has math but no typeset formula is on the page")
        if "{prf:" in source and state["proofs"] == 0:
            out.append("the source has theorem/definition boxes but none rendered")
        if "{cite" in source and state["citations"] == 0:
            out.append("the source cites but no citation links to the references page")
    out += broken_links(site, base, state["hrefs"])
    return out


def _source_of(rel: str) -> str | None:
    src = (ROOT / rel).with_suffix(".md")
    return src.read_text() if src.exists() else None


def screenshot_targets(site: Path) -> dict[str, str]:
    """Landing page, the first chapter page and the references page."""
    chapters = sorted(p for p in pages(site) if p.startswith("chapters/") and not p.endswith("index.html"))
    out = {"landing": "intro.html", "references": "references.html"}
    if chapters:
        out["chapter"] = chapters[0]
    return out


def take_screenshots(browser, base: str, site: Path, out: Path = SHOTS) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    saved = []
    for theme in ("light", "dark"):
        for vp in VIEWPORTS:
            ctx = new_context(browser, viewport=vp, theme=theme)
            for name, rel in screenshot_targets(site).items():
                page, _, _ = load(ctx, base + rel)
                path = out / f"{name}-{vp}-{theme}.png"
                page.screenshot(path=str(path), full_page=name == "chapter")
                saved.append(path)
                page.close()
            ctx.close()
    return saved


CHECKS = (("desktop", "light"), ("desktop", "dark"), ("phone", "light"))  # (viewport, theme) each page is checked at


def check_site(browser, base: str, site: Path, checks=CHECKS):
    """Yield ``(viewport, theme, page, problems)`` for every page of ``site`` at every check."""
    for viewport, theme in checks:
        ctx = new_context(browser, viewport=viewport, theme=theme)
        for rel in pages(site):
            page, state, errors = load(ctx, base + rel)
            page.close()
            yield viewport, theme, rel, problems(site, base, state, errors, source=_source_of(rel), viewport=viewport)
        ctx.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--site", type=Path, default=SITE)
    ap.add_argument("--no-screenshots", action="store_true")
    args = ap.parse_args(argv)
    from playwright.sync_api import sync_playwright

    failed = 0
    with serve(args.site) as base, sync_playwright() as pw:
        browser = open_browser(pw)
        for viewport, theme, rel, found in check_site(browser, base, args.site):
            print(f"{'ok ' if not found else 'BAD'} [{viewport} {theme}] {rel}")
            for f in found:
                print(f"      {f}")
            failed += bool(found)
        if not args.no_screenshots:
            for p in take_screenshots(browser, base, args.site):
                print(f"screenshot {p.relative_to(ROOT) if p.is_relative_to(ROOT) else p}")
        browser.close()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
