"""Analysis on a real study (the session's e2e study: real MNIST, `launch --local`, real MLflow).

Every named figure is written; the plotted values — read back from the matplotlib artists —
equal the Parquet values; the failed trial is named; `decompose` writes the table whose
identity holds exactly, on the study's own evaluation points (the study's own analysis decomposes).

The figures checked are those the study's own launch drew at its end (its `resume`, which ends
as `launch` does): the same `_write_figures(DIR, mlflow=True)` that `studyctl figures DIR` runs,
so drawing them all again (~20 s on 2 cores) would test nothing more. `studyctl figures` itself
(the command, its exit code 0 with an unfinished trial) is run in test_figures_partial.py and
test_generalization.py, its refusal below.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from analysis import figures as F
from analysis import figures_study as S
from analysis.tables import load_study
from diffusion_core.evaluation import grid_image

pytestmark = pytest.mark.slow

# Every thesis figure; the study-axis figures (learned variance, progressive frames) exist only for trials
# that have those axes (tests/test_variance_guidance.py checks them).
TRIAL_FIGS = [name for name in F.TRIAL_FIGURES if name not in F.figures_axes.TRIAL_FIGURES]
STUDY_FIGS = ["study_val_loss_by_capacity", "study_fid_by_capacity", "study_residual_by_capacity",
              "study_fid_bias_variance_vs_capacity"]


@pytest.fixture(scope="module")
def study_dir(e2e_study):
    _, out, r = e2e_study
    assert (out / "trials").is_dir(), r.stdout[-3000:]
    return out


@pytest.fixture(scope="module")
def figures_run(e2e_study):
    """The command that finished the study (it drew the figures and attached them to MLflow)."""
    return e2e_study[2]


@pytest.fixture(scope="module")
def study(study_dir, figures_run):
    return load_study(study_dir)


def _completed(study):
    return study.trials.loc[study.trials["status"] == "COMPLETED", "trial_id"].tolist()


def test_figures_command_writes_every_named_figure(study_dir, figures_run, study):
    assert "figures (PNG) and the report" in figures_run.stdout, figures_run.stdout[-3000:]
    out = study_dir / "figures"
    for tid in _completed(study):
        for name in TRIAL_FIGS:
            f = out / tid / (name + ".png")
            assert f.exists() and f.stat().st_size > 1000, f
    assert not list(out.rglob("*.pdf"))  # the study file's analysis.figure_formats: [png]
    for name in STUDY_FIGS:
        assert (out / (name + ".png")).stat().st_size > 1000, name
    html = (out / "index.html").read_text()
    for tid in _completed(study):
        assert tid in html
    assert "fig27_residual_vs_t" in html and "Study file" in html


def test_failed_trial_is_named_and_healthy_ones_still_drawn(figures_run, study):
    failed = study.trials.loc[study.trials["status"] == "FAILED", "trial_id"].tolist()
    assert len(failed) == 1
    assert f"missing/incomplete trial {failed[0]}: FAILED - DivergedError" in figures_run.stdout
    html = (study.dir / "figures" / "index.html").read_text()
    assert "Incomplete trials" in html and failed[0] in html and "DivergedError" in html


def test_loss_figure_shows_the_parquet_values(study):
    tid = _completed(study)[0]
    fig = F.fig26a_loss_per_epoch(study, tid)
    ep = study.trial_rows(study.epochs, tid).sort_values("epoch")
    train_line, val_line = fig.axes[0].lines[:2]
    np.testing.assert_allclose(train_line.get_xdata(), ep["epoch"])
    np.testing.assert_allclose(train_line.get_ydata(), ep["train_loss"])
    np.testing.assert_allclose(val_line.get_ydata(), ep["val_loss"])


def test_first_iterations_figure_shows_every_logged_step(study):
    tid = _completed(study)[0]
    line = F.fig26b_first_1000_iterations(study, tid).axes[0].lines[0]
    steps = study.trial_rows(study.train_steps, tid).sort_values("step")
    np.testing.assert_allclose(line.get_xdata(), steps["step"])
    np.testing.assert_allclose(line.get_ydata(), steps["loss"])
    # the thesis's second curve: the validation minibatch loss of the first steps (training.val_loss_first)
    val = F.fig26b_first_1000_iterations(study, tid).axes[0].lines[1]
    early = steps[steps["val_batch_loss"].notna()]
    assert early["step"].tolist() == list(range(1, 11))  # tests/e2e_scenario.py: val_loss_first 10
    np.testing.assert_allclose(val.get_xdata(), early["step"])
    np.testing.assert_allclose(val.get_ydata(), early["val_batch_loss"])


def test_residual_figure_shows_the_parquet_values(study):
    tid = _completed(study)[0]
    ax = F.fig27_residual_vs_t(study, tid).axes[0]
    res = study.trial_rows(study.residuals, tid)
    last = res[(res["weights"] == "ema") & (res["step"] == res["step"].max())].sort_values("t")
    ema_last = ax.lines[len(res.query("weights == 'ema'")["step"].unique()) - 1]
    np.testing.assert_allclose(ema_last.get_xdata(), last["t"])
    np.testing.assert_allclose(ema_last.get_ydata(), last["residual"])


def test_metric_figures_show_the_parquet_values(study):
    tid = _completed(study)[0]
    ev = study.trial_rows(study.evals, tid).sort_values("step")
    fid_line = F.fig30a_fid_vs_epoch(study, tid).axes[0].lines[0]
    np.testing.assert_allclose(fid_line.get_ydata(), ev["fid"])
    mean_line, cov_line = F.fig30b_fid_decomposition(study, tid).axes[0].lines[:2]
    np.testing.assert_allclose(mean_line.get_ydata(), ev["fid_mean_term"])
    np.testing.assert_allclose(cov_line.get_ydata(), ev["fid_cov_term"])
    scatter = F.fig29b_entropy_plane(study, tid).axes[0].collections[0]
    np.testing.assert_allclose(scatter.get_offsets(), ev[["h_y", "h_y_given_x"]].to_numpy())
    log_is = F.fig29a_log_is_vs_epoch(study, tid).axes[0].lines[0]
    np.testing.assert_allclose(log_is.get_ydata(), np.log(ev["inception_score"]))


def test_sample_grid_figure_shows_the_saved_grids(study):
    tid = _completed(study)[0]
    fig = F.fig28_samples_by_epoch(study, tid)
    ev = study.trial_rows(study.evals, tid).sort_values("step")
    panels = [ax for ax in fig.axes if ax.images]  # the grey-level colour bar is an axes too
    shown = panels[-1].images[0].get_array()
    # the last panel is the last evaluation's grid: the saved samples (n, C, H, W), tiled
    saved = torch.from_numpy(np.load(study.dir / ev["sample_grid"].iloc[-1].replace(".png", ".npy")))
    np.testing.assert_allclose(shown, grid_image(saved).numpy().squeeze(-1) / 255.0, atol=1e-6)
    assert len(panels) == min(6, len(ev))


def test_capacity_overlay_is_the_mean_over_seeds(study):
    """One panel per value of the other swept fields (here training.lr: the diverged arm has one width,
    so no panel), one curve per width, each the mean over seeds of exactly that width's trials."""
    fig = S.study_overlays(study)["study_val_loss_by_capacity"]
    col = "model.base_width"
    ep = study.epochs.dropna(subset=["val_loss"])
    axes = [a for a in fig.axes if a.get_visible()]
    assert len(axes) == 1 and "lr=0.001" in axes[0].get_title()
    lines = [ln for ln in axes[0].lines if ln.get_label().startswith("base_width")]
    assert len(lines) == 2
    for ln, (width, g) in zip(lines, sorted(ep[ep["training.lr"] < 1].groupby(col))):
        expected = g.groupby("epoch")["val_loss"].mean()
        np.testing.assert_allclose(ln.get_ydata(), expected.to_numpy())
        assert ln.get_label() == f"base_width = {width}"


@pytest.fixture(scope="module")
def decompose_run(e2e_study):
    """The resume that finished the study: its analysis decomposed (analysis.decompose, 32 points), then
    drew the figures. (`studyctl decompose`'s own options: tests/test_cli.py.)"""
    return e2e_study[2]


def test_decompose_writes_an_exact_table(study_dir, study, decompose_run):
    r = decompose_run
    assert "analysis 1/2: decompose: done" in r.stdout and "decomposition: 2 group(s)" in r.stdout, r.stdout[-3000:]
    dec = pd.read_parquet(study_dir / "decomposition")
    for col in ("group_id", "model.base_width", "t", "log_snr", "step", "weights", "residual", "bias2_plus_noise",
                "variance", "variance_data", "variance_opt", "residual_lo", "residual_hi", "bias2_plus_noise_lo",
                "bias2_plus_noise_hi", "variance_lo", "variance_hi", "interval", "design", "k_models", "n_points",
                "eval_seed", "trial_ids"):
        assert col in dec.columns, col
    assert "bias2" not in dec and "noise_floor" not in dec
    assert dec["group_id"].nunique() == 2 and (dec["k_models"] == 2).all() and (dec["n_points"] == 32).all()
    assert (dec["design"] == "seeds").all() and (dec["interval"] == "points").all()   # K = 2: no jackknife
    np.testing.assert_allclose(dec["residual"], dec["bias2_plus_noise"] + dec["variance"], atol=1e-12, rtol=0)
    assert (dec["variance_lo"] < dec["variance"]).all() and (dec["variance"] < dec["variance_hi"]).all()
    # every evaluation snapshot, EMA and raw weights (the worker now saves both)
    evals = study.evals.groupby("trial_id")["step"].apply(set)
    assert set(dec["step"]) == set.intersection(*evals) and set(dec["weights"]) == {"ema", "raw"}
    # Held-out points = the Evaluator's (first validation images, eps of the study's evaluation seed), so each
    # ensemble's residual is the mean of its members' recorded Residual(t), for both weights, at every step.
    res = study.residuals
    for row in dec.itertuples():
        rec = res[res["trial_id"].isin(row.trial_ids.split(",")) & (res["step"] == row.step)
                  & (res["t"] == row.t) & (res["weights"] == row.weights)]
        assert len(rec) == 2 and row.residual == pytest.approx(rec["residual"].mean(), rel=1e-4)
    mem = pd.read_parquet(study_dir / "distance_to_memorization")
    assert len(mem) == len(dec) and (mem["subset_size"] == 256).all()
    np.testing.assert_allclose(mem["distance_to_memorization"],
                               mem["ensemble_distance_to_memorization"] + mem["variance"], atol=1e-12, rtol=0)
    assert (mem["min_train_loss"] >= 0).all() and (mem["distance_to_memorization"] > 0).all()
    for name in ("decomposition_stacked", "decomposition_vs_capacity", "decomposition_vs_step",
                 "distance_to_memorization", "study_fid_bias_variance_vs_capacity"):
        assert (study_dir / "figures" / f"{name}.png").stat().st_size > 1000, name


def test_decompose_uses_the_study_evaluation_seed_and_reads_old_snapshots(study_dir, decompose_run, tmp_path):
    """A copy of the study whose study.yaml names another evaluation seed gets other eps (so other
    values); snapshots without raw weights (written before issue 9) and without core configs
    (before issue 13) give EMA rows only."""
    import shutil

    import torch
    import yaml

    from analysis.decompose import decompose

    copy = tmp_path / "study"
    shutil.copytree(study_dir, copy, ignore=shutil.ignore_patterns("mlflow.db", "mlartifacts", "figures", "ray*",
                                                                   "checkpoint_*", "samples"))
    snap = yaml.safe_load((copy / "study.yaml").read_text())
    assert snap["evaluation"]["seed"] == 0
    snap["evaluation"]["seed"] = 5
    (copy / "study.yaml").write_text(yaml.safe_dump(snap))
    for f in copy.glob("trial_files/*/ema/*.pt"):
        s = torch.load(f, weights_only=True)
        s.pop("raw")
        s.pop("core")
        torch.save(s, f)
    other = decompose(copy, n_points=32, steps="final", progress=False, n_boot=50)
    orig = pd.read_parquet(study_dir / "decomposition")
    orig = orig[(orig["weights"] == "ema") & orig["step"].isin(other["step"])]
    assert (other["eval_seed"] == 5).all() and set(other["weights"]) == {"ema"}
    both = other.merge(orig, on=["group_id", "t", "step"], suffixes=("", "_seed0"))
    assert len(both) == len(other) > 0
    assert (both["residual"] - both["residual_seed0"]).abs().min() > 1e-6
    seed0 = decompose(copy, n_points=32, steps="final", eval_seed=0, progress=False, n_boot=50)
    again = seed0.merge(orig, on=["group_id", "t", "step"], suffixes=("", "_seed0"))
    np.testing.assert_allclose(again["residual"], again["residual_seed0"], rtol=1e-9)


def test_figures_refuse_a_folder_without_records(tmp_path):
    from typer.testing import CliRunner

    from orchestrator.cli import app

    r = CliRunner().invoke(app, ["figures", str(tmp_path)])   # in this process: a refusal needs no new one
    assert r.exit_code == 2 and "no Parquet records" in r.output, r.output


def test_launch_draws_the_figures_at_the_end(e2e_study):
    _, out, r = e2e_study   # r: the resume that finished the study; it ends as launch does
    assert "figures (PNG)" in r.stdout and (out / "figures" / "index.html").exists(), r.stdout[-2000:]


def test_figures_are_attached_to_the_mlflow_parent_run(study_dir, figures_run):
    from mlflow.tracking import MlflowClient

    assert "attached to MLflow run" in figures_run.stdout
    c = MlflowClient(tracking_uri=f"sqlite:///{study_dir / 'mlflow.db'}")
    exp = c.get_experiment_by_name("e2e")
    parent = [x for x in c.search_runs([exp.experiment_id]) if x.data.tags.get("studyctl.role") == "study"][0]
    names = [a.path for a in c.list_artifacts(parent.info.run_id, "figures")]
    assert "figures/index.html" in names


def test_a_run_stopped_in_its_first_epoch_still_gets_its_other_figures(study_dir, tmp_path):
    """No epoch has ended yet, so there is no `epochs` table at all: Fig. 26a is skipped, every
    figure of what exists is drawn. Drawn by `studyctl figures DIR --no-mlflow` (in a subprocess,
    as a user runs it) on a copy holding one completed trial per width (two capacities: the study
    overlays still have curves to draw; a third of the drawing time of all five trials)."""
    import shutil
    import subprocess
    import sys

    trials = load_study(study_dir).trials
    done = trials[trials["status"] == "COMPLETED"]
    keep = set(done.groupby("model.base_width")["trial_id"].first())
    others = tuple(set(trials["trial_id"]) - keep)
    assert len(keep) == 2

    def ignore(folder, names):
        return set(shutil.ignore_patterns("ray", "mlartifacts", "mlflow.db", "figures")(folder, names)) | {
            n for n in names if n.startswith(others)}

    d = tmp_path / "early"
    shutil.copytree(study_dir, d, ignore=ignore)
    shutil.rmtree(d / "epochs")
    r = subprocess.run([sys.executable, "-m", "orchestrator.cli", "figures", str(d), "--no-mlflow"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "figures (PNG)" in r.stdout and "index.html" in r.stdout
    assert set(load_study(d).trials["trial_id"]) == keep
    tid = _completed(load_study(d))[0]
    assert not (d / "figures" / tid / "fig26a_loss_per_epoch.png").exists()
    assert (d / "figures" / tid / "fig27_residual_vs_t.png").exists() and (d / "figures" / "index.html").exists()
