"""Figures of the ground-truth analysis (docs/ground_truth.md), from `studyctl decompose`'s tables.

* `ground_truth_tradeoff` (molrg): bias^2 and variance against the noise level, one curve per
  capacity (model.base_width), one panel per training-set size N (data.subset_size), final
  evaluation, EMA weights; the noise ||eps - f*||^2 (the same held-out points for every model)
  drawn in every panel. Bands: the table's 95% intervals.
* `reference_distances_vs_n`, `reference_distances_vs_step`: each model's distance to the
  memorizing f*_D and to the Gaussian-linear denoiser of its own training set (and on molrg to
  the true f*), along N at the final evaluation and along training.
* `sample_quality` (molrg): exact sample-quality measures against the true mixture, with the
  floor of held-out mixture draws at the same sample count.

Trials that differ only in their training seed (and, for the ensembles, subset) are pooled: a
point of the reference and sample-quality figures is their mean with a 95% Student-t interval
over those trials (n in the legend), never pooling trials that differ in anything else.
"""
from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from .style import STYLE
from .figures_decomposition import _band, _final, _levels, _level_label, _noise_axis, _style_noise_axis
from .groups import t_interval
from .references import LABELS as REF_LABELS
from .references import REFERENCES
from .tables import Study

WIDTH, SIZE, SEED = "model.base_width", "data.subset_size", "training.seed"
PER_DIM = "‖·‖² / d  (per dimension)"
REF_COLORS = {"memorizing": "C3", "gaussian_linear": "C0", "optimal": "k"}

CAPTIONS = {
    "ground_truth_tradeoff": "The bias–variance trade-off where f* is exact (molrg): bias² (top) and variance "
                             "(bottom) of each ensemble (trials that differ only in training seed and/or subset) "
                             "against the noise level, one curve per U-Net base width, one panel per training-set "
                             "size N; final evaluation, EMA weights. Dashed black: the noise ‖ε − f*‖², the error "
                             "of the exact optimal denoiser on the same held-out points. Per dimension (‖·‖²/d); "
                             "bands: 95% intervals (bootstrap over points + jackknife over models when K ≥ 3); "
                             "symmetric-log y axis (bias² is unbiased, so it can be slightly negative).",
    "reference_distances_vs_n": "Distance ‖f − f_ref‖²/d on held-out points from each model to three reference "
                                "denoisers: the memorizing f*_D of its own training set, the Gaussian-linear "
                                "denoiser of that set's mean and covariance (Li, Dai & Qu 2024), and on molrg the "
                                "true f*; against training-set size N at three noise levels, final evaluation, EMA. "
                                "A point: mean over the trials that differ only in training seed / subset, 95% "
                                "t-interval over them (n in the legend).",
    "reference_distances_vs_step": "The same distances along training (EMA weights) at the middle noise level of "
                                   "the grid, one panel per training-set size N; mean over trials differing only in "
                                   "seed / subset, 95% t-interval.",
    "sample_quality": "Exact sample quality on molrg (DDIM η = 0, no x0 clipping, EMA weights, final evaluation): "
                      "mean log-density under the true mixture, distance to the nearest component's subspace, "
                      "KL(component coverage ‖ weights), the pixel-space Fréchet distance to the mixture's exact "
                      "mean and covariance, and the classifier-feature FID against held-out mixture draws (both "
                      "clipped to [−1, 1] before the classifier). Mean over trials differing only in seed, 95% "
                      "t-interval; dots: single trials; dashed grey: held-out mixture draws at the same sample "
                      "count (the floor finite n allows).",
}


def _label(key: dict) -> str:
    def fmt(v):
        return int(v) if isinstance(v, float) and v.is_integer() else v
    return ", ".join(f"{k.split('.')[-1]}={fmt(v)}" for k, v in key.items()) or "all"


def _others(df: pd.DataFrame, study: Study, skip: tuple[str, ...]) -> list[str]:
    """Swept fields that split curves besides the plotted ones (never the replicate fields)."""
    rep = (SEED, "data.subset_index", "data.data_seed")
    return [c for c in study.swept if c in df and c not in skip + rep and df[c].nunique(dropna=False) > 1]


def _by(df: pd.DataFrame, fields: list[str]):
    if not fields:
        yield {}, df
        return
    for vals, g in df.groupby(fields, dropna=False):
        vals = vals if isinstance(vals, tuple) else (vals,)
        yield dict(zip(fields, vals)), g


# ------------------------------------------------------------------ the trade-off
def fig_ground_truth_tradeoff(study: Study):
    dec = study.decomposition
    if dec.empty or "bias2" not in dec or dec["bias2"].isna().all():
        return None
    dec = _final(dec.dropna(subset=["bias2"]))
    x, xlabel = _noise_axis(dec)
    sizes = sorted(dec[SIZE].dropna().unique()) if SIZE in dec else []
    panels = sizes or [None]
    widths = sorted(dec[WIDTH].unique()) if WIDTH in dec else [None]
    others = _others(dec, study, (WIDTH, SIZE))
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(2, len(panels), figsize=(max(8.0, 3.8 * len(panels) + 3.0), 6.4), squeeze=False,
                                 sharex=True, sharey="row")
        for col, n in enumerate(panels):
            d_n = dec if n is None else dec[dec[SIZE] == n]
            for j, (key, g) in enumerate(_by(d_n, others)):
                ls = ["-", "--", ":", "-."][j % 4]
                for i, w in enumerate(widths):
                    gw = g if w is None else g[g[WIDTH] == w]
                    for gid, d in gw.groupby("group_id"):
                        d = d.sort_values(x)
                        tag = (f"width {int(w)}" if w is not None else gid) + (f", {_label(key)}" if key else "")
                        k = int(d["k_models"].iloc[0])
                        _band(axes[0][col], d, x, "bias2", color=f"C{i}", ls=ls, marker="o", ms=3,
                              label=f"{tag} (K={k})")
                        _band(axes[1][col], d, x, "variance", color=f"C{i}", ls=ls, marker="o", ms=3,
                              label=f"{tag} (K={k})")
            noise = d_n.sort_values(x).drop_duplicates(x)
            for ax in axes[:, col]:
                _band(ax, noise, x, "noise", color="k", ls="--", lw=1.2, label="noise ‖ε − f*‖² (exact f*)")
                ax.axhline(0, color="0.6", lw=0.7)
                ax.set_yscale("symlog", linthresh=_linthresh(dec))
                _style_noise_axis(ax, x, xlabel)
            axes[0][col].set_title("all training images" if n is None else f"N = {int(n)} training images")
        axes[0][0].set_ylabel(f"bias²  {PER_DIM}")
        axes[1][0].set_ylabel(f"variance  {PER_DIM}")
        for ax in axes[0][1:]:
            ax.tick_params(labelleft=True)
        handles, labels = axes[0][-1].get_legend_handles_labels()
        uniq = dict(zip(labels, handles))
        axes[0][-1].legend(uniq.values(), uniq.keys(), loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=7)
        fig.suptitle("Bias², variance and noise with the exact optimal denoiser (EMA, final evaluation)")
        fig.tight_layout()
    return fig


def _linthresh(dec: pd.DataFrame) -> float:
    """The symlog's linear range: a decade below the smallest positive noise/variance/bias² plotted."""
    vals = dec[["noise", "variance", "bias2"]].to_numpy().ravel()
    pos = vals[np.isfinite(vals) & (vals > 0)]
    return float(10 ** np.floor(np.log10(pos.min())) if len(pos) else 1e-4)


# ------------------------------------------------------------------ reference denoisers
def _pooled(df: pd.DataFrame, keys: list[str], y: str) -> pd.DataFrame:
    """Mean and 95% t-interval of y over the trials that share `keys` (the seeds / subsets)."""
    rows = []
    for vals, g in df.groupby(keys, dropna=False):
        vals = vals if isinstance(vals, tuple) else (vals,)
        m, lo, hi, n = t_interval(g[y].to_numpy())
        if n == 1 and f"{y}_lo" in g:       # one trial: its own interval (points only)
            lo, hi = float(g[f"{y}_lo"].iloc[0]), float(g[f"{y}_hi"].iloc[0])
        rows.append({**dict(zip(keys, vals)), "mean": m, "lo": lo, "hi": hi, "n": n})
    return pd.DataFrame(rows)


def _present(ref: pd.DataFrame) -> list[str]:
    return [r for r in REFERENCES if f"distance_{r}" in ref and ref[f"distance_{r}"].notna().any()]


def _errorbar(ax, p: pd.DataFrame, x: str, **kw):
    p = p.sort_values(x)
    ax.errorbar(p[x], p["mean"], yerr=[p["mean"] - p["lo"], p["hi"] - p["mean"]], capsize=2, **kw)
    ax._lowest = min(getattr(ax, "_lowest", np.inf), float(p["lo"].min()))


def _log_if_positive(ax) -> None:
    """A log y axis when every interval drawn is above 0; else linear (a log axis would cut the bars)."""
    if getattr(ax, "_lowest", 0.0) > 0:
        ax.set_yscale("log")


def fig_reference_distances_vs_n(study: Study):
    ref = study.reference_distances
    if ref.empty or ref["train_size"].nunique() < 2:
        return None
    ref = ref[(ref["weights"] == "ema") & (ref["step"] == ref.groupby("trial_id")["step"].transform("max"))]
    x, _ = _noise_axis(ref)
    levels = _levels(ref, x)
    widths = sorted(ref[WIDTH].unique()) if WIDTH in ref else [None]
    others = _others(ref, study, (WIDTH, SIZE))
    markers = "osD^v"
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(1, len(levels), figsize=(max(8.0, 3.8 * len(levels) + 3.5), 4.2), squeeze=False)
        for ax, level in zip(axes[0], levels):
            at = ref[ref[x] == min(ref[x].unique(), key=lambda v: abs(v - level))]
            for name in _present(ref):
                for i, w in enumerate(widths):
                    for key, g in _by(at if w is None else at[at[WIDTH] == w], others):
                        p = _pooled(g, ["train_size"], f"distance_{name}")
                        tag = (f"width {int(w)}" if w is not None else "") + (f", {_label(key)}" if key else "")
                        _errorbar(ax, p, "train_size", color=REF_COLORS[name], marker=markers[i % 5],
                                  ls="-" if i == 0 else "--",
                                  label=f"to {REF_LABELS[name]}{'; ' + tag if tag else ''} (n={int(p['n'].max())})")
            ax.set_xscale("log", base=2)
            _log_if_positive(ax)
            ax.set_xlabel("training-set size N (images)")
            ax.set_title(_level_label(x, level))
        axes[0][0].set_ylabel(f"distance ‖f − f_ref‖²  {PER_DIM}")
        axes[0][-1].legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=7)
        fig.suptitle("Distance to the reference denoisers against N (held-out points, EMA, final evaluation)")
        fig.tight_layout()
    return fig


def fig_reference_distances_vs_step(study: Study):
    ref = study.reference_distances
    if ref.empty or ref["step"].nunique() < 2:
        return None
    ref = ref[ref["weights"] == "ema"]
    x, _ = _noise_axis(ref)
    level = _levels(ref, x, 1)[0]
    ref = ref[ref[x] == min(ref[x].unique(), key=lambda v: abs(v - level))]
    sizes = sorted(ref["train_size"].unique())
    widths = sorted(ref[WIDTH].unique()) if WIDTH in ref else [None]
    others = _others(ref, study, (WIDTH, SIZE))
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(1, len(sizes), figsize=(max(8.0, 3.8 * len(sizes) + 3.5), 4.2), squeeze=False)
        for ax, n in zip(axes[0], sizes):
            at = ref[ref["train_size"] == n]
            for name in _present(ref):
                for i, w in enumerate(widths):
                    for key, g in _by(at if w is None else at[at[WIDTH] == w], others):
                        p = _pooled(g, ["step"], f"distance_{name}")
                        tag = (f"width {int(w)}" if w is not None else "") + (f", {_label(key)}" if key else "")
                        _errorbar(ax, p, "step", color=REF_COLORS[name], marker="osD^v"[i % 5],
                                  ls="-" if i == 0 else "--",
                                  label=f"to {REF_LABELS[name]}{'; ' + tag if tag else ''} (n={int(p['n'].max())})")
            _log_if_positive(ax)
            ax.set_xlabel("optimizer step")
            ax.set_title(f"N = {int(n)}, {_level_label(x, level)}")
            ax.tick_params(labelleft=True)
        axes[0][0].set_ylabel(f"distance ‖f − f_ref‖²  {PER_DIM}")
        axes[0][-1].legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=7)
        fig.suptitle("Distance to the reference denoisers along training (held-out points, EMA)")
        fig.tight_layout()
    return fig


# ------------------------------------------------------------------ sample quality
QUALITY = (("log_density", "mean log-density log p(x)  (nats / image)"),
           ("subspace_distance", f"distance to nearest subspace  {PER_DIM}"),
           ("coverage_kl", "KL(coverage ‖ weights)  (nats)"),
           ("pixel_fd", "Fréchet distance, pixel space"),
           ("fid", "FID, classifier features  (clipped to [−1, 1])"))


def fig_sample_quality(study: Study):
    sq = study.sample_quality
    if sq.empty or "source" not in sq or not (sq["source"] == "model").any():
        return None
    models = sq[sq["source"] == "model"]
    models = models[models["step"] == models.groupby("trial_id")["step"].transform("max")]
    floor = sq[sq["source"] == "heldout_mixture"]
    if models["train_size"].nunique() >= 2:
        x, xlabel, curves = "train_size", "training-set size N (images)", WIDTH
    elif WIDTH in models and models[WIDTH].nunique() >= 2:
        x, xlabel, curves = WIDTH, "U-Net base width (channels)", None
    else:
        x, xlabel, curves = "trial_id", "trial", None
    others = _others(models, study, (WIDTH, SIZE))
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(1, len(QUALITY), figsize=(3.4 * len(QUALITY) + 3.0, 3.9), squeeze=False)
        for ax, (y, ylabel) in zip(axes[0], QUALITY):
            split = [curves] if curves and curves in models else []
            for i, (key, g) in enumerate(_by(models, split + others)):
                color = f"C{i}"
                if x == "trial_id":
                    ax.scatter(range(len(g)), g[y], color=color, s=14)
                    ax.set_xticks(range(len(g)))
                    ax.set_xticklabels(g["trial_id"], rotation=60, fontsize=6)
                    continue
                ax.scatter(g[x], g[y], color=color, s=8, alpha=0.45)
                p = _pooled(g, [x], y)
                _errorbar(ax, p, x, color=color, marker="o",
                          label=f"{_label(key)} (n={int(p['n'].max())})" if key else f"mean (n={int(p['n'].max())})")
            for _, f in floor.iterrows():
                ax.axhline(f[y], color="0.4", ls="--", lw=1.0, label=f"held-out mixture draws (n={int(f['n_samples'])})")
                if f"{y}_lo" in f and np.isfinite(f.get(f"{y}_lo", np.nan)):
                    ax.axhspan(f[f"{y}_lo"], f[f"{y}_hi"], color="0.6", alpha=0.2, lw=0)
            if x == "train_size":
                ax.set_xscale("log", base=2)
            ax.set_xlabel(xlabel)
            ax.set_ylabel(ylabel)
        handles, labels = axes[0][-1].get_legend_handles_labels()
        uniq = dict(zip(labels, handles))
        axes[0][-1].legend(uniq.values(), uniq.keys(), loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=7)
        n = int(models["n_samples"].iloc[0])
        fig.suptitle(f"Exact sample quality against the true mixture ({n} samples per trial, DDIM η = 0, "
                     f"{int(models['ddim_steps'].iloc[0])} steps, no clipping)")
        fig.tight_layout()
    return fig


def ground_truth_figures(study: Study) -> dict:
    """name -> Figure or None (no data for it in this study)."""
    return {"ground_truth_tradeoff": fig_ground_truth_tradeoff(study),
            "reference_distances_vs_n": fig_reference_distances_vs_n(study),
            "reference_distances_vs_step": fig_reference_distances_vs_step(study),
            "sample_quality": fig_sample_quality(study)}
