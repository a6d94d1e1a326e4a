"""Figures of the memorization -> generalization study, from <study>/generalization/ alone
(the Parquet tables and the saved same-noise sample arrays; see analysis/generalization.py).

Intervals: across seeds when a configuration has >= 2 seeds (mean over seeds, 95% Student-t
interval of that mean; with 2 seeds it is wide, as it should be); with one seed, the
bootstrap interval over samples stored in the table.
"""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from scipy import stats  # noqa: E402

from records.layout import generalization_dir  # noqa: E402

from .style import STYLE  # noqa: E402
from .generalization import load_tables  # noqa: E402

CAPTIONS = {  # report: captions.caption
    "generalization_transition_vs_n": "Same-noise cosine similarity of two models trained on disjoint subsets "
        "(solid) and the memorized fraction d1 < d2/3 (dashed, mean of both models) against the training-set "
        "size N, at each pair's last evaluation; one colour per width; grey: held-out real images.",
    "generalization_samples_grid": "Same noise, two disjoint training sets: for each N, samples of model a, "
        "their nearest image in a's subset, samples of model b, their nearest image in b's subset.",
    "generalization_vs_step": "Same-noise similarity and memorized fraction along training (optimizer steps), "
        "one curve per N: the memorization onset.",
    "generalization_distance_to_memorization": "Distance E||eps_theta - f*_D||^2/d to the exact empirical optimal "
        "denoiser of the model's own subset, on its training points, per t (0 = memorized exactly).",
}


def _interval(g: pd.DataFrame, col: str) -> tuple[float, float, float]:
    """(mean, lo, hi) over seeds (Student t) or, for one seed, the stored bootstrap interval."""
    per_seed = g.groupby("seed")[col].mean()
    if len(per_seed) >= 2:
        m, s = per_seed.mean(), per_seed.std(ddof=1) / np.sqrt(len(per_seed))
        h = stats.t.ppf(0.975, len(per_seed) - 1) * s
        return m, m - h, m + h
    return g[col].mean(), g[f"{col}_lo"].mean(), g[f"{col}_hi"].mean()


def _last_step(table: pd.DataFrame) -> pd.DataFrame:
    return table[table["step"] == table.groupby("pair_id")["step"].transform("max")]


def fig_transition_vs_n(table: pd.DataFrame):
    models = _last_step(table[table["member"].isin(["a", "b"])])
    if models.empty or models["subset_size"].nunique() < 2:
        return None
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(6.0, 4.0))
    for i, (width, gw) in enumerate(sorted(models.groupby("base_width"))):
        for col, style, name in (("same_noise_cosine", "o-", "same-noise cosine"),
                                 ("memorized_fraction", "s--", "memorized fraction")):
            pts = [(n, *_interval(g, col)) for n, g in sorted(gw.groupby("subset_size"))]
            n, m, lo, hi = map(np.array, zip(*pts))
            ax.plot(n, m, style, color=f"C{i}", label=f"{name}, width {width}")
            ax.fill_between(n, lo, hi, color=f"C{i}", alpha=0.15, lw=0)
    held = table[table["member"] == "heldout"].groupby("subset_size")["memorized_fraction"].mean()
    if len(held):
        ax.plot(held.index, held.values, ":", color="grey", label="memorized fraction, held-out images")
    ax.set_xscale("log")
    ax.set_xlabel("training-set size N (images per subset)")
    ax.set_ylabel("cosine similarity / fraction of samples")
    ax.set_ylim(-0.03, 1.03)
    ax.set_title("Memorization to generalization: two disjoint training sets")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.tight_layout()
    return fig


def _strip(images: np.ndarray) -> np.ndarray:
    """(k, C, H, W) uint8 -> one (H, k*(W+1)) float row in [0, 1] (first channel / RGB kept)."""
    k, c, h, w = images.shape
    out = np.ones((h, k * (w + 1) - 1, c), dtype=np.float32)
    for i in range(k):
        out[:, i * (w + 1):i * (w + 1) + w] = images[i].transpose(1, 2, 0) / 255.0
    return out[..., 0] if c == 1 else out


def fig_samples_grid(table: pd.DataFrame, study_dir, max_samples: int = 8):
    models = _last_step(table[table["member"] == "a"])
    if models.empty or "samples_file" not in models:
        return None
    # One pair per N: the smallest width and seed (the caption names the pair).
    picks = models.sort_values(["subset_size", "base_width", "seed"]).groupby("subset_size").head(1)
    blocks = []
    for r in picks.itertuples():
        path = generalization_dir(study_dir) / r.samples_file
        if path.exists():
            z = np.load(path)
            blocks.append((r, [(lab, _strip(z[key][:max_samples])) for key, lab in
                               (("a", "model a"), ("nn_a", "nearest in D_a"), ("b", "model b"),
                                ("nn_b", "nearest in D_b"))]))
    if not blocks:
        return None
    n_rows = 4 * len(blocks)
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(n_rows, 1, figsize=(7.0, 0.62 * n_rows + 0.8), squeeze=False)
    for b, (r, strips) in enumerate(blocks):
        for j, (lab, img) in enumerate(strips):
            ax = axes[4 * b + j][0]
            ax.imshow(img, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.grid(False)
            ax.set_ylabel(lab, rotation=0, ha="right", va="center", fontsize=7)
            if j == 0:
                ax.set_title(f"N = {r.subset_size}  (width {r.base_width}, seed {r.seed}, step {r.step}; "
                             f"cosine a-b {r.same_noise_cosine:.2f}, memorized {r.memorized_fraction:.2f})",
                             fontsize=8, loc="left")
    fig.suptitle("Same noise, disjoint training sets", y=1.0)
    fig.tight_layout()
    return fig


def fig_vs_step(table: pd.DataFrame):
    models = table[table["member"].isin(["a", "b"])]
    if models.empty or models["step"].nunique() < 2:
        return None
    widths = sorted(models["base_width"].unique())
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(1, 2, figsize=(9.0, 3.6))
    sizes = sorted(models["subset_size"].unique())
    cmap = plt.get_cmap("viridis")
    for ax, col, label in zip(axes, ("same_noise_cosine", "memorized_fraction"),
                              ("same-noise cosine similarity", "memorized fraction (d1 < d2/3)")):
        for i, n in enumerate(sizes):
            for w, style in zip(widths, ("o-", "s--", "^:", "d-.")):
                g = models[(models["subset_size"] == n) & (models["base_width"] == w)]
                agg = g.groupby("step")[col].mean()
                ax.plot(agg.index, agg.values, style, color=cmap(i / max(len(sizes) - 1, 1)),
                        label=f"N={n}" + (f", width {w}" if len(widths) > 1 else ""))
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(label)
        ax.set_ylim(-0.03, 1.03)
    axes[1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.suptitle("Along training (mean over seeds and both models)")
    fig.tight_layout()
    return fig


def fig_distance_to_memorization(opt: pd.DataFrame):
    if opt.empty:
        return None
    last = opt[opt["step"] == opt.groupby("pair_id")["step"].transform("max")]
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(6.0, 3.8))
    sizes = sorted(last["subset_size"].unique())
    cmap = plt.get_cmap("viridis")
    widths = sorted(last["base_width"].unique())
    for i, n in enumerate(sizes):
        for w, style in zip(widths, ("o-", "s--", "^:", "d-.")):
            d = last[(last["subset_size"] == n) & (last["base_width"] == w)].groupby("t")["distance_to_memorization"].mean()
            ax.plot(d.index, d.values, style, color=cmap(i / max(len(sizes) - 1, 1)),
                    label=f"N={n}" + (f", width {w}" if len(widths) > 1 else ""))
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("diffusion timestep t")
    ax.set_ylabel("E||eps_theta - f*_D||^2 / d")
    ax.set_title("Distance to the memorizing optimum (last evaluation)")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.tight_layout()
    return fig


def generalization_figures(study) -> dict[str, object]:
    """name -> Figure (or None) for write_figures; empty when the study has no generalization table."""
    table, opt = load_tables(study.dir)
    if table.empty:
        return {}
    return {"generalization_transition_vs_n": fig_transition_vs_n(table),
            "generalization_samples_grid": fig_samples_grid(table, study.dir),
            "generalization_vs_step": fig_vs_step(table),
            "generalization_distance_to_memorization": fig_distance_to_memorization(opt)}
