"""A small Sphinx extension for the book (loaded by tools/build_book.py).

``dedupe_scripts``: jupyter-book 1.x with sphinx-thebe 0.3 adds sphinx-thebe's inline configuration
script to each page twice; the second copy re-declares ``const THEBE_JS_URL`` and every page
raises an uncaught ``SyntaxError`` in the reader's console. Identical script entries are dropped
here, keeping the first.
"""
from __future__ import annotations


def dedupe_scripts(app, pagename, templatename, context, doctree) -> None:
    scripts = context.get("script_files")
    if not scripts:
        return
    seen, kept = set(), []
    for js in scripts:
        attrs = getattr(js, "attributes", {}) or {}
        key = (str(getattr(js, "filename", js) or ""), tuple(sorted((k, str(v)) for k, v in attrs.items())))
        if key in seen:
            continue
        seen.add(key)
        kept.append(js)
    scripts[:] = kept


def setup(app):
    app.connect("html-page-context", dedupe_scripts, priority=900)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
