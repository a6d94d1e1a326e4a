"""Figures of the study axes from the papers beside the thesis (the iDDPM / CFG overview and the
DDPM implementation notes): the learned reverse variance per t, progressive generation, and the
fidelity-diversity trade-off of classifier-free guidance. Parquet (and the saved frame arrays) only.
"""
from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np

from records.layout import progressive_file

from .style import subplots
from .tables import Study, final_evals

GUIDANCE = "evaluation.guidance_scale"
SEED = "training.seed"

CAPTIONS = {
    "fig_variance_interpolation": "Learned reverse variance (Improved DDPM): beside Residual(t), the mean "
                                  "interpolation v(t) of the final EMA model on the residual batch; "
                                  "Sigma = exp(v log beta_t + (1 - v) log beta_tilde_t), so 0 is beta_tilde, 1 is beta.",
    "fig_progressive_generation": "Progressive generation of the final EMA model from the fixed evaluation noise: "
                                  "one row per sample, columns at the study's evaluation.progressive_t. Grey scale: "
                                  "x_t = -1 black, +1 white; x_t outside [-1, 1] (most of it at large t) is clipped "
                                  "to those ends.",
    "study_guidance_tradeoff": "Classifier-free guidance: final FID (total, mean and covariance terms), IS with "
                               "H(Y) and H(Y|X), precision / recall and conditional accuracy against the guidance "
                               "scale s; one colour per group of the other swept fields, one marker per metric, "
                               "mean over seeds (bars: min..max over seeds).",
}


def fig_variance_interpolation(study: Study, trial: str):
    df = study.trial_rows(study.residuals, trial)
    if df.empty or "variance_interpolation" not in df or df["variance_interpolation"].isna().all():
        return None
    ema = df[(df["weights"] == "ema") & df["variance_interpolation"].notna()]
    last = ema[ema["step"] == ema["step"].max()].sort_values("t")
    fig, (ax_r, ax_v) = subplots(ncols=2, figsize=(9.0, 3.6))
    ax_r.plot(last["t"], last["residual"], "o-")
    ax_r.set_xscale("log")
    ax_r.set_yscale("log")
    ax_r.set_xlabel("diffusion timestep t")
    ax_r.set_ylabel("Residual(t)  E||eps - eps_theta||^2 / d")
    ax_r.set_title("Residual(t)")
    ax_v.plot(last["t"], last["variance_interpolation"], "s-", color="C1")
    ax_v.axhline(0, color="grey", ls=":", lw=0.8)
    ax_v.axhline(1, color="grey", ls=":", lw=0.8)
    ax_v.set_ylim(-0.05, 1.05)
    ax_v.set_xscale("log")
    ax_v.set_xlabel("diffusion timestep t")
    ax_v.set_ylabel("mean v  (0: beta_tilde_t, 1: beta_t)")
    ax_v.set_title("Learned variance interpolation")
    fig.suptitle(f"{trial}, step {int(last['step'].iloc[0])} (EMA)")
    return fig


def fig_progressive_generation(study: Study, trial: str):
    path = progressive_file(study.dir, trial)
    if not path.exists():
        return None
    with np.load(path) as z:
        ts, frames = z["t"], z["frames"]          # frames: (rows, n_t, C, H, W) uint8
    rows, cols = frames.shape[:2]
    with plt.rc_context({"savefig.bbox": "tight", "savefig.dpi": 150}):
        fig, axes = plt.subplots(rows, cols, figsize=(1.1 * cols + 0.6, 1.1 * rows + 0.6), squeeze=False)
    for r in range(rows):
        for c in range(cols):
            ax = axes[r][c]
            img = frames[r, c].transpose(1, 2, 0).squeeze()
            ax.imshow(img, cmap="gray" if img.ndim == 2 else None, vmin=0, vmax=255, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(f"t = {int(ts[c])}", fontsize=8)
    fig.suptitle(f"Progressive generation — {trial}\ngrey: x_t −1 black … +1 white (outside [−1, 1] clipped)",
                 fontsize=10)
    return fig


TRIAL_FIGURES = {f.__name__: f for f in (fig_variance_interpolation, fig_progressive_generation)}


def study_guidance_tradeoff(study: Study):
    fe = final_evals(study)
    if fe.empty or GUIDANCE not in fe or fe[GUIDANCE].nunique() < 2:
        return None
    others = [c for c in study.swept if c in fe and c not in (GUIDANCE, SEED)]
    panels = [("FID (squared feature units)", [("fid", "FID"), ("fid_mean_term", "mean term"),
                                                ("fid_cov_term", "covariance term")]),
              ("nats", [("h_y", "H(Y)"), ("h_y_given_x", "H(Y|X)"), ("log_is", "log IS")]),
              ("fraction", [("precision", "precision"), ("recall", "recall"),
                            ("conditional_accuracy", "conditional accuracy")])]
    fe = fe.assign(log_is=np.log(fe["inception_score"]) if "inception_score" in fe else np.nan)
    fig, axes = subplots(ncols=3, figsize=(13.0, 3.8))
    groups = list(fe.groupby(others, dropna=False)) if others else [((), fe)]
    # One colour per arm (group of the other swept fields), one marker and line style per metric.
    for ax, (ylabel, cols) in zip(axes, panels):
        for gi, (key, g) in enumerate(groups):
            key = key if isinstance(key, tuple) else (key,)
            tag = ", ".join(f"{c.split('.')[-1]}={v}" for c, v in zip(others, key))
            for ci, (col, label) in enumerate(cols):
                if col not in g or g[col].isna().all():
                    continue
                agg = g.groupby(GUIDANCE)[col].agg(["mean", "min", "max", "count"]).reset_index()
                ax.errorbar(agg[GUIDANCE], agg["mean"], yerr=[agg["mean"] - agg["min"], agg["max"] - agg["mean"]],
                            fmt="os^"[ci] + ("-", "--", ":")[ci], color=f"C{gi}", capsize=2,
                            label=f"{label}" + (f" ({tag})" if tag else ""))
        ax.set_xlabel("guidance scale s  (0 uncond., 1 cond.)")
        ax.set_ylabel(ylabel)
        # below each panel, never over its data (the figure is saved with a tight bounding box)
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.2), frameon=False)
    axes[0].set_title("FID and its terms")
    axes[1].set_title("Entropy plane: diversity H(Y), confidence H(Y|X)")
    axes[2].set_title("Precision, recall, conditional accuracy")
    n = int(fe["n_samples"].iloc[0]) if "n_samples" in fe else None
    fig.suptitle("Classifier-free guidance: fidelity vs diversity (final evaluation, mean over seeds"
                 + (f", {n} samples" if n else "") + ")")
    return fig


def study_figures(study: Study) -> dict:
    return {"study_guidance_tradeoff": study_guidance_tradeoff(study)}
