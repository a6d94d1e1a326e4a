"""The thesis's figures (26-30) per trial, from Parquet only; the captions of every figure.

Each `fig_*` function takes the loaded `Study` (and a trial id for per-trial figures)
and returns a matplotlib Figure, or None when the data it needs does not exist yet
(a half-finished study still gets every figure it can). The study-level figures are in
figures_study.py, the captions in captions.py; report.write_figures saves all of them (PNG, PDF by default)
under <study>/figures/.
The style and the helpers every figure module shares are in style.py.
"""
from __future__ import annotations

import math

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize

from diffusion_core.training.ema import init_share_crossing

from . import figures_axes
from .style import STYLE, epoch_axis, legend_below, subplots
from .tables import Study, load_grid


# ------------------------------------------------------------------ per-trial figures
EMA_LAG_SHARE = 0.05  # shade where the EMA still holds more than this share of the initial weights


def _steps_per_epoch(df: pd.DataFrame) -> float | None:
    d = df[(df["epoch"] > 0) & df["step"].notna()]
    return float(d["step"].iloc[-1] / d["epoch"].iloc[-1]) if len(d) else None


def ema_lag_end(study: Study, trial: str, df: pd.DataFrame) -> float | None:
    """The epoch where the EMA's share of the initial weights reaches 5%: the exact step from the
    trial's ema_decay and ema_warmup (diffusion_core.training.ema.init_share_crossing), not a midpoint between
    evaluations. None when the trial's EMA settings or its steps per epoch are not recorded."""
    decay, warmup = study.param(trial, "training.ema_decay"), study.param(trial, "training.ema_warmup")
    per_epoch = _steps_per_epoch(df) if {"step", "epoch"} <= set(df) else None
    if decay is None or pd.isna(decay) or per_epoch is None:
        return None
    warm = bool(warmup) if warmup is not None and not pd.isna(warmup) else False
    return init_share_crossing(float(decay), EMA_LAG_SHARE, warm) / per_epoch


def _shade_ema_lag(ax, study: Study, trial: str, df: pd.DataFrame) -> None:
    end = ema_lag_end(study, trial, df)
    if end is None or end <= 0:
        return
    ax.axvspan(0, end, color="0.88", zorder=0,
               label=f"EMA holds > {EMA_LAG_SHARE:.0%} of the initial weights (to epoch {end:.2f})\n"
                     "(EMA numbers here show that lag)")


REAL_COLOUR = "#8c6d1f"   # real-data floors / ceilings and their intervals


def _real_data_line(ax, df: pd.DataFrame, column: str, transform=None, with_value: bool = True,
                    name: str = "real data") -> None:
    """The metric of real test images at the run's sample count (a horizontal dotted line), with its
    95% interval as a band where the records have one ({column}_lo / _hi)."""
    if column not in df or df[column].isna().all():
        return
    value = float(df[column].dropna().mean())
    n = int(df["real_n_samples"].dropna().iloc[0]) if "real_n_samples" in df else None
    f = transform or (lambda v: v)
    lo, hi = (f"{column}_{end}" for end in ("lo", "hi"))
    band = lo in df and hi in df and df[lo].notna().any()
    shown = f(value)
    label = f"{name} ({n} test images)" + (f": {shown:.3g}" if with_value else "")
    if band:
        b = (f(float(df[lo].dropna().mean())), f(float(df[hi].dropna().mean())))
        label += f" [{b[0]:.3g}, {b[1]:.3g}] (95%)" if with_value else " ± 95%"
        ax.axhspan(*b, color=REAL_COLOUR, alpha=0.15, lw=0)   # not grey: the EMA-lag shading is grey
    ax.axhline(shown, color=REAL_COLOUR, ls=":", lw=1.4, label=label)


def _loss_label(study: Study, trial: str) -> str:
    size, channels = study.param(trial, "model.image_size"), study.param(trial, "model.in_channels")
    d = (f"d = {int(channels)}·{int(size)}·{int(size)} = {int(channels) * int(size) ** 2:,}"
         if size is not None and channels is not None and not pd.isna(size) and not pd.isna(channels)
         else "d = channels·height·width")
    return f"loss  ||ε − ε_θ||² / d   (/ d: mean per pixel value, {d})"


def fig26a_loss_per_epoch(study: Study, trial: str):
    df = study.trial_rows(study.epochs, trial)
    if df.empty:  # no epoch has ended yet (a run stopped early in its first epoch)
        return None
    df = df.sort_values("epoch")
    fig, ax = subplots(figsize=(5.6, 3.8))
    # The thesis's Fig. 26a first (these two lines reproduce it), then the like-for-like pair.
    ax.plot(df["epoch"], df["train_loss"], "o-", label="training: running mean, dropout on (thesis)")
    if df["val_loss"].notna().any():
        ax.plot(df["epoch"], df["val_loss"], "s--", label="validation: EMA weights, eval mode (thesis)")
    for column, style, label in (("train_loss_eval", "^-", "training batch: raw weights, eval mode"),
                                 ("val_loss_raw", "v-", "validation: raw weights, eval mode")):
        if column in df and df[column].notna().any():
            ax.plot(df["epoch"], df[column], style, ms=3, lw=1.1, label=label)
    _shade_ema_lag(ax, study, trial, df)
    ax.set_yscale("log")   # the EMA's early lag (0.3 at epoch 1) would flatten the 0.002 gaps on a linear axis
    ax.set_xlim(0, float(df["epoch"].max()) + 0.5)
    epoch_axis(ax)
    ax.set_ylabel(_loss_label(study, trial), fontsize=8)
    ax.set_title(f"Loss per epoch — {trial}")
    legend_below(ax, ncol=1)
    return fig


def fig26b_first_1000_iterations(study: Study, trial: str):
    df = study.trial_rows(study.train_steps, trial)
    df = df[df["step"] <= 1000].sort_values("step") if len(df) else df
    if df.empty:
        return None
    fig, ax = subplots(figsize=(5.6, 3.6))
    ax.loglog(df["step"], df["loss"], "-", lw=0.8, label="training loss per iteration (dropout on)")
    top = int(df["step"].max())
    per_step = df[df["val_batch_loss"].notna()] if "val_batch_loss" in df else df.iloc[:0]
    val = study.trial_rows(study.epochs, trial)
    val = val[(val["step"] <= top) & val["val_loss"].notna()] if len(val) else val
    if len(per_step):
        ax.loglog(per_step["step"], per_step["val_batch_loss"], "-", lw=0.8, alpha=0.8,
                  label="validation loss per iteration (one minibatch, raw weights, eval mode)")
    elif len(val):
        ax.loglog(val["step"], val["val_loss"], "s--", label="validation loss (EMA weights, fixed draws)")
    else:
        # The thesis draws a per-iteration validation curve here; a run records validation per epoch
        # (training.val_every), so say where it is instead of leaving it out silently.
        ax.plot([], [], " ", label="validation: not recorded before step "
                                   f"{top:,} (training.val_loss_first: 0; per epoch: Fig. 26a)")
    ax.set_xlabel("iteration (optimizer step)")
    ax.set_ylabel(_loss_label(study, trial), fontsize=8)
    # The thesis's figure shows 1,000 iterations; a shorter run shows what it has.
    ax.set_title(f"First {top:,} iterations — {trial}")
    legend_below(ax, ncol=1)
    return fig


def fig27_residual_vs_t(study: Study, trial: str):
    df = study.trial_rows(study.residuals, trial)
    if df.empty:
        return None
    fig, ax = subplots(figsize=(5.6, 3.6))
    ema = df[df["weights"] == "ema"]
    epochs = ema.groupby("step")["epoch"].first().sort_index()
    norm = Normalize(float(epochs.min()), float(epochs.max()) if len(epochs) > 1 else float(epochs.min()) + 1)
    cmap = plt.get_cmap("viridis")
    for s, epoch in epochs.items():
        d = ema[ema["step"] == s].sort_values("t")
        ax.plot(d["t"], d["residual"], color=cmap(norm(epoch)), lw=2 if s == epochs.index[-1] else 1.0)
    raw = df[(df["weights"] == "raw") & (df["step"] == df["step"].max())].sort_values("t")
    if len(raw):
        ax.plot(raw["t"], raw["residual"], "k--", lw=1, label=f"raw weights, epoch {raw['epoch'].iloc[0]:.1f}")
        ax.legend(loc="lower left")
    fig.colorbar(ScalarMappable(norm, cmap), ax=ax, label="epoch of the evaluation (EMA weights)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("diffusion timestep t")
    ax.set_ylabel("Residual(t)  E||ε − ε_θ||² / d")
    ax.set_title(f"Residual vs timestep — {trial}")
    return fig


GREY_NOTE = "grey: model output −1 black … +1 white (outside [−1, 1] clipped when stored as uint8)"


def fig28_samples_by_epoch(study: Study, trial: str, max_panels: int = 6):
    df = study.trial_rows(study.evals, trial)
    if df.empty or "sample_grid" not in df:
        return None
    df = df.sort_values("step")
    rows = df.iloc[np.unique(np.linspace(0, len(df) - 1, min(max_panels, len(df))).round().astype(int))]
    grids = [(r.epoch, load_grid(r.sample_grid, study.dir), ema_init_share(study, trial, r))
             for r in rows.itertuples()]
    grids = [(e, g, share) for e, g, share in grids if g is not None]
    if not grids:
        return None
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(1, len(grids), figsize=(3.2 * len(grids), 3.9), squeeze=False)
    for ax, (epoch, g, share) in zip(axes[0], grids):
        im = ax.imshow(g, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        # Early EMA weights are mostly the random initialisation (share lambda^step): their
        # samples are saturated noise, not a broken sampler. Say so on the panel.
        note = f"\nEMA weights: {share:.0%} initial" if share is not None and share >= 0.005 else ""
        ax.set_title(f"epoch {epoch:.1f}{note}")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.grid(False)
    bar = fig.colorbar(im, ax=list(axes[0]), orientation="horizontal", fraction=0.05, pad=0.04, aspect=60)
    bar.set_ticks([0, 0.5, 1], labels=["−1", "0", "+1"])
    bar.set_label(GREY_NOTE)
    fig.suptitle(f"Samples from fixed noise by epoch — {trial}")
    return fig


def ema_init_share(study: Study, trial: str, row) -> float | None:
    """Share of the random initial weights still in the EMA weights at an evaluation: lambda^step
    (thesis eq. 101 unrolled). The `evals` table's own column when it has one, else from the
    trial's training.ema_decay."""
    recorded = getattr(row, "ema_init_share", None)
    if recorded is not None and pd.notna(recorded):
        return float(recorded)
    decay = study.param(trial, "training.ema_decay")
    return float(decay) ** int(row.step) if decay is not None and pd.notna(decay) else None


def _metric_frame(study: Study, trial: str, *cols: str) -> pd.DataFrame:
    df = study.trial_rows(study.evals, trial)
    if df.empty or any(c not in df for c in cols):
        return pd.DataFrame()
    return df.dropna(subset=list(cols)).sort_values("step")


def _has_interval(df: pd.DataFrame, column: str) -> bool:
    return f"{column}_lo" in df and f"{column}_hi" in df and df[f"{column}_lo"].notna().any()


def _metric_line(ax, df: pd.DataFrame, column: str, style: str, label: str, transform=None, color=None):
    """A metric against epoch with its recorded 95% interval as a band; without one, the label says so."""
    f = transform or (lambda v: v)
    banded = _has_interval(df, column)
    line, = ax.plot(df["epoch"], f(df[column].to_numpy()), style, color=color,
                    label=label + (" ± 95% interval" if banded else " (no interval recorded)"))
    if banded:
        ax.fill_between(df["epoch"], f(df[f"{column}_lo"].to_numpy()), f(df[f"{column}_hi"].to_numpy()),
                        color=line.get_color(), alpha=0.2, lw=0)
    return line


def _epoch_range(ax, df: pd.DataFrame) -> None:
    """Figures against epoch of one trial's evaluations share this x range (30a and 30b side by side)."""
    ax.set_xlim(0, float(df["epoch"].max()) + 0.5)


def fig29a_log_is_vs_epoch(study: Study, trial: str):
    df = _metric_frame(study, trial, "inception_score")
    if df.empty:
        return None
    fig, ax = subplots(figsize=(5.6, 3.6))
    if _has_interval(df, "inception_score"):
        _metric_line(ax, df, "inception_score", "o-", "log IS", transform=np.log)
    else:
        err = (df["inception_score_std"] / df["inception_score"]).to_numpy() if "inception_score_std" in df else None
        ax.errorbar(df["epoch"], np.log(df["inception_score"].to_numpy()), yerr=err, fmt="o-", capsize=2,
                    label="log IS, bars: std over 5 splits of one draw")
    ax.axhline(np.log(10), color="grey", ls="-.", lw=1, label="bound log 10")
    _real_data_line(ax, df, "real_inception_score", transform=np.log)
    _shade_ema_lag(ax, study, trial, df)
    _epoch_range(ax, df)
    epoch_axis(ax)
    ax.set_ylabel("log Inception Score  (nats)")
    ax.set_title(f"log IS vs epoch — {trial}")
    legend_below(ax, ncol=1)
    return fig


def _entropy_panel(ax, df: pd.DataFrame, norm) -> object:
    ax.plot(df["h_y"], df["h_y_given_x"], "-", color="grey", lw=0.8, zorder=1)
    sc = ax.scatter(df["h_y"], df["h_y_given_x"], c=df["epoch"], cmap="viridis", norm=norm, zorder=2)
    if "real_h_y" in df and df["real_h_y"].notna().any():
        n = int(df["real_n_samples"].dropna().iloc[0])
        ax.plot(df["real_h_y"].dropna().iloc[0], df["real_h_y_given_x"].dropna().iloc[0], "*", ms=13, color=REAL_COLOUR,
                mec="k", zorder=3, label=f"real test images (n = {n})")
    ax.axvline(math.log(10), color="0.3", ls="--", lw=1, label="bound H(Y) = ln 10 (all classes equally often)")
    ax.set_xlabel("H(Y)  marginal class entropy (nats)")
    ax.set_ylabel("H(Y|X)  mean conditional entropy (nats)")
    return sc


def fig29b_entropy_plane(study: Study, trial: str):
    df = _metric_frame(study, trial, "h_y", "h_y_given_x")
    if df.empty:
        return None
    fig, (ax, zoom) = subplots(ncols=2, figsize=(10.0, 4.0), layout="constrained")
    norm = Normalize(float(df["epoch"].min()), float(df["epoch"].max()))
    sc = _entropy_panel(ax, df, norm)
    ax.set_title("all evaluations")
    late = df[df["epoch"] >= df["epoch"].min() + (df["epoch"].max() - df["epoch"].min()) / 2]
    _entropy_panel(zoom, late, norm)
    xs = list(late["h_y"]) + [math.log(10)] + (list(late["real_h_y"].dropna()) if "real_h_y" in late else [])
    ys = list(late["h_y_given_x"]) + (list(late["real_h_y_given_x"].dropna()) if "real_h_y_given_x" in late else [])
    pad_x, pad_y = 0.1 * (max(xs) - min(xs)) + 1e-3, 0.1 * (max(ys) - min(ys)) + 1e-3
    zoom.set_xlim(min(xs) - pad_x, max(xs) + pad_x)
    zoom.set_ylim(min(ys) - pad_y, max(ys) + pad_y)
    zoom.set_title(f"enlarged: epochs {late['epoch'].min():.1f}–{late['epoch'].max():.1f}")
    fig.colorbar(sc, ax=[ax, zoom], label="epoch of the evaluation")
    fig.legend(*ax.get_legend_handles_labels(), loc="outside lower center", ncol=2, frameon=False)
    fig.suptitle(f"Entropy plane — {trial}")
    return fig


def fig30a_fid_vs_epoch(study: Study, trial: str):
    df = _metric_frame(study, trial, "fid")
    if df.empty:
        return None
    fig, ax = subplots(figsize=(5.6, 3.6))
    _metric_line(ax, df, "fid", "o-", "FID (MNIST classifier features)")
    _real_data_line(ax, df, "real_fid")
    _shade_ema_lag(ax, study, trial, df)
    ax.set_yscale("log")
    _epoch_range(ax, df)
    epoch_axis(ax)
    ax.set_ylabel("FID  (squared feature units, log scale)")
    ax.set_title(f"FID vs epoch — {trial}")
    legend_below(ax, ncol=1)
    return fig


def fig30b_fid_decomposition(study: Study, trial: str):
    df = _metric_frame(study, trial, "fid_mean_term", "fid_cov_term")
    if df.empty:
        return None
    fig, ax = subplots(figsize=(5.6, 3.6))
    ax.plot(df["epoch"], df["fid_mean_term"], "o-", label="mean term  ||μ_r − μ_g||²")
    ax.plot(df["epoch"], df["fid_cov_term"], "s-", label="covariance term  Tr(Σ_r + Σ_g − 2 (Σ_r Σ_g)^½)")
    _real_data_line(ax, df, "real_fid", name="real data, total FID")   # what both terms together reach there
    _shade_ema_lag(ax, study, trial, df)
    ax.set_yscale("log")
    _epoch_range(ax, df)
    epoch_axis(ax)
    ax.set_ylabel("FID term  (squared feature units, log scale)")
    ax.set_title(f"FID decomposition — {trial}")
    legend_below(ax, ncol=1)
    return fig


TRIAL_FIGURES = {f.__name__: f for f in (fig26a_loss_per_epoch, fig26b_first_1000_iterations, fig27_residual_vs_t,
                                         fig28_samples_by_epoch, fig29a_log_is_vs_epoch, fig29b_entropy_plane,
                                         fig30a_fid_vs_epoch, fig30b_fid_decomposition)}


# the study axes of the other papers
TRIAL_FIGURES.update(figures_axes.TRIAL_FIGURES)
