"""What every figure module shares: the rc style, a styled subplots call, saving (PNG, PDF, SVG; atomic),
legends outside the axes, the epoch and U-Net-width axes, a spread of timesteps. A leaf module: the figure modules import
it and nothing here imports them, so none of them imports another to borrow a helper."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from records.atomic import atomic_write  # noqa: E402

STYLE = {
    "figure.figsize": (5.0, 3.6), "figure.dpi": 120, "savefig.dpi": 150, "savefig.bbox": "tight",
    "font.size": 10, "axes.titlesize": 10, "axes.labelsize": 10, "legend.fontsize": 8,
    "axes.grid": True, "grid.alpha": 0.3, "axes.spines.top": False, "axes.spines.right": False,
    "lines.linewidth": 1.6, "lines.markersize": 4,
}


def styled():
    """The figures' rc context: draw *and* save a figure inside it (`figures.save` also pins dpi and bbox)."""
    return plt.rc_context(STYLE)


def subplots(**kw):
    # The size and dpi apply here; the rest of STYLE (fonts, line widths, savefig.*) is read
    # while drawing and saving, so `report.write_figures` draws and saves each figure inside `styled()`.
    with styled():
        return plt.subplots(**kw)


def legend_outside(ax, **kw):
    """A legend right of the axes, never over the data (a dense plot has no empty corner)."""
    return ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, **kw)


def legend_below(ax, ncol: int = 2) -> None:
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=ncol, frameon=False)


def epoch_axis(ax) -> None:
    ax.set_xlabel("epoch (passes over the training set)")


def width_axis(ax, widths) -> None:
    """A log2 x axis labelled with the U-Net base widths themselves."""
    from matplotlib.ticker import NullFormatter

    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted(set(int(w) for w in widths)))
    ax.set_xticklabels([str(w) for w in sorted(set(int(w) for w in widths))])
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("U-Net base width (channels)")


def pick_ts(ts, n):
    """n values spread over the sorted ts, ends excluded (all of them when there are no more than n)."""
    ts = np.sort(np.asarray(ts))
    idx = np.unique(np.linspace(0, len(ts) - 1, n + 2).round().astype(int)[1:-1]) if len(ts) > n else np.arange(len(ts))
    return [int(ts[i]) for i in idx]


FIGURE_FORMATS = ("png", "pdf")  # the study file's default (orchestrator/spec.py: analysis.figure_formats)


def save(fig, path_stem: Path, formats=FIGURE_FORMATS) -> Path:
    """`fig` as path_stem.<format> for each format (PNG among them: the report shows it); returns the PNG."""
    path_stem.parent.mkdir(parents=True, exist_ok=True)
    for fmt in formats:
        # dpi and bbox explicitly: outside STYLE's rc context savefig would crop at the figure's
        # edge (labels, titles and outside legends cut) at the figure's own dpi.
        with atomic_write(path_stem.with_suffix(f".{fmt}")) as fh:
            fig.savefig(fh, format=fmt, dpi=STYLE["savefig.dpi"], bbox_inches=STYLE["savefig.bbox"])
    plt.close(fig)
    return path_stem.with_suffix(".png")
