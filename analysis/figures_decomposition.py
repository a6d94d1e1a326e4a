"""Figures of the bias-variance decomposition (`studyctl decompose`), from its Parquet tables.

Every curve is one ensemble (`group_id`: the trials that differ only in training seed
and/or subset) and carries its 95% interval (bootstrap over points, plus the jackknife
over models where K allows it: column `interval`). Timesteps are compared at equal
log-SNR lambda_t = log(abar_t / (1 - abar_t)) when the plotted groups' schedules differ
(equal t is a different noise level under another schedule).
"""
from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from .style import STYLE, pick_ts, width_axis
from .tables import Study

BN_LABEL = "bias² + noise"
VAR_LABEL = "variance (unbiased, K−1)"
Y_LABEL = "per-dimension error  ‖·‖² / d"


def _width(panels: int, per: float = 3.6) -> float:
    """Figure width: the panels plus the legend column on the right, never narrower than the title."""
    return max(8.0, per * panels + 3.0)


def _final(df: pd.DataFrame, weights: str | None = "ema") -> pd.DataFrame:
    d = df[df["step"] == df.groupby("group_id")["step"].transform("max")]
    return d[d["weights"] == weights] if weights else d


def _noise_axis(df: pd.DataFrame) -> tuple[str, str]:
    """(column, label): t when every group shares one t -> log-SNR map, else log-SNR."""
    if df.groupby("t")["log_snr"].nunique().max() > 1:
        return "log_snr", "log-SNR  λ_t = log(ᾱ_t / (1 − ᾱ_t))   (noisier →)"
    return "t", "diffusion timestep t"


def _style_noise_axis(ax, x: str, label: str) -> None:
    ax.set_xlabel(label)
    if x == "t":
        ax.set_xscale("log")
    elif not ax.xaxis_inverted():
        ax.invert_xaxis()   # high noise to the right, as t


def _band(ax, d: pd.DataFrame, x: str, y: str, **kw):
    line, = ax.plot(d[x], d[y], **kw)
    ax.fill_between(d[x], d[f"{y}_lo"], d[f"{y}_hi"], color=line.get_color(), alpha=0.2, lw=0)
    return line


def _levels(df: pd.DataFrame, x: str, n: int = 3) -> list[float]:
    """n interior grid values, from the least to the most noisy."""
    if x == "t":
        return [float(v) for v in pick_ts(df[x].unique(), n)]
    grid = np.sort(df[x].unique())[::-1]                       # log-SNR falls as noise grows
    idx = np.unique(np.linspace(0, len(grid) - 1, n + 2).round().astype(int)[1:-1])
    return [float(grid[i]) for i in idx]


def _at_level(g: pd.DataFrame, x: str, level: float) -> pd.DataFrame:
    """The rows of one group at the grid point nearest a noise level (per step and weights)."""
    nearest = g.loc[(g[x] - level).abs() == (g[x] - level).abs().min(), x].iloc[0]
    return g[g[x] == nearest]


def _level_label(x: str, v: float) -> str:
    return f"t = {int(v)}" if x == "t" else f"λ ≈ {v:.1f}"


def _group_title(d: pd.DataFrame, gid: str, step: int | None = None) -> str:
    """Group, design, K (and the step), and what the bands cover, one per line so neighbouring panels'
    titles never run into each other: with K = 2 (or J = 2 subsets) no jackknife over models exists
    and the band is the points' part only: the model-to-model spread is not in it."""
    at = f", step {step:,}" if step is not None else ""
    return f"{gid}\n{d['design'].iloc[0]}, K={int(d['k_models'].iloc[0])}{at}\n{_bands(d)}"


def _bands(d: pd.DataFrame) -> str:
    return "bands: points + models" if (d["interval"] == "points+models").all() else \
        "bands: points only (too few models)"


def fig_decomposition_stacked(study: Study, max_groups: int = 6):
    dec = study.decomposition
    if dec.empty or "bias2_plus_noise" not in dec:
        return None
    dec = _final(dec)
    x, xlabel = _noise_axis(dec)
    groups = sorted(dec["group_id"].unique())[:max_groups]
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(2, len(groups), figsize=(_width(len(groups)), 6.0), squeeze=False,
                                 gridspec_kw={"height_ratios": [2, 1.3]})
        for col, gid in enumerate(groups):
            d = dec[dec["group_id"] == gid].sort_values(x)
            ax, var = axes[0][col], axes[1][col]
            ax.stackplot(d[x], d["bias2_plus_noise"], d["variance"], labels=[BN_LABEL, VAR_LABEL],
                         colors=["C1", "C2"], alpha=0.75)
            ax.fill_between(d[x], d["bias2_plus_noise_lo"], d["bias2_plus_noise_hi"], facecolor="none",
                            edgecolor="k", hatch="////", lw=0, label=f"{BN_LABEL}: 95% interval")
            ax.plot(d[x], d["residual"], "k-", lw=1, label="residual")
            ax.set_title(_group_title(d, gid, int(d['step'].iloc[0])), fontsize=8)
            _band(var, d, x, "variance", color="C2", marker="o", label=VAR_LABEL)
            if d["variance_data"].notna().any():
                _band(var, d, x, "variance_data", color="C4", marker="s", ls="--", label="data variance")
                _band(var, d, x, "variance_opt", color="C5", marker="^", ls=":", label="optimization variance")
            var.axhline(0, color="0.5", lw=0.8)
            for a in (ax, var):
                _style_noise_axis(a, x, xlabel)
            ax.set_ylim(bottom=0)
        axes[0][0].set_ylabel(Y_LABEL)
        axes[1][0].set_ylabel("variance  ‖·‖² / d")
        axes[0][-1].legend(loc="upper left", bbox_to_anchor=(1.02, 1.0))
        axes[1][-1].legend(loc="upper left", bbox_to_anchor=(1.02, 1.0))
        fig.suptitle("Held-out error = bias² + noise + variance, per noise level (EMA, final evaluation)")
        fig.tight_layout()
    return fig


def _other_key(study: Study, dec: pd.DataFrame, col: str) -> list[str]:
    return [c for c in study.swept if c in dec and c != col and c.split(".")[-1] not in ("seed", "subset_index",
                                                                                          "data_seed")]


def fig_decomposition_vs_capacity(study: Study):
    dec = study.decomposition
    col = "model.base_width"
    if dec.empty or col is None or col not in dec or dec[col].nunique() < 2:
        return None
    dec = _final(dec)
    x, _ = _noise_axis(dec)
    levels = _levels(dec, x)
    others = _other_key(study, dec, col)
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(2, len(levels), figsize=(_width(len(levels)), 5.6), squeeze=False, sharex=True)
        for j, level in enumerate(levels):
            for i, (key, g) in enumerate(dec.groupby(others, dropna=False) if others else [((), dec)]):
                key = key if isinstance(key, tuple) else (key,)
                label = ", ".join(f"{o.split('.')[-1]}={v}" for o, v in zip(others, key)) or "all"
                pts = pd.concat([_at_level(gg, x, level) for _, gg in g.groupby("group_id")]).sort_values(col)
                for ax, y in ((axes[0][j], "bias2_plus_noise"), (axes[1][j], "variance")):
                    ax.errorbar(pts[col], pts[y], yerr=[pts[y] - pts[f"{y}_lo"], pts[f"{y}_hi"] - pts[y]],
                                fmt="o-", capsize=3, color=f"C{i}", label=label)
            axes[0][j].set_title(_level_label(x, level))
            for ax in axes[:, j]:
                width_axis(ax, dec[col].unique())
        _finish_two_rows(fig, axes, "bias² + noise and variance vs capacity (EMA, final evaluation)")
    return fig


def _finish_two_rows(fig, axes, title: str) -> None:
    """The bias² + noise (top) / variance (bottom) panel grid: row labels, one legend outside, title."""
    axes[0][0].set_ylabel(f"{BN_LABEL}  ‖·‖² / d")
    axes[1][0].set_ylabel(VAR_LABEL)
    axes[0][-1].legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()


def fig_decomposition_vs_step(study: Study, max_groups: int = 6):
    dec = study.decomposition
    if dec.empty or "step" not in dec or dec["step"].nunique() < 2:
        return None
    x, _ = _noise_axis(dec)
    levels = _levels(dec, x)
    groups = sorted(dec["group_id"].unique())[:max_groups]
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(2, len(groups), figsize=(_width(len(groups)), 5.6), squeeze=False, sharex="col")
        for c, gid in enumerate(groups):
            g = dec[dec["group_id"] == gid]
            for i, level in enumerate(levels):
                at = _at_level(g, x, level)
                for w, ls in (("ema", "-"), ("raw", "--")):
                    d = at[at["weights"] == w].sort_values("step")
                    if d.empty:
                        continue
                    for ax, y in ((axes[0][c], "bias2_plus_noise"), (axes[1][c], "variance")):
                        _band(ax, d, "step", y, color=f"C{i}", ls=ls, marker="o" if w == "ema" else None,
                              label=f"{_level_label(x, level)}, {w.upper()}")
            axes[0][c].set_title(_group_title(g, gid), fontsize=8)
            axes[1][c].set_xlabel("optimizer step")
            axes[1][c].axhline(0, color="0.5", lw=0.8)
        _finish_two_rows(fig, axes, "Decomposition along training: EMA (solid) and raw (dashed) weights")
    return fig


def fig_distance_to_memorization(study: Study, max_panels: int = 6):
    mem = study.distance_to_memorization
    if mem.empty:
        return None
    mem = _final(mem, weights=None)
    x, xlabel = _noise_axis(mem)
    panels = sorted(mem.groupby(["group_id", "trial_ids"]).groups)[:max_panels]
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(1, len(panels), figsize=(_width(len(panels), 4.2), 4.2), squeeze=False)
        for ax, (gid, ids) in zip(axes[0], panels):
            d = mem[(mem["group_id"] == gid) & (mem["trial_ids"] == ids)]
            for w, ls in (("ema", "-"), ("raw", "--")):
                dw = d[d["weights"] == w].sort_values(x)
                if dw.empty:
                    continue
                _band(ax, dw, x, "train_residual", color="C0", ls=ls, label=f"training residual ‖ε − f‖², {w}")
                _band(ax, dw, x, "distance_to_memorization", color="C3", ls=ls, marker="o", ms=3,
                      label=f"distance to memorization ‖f − f*_D‖², {w}")
            base = d[d["weights"] == d["weights"].iloc[0]].sort_values(x)
            _band(ax, base, x, "min_train_loss", color="k", ls=":", label="min. training loss ‖ε − f*_D‖²")
            r = d.iloc[0]
            ax.set_title(f"{gid}\nsubset {r.get('data.subset_index', 0)} ({int(r['subset_size'])} images), "
                         f"K={int(r['k_models'])}, "
                         f"step {int(r['step'])}\n{_bands(d)}", fontsize=8)
            _style_noise_axis(ax, x, xlabel)
            ax.set_ylim(bottom=0)
        axes[0][0].set_ylabel(Y_LABEL + "  (training points)")
        axes[0][-1].legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=7)
        fig.suptitle("Distance to the memorizing denoiser f*_D on training points")
        fig.tight_layout()
    return fig


def draw_on_capacity_axis(ax2, study: Study, col: str) -> None:
    """For the FID-vs-capacity figure's right axis: bias² + noise and variance at the middle
    timestep (final evaluation, EMA), one pair of lines per setting of the other swept fields."""
    dec = _final(study.decomposition)
    x, _ = _noise_axis(dec)
    level = _levels(dec, x, 1)[0]
    others = _other_key(study, dec, col)
    for i, (key, g) in enumerate(dec.groupby(others, dropna=False) if others else [((), dec)]):
        key = key if isinstance(key, tuple) else (key,)
        tag = ", ".join(f"{o.split('.')[-1]}={v}" for o, v in zip(others, key))
        pts = pd.concat([_at_level(gg, x, level) for _, gg in g.groupby("group_id")]).sort_values(col)
        where = _level_label(x, level) + (f", {tag}" if tag else "")
        for y, fmt, name in (("bias2_plus_noise", "s--", BN_LABEL), ("variance", "^:", "variance")):
            ax2.errorbar(pts[col], pts[y], yerr=[pts[y] - pts[f"{y}_lo"], pts[f"{y}_hi"] - pts[y]], fmt=fmt,
                         capsize=2, color=f"C{i + 1}", label=f"{name} ({where})")
    ax2.set_ylabel("error at that noise level  ‖·‖² / d")
    ax2.grid(False)   # its lines join the figure's one legend, outside the axes (the caller draws it)
