"""The build tools: MyST -> Colab conversion, the chapter table, the runner's failure report."""
import json
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))

import build_book  # noqa: E402
import colab  # noqa: E402
import run_chapters  # noqa: E402

BIB = colab.parse_bib(textwrap.dedent("""
    @article{doe2020x,
      author = {Doe, Jane and Roe, Richard and Poe, Edgar},
      title = {A {Title}},
      journal = {J},
      year = {2020}
    }
    """))


def test_parse_bib_and_cite_text():
    assert BIB["doe2020x"]["title"] == "A Title"
    assert colab.cite_text(BIB["doe2020x"]) == "Doe et al., 2020"
    assert "Jane Doe, Richard Roe, Edgar Poe (2020)" in colab.reference_line("doe2020x", BIB["doe2020x"])


def test_converter_rewrites_myst_into_plain_markdown(tmp_path):
    mod = tmp_path / "m.py"
    mod.write_text("import x\n\n\ndef f(a):\n    return a + 1\n\n\ndef g():\n    pass\n")
    src = tmp_path / "ch.md"
    text = textwrap.dedent(f"""
        As shown by {{cite}}`doe2020x`, see {{eq}}`eq-a` and {{prf:ref}}`thm-a`.

        $$
        a = b
        $$ (eq-a)

        ```{{prf:theorem}} Main
        :label: thm-a

        It holds, by {{eq}}`eq-a`.
        ```

        ```{{prf:proof}}
        Obvious.
        ```

        ```{{literalinclude}} {mod.name}
        :pyobject: f
        ```

        ```{{note}}
        Careful.
        ```
        """)
    conv = colab.Converter(src, BIB)
    conv.prescan([text])
    out = conv.convert(text)
    assert "(Doe et al., 2020)" in out and "see (1) and Theorem 1" in out
    assert "\\tag{1}" in out and "**Theorem 1 (Main).**" in out and "*Proof.* Obvious." in out
    assert "def f(a):\n    return a + 1\n```" in out and "def g" not in out
    assert "**Note.** Careful." in out
    assert not colab.RAW_LEFT.search(out), out
    assert conv.cited == ["doe2020x"]


def test_converter_numbers_math_directives_in_page_order_also_inside_lists(tmp_path):
    text = textwrap.dedent("""
        See {eq}`eq-c`, {eq}`eq-b` and {eq}`eq-a`.

        $$
        a = 1
        $$ (eq-a)

        ```{prf:lemma}
        :::{math}
        :label: eq-b
        b = 2
        :::
        ```

        1. A step:

           ```{math}
           :label: eq-c
           c = 3
           ```

           then more.
        """)
    conv = colab.Converter(tmp_path / "ch.md", BIB)
    conv.prescan([text])
    out = conv.convert(text)
    assert "See (3), (2) and (1)." in out
    assert "b = 2 \\tag{2}" in out and "   c = 3 \\tag{3}" in out
    assert not colab.RAW_LEFT.search(out), out


def test_colab_url_comes_from_config():
    cfg = {"repository": {"url": "https://github.com/o/r", "branch": "dev"},
           "lossbook": {"colab_branch": "pages", "colab_path": "nb"}}
    assert colab.pip_spec(cfg) == "lossbook[book] @ git+https://github.com/o/r@dev"
    assert colab.colab_url(cfg, "p/s") == "https://colab.research.google.com/github/o/r/blob/pages/nb/chapters/p/s.ipynb"
    staged = build_book.staged_config(cfg)
    assert staged["repository"] == {"url": "https://github.com/o/r", "branch": "pages", "path_to_book": "nb"}


def test_verdict_and_claim(tmp_path):
    assert build_book.verdict(None) == "not run"
    assert build_book.verdict({"claims": {"a": True, "b": True}}) == "held (2/2)"
    assert build_book.verdict({"claims": {"a": True, "b": False}}) == "partly held (1/2)"
    assert build_book.verdict({"claims": {"a": False}}) == "not held (0/1)"
    ch = tmp_path / "c.md"
    ch.write_text("# T\n\n**Paper.** P. **Claim tested.** Losses\nare losses. **Paper's number.** 3\n")
    assert build_book.chapter_claim(ch) == "Losses are losses."


CHAPTER = """---
jupytext:
  text_representation: {{extension: .md, format_name: myst, format_version: 0.13}}
kernelspec: {{display_name: Python 3, language: python, name: python3}}
---
# Broken

```{{code-cell}} ipython3
:tags: [parameters]
SCALE = "ci"
```

```{{code-cell}} ipython3
{body}
```
"""


def test_runner_reports_the_failing_cell(tmp_path, capsys):
    bad = tmp_path / "demo" / "broken.md"
    bad.parent.mkdir()
    bad.write_text(CHAPTER.format(body="x = 1\nraise ValueError('the claim did not hold')"))
    rc = run_chapters.main([str(bad), "--out", str(tmp_path / "out"), "--jobs", "1",
                            "--record-dir", str(tmp_path / "rec"), "--report", str(tmp_path / "t.json")])
    err = capsys.readouterr().err
    assert rc == 1
    assert "demo/broken failed" in err and "ValueError: the claim did not hold" in err


def test_runner_injects_parameters_and_records_time(tmp_path, capsys):
    ok = tmp_path / "demo" / "fine.md"
    ok.parent.mkdir()
    ok.write_text(CHAPTER.format(body="print('scale is', SCALE)"))
    assert run_chapters.main([str(ok), "--scale", "full", "--out", str(tmp_path / "out"), "--jobs", "1",
                              "--record-dir", str(tmp_path / "rec"), "--report", str(tmp_path / "t.json")]) == 0
    nb = json.loads((tmp_path / "out" / "chapters" / "demo" / "fine.ipynb").read_text())
    outputs = "".join("".join(o.get("text", "")) for c in nb["cells"] if c["cell_type"] == "code" for o in c["outputs"])
    assert "scale is full" in outputs
    timings = json.loads((tmp_path / "t.json").read_text())
    assert timings["demo/fine@full"]["status"] == "ok" and timings["demo/fine@full"]["wall_s"] > 0


def test_sphinx_extension_drops_repeated_scripts_and_is_loaded_by_the_build():
    import lossbook_sphinx
    from sphinx.builders.html._assets import _JavaScript

    thebe = _JavaScript(None, body="const THEBE_JS_URL = 'x'")  # an inline script, added twice
    ctx = {"script_files": [_JavaScript("a.js"), thebe, _JavaScript(None, body="const THEBE_JS_URL = 'x'"),
                            _JavaScript("a.js", defer="defer"), _JavaScript("a.js")]}
    lossbook_sphinx.dedupe_scripts(None, "p", "page.html", ctx, None)
    assert [(str(s.filename), s.attributes) for s in ctx["script_files"]] == \
        [("a.js", {}), ("None", {"body": "const THEBE_JS_URL = 'x'"}), ("a.js", {"defer": "defer"})]
    cfg = build_book.staged_config(colab.load_config())
    assert cfg["sphinx"]["local_extensions"]["lossbook_sphinx"] == str(ROOT / "tools")
