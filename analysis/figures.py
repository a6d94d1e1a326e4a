"""The thesis's figures (26-30) per trial, from Parquet only, and the style every figure shares.

Each `fig_*` function takes the loaded `Study` (and a trial id for per-trial figures)
and returns a matplotlib Figure, or None when the data it needs does not exist yet
(a half-finished study still gets every figure it can). The study-level figures are in
figures_study.py; report.write_figures saves PNG and PDF of all under <study>/figures/.
"""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from records.atomic import atomic_write  # noqa: E402

from .tables import Study, load_grid  # noqa: E402

STYLE = {
    "figure.figsize": (5.0, 3.6), "figure.dpi": 120, "savefig.dpi": 150, "savefig.bbox": "tight",
    "font.size": 10, "axes.titlesize": 10, "axes.labelsize": 10, "legend.fontsize": 8,
    "axes.grid": True, "grid.alpha": 0.3, "axes.spines.top": False, "axes.spines.right": False,
    "lines.linewidth": 1.6, "lines.markersize": 4,
}

# One sentence per figure, for the report.
CAPTIONS = {
    "fig26a_loss_per_epoch": "Loss per epoch. The thesis's two curves: training loss (running mean over the epoch's "
                             "iterations, raw weights with dropout on) and validation loss (EMA weights, eval mode, "
                             "fixed t and noise). Beside them, like for like: the raw weights in eval mode on a fixed "
                             "training batch and on the validation draws. Shaded: epochs where the EMA still holds "
                             "more than 5% of the initial weights, where its loss measures that lag, not "
                             "generalization.",
    "fig26b_first_1000_iterations": "Training loss of every iteration of the first 1,000, log-log: how fast the "
                                    "noise predictor leaves the trivial solution.",
    "fig27_residual_vs_t": "Residual(t) = E||eps - eps_theta(x_t, t)||^2 / d on a fixed validation batch, per "
                           "evaluation: where along the diffusion the prediction error sits.",
    "fig28_samples_by_epoch": "Samples from the same starting noise at chosen epochs: how fidelity and diversity "
                              "develop in image space.",
    "fig29a_log_is_vs_epoch": "log Inception Score (MNIST classifier) per evaluation, mean and std over splits; "
                              "the bound is log 10, and the IS of real test images at the same sample count "
                              "(n in the legend) is the attainable ceiling.",
    "fig29b_entropy_plane": "Trajectory in the (H(Y), H(Y|X)) plane, coloured by epoch: diversity to the right, "
                            "confidence (fidelity) downwards.",
    "fig30a_fid_vs_epoch": "FID in the MNIST classifier's feature space per evaluation, against the validation "
                           "split; the floor is the FID of real test images at the same sample count (n in the "
                           "legend).",
    "fig30b_fid_decomposition": "FID split into the mean term ||mu_r - mu_g||^2 and the covariance term: which "
                                "moment of the feature distribution is still wrong.",
    "study_val_loss_by": "Validation loss (EMA weights, fixed draws), one curve per value of the swept field and "
                         "one panel per combination of the other swept fields: mean over seeds +- 95% t-interval "
                         "(n seeds in the legend). Training-set sizes are compared at equal optimizer steps.",
    "study_fid_by": "FID per evaluation, one curve per value of the swept field, one panel per combination of the "
                    "other swept fields: mean over seeds +- 95% t-interval (n in the legend); dotted: real test "
                    "images at the same sample count.",
    "study_residual_by": "Residual(t) at the last evaluation every seed of a curve reached, against the log-SNR "
                         "lambda_t = log(alpha_bar_t / (1 - alpha_bar_t)) so schedules compare at equal noise level: "
                         "mean over seeds +- 95% t-interval, one panel per combination of the other swept fields.",
    "study_fid_bias_variance_vs_capacity": "Final FID against the U-Net's base width, one curve per combination "
                                           "of the other swept fields (mean over seeds +- 95% t-interval, n in "
                                           "the legend), with the real-data floor at the same sample count; right "
                                           "axis: the decomposition's bias² + noise and variance (EMA, final "
                                           "evaluation, 95% intervals).",
    "study_pr_memorization_vs_size": "Precision, recall and memorized fraction against the training-set size at "
                                     "equal optimizer steps, one curve per combination of the other swept fields "
                                     "(mean over seeds +- 95% t-interval); dotted: real test images at the same "
                                     "sample count.",
    "decomposition_stacked": "Held-out error of each ensemble (trials differing only in seed and/or training "
                             "subset), final evaluation, EMA weights: residual = bias² + noise (not separable: the "
                             "optimal denoiser is unknown) + variance (unbiased, K−1), stacked; bottom: the variance "
                             "alone (data / optimization parts where subsets are crossed with seeds). Bands: 95% "
                             "intervals (bootstrap over points; + jackknife over models when K ≥ 3).",
    "decomposition_vs_capacity": "bias² + noise (top) and variance (bottom) against base width at three noise "
                                 "levels, one line per setting of the other swept fields, final evaluation, EMA; "
                                 "error bars: 95% intervals.",
    "decomposition_vs_step": "bias² + noise (top) and variance (bottom) of each ensemble at every evaluation "
                             "snapshot, EMA weights solid, raw weights dashed, at three noise levels; bands: 95% "
                             "intervals.",
    "distance_to_memorization": "On training points of one subset D, models trained on D (seeds only), final "
                                "evaluation: training residual, the minimum training loss ‖ε − f*_D‖² of the exact "
                                "empirical optimal denoiser of D, and the distance to it ‖f − f*_D‖² (Kadkhodaie et "
                                "al. 2024; Gu et al. 2023) — not bias²; EMA solid, raw dashed; bands: 95% intervals.",
}


def _fig(**kw):
    # The size and dpi apply here; the rest of STYLE (fonts, line widths, savefig.*) is read
    # while drawing and saving, so `write_figures` draws and saves each figure inside `styled()`.
    with styled():
        return plt.subplots(**kw)


def styled():
    """The figures' rc context: draw *and* save a figure inside it (`save` also pins dpi and bbox)."""
    return plt.rc_context(STYLE)


def _legend_outside(ax, **kw):
    """A legend right of the axes, never over the data (a dense plot has no empty corner)."""
    return ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, **kw)


def _epoch_axis(ax):
    ax.set_xlabel("epoch (passes over the training set)")


# ------------------------------------------------------------------ per-trial figures
EMA_LAG_SHARE = 0.05  # shade where the EMA still holds more than this share of the initial weights


def _shade_ema_lag(ax, df: pd.DataFrame, x: str) -> None:
    """Shade from the start of training to the last point whose ema_init_share > 5% (the share only
    falls, so that is one interval), ending halfway to the next point."""
    if "ema_init_share" not in df or df["ema_init_share"].isna().all():
        return
    lag = df["ema_init_share"].to_numpy() > EMA_LAG_SHARE
    if not lag.any():
        return
    xs = df[x].to_numpy(dtype=float)
    last = int(np.flatnonzero(lag)[-1])
    right = (xs[last] + xs[last + 1]) / 2 if last + 1 < len(xs) else xs[last]
    ax.axvspan(0, right, color="0.88", zorder=0,
               label=f"EMA holds > {EMA_LAG_SHARE:.0%} of the initial weights\n(EMA numbers here show that lag)")


def _real_data_line(ax, df: pd.DataFrame, column: str, transform=None, with_value: bool = True) -> None:
    """The metric of real test images at the run's sample count (a horizontal dotted line)."""
    if column not in df or df[column].isna().all():
        return
    value = float(df[column].dropna().mean())
    n = int(df["real_n_samples"].dropna().iloc[0]) if "real_n_samples" in df else None
    shown = transform(value) if transform else value
    label = f"real data ({n} test images)" + (f": {shown:.3g}" if with_value else "")
    ax.axhline(shown, color="0.35", ls=":", lw=1.2, label=label)


def _legend_below(ax, ncol: int = 2) -> None:
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=ncol, frameon=False)


def fig26a_loss_per_epoch(study: Study, trial: str):
    df = study.trial_rows(study.epochs, trial)
    if df.empty:  # no epoch has ended yet (a run stopped early in its first epoch)
        return None
    df = df.sort_values("epoch")
    fig, ax = _fig()
    # The thesis's Fig. 26a first (these two lines reproduce it), then the like-for-like pair.
    ax.plot(df["epoch"], df["train_loss"], "o-", label="training: running mean, dropout on (thesis)")
    if df["val_loss"].notna().any():
        ax.plot(df["epoch"], df["val_loss"], "s--", label="validation: EMA weights, eval mode (thesis)")
    for column, style, label in (("train_loss_eval", "^-", "training batch: raw weights, eval mode"),
                                 ("val_loss_raw", "v-", "validation: raw weights, eval mode")):
        if column in df and df[column].notna().any():
            ax.plot(df["epoch"], df[column], style, ms=3, lw=1.1, label=label)
    _shade_ema_lag(ax, df, "epoch")
    _epoch_axis(ax)
    ax.set_ylabel("loss  ||eps - eps_theta||^2 / d")
    ax.set_title(f"Loss per epoch — {trial}")
    _legend_below(ax, ncol=1)
    return fig


def fig26b_first_1000_iterations(study: Study, trial: str):
    df = study.trial_rows(study.train_steps, trial)
    df = df[df["step"] <= 1000].sort_values("step") if len(df) else df
    if df.empty:
        return None
    fig, ax = _fig()
    ax.loglog(df["step"], df["loss"], "-", lw=0.8, label="training loss per iteration")
    ax.set_xlabel("iteration (optimizer step)")
    ax.set_ylabel("loss  ||eps - eps_theta||^2 / d")
    # The thesis's figure shows 1,000 iterations; a shorter run shows what it has.
    ax.set_title(f"First {int(df['step'].max()):,} iterations — {trial}")
    _legend_outside(ax)
    return fig


def fig27_residual_vs_t(study: Study, trial: str):
    df = study.trial_rows(study.residuals, trial)
    if df.empty:
        return None
    fig, ax = _fig()
    ema = df[df["weights"] == "ema"]
    steps = sorted(ema["step"].unique())
    cmap = plt.get_cmap("viridis")
    for i, s in enumerate(steps):
        d = ema[ema["step"] == s].sort_values("t")
        ax.plot(d["t"], d["residual"], color=cmap(i / max(len(steps) - 1, 1)), lw=1.2 if s != steps[-1] else 2,
                label=f"EMA, epoch {d['epoch'].iloc[0]:.1f}" if s in (steps[0], steps[-1]) else None)
    raw = df[(df["weights"] == "raw") & (df["step"] == df["step"].max())].sort_values("t")
    if len(raw):
        ax.plot(raw["t"], raw["residual"], "k--", lw=1, label=f"raw weights, epoch {raw['epoch'].iloc[0]:.1f}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("diffusion timestep t")
    ax.set_ylabel("Residual(t)  E||eps - eps_theta||^2 / d")
    ax.set_title(f"Residual vs timestep — {trial}")
    _legend_outside(ax)
    return fig


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
        fig, axes = plt.subplots(1, len(grids), figsize=(3.2 * len(grids), 3.5), squeeze=False)
    for ax, (epoch, g, share) in zip(axes[0], grids):
        ax.imshow(g, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        # Early EMA weights are mostly the random initialisation (share lambda^step): their
        # samples are saturated noise, not a broken sampler. Say so on the panel.
        note = f"\nEMA weights: {share:.0%} initial" if share is not None and share >= 0.005 else ""
        ax.set_title(f"epoch {epoch:.1f}{note}")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.grid(False)
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


def fig29a_log_is_vs_epoch(study: Study, trial: str):
    df = _metric_frame(study, trial, "inception_score")
    if df.empty:
        return None
    fig, ax = _fig()
    log_is = np.log(df["inception_score"].to_numpy())
    err = (df["inception_score_std"] / df["inception_score"]).to_numpy() if "inception_score_std" in df else None
    ax.errorbar(df["epoch"], log_is, yerr=err, fmt="o-", capsize=2, label="log IS (std over splits)")
    ax.axhline(np.log(10), color="grey", ls="-.", lw=1, label="bound log 10")
    _real_data_line(ax, df, "real_inception_score", transform=np.log)
    _shade_ema_lag(ax, df, "epoch")
    _epoch_axis(ax)
    ax.set_ylabel("log Inception Score  (nats)")
    ax.set_title(f"log IS vs epoch — {trial}")
    _legend_outside(ax)
    return fig


def fig29b_entropy_plane(study: Study, trial: str):
    df = _metric_frame(study, trial, "h_y", "h_y_given_x")
    if df.empty:
        return None
    fig, ax = _fig()
    ax.plot(df["h_y"], df["h_y_given_x"], "-", color="grey", lw=0.8, zorder=1)
    # One point per evaluation; the colour bar says its epoch (a legend would sit on the colour bar).
    sc = ax.scatter(df["h_y"], df["h_y_given_x"], c=df["epoch"], cmap="viridis", zorder=2)
    fig.colorbar(sc, ax=ax, label="epoch of the evaluation")
    ax.set_xlabel("H(Y)  marginal class entropy (nats)")
    ax.set_ylabel("H(Y|X)  mean conditional entropy (nats)")
    ax.set_title(f"Entropy plane — {trial}")
    return fig


def _metric_vs_epoch(study: Study, trial: str, lines: dict[str, tuple[str, str]], ylabel: str, title: str,
                     real_data: str | None = None):
    """One line per metric column ({column: (marker style, legend label)}) against epoch; `real_data`:
    the column of the same metric on real test images, drawn as a floor."""
    df = _metric_frame(study, trial, *lines)
    if df.empty:
        return None
    fig, ax = _fig()
    for column, (style, label) in lines.items():
        ax.plot(df["epoch"], df[column], style, label=label)
    if real_data:
        _real_data_line(ax, df, real_data)
        _shade_ema_lag(ax, df, "epoch")
    _epoch_axis(ax)
    ax.set_ylabel(ylabel)
    ax.set_title(f"{title} — {trial}")
    _legend_outside(ax)
    return fig


def fig30a_fid_vs_epoch(study: Study, trial: str):
    return _metric_vs_epoch(study, trial, {"fid": ("o-", "FID (MNIST classifier features)")},
                            "FID  (squared feature units)", "FID vs epoch", real_data="real_fid")


def fig30b_fid_decomposition(study: Study, trial: str):
    return _metric_vs_epoch(study, trial, {"fid_mean_term": ("o-", "mean term ||mu_r - mu_g||^2"),
                                           "fid_cov_term": ("s-", "covariance term")},
                            "FID term  (squared feature units)", "FID decomposition")


TRIAL_FIGURES = {f.__name__: f for f in (fig26a_loss_per_epoch, fig26b_first_1000_iterations, fig27_residual_vs_t,
                                         fig28_samples_by_epoch, fig29a_log_is_vs_epoch, fig29b_entropy_plane,
                                         fig30a_fid_vs_epoch, fig30b_fid_decomposition)}


def save(fig, path_stem: Path) -> Path:
    path_stem.parent.mkdir(parents=True, exist_ok=True)
    png = path_stem.with_suffix(".png")
    for suffix in (".png", ".pdf"):
        # dpi and bbox explicitly: outside STYLE's rc context savefig would crop at the figure's
        # edge (labels, titles and outside legends cut) at the figure's own dpi.
        with atomic_write(path_stem.with_suffix(suffix)) as fh:
            fig.savefig(fh, format=suffix[1:], dpi=STYLE["savefig.dpi"], bbox_inches=STYLE["savefig.bbox"])
    plt.close(fig)
    return png


# ------------------------------------------------------------------ the study axes of the other papers
from . import figures_axes  # noqa: E402  (it draws with _fig above)

TRIAL_FIGURES.update(figures_axes.TRIAL_FIGURES)
CAPTIONS.update(figures_axes.CAPTIONS)
