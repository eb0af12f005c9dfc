"""The chapter contract of GUIDE.md, checked on every chapter: each gap is named."""
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TOC = (ROOT / "_toc.yml").read_text()
BIB_KEYS = set(re.findall(r"@\w+\s*\{\s*([^,\s]+)", (ROOT / "references.bib").read_text()))
SOURCES = sorted(p for p in (ROOT / "chapters").glob("*/*.md") if p.name != "index.md")
TOC_FILES = re.findall(r"file:\s*([\w/]+)", TOC)


def code_cells(text: str) -> list[tuple[str, str]]:
    """(options block, source) of each ``{code-cell}``."""
    cells = []
    for m in re.finditer(r"^```\{code-cell\}[^\n]*\n(.*?)^```\s*$", text, re.S | re.M):
        body = m.group(1)
        opts = "\n".join(re.findall(r"^:[\w-]+:.*$", body, re.M))
        cells.append((opts, re.sub(r"^:[\w-]+:.*\n", "", body, flags=re.M)))
    return cells


def gaps(src: Path) -> list[str]:
    part, slug = src.parent.name, src.stem
    text = src.read_text()
    cells = code_cells(text)
    code = "\n".join(c for _, c in cells)
    out = []
    if f"chapters/{part}/{slug}" not in TOC_FILES:
        out.append("not listed in _toc.yml")
    if f"chapters/{part}/index" not in TOC_FILES or not (src.parent / "index.md").exists():
        out.append(f"no part introduction chapters/{part}/index.md in _toc.yml")
    if not re.match(r"---\njupytext:.*?kernelspec:.*?\n---\n", text, re.S):
        out.append("no jupytext/kernelspec header")
    params = [c for o, c in cells if re.search(r"tags:.*\bparameters\b", o)]
    if not params:
        out.append("no code cell tagged parameters")
    elif not re.search(r"^SCALE\s*=\s*\"ci\"", params[0], re.M):
        out.append('the parameters cell does not set SCALE = "ci"')
    setup = [(o, c) for o, c in cells if "google.colab" in c]
    if not setup or "remove-cell" not in setup[0][0]:
        out.append("no Colab set-up cell tagged remove-cell")
    keys = {k.strip() for c in re.findall(r"\{cite(?::\w+)?\}`([^`]+)`", text) for k in c.split(",")}
    if not keys:
        out.append("no {cite} of the paper")
    elif not keys <= BIB_KEYS:
        out.append("cites keys missing from references.bib: " + ", ".join(sorted(keys - BIB_KEYS)))
    if not re.search(r"\*\*Claim tested\.\*\*\s*\S", text):
        out.append("no '**Claim tested.**' sentence")
    if f"literalinclude}} ../../lib/lossbook/{part}/{slug}.py" not in text:
        out.append(f"no literalinclude of ../../lib/lossbook/{part}/{slug}.py")
    if not re.search(r"^\s*assert\b", code, re.M):
        out.append("no assert in a code cell")
    if not any(c.lstrip().startswith("# NBVAL_CHECK_OUTPUT") for _, c in cells):
        out.append("no code cell starting with # NBVAL_CHECK_OUTPUT")
    if not re.search(rf"runtime\.record\(\s*[\"']{part}/{slug}[\"']", code):
        out.append(f'no runtime.record("{part}/{slug}", ...) call')
    if not re.search(r"lossbook\.plot|\bplot\.\w+\(|plt\.|savefig", code):
        out.append("no figure")
    import jupytext

    swallowed = [c.source[:60] for c in jupytext.reads(text, fmt="md:myst").cells
                 if c.cell_type == "markdown" and "{code-cell}" in c.source]
    if swallowed:
        out.append(f"a code cell was read as markdown (a stray ``` fence before it?): {swallowed[0]!r}")
    for box in re.findall(r"^```\{prf:[^\n]*\n(.*?)^```\s*$", text, re.S | re.M):
        if re.search(r"^\$\$\s*\([\w-]+\)\s*$", box, re.M):
            out.append("a labelled $$...$$ (label) equation inside a {prf:...} box: MyST drops the label there; "
                       "use a :::{math} directive with :label: instead")
            break
    if re.search(r"^[ \t]+\$\$\s*\([\w-]+\)\s*$", text, re.M):
        out.append("a labelled $$...$$ (label) equation indented in a list: its label is lost; "
                   "use a ```{math} directive with :label: instead")
    if not (ROOT / "lib" / "lossbook" / part / f"{slug}.py").exists():
        out.append(f"no lib/lossbook/{part}/{slug}.py")
    if not (ROOT / "tests" / part / f"test_{slug}.py").exists():
        out.append(f"no tests/{part}/test_{slug}.py")
    return out


def test_there_are_chapters():
    assert SOURCES, "no chapters under chapters/<part>/"


@pytest.mark.parametrize("src", SOURCES, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_chapter_contract(src):
    found = gaps(src)
    assert not found, f"{src.relative_to(ROOT)}: " + "; ".join(found)


def test_toc_lists_only_existing_pages():
    missing = [f for f in TOC_FILES if not any((ROOT / f).with_suffix(s).exists() for s in (".md", ".ipynb"))]
    assert not missing, f"_toc.yml lists pages that do not exist: {missing}"


def test_every_library_module_of_a_chapter_has_tests():
    lonely = [m for m in (ROOT / "lib" / "lossbook").glob("*/*.py")
              if not m.name.startswith("_") and (ROOT / "chapters" / m.parent.name / f"{m.stem}.md").exists()
              and not (ROOT / "tests" / m.parent.name / f"test_{m.stem}.py").exists()]
    assert not lonely, f"modules without tests: {lonely}"


def test_no_notebook_is_committed_as_source():
    assert not list((ROOT / "chapters").rglob("*.ipynb")), "chapters are .md sources; .ipynb are build products"
