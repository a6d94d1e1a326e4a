"""Study-level figures: one curve or panel per group of trials (analysis/groups.py), from Parquet only.

Each figure averages only trials that differ in the seed (mean over seeds, 95% t-interval,
n stated) and draws one curve or panel per setting of every other swept field; per-timestep
curves across noise schedules use the log-SNR axis.
"""
from __future__ import annotations

import matplotlib.pyplot as plt
import pandas as pd

from . import figures_axes
from . import figures_decomposition as D
from .figures import _real_data_line
from .figures_generalization import generalization_figures
from .groups import (REPLICATE_FIELD, SCHEDULE_FIELDS, at_common_last_step, describe, group_fields,  # noqa: F401
                     fmt_value, groups, log_snr, n_label, range_text, short, summarize)
from .style import STYLE, width_axis
from .tables import Study

def _panels(n: int, width: float = 4.6, height: float = 3.5):
    cols = min(n, 3)
    rows = -(-n // cols)
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False,
                                 layout="constrained")
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, list(axes.flat[:n])


def _figure_legend(fig, axes, loc: str = "outside lower center") -> None:
    """One legend for all panels (curves share their labels across panels), outside the axes."""
    seen = {}
    for ax in axes:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            seen.setdefault(lab, h)
    fig.legend(list(seen.values()), list(seen), loc=loc, frameon=False, ncol=min(3, len(seen)))


def _cut_note(y: str, cut: bool) -> str:
    """What a figure says when a band was cut to the quantity's range (groups.summarize)."""
    return f" (cut to the possible values {range_text(y)})" if cut else ""


def _mean_line(ax, s: pd.DataFrame, x: str, label: str, style: str = "o-", color=None):
    """Mean over seeds with its 95% t-interval band (where n >= 2), cut to the quantity's range."""
    line, = ax.plot(s[x], s["mean"], style, color=color, label=label)
    band = s["n"] >= 2
    if band.any():
        ax.fill_between(s[x], s["low"].where(band), s["high"].where(band), color=line.get_color(), alpha=0.15,
                        lw=0)
    return line


def _real_floor_in(ax, rows: pd.DataFrame, column: str) -> None:
    if column in rows and rows[column].notna().any():
        _real_data_line(ax, rows, column)


def _overlay(study: Study, df: pd.DataFrame, col: str, x: str, y: str, xlabel: str, ylabel: str, title: str,
             logx=False, logy=False, real_data: str | None = None, invert_x: bool = False):
    """One panel per group of the other swept fields (seed excepted), one curve per value of `col`."""
    if df.empty or col not in df or y not in df or df[y].notna().sum() == 0:
        return None
    d = df.dropna(subset=[y])
    panels = [(ctx, g) for ctx, g in groups(d, group_fields(study.swept, col)) if g[col].nunique() >= 2]
    if not panels:
        return None
    fig, axes = _panels(len(panels))
    cut = False
    for ax, (ctx, g) in zip(axes, panels):
        counts = []
        for value, gv in groups(g, [col]):
            s = summarize(gv, x, y)
            cut |= bool(s["cut"].any())
            counts.append(s["n"])
            _mean_line(ax, s, x, f"{short(col)} = {fmt_value(value[col])}")
        if real_data:
            _real_floor_in(ax, g, real_data)
        ax.set_title(f"{describe(ctx)}\n{n_label(pd.concat(counts))} seeds per point", fontsize=8, wrap=True)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        if logx:
            ax.set_xscale("log")
        if logy:
            ax.set_yscale("log")
        if invert_x:
            ax.invert_xaxis()
    _figure_legend(fig, axes)
    fig.suptitle(f"{title}: mean over seeds ± 95% t-interval{_cut_note(y, cut)}", fontsize=10)
    return fig


def _with_schedule(study: Study, df: pd.DataFrame) -> pd.DataFrame:
    """Rows with the schedule fields from the trials table (rows carry only the swept fields)."""
    missing = [c for c in SCHEDULE_FIELDS if c not in df]
    if not missing or study.trials.empty or any(c not in study.trials for c in missing):
        return df
    return df.merge(study.trials[["trial_id", *missing]], on="trial_id", how="left")


def study_overlays(study: Study) -> dict[str, object]:
    figs = {}
    # Exact dotted names; a training-set size is compared at equal optimizer steps, not epochs.
    by = {"capacity": ("model.base_width", "epoch", "epoch (passes over the training set)"),
          "schedule": ("diffusion.schedule", "epoch", "epoch (passes over the training set)"),
          "train_size": ("data.subset_size", "step", "optimizer step")}
    res = study.residuals
    if len(res):
        res = _with_schedule(study, res[res["weights"] == "ema"])
    for name, (col, x, xlabel) in by.items():
        if col not in study.swept:
            continue
        figs[f"study_val_loss_by_{name}"] = _overlay(
            study, study.epochs, col, x, "val_loss", xlabel,
            "validation loss, EMA  ‖ε − ε_θ‖² / d", f"Validation loss by {short(col)}")
        figs[f"study_fid_by_{name}"] = _overlay(
            study, study.evals, col, x, "fid", xlabel, "FID  (squared feature units)", f"FID by {short(col)}",
            real_data="real_fid")
        if len(res) and all(c in res for c in SCHEDULE_FIELDS):
            last = at_common_last_step(res, [c for c in study.swept if c != REPLICATE_FIELD])
            last = last.assign(log_snr=log_snr(last))
            figs[f"study_residual_by_{name}"] = _overlay(
                study, last, col, "log_snr", "residual",
                "log-SNR  λ_t = log(ᾱ_t / (1 − ᾱ_t))   (noisier →)", "Residual  E‖ε − ε_θ‖² / d",
                f"Residual at the last common evaluation by {short(col)}", logy=True, invert_x=True)
    figs["study_fid_bias_variance_vs_capacity"] = fig_fid_bias_variance_vs_capacity(study)
    figs["study_pr_memorization_vs_size"] = fig_pr_memorization_vs_size(study)
    for name in ("decomposition_stacked", "decomposition_vs_capacity", "decomposition_vs_step",
                 "distance_to_memorization"):
        figs[name] = getattr(D, f"fig_{name}")(study)
    figs.update(figures_axes.study_figures(study))
    figs.update(generalization_figures(study))
    return figs


def _final_by_group(study: Study, col: str) -> pd.DataFrame:
    """Each trial's evaluation at the last step every trial of its curve (its group, all values of col) reached."""
    if study.evals.empty or col not in study.evals:
        return pd.DataFrame()
    return at_common_last_step(study.evals, group_fields(study.swept, col))


def fig_fid_bias_variance_vs_capacity(study: Study):
    col = "model.base_width"
    fe = _final_by_group(study, col)
    if col not in study.swept or fe.empty or "fid" not in fe or fe["fid"].isna().all():
        return None
    curves = [(ctx, g) for ctx, g in groups(fe.dropna(subset=["fid"]), group_fields(study.swept, col))
              if g[col].nunique() >= 2]
    if not curves:
        return None
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(6.0, 3.8), layout="constrained")
        cut = False
        for i, (ctx, g) in enumerate(curves):
            s = summarize(g, col, "fid")
            cut |= bool(s["cut"].any())
            _mean_line(ax, s, col, f"{describe(ctx)}: step {int(g['step'].max())}, {n_label(s['n'])} seeds",
                       color=f"C{i}")
        _real_floor_in(ax, fe, "real_fid")
        width_axis(ax, fe[col].dropna())
        ax.set_ylabel("FID  (squared feature units)")
        if len(study.decomposition) and col in study.decomposition:
            twin = ax.twinx()
            D.draw_on_capacity_axis(twin, study, col)
        _figure_legend(fig, [ax] + ([twin] if len(study.decomposition) and col in study.decomposition else []),
                       loc="outside lower center")
        ax.set_title(f"Final FID, bias² + noise and variance vs capacity\n"
                     f"FID: mean over seeds ± 95% t-interval{_cut_note('fid', cut)}", fontsize=9)
    return fig


def fig_pr_memorization_vs_size(study: Study):
    col = "data.subset_size"
    needed = ("precision", "recall", "memorized_fraction")
    fe = _final_by_group(study, col)
    if col not in study.swept or fe.empty or any(c not in fe or fe[c].isna().all() for c in needed):
        return None   # (evaluation.metrics: false records no precision/recall: nothing to draw)
    fe = fe.dropna(subset=[col])  # trials that name a subset size
    curves = [(ctx, g) for ctx, g in groups(fe, group_fields(study.swept, col)) if g[col].nunique() >= 2]
    if not curves:
        return None
    fig, axes = _panels(3, width=3.6, height=3.3)
    cut = False
    for ax, metric in zip(axes, needed):
        for i, (ctx, g) in enumerate(curves):
            s = summarize(g, col, metric)
            cut |= bool(s["cut"].any())
            _mean_line(ax, s, col, f"{describe(ctx)}: {n_label(s['n'])} seeds", color=f"C{i}")
        real = f"real_{metric}"
        if real in fe and fe[real].notna().any():
            if metric == "memorized_fraction":  # depends on the training set: one value per size
                r = fe.groupby(col)[real].mean()
                n = int(fe["real_n_samples"].dropna().iloc[0])
                ax.plot(r.index, r.to_numpy(), ":", color="0.35", lw=1.2, label=f"real data ({n} test images)")
            else:
                _real_data_line(ax, fe, real, with_value=False)
        ax.set_xscale("log")
        ax.set_xlabel("training-set size (images)")
        ax.set_ylabel(metric.replace("_", " "))
        ax.set_ylim(-0.02, 1.02)
    _figure_legend(fig, axes, loc="outside lower center")
    fig.suptitle("Precision, recall, memorized fraction of samples vs training-set size (equal optimizer steps)\n"
                 f"mean over seeds ± 95% t-interval{_cut_note('precision', cut)},\nat the last evaluation every "
                 f"trial of a curve reached",
                 fontsize=9)
    return fig
