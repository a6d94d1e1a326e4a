"""The thesis's figures (26-30) per trial, and the study-level figures, from Parquet only.

Each `fig_*` function takes the loaded `Study` (and a trial id for per-trial figures)
and returns a matplotlib Figure, or None when the data it needs does not exist yet
(a half-finished study still gets every figure it can). `write_figures` saves PNG and
PDF of each under <study>/figures/ and returns what it wrote and what it skipped.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from .tables import Study, final_evals, load_grid  # noqa: E402

STYLE = {
    "figure.figsize": (5.0, 3.6), "figure.dpi": 120, "savefig.dpi": 150, "savefig.bbox": "tight",
    "font.size": 10, "axes.titlesize": 10, "axes.labelsize": 10, "legend.fontsize": 8,
    "axes.grid": True, "grid.alpha": 0.3, "axes.spines.top": False, "axes.spines.right": False,
    "lines.linewidth": 1.6, "lines.markersize": 4,
}

# One sentence per figure, for the report.
CAPTIONS = {
    "fig26a_loss_per_epoch": "Training loss (mean over the epoch's iterations) and validation loss (EMA weights, "
                             "fixed t and noise) per epoch; a widening gap would signal variance.",
    "fig26b_first_1000_iterations": "Training loss of every iteration of the first 1,000, log-log: how fast the "
                                    "noise predictor leaves the trivial solution.",
    "fig27_residual_vs_t": "Residual(t) = E||eps - eps_theta(x_t, t)||^2 / d on a fixed validation batch, per "
                           "evaluation: where along the diffusion the prediction error sits.",
    "fig28_samples_by_epoch": "Samples from the same starting noise at chosen epochs: how fidelity and diversity "
                              "develop in image space.",
    "fig29a_log_is_vs_epoch": "log Inception Score (MNIST classifier) per evaluation, mean and std over splits; "
                              "the bound is log 10.",
    "fig29b_entropy_plane": "Trajectory in the (H(Y), H(Y|X)) plane, coloured by epoch: diversity to the right, "
                            "confidence (fidelity) downwards.",
    "fig30a_fid_vs_epoch": "FID in the MNIST classifier's feature space per evaluation, against the validation "
                           "split.",
    "fig30b_fid_decomposition": "FID split into the mean term ||mu_r - mu_g||^2 and the covariance term: which "
                                "moment of the feature distribution is still wrong.",
    "study_val_loss_by": "Validation loss per epoch, overlaid by a swept field (mean over seeds, band = min..max).",
    "study_fid_by": "FID per evaluation, overlaid by a swept field (mean over seeds).",
    "study_residual_by": "Final Residual(t), overlaid by a swept field (mean over seeds).",
    "study_fid_bias_variance_vs_capacity": "Final FID, bias^2 and variance against the U-Net's base width: the "
                                           "classical U-curve, or its absence.",
    "study_pr_memorization_vs_size": "Precision, recall and memorized fraction against the training-set size.",
    "decomposition_stacked": "Per-timestep bias^2 / variance / noise floor, stacked, for each group of trials "
                             "differing only in seed and/or training subset.",
    "decomposition_vs_capacity": "bias^2 and variance against base width at a few timesteps.",
}


def _fig(**kw):
    with plt.rc_context(STYLE):
        return plt.subplots(**kw)


def _epoch_axis(ax):
    ax.set_xlabel("epoch (passes over the training set)")


# ------------------------------------------------------------------ per-trial figures
def fig26a_loss_per_epoch(study: Study, trial: str):
    df = study.of(study.epochs, trial)
    if df.empty:  # no epoch has ended yet (a run stopped early in its first epoch)
        return None
    df = df.sort_values("epoch")
    fig, ax = _fig()
    ax.plot(df["epoch"], df["train_loss"], "o-", label="training (mean over epoch)")
    if df["val_loss"].notna().any():
        ax.plot(df["epoch"], df["val_loss"], "s--", label="validation (EMA, fixed draws)")
    _epoch_axis(ax)
    ax.set_ylabel("loss  ||eps - eps_theta||^2 / d")
    ax.set_title(f"Loss per epoch — {trial}")
    ax.legend()
    return fig


def fig26b_first_1000_iterations(study: Study, trial: str):
    df = study.of(study.train_steps, trial)
    df = df[df["step"] <= 1000].sort_values("step") if len(df) else df
    if df.empty:
        return None
    fig, ax = _fig()
    ax.loglog(df["step"], df["loss"], "-", lw=0.8, label="training loss per iteration")
    ax.set_xlabel("iteration (optimizer step)")
    ax.set_ylabel("loss  ||eps - eps_theta||^2 / d")
    ax.set_title(f"First 1,000 iterations — {trial}")
    ax.legend()
    return fig


def fig27_residual_vs_t(study: Study, trial: str):
    df = study.of(study.residuals, trial)
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
    ax.legend()
    return fig


def fig28_samples_by_epoch(study: Study, trial: str, max_panels: int = 6):
    df = study.of(study.evals, trial)
    if df.empty or "sample_grid" not in df:
        return None
    df = df.sort_values("step")
    rows = df.iloc[np.unique(np.linspace(0, len(df) - 1, min(max_panels, len(df))).round().astype(int))]
    grids = [(r.epoch, load_grid(r.sample_grid, study.dir)) for r in rows.itertuples()]
    grids = [(e, g) for e, g in grids if g is not None]
    if not grids:
        return None
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(1, len(grids), figsize=(3.2 * len(grids), 3.5), squeeze=False)
    for ax, (epoch, g) in zip(axes[0], grids):
        ax.imshow(g, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        ax.set_title(f"epoch {epoch:.1f}")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.grid(False)
    fig.suptitle(f"Samples from fixed noise by epoch — {trial}")
    return fig


def _metric_frame(study: Study, trial: str, *cols: str) -> pd.DataFrame:
    df = study.of(study.evals, trial)
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
    ax.axhline(np.log(10), color="grey", ls=":", label="bound log 10")
    _epoch_axis(ax)
    ax.set_ylabel("log Inception Score  (nats)")
    ax.set_title(f"log IS vs epoch — {trial}")
    ax.legend()
    return fig


def fig29b_entropy_plane(study: Study, trial: str):
    df = _metric_frame(study, trial, "h_y", "h_y_given_x")
    if df.empty:
        return None
    fig, ax = _fig()
    ax.plot(df["h_y"], df["h_y_given_x"], "-", color="grey", lw=0.8, zorder=1)
    sc = ax.scatter(df["h_y"], df["h_y_given_x"], c=df["epoch"], cmap="viridis", zorder=2, label="evaluation")
    fig.colorbar(sc, ax=ax, label="epoch")
    ax.set_xlabel("H(Y)  marginal class entropy (nats)")
    ax.set_ylabel("H(Y|X)  mean conditional entropy (nats)")
    ax.set_title(f"Entropy plane — {trial}")
    ax.legend()
    return fig


def _metric_vs_epoch(study: Study, trial: str, lines: dict[str, tuple[str, str]], ylabel: str, title: str):
    """One line per metric column ({column: (marker style, legend label)}) against epoch."""
    df = _metric_frame(study, trial, *lines)
    if df.empty:
        return None
    fig, ax = _fig()
    for column, (style, label) in lines.items():
        ax.plot(df["epoch"], df[column], style, label=label)
    _epoch_axis(ax)
    ax.set_ylabel(ylabel)
    ax.set_title(f"{title} — {trial}")
    ax.legend()
    return fig


def fig30a_fid_vs_epoch(study: Study, trial: str):
    return _metric_vs_epoch(study, trial, {"fid": ("o-", "FID (MNIST classifier features)")},
                            "FID  (squared feature units)", "FID vs epoch")


def fig30b_fid_decomposition(study: Study, trial: str):
    return _metric_vs_epoch(study, trial, {"fid_mean_term": ("o-", "mean term ||mu_r - mu_g||^2"),
                                           "fid_cov_term": ("s-", "covariance term")},
                            "FID term  (squared feature units)", "FID decomposition")


TRIAL_FIGURES = {f.__name__: f for f in (fig26a_loss_per_epoch, fig26b_first_1000_iterations, fig27_residual_vs_t,
                                         fig28_samples_by_epoch, fig29a_log_is_vs_epoch, fig29b_entropy_plane,
                                         fig30a_fid_vs_epoch, fig30b_fid_decomposition)}


# ------------------------------------------------------------------ study-level figures
def _with_params(study: Study, df: pd.DataFrame, col: str) -> pd.DataFrame:
    if df.empty or col is None or col not in study.trials:
        return pd.DataFrame()
    return df.drop(columns=[col], errors="ignore").merge(study.trials[["trial_id", col]], on="trial_id")


def _overlay(study: Study, df: pd.DataFrame, col: str, x: str, y: str, xlabel: str, ylabel: str, title: str,
             logx=False, logy=False):
    d = _with_params(study, df, col)
    if d.empty or d[y].notna().sum() == 0 or d[col].nunique() < 2:
        return None
    fig, ax = _fig()
    for value, g in sorted(d.groupby(col), key=lambda kv: (str(type(kv[0])), kv[0])):
        agg = g.groupby(x)[y].agg(["mean", "min", "max"]).reset_index()
        line, = ax.plot(agg[x], agg["mean"], "o-", label=f"{col.split('.')[-1]} = {value}")
        if (agg["max"] > agg["min"]).any():
            ax.fill_between(agg[x], agg["min"], agg["max"], color=line.get_color(), alpha=0.15)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if logx:
        ax.set_xscale("log")
    if logy:
        ax.set_yscale("log")
    ax.legend(title=col)
    return fig


def study_overlays(study: Study) -> dict[str, object]:
    figs = {}
    by = {"capacity": study.column("base_width"), "schedule": study.column("schedule"),
          "train_size": study.column("subset_size")}
    last_res = study.residuals
    if len(last_res):
        last_res = last_res[last_res["weights"] == "ema"]
        last_res = last_res[last_res["step"] == last_res.groupby("trial_id")["step"].transform("max")]
    for name, col in by.items():
        if col is None:
            continue
        figs[f"study_val_loss_by_{name}"] = _overlay(
            study, study.epochs, col, "epoch", "val_loss", "epoch (passes over the training set)",
            "validation loss  ||eps - eps_theta||^2 / d", f"Validation loss by {name}")
        figs[f"study_fid_by_{name}"] = _overlay(
            study, study.evals, col, "epoch", "fid", "epoch (passes over the training set)",
            "FID  (squared feature units)", f"FID by {name}")
        figs[f"study_residual_by_{name}"] = _overlay(
            study, last_res, col, "t", "residual", "diffusion timestep t", "Residual(t)  E||eps - eps_theta||^2 / d",
            f"Final Residual(t) by {name}", logx=True, logy=True)
    figs["study_fid_bias_variance_vs_capacity"] = fig_fid_bias_variance_vs_capacity(study)
    figs["study_pr_memorization_vs_size"] = fig_pr_memorization_vs_size(study)
    figs["decomposition_stacked"] = fig_decomposition_stacked(study)
    figs["decomposition_vs_capacity"] = fig_decomposition_vs_capacity(study)
    from .figures_generalization import generalization_figures  # here: that module imports this one
    figs.update(generalization_figures(study))
    return figs


def fig_fid_bias_variance_vs_capacity(study: Study):
    col = study.column("base_width")
    fe = final_evals(study)
    if col is None or fe.empty or col not in fe or fe["fid"].isna().all():
        return None
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots()
        agg = fe.groupby(col)["fid"].agg(["mean", "std"]).reset_index()
        ax.errorbar(agg[col], agg["mean"], yerr=agg["std"].fillna(0), fmt="o-", capsize=3, label="final FID")
        _width_axis(ax, agg[col])
        ax.set_ylabel("FID  (squared feature units)")
        dec = study.decomposition
        if len(dec) and col in dec:
            ax2 = ax.twinx()
            t_mid = _pick_ts(dec["t"].unique(), 1)[0]
            d = dec[dec["t"] == t_mid].groupby(col)[["bias2", "variance"]].mean().reset_index()
            ax2.plot(d[col], d["bias2"], "s--", color="C1", label=f"bias² (t={t_mid})")
            ax2.plot(d[col], d["variance"], "^--", color="C2", label=f"variance (t={t_mid})")
            ax2.set_ylabel("per-dimension error at t")
            ax2.grid(False)
            ax2.legend(loc="upper right")
        ax.legend(loc="upper left")
        ax.set_title("FID, bias² and variance vs capacity")
    return fig


def fig_pr_memorization_vs_size(study: Study):
    col = study.column("subset_size")
    fe = final_evals(study)
    needed = ("precision", "recall", "memorized_fraction")
    if col is None or fe.empty or col not in fe or any(c not in fe for c in needed):
        return None
    fe = fe.dropna(subset=[col])  # only the data-size arm: trials that name a subset size
    if fe[col].nunique() < 2:
        return None
    agg = fe.groupby(col)[list(needed)].mean().reset_index().sort_values(col)
    fig, ax = _fig()
    for c, m in zip(needed, "os^"):
        ax.plot(agg[col], agg[c], m + "-", label=c.replace("_", " "))
    ax.set_xscale("log")
    ax.set_xlabel("training-set size (images)")
    ax.set_ylabel("fraction")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title("Precision, recall, memorization vs training-set size")
    ax.legend()
    return fig


def _width_axis(ax, widths) -> None:
    from matplotlib.ticker import NullFormatter

    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted(set(int(w) for w in widths)))
    ax.set_xticklabels([str(w) for w in sorted(set(int(w) for w in widths))])
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("U-Net base width (channels)")


def _pick_ts(ts, n):
    ts = np.sort(np.asarray(ts))
    idx = np.unique(np.linspace(0, len(ts) - 1, n + 2).round().astype(int)[1:-1]) if len(ts) > n else np.arange(len(ts))
    return [int(ts[i]) for i in idx]


def fig_decomposition_stacked(study: Study, max_groups: int = 6):
    """Top row: noise floor, bias^2 and variance stacked per t (they sum to the residual).
    Bottom row: variance as a share of the residual, which the stack makes too thin to read."""
    dec = study.decomposition
    if dec.empty:
        return None
    groups = sorted(dec["group_id"].unique())[:max_groups]
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(2, len(groups), figsize=(3.6 * len(groups), 5.6), squeeze=False,
                                 sharex=True, gridspec_kw={"height_ratios": [2, 1]})
    for col, gid in enumerate(groups):
        d = dec[dec["group_id"] == gid].sort_values("t")
        ax, share = axes[0][col], axes[1][col]
        floor = d["noise_floor"].fillna(0).clip(lower=0)
        ax.stackplot(d["t"], floor, d["bias2_plus_noise"] - floor, d["variance"],
                     labels=["noise floor", "bias²", "variance"], colors=["0.75", "C1", "C2"], alpha=0.9)
        ax.plot(d["t"], d["residual"], "k-", lw=1, label="residual")
        ax.set_xscale("log")
        ax.set_title(f"{gid} (K={int(d['k_models'].iloc[0])})", fontsize=8)
        share.plot(d["t"], 100 * d["variance"] / d["residual"], "o-", color="C2", label="variance / residual")
        share.set_xlabel("diffusion timestep t")
        share.set_ylim(bottom=0)
    axes[0][0].set_ylabel("per-dimension error  ||.||^2 / d")
    axes[1][0].set_ylabel("variance share (%)")
    axes[0][-1].legend(loc="upper right")
    fig.suptitle("Bias² / variance / noise per timestep")
    return fig


def fig_decomposition_vs_capacity(study: Study):
    dec = study.decomposition
    col = study.column("base_width")
    if dec.empty or col is None or col not in dec or dec[col].nunique() < 2:
        return None
    ts = _pick_ts(dec["t"].unique(), 3)
    fig, ax = _fig()
    for i, t in enumerate(ts):
        d = dec[dec["t"] == t].groupby(col)[["bias2", "variance"]].mean().reset_index()
        ax.plot(d[col], d["bias2"].clip(lower=1e-8), "o-", color=f"C{i}", label=f"bias², t={t}")
        ax.plot(d[col], d["variance"], "s--", color=f"C{i}", label=f"variance, t={t}")
    _width_axis(ax, dec[col].unique())
    ax.set_yscale("log")
    ax.set_ylabel("per-dimension error  ||.||^2 / d")
    ax.set_title("bias² and variance vs capacity (mean over groups)")
    ax.legend(ncol=2, fontsize=7, framealpha=0.85, loc="best")
    return fig


# ------------------------------------------------------------------ writing
@dataclass
class FigureSet:
    written: dict[str, Path] = field(default_factory=dict)   # name -> PNG path (PDF beside it)
    skipped: dict[str, str] = field(default_factory=dict)    # name -> why


def save(fig, path_stem: Path) -> Path:
    path_stem.parent.mkdir(parents=True, exist_ok=True)
    png = path_stem.with_suffix(".png")
    for suffix in (".png", ".pdf"):
        tmp = path_stem.with_name(f".tmp-{path_stem.name}{suffix}")
        fig.savefig(tmp, format=suffix[1:])
        tmp.replace(path_stem.with_suffix(suffix))
    plt.close(fig)
    return png


def write_figures(study: Study, out: Path | None = None) -> FigureSet:
    out = out or study.dir / "figures"
    result = FigureSet()
    for trial in study.trial_ids():
        for name, fn in TRIAL_FIGURES.items():
            key = f"{trial}/{name}"
            fig = fn(study, trial)
            if fig is None:
                result.skipped[key] = f"no data yet (trial status {study.status(trial)})"
            else:
                result.written[key] = save(fig, out / trial / name)
    for name, fig in study_overlays(study).items():
        if fig is None:
            result.skipped[name] = "needs a swept field with >= 2 values and records for it"
        else:
            result.written[name] = save(fig, out / name)
    return result
