import matplotlib

matplotlib.use("agg")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from lossbook import plot  # noqa: E402


def test_learning_curves_and_compare_draw():
    ax = plot.learning_curves({"a": np.random.rand(3, 10), "b": np.random.rand(1, 10)}, ylabel="acc")
    assert len(ax.lines) == 2 and ax.get_ylabel() == "acc"
    ax = plot.compare({"x": [0.1, 0.2], "y": [0.3]}, paper={"x": 0.15}, ylabel="err")
    assert [t.get_text() for t in ax.get_xticklabels()] == ["x", "y"]
    with pytest.raises(ValueError, match="band"):
        plot.learning_curves({"a": [1, 2]}, band="iqr")


def test_figures_are_opaque_for_dark_themes():
    fig, _ = plot.figure()
    assert fig.get_facecolor()[:3] == (1.0, 1.0, 1.0)
    import matplotlib as mpl
    assert mpl.rcParams["savefig.transparent"] is False


def test_results_table_markdown():
    t = plot.results_table([{"loss": "ce", "acc": 0.91234}, {"loss": "a|b", "acc": None}])
    assert t.splitlines()[0] == "| loss | acc |"
    assert "0.912" in t and "a\\|b" in t and "—" in t
    assert t._repr_markdown_() == str(t)
    assert plot.mean_std([1.0, 3.0], ".1f") == "2.0 ± 1.4"
    with pytest.raises(ValueError):
        plot.results_table([])
