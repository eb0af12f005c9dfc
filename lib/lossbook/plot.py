"""One figure style for the whole book, and helpers for the figures and tables chapters share:
learning curves with a band over seeds, comparisons with error bars, and results tables.

Figures have an opaque white background and dark text, so they read the same on the book's light
and dark themes. matplotlib is imported here only (it is in the ``book`` extra).
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

__all__ = ["compare", "figure", "learning_curves", "mean_std", "reliability_diagram", "results_table",
           "use_style"]

PALETTE = ["#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000", "#F0E442"]
"""Okabe–Ito colours: distinguishable with the common colour-vision deficiencies."""

_STYLE = {
    "figure.dpi": 110,
    "savefig.dpi": 110,
    "figure.facecolor": "white",
    "axes.facecolor": "white",
    "savefig.facecolor": "white",
    "savefig.transparent": False,
    "font.size": 10,
    "axes.titlesize": 11,
    "axes.labelsize": 10,
    "legend.fontsize": 9,
    "legend.frameon": False,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "lines.linewidth": 1.8,
    "figure.constrained_layout.use": True,
}


def use_style() -> None:
    """Apply the book's figure style (called by every helper here; call it for custom figures)."""
    import matplotlib as mpl
    from cycler import cycler

    mpl.rcParams.update(_STYLE)
    mpl.rcParams["axes.prop_cycle"] = cycler(color=PALETTE)


def figure(ncols: int = 1, nrows: int = 1, *, width: float = 4.2, height: float = 3.2, **kw: Any):
    """``fig, ax`` in the book's style (``ax`` a flat array of axes when there are several panels);
    ``width``/``height`` are per panel, in inches."""
    import matplotlib.pyplot as plt

    use_style()
    fig, axes = plt.subplots(nrows, ncols, figsize=(width * ncols, height * nrows), squeeze=False, **kw)
    return fig, (axes[0, 0] if ncols * nrows == 1 else axes.ravel())


def mean_std(values: Sequence[float], fmt: str = ".3f") -> str:
    """``"0.912 ± 0.004"``: mean and sample standard deviation over seeds."""
    v = np.asarray(values, dtype=float)
    if v.size == 0:
        raise ValueError("values must not be empty")
    sd = v.std(ddof=1) if v.size > 1 else 0.0
    return f"{v.mean():{fmt}} ± {sd:{fmt}}"


def learning_curves(curves: Mapping[str, Any], *, ax=None, x: Sequence[float] | None = None,
                    xlabel: str = "epoch", ylabel: str = "", title: str = "", band: str = "std"):
    """One line per entry of ``curves`` (label -> array of shape (n_seeds, n_points)): the mean
    over seeds, with a shaded band of ± one standard deviation (``band="std"``) or min–max
    (``band="range"``). Returns the axes."""
    if band not in ("std", "range"):
        raise ValueError(f"band must be 'std' or 'range', got {band!r}")
    if ax is None:
        _, ax = figure()
    use_style()
    for i, (label, c) in enumerate(curves.items()):
        c = np.atleast_2d(np.asarray(c, dtype=float))
        xs = np.arange(1, c.shape[1] + 1) if x is None else np.asarray(x)
        m = c.mean(0)
        lo, hi = ((m - c.std(0), m + c.std(0)) if band == "std" else (c.min(0), c.max(0)))
        color = PALETTE[i % len(PALETTE)]
        ax.plot(xs, m, label=f"{label}", color=color)
        if c.shape[0] > 1:
            ax.fill_between(xs, lo, hi, color=color, alpha=0.2, linewidth=0)
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.legend()
    return ax


def compare(results: Mapping[str, Sequence[float]], *, ax=None, ylabel: str = "", title: str = "",
            paper: Mapping[str, float] | None = None, horizontal: bool = False):
    """Bars of the mean over seeds with ± one standard deviation, the seeds as dots, and the
    paper's number as a black diamond where ``paper`` gives one. Returns the axes."""
    if ax is None:
        _, ax = figure(width=max(4.2, 0.8 * len(results) + 1.5))
    use_style()
    labels = list(results)
    pos = np.arange(len(labels))
    for i, label in enumerate(labels):
        v = np.asarray(results[label], dtype=float)
        sd = v.std(ddof=1) if v.size > 1 else 0.0
        color = PALETTE[i % len(PALETTE)]
        jitter = np.linspace(-0.15, 0.15, v.size) if v.size > 1 else np.zeros(1)
        if horizontal:
            ax.barh(i, v.mean(), xerr=sd, color=color, alpha=0.75, capsize=4)
            ax.scatter(v, i + jitter, color="black", s=10, zorder=3)
        else:
            ax.bar(i, v.mean(), yerr=sd, color=color, alpha=0.75, capsize=4)
            ax.scatter(i + jitter, v, color="black", s=10, zorder=3)
        if paper and label in paper:
            kw = dict(marker="D", color="black", s=40, zorder=4, label="paper" if i == 0 else None)
            ax.scatter(paper[label], i, **kw) if horizontal else ax.scatter(i, paper[label], **kw)
    if horizontal:
        ax.set_yticks(pos, labels)
        ax.set(xlabel=ylabel, title=title)
        ax.grid(axis="y", visible=False)
    else:
        ax.set_xticks(pos, labels)
        ax.set(ylabel=ylabel, title=title)
        ax.grid(axis="x", visible=False)
    if paper:
        ax.legend()
    return ax


def reliability_diagram(bins: Mapping[str, Any], *, ax=None, title: str = "", ece: Mapping[str, float] | None = None):
    """Reliability diagram: for each entry (label -> :class:`lossbook.metrics.ReliabilityBins`),
    the accuracy of each non-empty confidence bin against its mean confidence, with the diagonal of
    perfect calibration; the ECE goes into the legend where ``ece`` gives it. Returns the axes."""
    if ax is None:
        _, ax = figure(width=3.6, height=3.4)
    use_style()
    ax.plot([0, 1], [0, 1], color="0.5", linestyle="--", linewidth=1, label="calibrated")
    for i, (label, b) in enumerate(bins.items()):
        conf, acc, count = (np.asarray(t.detach().cpu() if hasattr(t, "detach") else t, dtype=float)
                            for t in (b.confidence, b.accuracy, b.count))
        keep = count > 0
        name = f"{label} (ECE {ece[label]:.3f})" if ece and label in ece else f"{label}"
        ax.plot(conf[keep], acc[keep], marker="o", markersize=4, color=PALETTE[i % len(PALETTE)],
                label=name)
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence", ylabel="accuracy", title=title)
    ax.set_aspect("equal")
    ax.legend(loc="upper left")
    return ax


class _Table(str):
    """A Markdown table that notebooks render (``_repr_markdown_``) and ``print`` shows as text."""

    def _repr_markdown_(self) -> str:
        return str(self)


def results_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None, *,
                  floatfmt: str = ".3f") -> _Table:
    """A Markdown table from a list of dicts (one per row); floats formatted with ``floatfmt``.

    Displayed as the last expression of a cell it renders as a table in the book and on Colab.
    """
    if not rows:
        raise ValueError("rows must not be empty")
    columns = list(columns) if columns is not None else list(dict.fromkeys(k for r in rows for k in r))

    def fmt(v: Any) -> str:
        if v is None:
            return "—"
        if isinstance(v, (float, np.floating)):
            return "—" if np.isnan(v) else f"{v:{floatfmt}}"
        return str(v).replace("|", "\\|")

    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return _Table("\n".join(lines))
