"""Study figures on the real bias_variance expansion with synthetic records of known value.

Every trial of `studies/bias_variance.yaml` gets Parquet rows whose values are a known function
of its configuration (+ a seed offset). Each point read back from the matplotlib artists must
equal the mean over seeds of exactly the trials its curve names: no pooling of schedules,
training-set sizes or subsets. (The old figures grouped by width only: the width-32 point
pooled both schedules and the data-size arm.)
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from analysis import figures_study as S
from analysis import style
from analysis.groups import t_interval
from analysis.tables import load_study
from orchestrator.driver import StudyRun
from orchestrator.plan import build_plan
from orchestrator.study_file import load_study_file

SIZE_TERM = {1000: 10.0, 6000: 5.0, 24000: 3.0, 48000: 0.0}
EVAL_STEPS = (3000, 39000, 75000)
T_GRID = (1, 100, 300, 1000)


def fid_of(cfg: dict, step: int) -> float:
    d, m, f, t = cfg["data"], cfg["model"], cfg["diffusion"], cfg["training"]
    return (1.0 + (f["schedule"] == "cosine") * 2.0 + SIZE_TERM[d["subset_size"]] + 0.5 * d["subset_index"]
            + 16.0 / m["base_width"] + 0.1 * t["seed"] ** 2 + 3000.0 / step)


def val_of(cfg: dict, step: int) -> float:
    return fid_of(cfg, step) / 100


def residual_of(cfg: dict, t: int) -> float:
    return fid_of(cfg, 75000) * t / 1000


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    p = build_plan(load_study_file("bias_variance"))
    out = tmp_path_factory.mktemp("bv")
    assert len(p.trials) == 42
    for trial in p.trials:
        cfg, w = trial.config(), StudyRun(p, out, None, None, None).writer(trial)
        w.write_trial(status="COMPLETED", step=75000, total_steps=75000)
        spe = cfg["data"]["subset_size"] // 16
        w.write_part("epochs", [{"epoch": s // spe, "step": s, "train_loss": 1.0, "val_loss": val_of(cfg, s)}
                                for s in EVAL_STEPS], 75000)
        w.write_part("evals", [{"step": s, "epoch": s / spe, "fid": fid_of(cfg, s), "precision": fid_of(cfg, s) / 20,
                                "recall": 0.5, "memorized_fraction": 0.01, "real_fid": 0.5, "real_precision": 0.7,
                                "real_recall": 0.7, "real_memorized_fraction": 0.001, "real_n_samples": 2000.0,
                                "ema_init_share": 0.0}
                               for s in EVAL_STEPS], 75000)
        w.write_part("residuals", [{"step": 75000, "epoch": 75000 / spe, "t": t, "residual": residual_of(cfg, t),
                                    "weights": "ema"} for t in T_GRID], 75000)
    return p, load_study(out)


@pytest.fixture(scope="module")
def overlays(synthetic):
    import matplotlib.pyplot as plt

    figs = S.study_overlays(synthetic[1])
    yield figs
    plt.close("all")


def truth(p, value, **where) -> float:
    """Mean of value(cfg) over the trials (one per seed) matching every dotted field in `where`."""
    vals = [value(t.config()) for t in p.trials if all(t.get(k) == v for k, v in where.items())]
    assert len(vals) == 3, (where, len(vals))   # exactly the three seeds
    return float(np.mean(vals))


def data_lines(ax):
    return [ln for ln in ax.lines if not ln.get_label().startswith(("real data", "_"))]


def test_t_interval_is_the_student_t_95_interval():
    mean, lo, hi, n = t_interval([1.0, 2.0, 3.0, float("nan")])
    t_975 = 0.95 / math.sqrt(2 * 0.975 * 0.025)  # Student t quantile, 2 dof: (2p - 1) / sqrt(2 p (1 - p))
    half = t_975 / math.sqrt(3)                  # t_{0.975, 2} * s / sqrt(n), s = 1
    assert (mean, n) == (2.0, 3) and lo == pytest.approx(2 - half, rel=1e-12) and hi == pytest.approx(2 + half)
    assert t_interval([5.0]) == (5.0, 5.0, 5.0, 1)


def test_fid_vs_capacity_plots_each_group_mean_and_no_pooled_kink(synthetic):
    p, study = synthetic
    ax = S.fig_fid_bias_variance_vs_capacity(study).axes[0]
    lines = data_lines(ax)
    assert len(lines) == 2   # linear and cosine at the full set; the arms have one width each: no curve
    for ln, schedule in zip(lines, ("cosine", "linear")):
        assert f"schedule={schedule}" in ln.get_label() and "n=3 seeds" in ln.get_label()
        np.testing.assert_allclose(ln.get_xdata(), [8, 16, 32, 64, 128])
        expected = [truth(p, lambda c: fid_of(c, 75000), **{"model.base_width": w, "diffusion.schedule": schedule,
                                                            "data.subset_size": 48000, "data.subset_index": 0})
                    for w in (8, 16, 32, 64, 128)]
        np.testing.assert_allclose(ln.get_ydata(), expected, rtol=1e-12)
    # the point the old figure got wrong: width 32, linear, the whole training set
    y32 = data_lines(ax)[1].get_ydata()[2]
    assert y32 == pytest.approx(1 + 0.5 + 0.5 / 3 + 0.04, rel=1e-12)   # 1 + 16/32 + 0.1*mean(0, 1, 4) + 3000/75000
    floor = [ln for ln in ax.lines if ln.get_label().startswith("real data")]
    assert len(floor) == 1 and floor[0].get_ydata()[0] == 0.5 and "2000 test images" in floor[0].get_label()


def test_capacity_overlays_have_one_panel_per_schedule(synthetic, overlays):
    p, study = synthetic
    fig = overlays["study_fid_by_capacity"]
    axes = [a for a in fig.axes if a.get_visible()]
    assert [a.get_title() for a in axes] == ["subset_index=0, subset_size=48000, schedule=cosine\nn=3 seeds per point",
                                             "subset_index=0, subset_size=48000, schedule=linear\nn=3 seeds per point"]
    for ax, schedule in zip(axes, ("cosine", "linear")):
        lines = data_lines(ax)
        assert [ln.get_label() for ln in lines] == [f"base_width = {w}" for w in (8, 16, 32, 64, 128)]
        for ln, w in zip(lines, (8, 16, 32, 64, 128)):
            np.testing.assert_allclose(ln.get_xdata(), np.array(EVAL_STEPS) / 3000)   # epochs of the 48k set
            expected = [truth(p, lambda c, s=s: fid_of(c, s), **{"model.base_width": w, "diffusion.schedule": schedule,
                                                                 "data.subset_size": 48000}) for s in EVAL_STEPS]
            np.testing.assert_allclose(ln.get_ydata(), expected, rtol=1e-12)


def test_data_size_curves_are_against_optimizer_steps_per_subset(synthetic, overlays):
    p, study = synthetic
    fig = overlays["study_val_loss_by_train_size"]
    axes = [a for a in fig.axes if a.get_visible()]
    assert len(axes) == 1 and "subset_index=0" in axes[0].get_title() and "schedule=linear" in axes[0].get_title()
    assert axes[0].get_xlabel() == "optimizer step"
    lines = data_lines(axes[0])
    assert [ln.get_label() for ln in lines] == [f"subset_size = {n}" for n in (1000, 6000, 24000, 48000)]
    for ln, n in zip(lines, (1000, 6000, 24000, 48000)):
        np.testing.assert_allclose(ln.get_xdata(), EVAL_STEPS)
        expected = [truth(p, lambda c, s=s: val_of(c, s), **{"data.subset_size": n, "data.subset_index": 0,
                                                             "model.base_width": 32, "diffusion.schedule": "linear"})
                    for s in EVAL_STEPS]
        np.testing.assert_allclose(ln.get_ydata(), expected, rtol=1e-12)


def test_precision_recall_memorization_vs_size_one_curve_per_group(synthetic):
    p, study = synthetic
    fig = S.fig_pr_memorization_vs_size(study)
    prec_ax = fig.axes[0]
    line, = data_lines(prec_ax)[:1]
    assert len(data_lines(prec_ax)) == 1
    np.testing.assert_allclose(line.get_xdata(), [1000, 6000, 24000, 48000])
    expected = [truth(p, lambda c: fid_of(c, 75000) / 20, **{"data.subset_size": n, "data.subset_index": 0,
                                                              "model.base_width": 32, "diffusion.schedule": "linear"})
                for n in (1000, 6000, 24000, 48000)]
    np.testing.assert_allclose(line.get_ydata(), expected, rtol=1e-12)


def test_residual_overlay_across_schedules_is_on_the_log_snr_axis(synthetic, overlays):
    p, study = synthetic
    fig = overlays["study_residual_by_schedule"]
    axes = [a for a in fig.axes if a.get_visible()]
    assert len(axes) == 5   # one per width (the arms have one schedule: no panel)
    t = np.array(T_GRID)
    beta = np.linspace(1e-4, 0.02, 1000)
    abar_lin = np.cumprod(1 - beta)[t - 1]
    s = 0.008
    f = np.cos((np.arange(1001) / 1000 + s) / (1 + s) * np.pi / 2) ** 2
    beta_cos = np.clip(1 - f[1:] / f[:-1], None, 0.999)            # Nichol & Dhariwal's clipped betas
    abar_cos = np.cumprod(1 - beta_cos)[t - 1]
    cos, lin = data_lines(axes[2])                                  # width 32
    # points run in increasing lambda_t, i.e. t = 1000, 300, 100, 1
    np.testing.assert_allclose(lin.get_xdata(), np.log(abar_lin / (1 - abar_lin))[::-1], rtol=1e-6)
    np.testing.assert_allclose(cos.get_xdata(), np.log(abar_cos / (1 - abar_cos))[::-1], rtol=1e-6)
    assert lin.get_xdata()[1] < cos.get_xdata()[1]   # at t = 300 the linear schedule is the noisier
    expected = [truth(p, lambda c, tt=tt: residual_of(c, tt), **{"model.base_width": 32, "diffusion.schedule": "cosine",
                                                                 "data.subset_size": 48000}) for tt in T_GRID]
    np.testing.assert_allclose(cos.get_ydata(), expected[::-1], rtol=1e-12)


def test_figures_of_the_synthetic_study_are_written(synthetic, overlays, tmp_path):
    _, study = synthetic
    figs = overlays
    for name in ("study_fid_by_schedule", "study_residual_by_train_size", "study_fid_bias_variance_vs_capacity",
                 "study_pr_memorization_vs_size", "study_val_loss_by_capacity"):
        assert figs[name] is not None, name
    for name in ("study_val_loss_by_capacity", "study_pr_memorization_vs_size"):   # PNG + PDF of two
        assert style.save(figs[name], tmp_path / name) == tmp_path / f"{name}.png"
        assert (tmp_path / f"{name}.png").stat().st_size > 1000
        assert (tmp_path / f"{name}.pdf").read_bytes()[:5] == b"%PDF-"
    assert pd.read_parquet(study.dir / "evals")["ema_init_share"].notna().all()


def test_bands_stay_inside_the_quantitys_range(tmp_path, data_root):
    """Two seeds whose FIDs are 10 and 200: the t-interval (t_{0.975,1} = 12.7) reaches FID -1,101.
    The band drawn is its part inside [0, inf), and the figure says it was cut."""
    import matplotlib.pyplot as plt

    from analysis.groups import summarize
    from orchestrator.spec import parse_study

    try:
        from .orchestrator_helpers import tiny_study
    except ImportError:
        from orchestrator_helpers import tiny_study
    p = build_plan(parse_study(tiny_study(data_root, name="two_seeds",
                                          sweep={"grid": {"model.base_width": [8, 16]}, "seeds": [0, 1]})))
    fids = {(8, 0): 10.0, (8, 1): 200.0, (16, 0): 50.0, (16, 1): 51.0}
    for trial in p.trials:
        w = StudyRun(p, tmp_path, None, None, None).writer(trial)
        w.write_trial(status="COMPLETED", step=20, total_steps=20)
        w.write_part("evals", [{"step": 20, "epoch": 1.0, "fid": fids[trial.model.base_width, trial.training.seed],
                                "precision": 0.5, "recall": 0.5, "memorized_fraction": 0.0}], 20)
    study = load_study(tmp_path)
    half = 12.706204736174704 * float(np.std([10.0, 200.0], ddof=1)) / math.sqrt(2)
    s = summarize(study.evals, "model.base_width", "fid")
    assert s["low"].tolist() == [0.0, pytest.approx(50.5 - 12.706204736174704 * 0.5)]   # not cut at width 16
    assert s["high"].tolist() == pytest.approx([105.0 + half, 50.5 + 12.706204736174704 * 0.5])
    assert s["cut"].tolist() == [True, False] and 105.0 - half < -1000
    fig = S.fig_fid_bias_variance_vs_capacity(study)
    ax = fig.axes[0]
    band = ax.collections[0].get_paths()[0].vertices
    assert band[:, 1].min() == 0.0 and band[:, 1].max() == pytest.approx(105.0 + half)
    assert "(cut to the possible values [0, ∞))" in ax.get_title()
    plt.close("all")


def test_each_figure_family_finds_its_caption():
    """The report's captions come from four modules (captions.py and the figure modules of the other papers'
    axes, the generalization study and the ground truth); a trial figure is named <trial>/<figure>, a study
    overlay carries its swept field after the key."""
    from analysis.captions import caption

    assert caption("t000-bf21a9/fig26b_first_1000_iterations").startswith("Training loss of every iteration")
    assert caption("study_val_loss_by_base_width").startswith("Validation loss (EMA weights")
    assert caption("t001-0a1b2c/fig_progressive_generation").startswith("Progressive generation")
    assert caption("generalization_vs_step").startswith("Same-noise similarity")
    assert caption("ground_truth_tradeoff").startswith("The bias–variance trade-off")
    assert caption("no_such_figure") == ""
