"""`studyctl launch --local`: the same study without Ray, in one process (a notebook, a GPU box
without Ray), with and without MLflow. Real MNIST, real Parquet, a real MLflow sqlite store,
`studyctl` as a subprocess; the kill is a real SIGKILL of the launcher."""
from __future__ import annotations

import json

import pandas as pd
import pytest

try:
    from .orchestrator_helpers import (NAN_LR, expected_steps, kill_group, start, studyctl, tiny_study, wait_for,
                                       write_study)
except ImportError:
    from orchestrator_helpers import (NAN_LR, expected_steps, kill_group, start, studyctl, tiny_study, wait_for,
                                      write_study)


def test_local_launch_records_tracks_and_isolates_a_diverged_trial(tmp_path, data_root):
    study = tiny_study(data_root, name="local", sweep={"grid": {"training.lr": [1e-3, NAN_LR]}},
                       evaluation={"metrics": False})
    study["analysis"] = {"figures": False}
    f, out = write_study(tmp_path / "local.yaml", study), tmp_path / "out"
    r = studyctl("launch", f, "--local", "--output", out, timeout=300)
    assert r.returncode == 1, r.stdout[-3000:]  # one trial failed: named, the other finished
    trials = pd.read_parquet(out / "trials").set_index("training.lr")
    assert trials.loc[1e-3, "status"] == "COMPLETED" and trials.loc[NAN_LR, "status"] == "FAILED"
    assert "DivergedError" in trials.loc[NAN_LR, "error"]
    assert "FAILED: 1 trial(s)" in r.stdout and "on cpu" in r.stdout
    good = trials.loc[1e-3, "trial_id"]
    logged, _, evals = expected_steps(256, 16, 1, 2, 10, 5, 10, 10)
    steps = pd.read_parquet(out / "train_steps").query("trial_id == @good")["step"]
    assert sorted(steps) == logged
    ev = pd.read_parquet(out / "evals").query("trial_id == @good")
    assert sorted(ev["step"]) == evals
    # the EMA's initial-weight share: decay^step (tiny_study: decay 0.9, no warm-up)
    assert ev["ema_init_share"].to_numpy() == pytest.approx(0.9 ** ev["step"].to_numpy(), rel=1e-9)
    ep = pd.read_parquet(out / "epochs").query("trial_id == @good")
    assert ep[["val_loss", "val_loss_raw", "train_loss_eval", "ema_init_share"]].notna().all().all()
    assert (ep["val_loss_raw"] != ep["val_loss"]).all()   # raw and EMA weights differ
    assert (out / "trial_files" / good / "resume.pt").exists() and not (out / "ray").exists()
    from mlflow.tracking import MlflowClient

    c = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    run = c.get_run(trials.loc[1e-3, "mlflow_run_id"])
    assert run.info.status == "FINISHED" and len(c.get_metric_history(run.info.run_id, "loss")) == len(logged)
    for name in ("val_loss_raw", "train_loss_eval", "ema_init_share"):
        assert name in run.data.metrics, name
    assert c.get_run(trials.loc[NAN_LR, "mlflow_run_id"]).info.status == "FAILED"
    # finished and failed trials are not run again
    r = studyctl("resume", out, "--local", timeout=120)
    assert "2 already finished, 0 to run" in r.stdout, r.stdout[-2000:]


def test_local_run_killed_resumes_from_its_file_without_mlflow(tmp_path, data_root):
    study = tiny_study(data_root, name="localkill", training={"epochs": 12, "eval_every": 20, "eval_start": 20},
                       evaluation={"metrics": False})
    study["analysis"] = {"figures": False}
    f, out = write_study(tmp_path / "localkill.yaml", study), tmp_path / "out"
    files = None
    p = start("launch", f, "--local", "--no-tracking", "--output", out, log=tmp_path / "launch.log")
    try:
        def resumable():
            nonlocal files
            found = list((out / "trial_files").glob("*/resume.pt")) if (out / "trial_files").exists() else []
            files = found[0].parent if found else None
            return files
        wait_for(resumable, 120, "the first resume state", proc=p, poll=0.1)
    finally:
        kill_group(p)
    killed_at = json.loads((files / "summary.json").read_text())["step"]
    total = 12 * 16
    assert killed_at < total, "the run finished before the kill: nothing was resumed"
    r = studyctl("resume", out, "--local", timeout=300)
    assert r.returncode == 0, r.stdout[-3000:]
    trial = pd.read_parquet(out / "trials").iloc[0]
    assert trial["status"] == "COMPLETED" and trial["restarts"] == 1 and pd.isna(trial["mlflow_run_id"])
    logged, _, evals = expected_steps(256, 16, 1, 12, 10, 5, 20, 20)
    assert sorted(pd.read_parquet(out / "train_steps")["step"]) == logged  # each step exactly once
    assert sorted(pd.read_parquet(out / "evals")["step"]) == evals
    assert not (out / "mlflow.db").exists() and not (out / "mlartifacts").exists()
    from typer.testing import CliRunner

    from orchestrator.cli import app

    r = CliRunner().invoke(app, ["ui", str(out)])   # in this process: it only says why it starts nothing
    assert r.exit_code == 0 and "without MLflow" in r.output, r.output


def test_local_packs_trials_into_concurrent_processes(tmp_path, data_root):
    """resources.max_concurrent_trials: 2 -> two trial processes at once on the one device
    (what a fractional GPU gives under Ray), each recording exactly what it would alone."""
    study = tiny_study(data_root, name="localpack", training={"epochs": 4},
                       sweep={"grid": {"model.base_width": [8, 12]}}, evaluation={"metrics": False},
                       resources={"max_concurrent_trials": 2})
    study["analysis"] = {"figures": False}
    f, out = write_study(tmp_path / "localpack.yaml", study), tmp_path / "out"
    r = studyctl("launch", f, "--local", "--no-tracking", "--output", out, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:]
    assert "2 at a time in separate processes" in r.stdout
    trials = pd.read_parquet(out / "trials")
    assert list(trials["status"]) == ["COMPLETED", "COMPLETED"]
    runs = [json.loads((out / "trial_files" / t / "workers" / "rank0.json").read_text()) for t in trials["trial_id"]]
    ends = [json.loads((out / "trial_files" / t / "summary.json").read_text())["updated_at"]
            for t in trials["trial_id"]]
    assert runs[0]["pid"] != runs[1]["pid"]
    assert max(w["started_at"] for w in runs) < min(ends), "the two trials did not overlap in time"
    logged, _, evals = expected_steps(256, 16, 1, 4, 10, 5, 10, 10)
    for tid in trials["trial_id"]:
        assert sorted(pd.read_parquet(out / "train_steps").query("trial_id == @tid")["step"]) == logged
        assert sorted(pd.read_parquet(out / "evals").query("trial_id == @tid")["step"]) == evals


@pytest.mark.parametrize("change, message", [
    ({"resources": {"gpus_per_worker": 1}}, "resources.gpus_per_worker is 1 but torch sees no CUDA device"),
    ({"sweep": {"grid": {"training.lr": [1e-3, 2e-3]}, "asha": {"max_t": 2}}}, "sweep.asha needs Ray Tune"),
])
def test_local_refuses_what_it_cannot_do_before_writing(tmp_path, data_root, change, message):
    import torch

    if "gpus_per_worker" in str(change) and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    study = tiny_study(data_root, name="refuse", **change)
    out = tmp_path / "out"
    r = studyctl("launch", write_study(tmp_path / "refuse.yaml", study), "--local", "--output", out, timeout=120)
    assert r.returncode == 1 and message in r.stdout, r.stdout[-2000:]
    assert not out.exists()
