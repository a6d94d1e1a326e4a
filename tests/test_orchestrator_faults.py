"""Failures lose nothing: a killed DDP worker, then a killed launcher and `studyctl resume`.

One scenario for the module (each Ray start and worker-group start costs ~15 s on 2
cores, so the two faults share one sweep of two sequential trials):

1. `studyctl launch`; once trial A has written its first checkpoint, SIGKILL its rank-1
   worker. Ray Train restarts the worker group from that checkpoint.
2. Once trial B has written its first checkpoint, SIGKILL the launcher's whole process
   group (the launcher and the local Ray it started).
3. `studyctl resume DIR` finishes the sweep: A is not rerun, B continues from its
   checkpoint in the same MLflow child run.

The records must then be exactly those of an undisturbed run: every logged step once,
every evaluation once.
"""
from __future__ import annotations

import json
import os
import signal

import pandas as pd
import pytest

try:
    from .orchestrator_helpers import expected_steps, kill_group, start, studyctl, tiny_study, wait_for, write_study
except ImportError:
    from orchestrator_helpers import expected_steps, kill_group, start, studyctl, tiny_study, wait_for, write_study

pytestmark = pytest.mark.slow


def _trial_ids(out):
    df = pd.read_parquet(out / "trials")
    return sorted(df["trial_id"])


def _has_checkpoint(out, tid):
    """A checkpoint Ray Train has registered (in its snapshot), not one still being uploaded."""
    snap = out / "ray" / "train" / tid / "checkpoint_manager_snapshot.json"
    try:
        return "checkpoint_step_" in snap.read_text()
    except OSError:
        return False


def _parts(out, tid):
    return {str(p.relative_to(out)): p.stat().st_mtime_ns
            for kind in ("train_steps", "epochs", "residuals", "evals") for p in (out / kind).glob(f"{tid}--*")}


@pytest.fixture(scope="module")
def scenario(tmp_path_factory, data_root):
    tmp = tmp_path_factory.mktemp("faults")
    study = tiny_study(data_root, name="faults",
                       training={"epochs": 3, "log_every_first": 10, "log_every": 5, "eval_every": 8,
                                 "eval_start": 8},
                       sweep={"grid": {"model.base_width": [8, 12]}},
                       resources={"workers_per_trial": 2, "cpus_per_worker": 1, "max_failures": 2})
    f = write_study(tmp / "faults.yaml", study)
    out = tmp / "out"
    obs = {"study": study, "out": out}
    p = start("launch", f, "--output", out, log=tmp / "launch.log")
    try:
        # Parts are written under a dot-name and renamed: count only the renamed (readable) ones.
        wait_for(lambda: (out / "trials").is_dir() and len([f for f in (out / "trials").glob("*.parquet")
                                                            if not f.name.startswith(".")]) == 2,
                 120, "PENDING rows", p)
        a, b = _trial_ids(out)
        obs["a"], obs["b"] = a, b
        # 1. kill trial A's rank-1 worker after its first checkpoint
        wait_for(lambda: _has_checkpoint(out, a), 180, f"first checkpoint of {a}", p, poll=0.1)
        rank1 = json.loads((out / "trial_files" / a / "workers" / "rank1.json").read_text())
        obs["killed_worker_pid"] = rank1["pid"]
        os.kill(rank1["pid"], signal.SIGKILL)
        # 2. kill the launcher (and its local Ray) once trial B has a checkpoint
        wait_for(lambda: _has_checkpoint(out, b), 240, f"first checkpoint of {b}", p, poll=0.1)
        kill_group(p)
        obs["launch_log"] = (tmp / "launch.log").read_text()
        trials = pd.read_parquet(out / "trials").set_index("trial_id")
        obs["status_after_kill"] = trials["status"].to_dict()
        obs["b_run_id"] = trials.loc[b, "mlflow_run_id"]
        obs["a_parts"] = _parts(out, a)
        obs["a_row"] = trials.loc[a].to_dict()
    finally:
        kill_group(p)
    # 3. resume
    obs["resume"] = studyctl("resume", out, timeout=300)
    return obs


def test_worker_kill_restarts_from_checkpoint(scenario):
    out, a = scenario["out"], scenario["a"]
    assert scenario["status_after_kill"][a] == "COMPLETED", scenario["launch_log"][-4000:]
    summary = json.loads((out / "trial_files" / a / "summary.json").read_text())
    assert summary["restarts"] >= 1  # the worker group was restarted from a checkpoint
    rank1 = json.loads((out / "trial_files" / a / "workers" / "rank1.json").read_text())
    assert rank1["pid"] != scenario["killed_worker_pid"]


def test_resume_finishes_the_sweep_without_rerunning(scenario):
    out, a, b = scenario["out"], scenario["a"], scenario["b"]
    r = scenario["resume"]
    assert r.returncode == 0, r.stdout[-4000:]
    assert "1 already finished, 1 to run" in r.stdout
    assert scenario["status_after_kill"][b] == "RUNNING"
    trials = pd.read_parquet(out / "trials").set_index("trial_id")
    assert trials["status"].tolist() == ["COMPLETED", "COMPLETED"]
    assert _parts(out, a) == scenario["a_parts"]  # A's records untouched: not rerun
    assert trials.loc[a, "updated_at"] == scenario["a_row"]["updated_at"]
    assert trials.loc[b, "restarts"] >= 1  # B continued from its checkpoint, not from step 0


@pytest.mark.parametrize("which", ["a", "b"])
def test_records_have_no_duplicated_and_no_missing_steps(scenario, which):
    out, study = scenario["out"], scenario["study"]
    tid = scenario[which]
    tr = study["training"]
    logged, ends, evals = expected_steps(study["data"]["subset_size"], tr["batch_size"], 2, tr["epochs"],
                                         tr["log_every_first"], tr["log_every"], tr["eval_every"], tr["eval_start"])
    steps = pd.read_parquet(out / "train_steps").query("trial_id == @tid")
    assert steps["step"].tolist() == logged
    epochs = pd.read_parquet(out / "epochs").query("trial_id == @tid")
    assert sorted(epochs["step"]) == ends
    evs = pd.read_parquet(out / "evals").query("trial_id == @tid")
    assert sorted(evs["step"]) == evals
    res = pd.read_parquet(out / "residuals").query("trial_id == @tid")
    assert not res.duplicated(["step", "t", "weights"]).any()
    assert sorted(res["step"].unique()) == evals


def test_mlflow_child_run_continues_not_duplicated(scenario):
    from mlflow.tracking import MlflowClient

    out, b = scenario["out"], scenario["b"]
    c = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    exp = c.get_experiment_by_name("faults")
    runs = c.search_runs([exp.experiment_id])
    children = [x for x in runs if x.data.tags.get("studyctl.role") == "trial"]
    parents = [x for x in runs if x.data.tags.get("studyctl.role") == "study"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert sorted(x.data.tags["studyctl.trial_id"] for x in children) == [scenario["a"], b]
    child_b = next(x for x in children if x.data.tags["studyctl.trial_id"] == b)
    assert child_b.info.run_id == scenario["b_run_id"] and child_b.info.status == "FINISHED"
    evals = sorted(m.step for m in c.get_metric_history(child_b.info.run_id, "eval_seconds"))
    assert evals == sorted(set(evals))  # evaluations are logged with the checkpoint: once each
