"""`studyctl launch --local`: the same study without Ray, in one process (a notebook, a GPU box
without Ray), without MLflow, and several trial processes at once. Real MNIST, real Parquet,
`studyctl` as a subprocess; the kill is a real SIGKILL of the launcher. With MLflow, a diverged
trial, a kill and two resumes: the session's shared study (tests/e2e_scenario.py)."""
from __future__ import annotations

import json

import pandas as pd
import pytest

try:
    from .orchestrator_helpers import (expected_steps, kill_group, start, studyctl, tiny_study, wait_for,
                                       write_study)
except ImportError:
    from orchestrator_helpers import (expected_steps, kill_group, start, studyctl, tiny_study, wait_for,
                                      write_study)


def test_local_run_killed_resumes_from_its_file_without_mlflow(tmp_path, data_root):
    study = tiny_study(data_root, name="localkill", training={"epochs": 6, "eval_every": 20, "eval_start": 20},
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
    total = 6 * 16
    assert killed_at < total, "the run finished before the kill: nothing was resumed"
    r = studyctl("resume", out, "--local", timeout=300)
    assert r.returncode == 0, r.stdout[-3000:]
    trial = pd.read_parquet(out / "trials").iloc[0]
    assert trial["status"] == "COMPLETED" and trial["restarts"] == 1 and pd.isna(trial["mlflow_run_id"])
    logged, _, evals = expected_steps(256, 16, 1, 6, 10, 5, 20, 20)
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
    from typer.testing import CliRunner

    from orchestrator.cli import app

    study = tiny_study(data_root, name="refuse", **change)
    out = tmp_path / "out"
    # in this process: a refusal needs no new one
    r = CliRunner().invoke(app, ["launch", str(write_study(tmp_path / "refuse.yaml", study)), "--local", "--output",
                                 str(out)])
    assert r.exit_code == 1 and message in r.output, r.output[-2000:]
    assert not out.exists()
