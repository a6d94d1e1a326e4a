"""ASHA early stopping on a real sweep: a hopeless trial is stopped at its first rung and
recorded as STOPPED (not FAILED), the good one runs to the end, and `launch` exits 0."""
from __future__ import annotations

import pandas as pd
import pytest

try:
    from .orchestrator_helpers import studyctl, tiny_study, write_study
except ImportError:
    from orchestrator_helpers import studyctl, tiny_study, write_study

from orchestrator import sweep, tracking
from orchestrator.plan import build_plan
from orchestrator.ray_runner import reconcile_asha
from orchestrator.spec import StudySpec
from orchestrator.status import statuses
from records.atomic import write_json
from records.layout import summary_file


@pytest.mark.slow
def test_asha_stops_the_hopeless_trial(tmp_path, data_root, ray_cluster):
    # One trial at a time (max_concurrent_trials 1), so the good trial (lr 1e-3) sets the rung
    # before the hopeless one (lr 1e-7: its validation loss stays at the untrained ~1.0) reaches it.
    study = tiny_study(data_root, name="asha",
                       sweep={"grid": {"training.lr": [1e-3, 1e-7]},
                              "asha": {"metric": "val_loss", "mode": "min", "grace_period": 1,
                                       "reduction_factor": 2, "max_t": 4}},
                       evaluation={"metrics": False},
                       resources={"workers_per_trial": 1, "cpus_per_worker": 1, "max_concurrent_trials": 1})
    study["analysis"] = {"figures": False}
    out = tmp_path / "out"
    r = studyctl("launch", write_study(tmp_path / "asha.yaml", study), "--output", out, "--address",
                 ray_cluster.address, timeout=400)
    trials = pd.read_parquet(out / "trials").set_index("training.lr")
    assert r.returncode == 0, r.stdout[-4000:]
    assert trials.loc[1e-3, "status"] == "COMPLETED"
    assert trials.loc[1e-7, "status"] == "STOPPED", r.stdout[-4000:]
    assert "ASHA" in trials.loc[1e-7, "error"]
    stopped_evals = pd.read_parquet(out / "evals").query("`training.lr` == 1e-7")
    assert len(stopped_evals) < len(pd.read_parquet(out / "evals").query("`training.lr` == 1e-3"))
    from mlflow.tracking import MlflowClient

    c = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    for lr, state in ((1e-3, "FINISHED"), (1e-7, "KILLED")):
        assert c.get_run(trials.loc[lr, "mlflow_run_id"]).info.status == state


def test_reconcile_follows_tunes_verdict_not_the_race(tmp_path, data_root):
    """When ASHA stops a trial, Tune removes its placement group: its driver is either killed
    silently (row RUNNING) or first sees its TorchTrainer die and records FAILED (ActorDiedError).
    Both are scheduler stops; only a trial Tune itself saw fail stays FAILED."""
    study = tiny_study(data_root, name="race",
                       sweep={"grid": {"training.lr": [1e-3, 2e-3, 3e-3, 4e-3]},
                              "asha": {"metric": "val_loss", "mode": "min", "max_t": 4}},
                       evaluation={"metrics": False})
    spec, out = StudySpec.model_validate(study), tmp_path / "out"
    study_run = sweep.prepare(build_plan(spec), out, echo=lambda _: None)
    tids = [t.trial_id for t in study_run.plan.trials]
    runs = []
    # 0: finished, then its driver saw the trainer die  1: stopped mid-run, driver killed silently
    # 2: stopped mid-run, driver saw the trainer die    3: a real failure (Tune saw the driver raise)
    for i, (step, status) in enumerate([(32, "FAILED"), (20, "RUNNING"), (20, "FAILED"), (12, "FAILED")]):
        run_id = tracking.ensure_child_run(study_run.mlflow_uri, study_run.experiment_id,
                                           study_run.parent_run_id, spec.name, tids[i], {})
        runs.append(run_id)
        write_json(summary_file(out, tids[i]), {"step": step, "total_steps": 32, "status": status})
        study_run.writer(study_run.plan.trials[i]).write_trial(
            status=status, mlflow_run_id=run_id, step=step, total_steps=32,
            error="ActorDiedError: placement group was removed" if status == "FAILED" else None)
    reconcile_asha(study_run, ran=tids, tune_errored={tids[3]})
    got = statuses(out)
    assert [got[t] for t in tids] == ["COMPLETED", "STOPPED", "STOPPED", "FAILED"]
    trials = pd.read_parquet(out / "trials").set_index("trial_id")
    assert pd.isna(trials.loc[tids[0], "error"]) and "ASHA at step 20" in trials.loc[tids[2], "error"]
    from mlflow.tracking import MlflowClient

    c = MlflowClient(tracking_uri=study_run.mlflow_uri)
    assert [c.get_run(r).info.status for r in runs[:3]] == ["FINISHED", "KILLED", "KILLED"]
    assert c.get_run(runs[0]).data.tags["status"] == "COMPLETED"
