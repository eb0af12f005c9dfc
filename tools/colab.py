#!/usr/bin/env python3
"""Turn the chapters into notebooks that read and run properly on Colab.

    python tools/colab.py            # every chapter in _toc.yml -> _build/colab/chapters/<part>/<slug>.ipynb

The book's MyST (sphinx-proof boxes, {cite}, {eq}, literalinclude, labelled equations) means
nothing to Colab, so each markdown cell is rewritten into plain Markdown + LaTeX: theorem-like
boxes become quoted, numbered paragraphs; citations become "(Author, year)" with a reference list
at the end; labelled equations get \\tag{n} and references to them read "(n)"; a literalinclude
becomes the code it includes. The Colab set-up cell moves to the top and installs lossbook from the
repository named in _config.yml. Outputs are not kept: the notebook is for running.
"""
from __future__ import annotations

import ast
import copy
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))

from run_chapters import chapter_id, toc_chapters  # noqa: E402

PLACEHOLDER_PIP = "lossbook[book] @ git+https://github.com/lossbook/lossbook@main"
PRF_KINDS = {"theorem": "Theorem", "lemma": "Lemma", "proposition": "Proposition",
             "corollary": "Corollary", "definition": "Definition", "algorithm": "Algorithm",
             "remark": "Remark", "example": "Example", "assumption": "Assumption",
             "conjecture": "Conjecture", "proof": "Proof", "property": "Property",
             "observation": "Observation", "criterion": "Criterion", "axiom": "Axiom"}
ADMONITIONS = {"note", "tip", "warning", "important", "caution", "attention", "hint", "seealso",
               "admonition", "danger", "error"}
FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>```+|:::+)\{(?P<name>[\w:-]+)\}[ \t]*(?P<arg>[^\n]*)\n"
                   r"(?P<body>.*?)^[ \t]*(?P=fence)[ \t]*$", re.M | re.S)  # indented: inside a list item
MATH_LABEL = re.compile(r"\$\$[ \t]*\(([\w:.-]+)\)|^[ \t]*(?:```+|:::+)\{math\}[^\n]*\n(?:[ \t]*:[\w-]+:.*\n)*?"
                        r"[ \t]*:label:[ \t]*(\S+)", re.M)
ROLE = re.compile(r"\{(?P<role>[\w:-]+)\}`(?P<text>[^`]*)`")
RAW_LEFT = re.compile(r"(```+|:::+)\{[\w:-]+\}|\{[\w:-]+\}`")


def load_config(root: Path = ROOT) -> dict:
    import yaml

    return yaml.safe_load((root / "_config.yml").read_text())


def pip_spec(config: dict) -> str:
    """``lossbook[book] @ git+<url>@<branch>`` from _config.yml."""
    repo = config["repository"]
    return f"lossbook[book] @ git+{repo['url'].rstrip('/')}@{repo.get('branch', 'main')}"


def colab_location(config: dict) -> tuple[str, str, str]:
    """(``org/repo``, branch, folder) where the published Colab notebooks live."""
    url = config["repository"]["url"].rstrip("/")
    org_repo = "/".join(url.split("/")[-2:])
    lb = config.get("lossbook", {})
    return org_repo, lb.get("colab_branch", "gh-pages"), lb.get("colab_path", "colab").strip("/")


def colab_url(config: dict, chapter: str) -> str:
    """The URL that opens chapter ``<part>/<slug>`` on Colab."""
    org_repo, branch, folder = colab_location(config)
    base = config.get("launch_buttons", {}).get("colab_url", "https://colab.research.google.com").rstrip("/")
    return f"{base}/github/{org_repo}/blob/{branch}/{folder}/chapters/{chapter}.ipynb"


# --------------------------------------------------------------------------- bibliography
def parse_bib(text: str) -> dict[str, dict[str, str]]:
    """A small BibTeX reader: ``key -> {field: value}`` (braces stripped)."""
    entries = {}
    for m in re.finditer(r"@(\w+)\s*\{\s*([^,\s]+)\s*,(.*?)\n\}", text, re.S):
        fields = {}
        for f in re.finditer(r"(\w+)\s*=\s*(\{(?:[^{}]|\{[^{}]*\})*\}|\"[^\"]*\"|\d+)", m.group(3)):
            fields[f.group(1).lower()] = re.sub(r"[{}\"]", "", f.group(2)).strip()
        fields["_type"] = m.group(1).lower()
        entries[m.group(2)] = fields
    return entries


def _last_names(authors: str) -> list[str]:
    names = []
    for a in re.split(r"\s+and\s+", authors):
        a = a.strip()
        names.append(a.split(",")[0].strip() if "," in a else a.split()[-1] if a else a)
    return names


def cite_text(entry: dict[str, str]) -> str:
    names = _last_names(entry.get("author", "Anonymous"))
    who = names[0] if len(names) == 1 else f"{names[0]} and {names[1]}" if len(names) == 2 else f"{names[0]} et al."
    return f"{who}, {entry.get('year', 'n.d.')}"


def _full_names(authors: str) -> str:
    names = []
    for a in re.split(r"\s+and\s+", authors.strip()):
        last, _, first = a.partition(",")
        names.append(f"{first.strip()} {last.strip()}".strip() if first else a.strip())
    return ", ".join(names)


def reference_line(key: str, e: dict[str, str]) -> str:
    venue = e.get("journal") or e.get("booktitle") or e.get("publisher") or e.get("howpublished") or ""
    url = e.get("url") or (f"https://arxiv.org/abs/{e['eprint']}" if "eprint" in e else "")
    tail = f" {url}" if url else ""
    return f"- {_full_names(e.get('author', ''))} ({e.get('year', 'n.d.')}). *{e.get('title', key)}*. {venue}.{tail}".replace(" .", "")


# --------------------------------------------------------------------------- code extraction
def extract_pyobject(path: Path, name: str) -> str:
    """Source of function/class ``name`` (``Class.method`` allowed) in ``path``, as Sphinx's
    literalinclude ``:pyobject:`` shows it."""
    src = path.read_text()
    tree = ast.parse(src)
    node: ast.AST = tree
    for part in name.split("."):
        node = next(n for n in ast.iter_child_nodes(node)
                    if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and n.name == part)
    lines = src.splitlines()
    start = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])]) - 1
    return "\n".join(lines[start:node.end_lineno])


# --------------------------------------------------------------------------- markdown rewriting
class Converter:
    """Rewrites one chapter's markdown cells; numbering runs across the chapter."""

    def __init__(self, src: Path, bib: dict[str, dict[str, str]]):
        self.src, self.bib = src, bib
        self.eq: dict[str, int] = {}
        self.prf: dict[str, str] = {}
        self.counts: dict[str, int] = {}
        self.cited: list[str] = []

    def prescan(self, texts: list[str]) -> None:
        """Number labelled equations and proof-like boxes before rewriting, so forward
        references resolve."""
        for t in texts:
            for m in MATH_LABEL.finditer(t):  # both label forms share one counter, in page order
                self.eq.setdefault(m.group(1) or m.group(2), len(self.eq) + 1)
            for m in FENCE.finditer(t):
                name = m.group("name")
                kind = name.split(":", 1)[1] if name.startswith("prf:") else None
                if kind and kind != "proof":
                    self.counts[kind] = self.counts.get(kind, 0) + 1
                    lab = re.search(r"^:label:\s*(\S+)", m.group("body"), re.M)
                    if lab:
                        self.prf[lab.group(1)] = f"{PRF_KINDS.get(kind, kind.title())} {self.counts[kind]}"
        self.counts = {}

    def _fence(self, m: re.Match) -> str:
        name, arg, body = m.group("name"), m.group("arg").strip(), m.group("body")
        head = re.match(r"(?:[ \t]*:[\w-]+:.*(?:\n|$))*", body).group(0)   # the options block, not nested ones
        opts = dict(re.findall(r"^[ \t]*:([\w-]+):[ \t]*(.*)$", head, re.M))
        indent = m.group("indent")
        body = body[len(head):].strip("\n")
        if indent:
            body = "\n".join(line[len(indent):] if line.startswith(indent) else line for line in body.splitlines())
        if name == "literalinclude":
            path = (self.src.parent / arg).resolve()
            code = extract_pyobject(path, opts["pyobject"]) if "pyobject" in opts else path.read_text()
            shown = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path.name
            return f"```python\n{code}\n```\n*(from `{shown}`)*\n"
        if name.startswith("prf:"):
            kind = name.split(":", 1)[1]
            inner = self.convert(body)
            if kind == "proof":
                head = "*Proof.*"
                inner += " $\\blacksquare$"
            else:
                self.counts[kind] = self.counts.get(kind, 0) + 1
                title = f" ({self.convert(arg)})" if arg else ""
                head = f"**{PRF_KINDS.get(kind, kind.title())} {self.counts[kind]}{title}.**"
            return "\n".join("> " + line if line else ">" for line in f"{head} {inner}".splitlines()) + "\n"
        if name in ("math",):
            lab = opts.get("label")
            tag = f" \\tag{{{self.eq[lab]}}}" if lab in self.eq else ""
            return "\n".join(indent + line for line in f"$$\n{body}{tag}\n$$".splitlines()) + "\n"
        if name in ADMONITIONS:
            title = arg if name == "admonition" else (arg or name.title())
            inner = self.convert(body)
            return "\n".join("> " + line if line else ">" for line in f"**{title}.** {inner}".splitlines()) + "\n"
        if name in ("figure", "image"):
            cap = self.convert(body)
            return f"![{cap}]({arg})\n\n*{cap}*\n"
        if name in ("bibliography", "tableofcontents", "toctree"):
            return ""
        if name in ("code-block", "code"):
            return f"```{arg}\n{body}\n```\n"
        # any other directive: keep its content, drop the markup
        return self.convert(body) + "\n"

    def _role(self, m: re.Match) -> str:
        role, text = m.group("role"), m.group("text")
        if role.startswith("cite"):
            keys = [k.strip() for k in text.split(",")]
            for k in keys:
                if k not in self.cited:
                    self.cited.append(k)
            parts = [cite_text(self.bib[k]) if k in self.bib else k for k in keys]
            return "(" + "; ".join(parts) + ")"
        if role == "eq":
            return f"({self.eq.get(text, '?')})"
        if role in ("prf:ref", "ref", "numref"):
            label = re.sub(r".*<(.+)>", r"\1", text)
            return self.prf.get(label, re.sub(r"\s*<.+>", "", text))
        if role == "math":
            return f"${text}$"
        if role in ("doc", "download"):
            return re.sub(r"\s*<.+>", "", text)
        return text

    def convert(self, text: str) -> str:
        text = FENCE.sub(self._fence, text)

        def eqlabel(m: re.Match) -> str:
            lab = m.group(2)
            body = m.group(1).rstrip()
            return f"$${body} \\tag{{{self.eq.get(lab, '?')}}}$$"

        text = re.sub(r"\$\$(.+?)\$\$[ \t]*\(([\w:.-]+)\)", eqlabel, text, flags=re.S)
        text = ROLE.sub(self._role, text)
        text = re.sub(r"^\(([\w:-]+)\)=\s*$\n?", "", text, flags=re.M)  # MyST targets
        return text


def is_setup_cell(cell) -> bool:
    return cell.cell_type == "code" and "google.colab" in cell.source and "pip" in cell.source


def to_colab(src: Path, config: dict, bib: dict) -> "nbformat.NotebookNode":  # noqa: F821
    """The Colab notebook for one chapter source."""
    import jupytext
    import nbformat

    nb = jupytext.read(src)
    conv = Converter(src, bib)
    conv.prescan([c.source for c in nb.cells if c.cell_type == "markdown"])
    setup = [c for c in nb.cells if is_setup_cell(c)]
    if not setup:
        raise ValueError(f"{src}: no Colab set-up cell (a code cell installing lossbook under google.colab)")
    cells = []
    first = copy.deepcopy(setup[0])
    first.source = first.source.replace(PLACEHOLDER_PIP, pip_spec(config))
    first.metadata = {"id": "setup"}
    cells.append(first)
    for c in nb.cells:
        if is_setup_cell(c):
            continue
        c = copy.deepcopy(c)
        if c.cell_type == "markdown":
            c.source = conv.convert(c.source)
            if not c.source.strip():
                continue
        elif c.cell_type == "code":
            c.outputs, c.execution_count = [], None
            tags = c.metadata.get("tags", [])
            if "parameters" in tags:
                c.source = "# Switch SCALE to \"full\" for the paper-sized run (use a GPU runtime).\n" + c.source
        cells.append(c)
    if conv.cited:
        refs = "\n".join(reference_line(k, bib[k]) for k in conv.cited if k in bib)
        cells.append(nbformat.v4.new_markdown_cell("## References\n\n" + refs))
    out = nbformat.v4.new_notebook(cells=cells)
    out.metadata = {
        "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
        "language_info": {"name": "python"},
        "accelerator": "GPU",
        "colab": {"provenance": [], "gpuType": "T4", "name": src.stem},
    }
    nbformat.validator.normalize(out)
    return out


def raw_markup(nb) -> list[str]:
    """MyST markup left in a notebook's markdown cells (should be empty)."""
    return [m.group(0) for c in nb.cells if c.cell_type == "markdown" for m in RAW_LEFT.finditer(c.source)]


def main(argv: list[str] | None = None) -> int:
    import argparse

    import nbformat

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("chapters", nargs="*", type=Path)
    ap.add_argument("--out", type=Path, default=ROOT / "_build" / "colab")
    args = ap.parse_args(argv)
    config = load_config()
    bib = parse_bib((ROOT / "references.bib").read_text())
    chapters = [c.resolve() for c in args.chapters] or toc_chapters()
    bad = 0
    for src in chapters:
        nb = to_colab(src, config, bib)
        left = raw_markup(nb)
        if left:
            print(f"{chapter_id(src)}: MyST markup left for Colab: {sorted(set(left))}", file=sys.stderr)
            bad += 1
        path = args.out / "chapters" / f"{chapter_id(src)}.ipynb"
        path.parent.mkdir(parents=True, exist_ok=True)
        nbformat.write(nb, path)
    print(f"wrote {len(chapters)} Colab notebook(s) to {args.out}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
