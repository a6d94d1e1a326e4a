"""Failures lose nothing: a killed launcher, then `studyctl resume`.

The fault happens in the session's shared study (tests/e2e_scenario.py, `--local`): once trial A
has finished and trial B holds a resume state, the launcher's whole process group is SIGKILLed;
`studyctl resume DIR --local` finishes the study: A is not rerun, B continues from its resume
state in the same MLflow child run. The records must then be exactly those of an undisturbed
run: every logged step once, every evaluation once (here for A and B; tests/test_orchestrator_e2e.py
checks every trial). Under Ray, a killed DDP worker and a killed driver on a cluster:
tests/test_orchestrator_cluster.py.
"""
from __future__ import annotations

import pandas as pd
import pytest

from diffusion_core.data import steps_per_epoch
from orchestrator.status import FINISHED

try:
    from .e2e_scenario import WORLD, record_parts
    from .orchestrator_helpers import expected_steps, studyctl
except ImportError:
    from e2e_scenario import WORLD, record_parts
    from orchestrator_helpers import expected_steps, studyctl

pytestmark = pytest.mark.slow


def test_resume_finishes_the_sweep_without_rerunning(e2e_run):
    out, a, b, study = e2e_run["out"], e2e_run["a"], e2e_run["b"], e2e_run["study"]
    r, before = e2e_run["resume"], e2e_run["status_after_kill"]
    done = sum(s in FINISHED for s in before.values())
    assert f"{done} already finished, {len(before) - done} to run" in r.stdout, r.stdout[-4000:]
    assert before[a] == "COMPLETED" and before[b] == "RUNNING", e2e_run["launch_log"][-4000:]
    tr = study["training"]
    total = steps_per_epoch(study["data"]["subset_size"], tr["batch_size"], WORLD) * tr["epochs"]
    assert tr["eval_start"] <= e2e_run["b_step_at_kill"] < total  # killed between its first state and its end
    trials = pd.read_parquet(out / "trials").set_index("trial_id")
    assert trials.loc[[a, b], "status"].tolist() == ["COMPLETED", "COMPLETED"]
    assert record_parts(out, a) == e2e_run["a_parts"]  # A's records untouched: not rerun
    assert trials.loc[a, "updated_at"] == e2e_run["a_row"]["updated_at"]
    assert trials.loc[a, "restarts"] == 0 and trials.loc[b, "restarts"] == 1  # B continued from its state


@pytest.mark.parametrize("which", ["a", "b"])
def test_records_have_no_duplicated_and_no_missing_steps(e2e_run, which):
    out, study = e2e_run["out"], e2e_run["study"]
    tid = e2e_run[which]
    tr = study["training"]
    logged, ends, evals = expected_steps(study["data"]["subset_size"], tr["batch_size"], WORLD, tr["epochs"],
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


def test_mlflow_child_run_continues_not_duplicated(e2e_run):
    from mlflow.tracking import MlflowClient

    out, b, study = e2e_run["out"], e2e_run["b"], e2e_run["study"]
    tr = study["training"]
    logged, _, expected_evals = expected_steps(study["data"]["subset_size"], tr["batch_size"], WORLD, tr["epochs"],
                                               tr["log_every_first"], tr["log_every"], tr["eval_every"],
                                               tr["eval_start"])
    c = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    exp = c.get_experiment_by_name("e2e")
    runs = c.search_runs([exp.experiment_id])
    children = [x for x in runs if x.data.tags.get("studyctl.role") == "trial"]
    parents = [x for x in runs if x.data.tags.get("studyctl.role") == "study"]
    # resume ended the parent run the kill left RUNNING, with the study's outcome (a trial diverged)
    assert len(parents) == 1 and parents[0].info.status == "FAILED"
    assert sorted(x.data.tags["studyctl.trial_id"] for x in children) == sorted(e2e_run["status_after_kill"])
    child_b = next(x for x in children if x.data.tags["studyctl.trial_id"] == b)
    assert child_b.info.run_id == e2e_run["b_run_id"] and child_b.info.status == "FINISHED"
    # every point once: what the killed launch logged after B's resume state is not logged again
    evals = sorted(m.step for m in c.get_metric_history(child_b.info.run_id, "eval_seconds"))
    assert evals == expected_evals
    assert sorted(m.step for m in c.get_metric_history(child_b.info.run_id, "loss")) == logged


def test_a_finished_study_resumed_again_runs_nothing(e2e_run):
    """Finished and failed trials are not run again (the diverged trial stays FAILED); exit 1 names it."""
    out = e2e_run["out"]
    before = pd.read_parquet(out / "trials").set_index("trial_id")
    r = studyctl("resume", out, "--local", timeout=300)
    assert r.returncode == 1 and "5 already finished, 0 to run" in r.stdout, r.stdout[-3000:]
    assert "FAILED: 1 trial(s)" in r.stdout and " on cpu" in e2e_run["launch_log"]  # --local says its device
    after = pd.read_parquet(out / "trials").set_index("trial_id")
    assert after["updated_at"].equals(before["updated_at"]) and after["status"].equals(before["status"])
