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
from orchestrator.driver import TrialStopped, drive_group
from orchestrator.plan import build_plan
from orchestrator.ray_runner import ended_by_tune, reconcile_asha
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


def test_a_driver_ended_by_its_scheduler_records_nothing(tmp_path, data_root):
    """The CI race behind a FAILED 'stopped' trial: Tune ends the driver of a trial ASHA stopped,
    the TorchTrainer it owns dies, and fit raises ActorDiedError naming this process as the dead
    owner, or saying the trial's placement group was removed. That is TrialStopped: the row stays
    RUNNING for reconcile_asha, the MLflow run open."""
    me = "d9a97d50e1916e1b4ab1e743e814f0d53e5d084b501ac40d5de82e62"
    died = ("The actor died unexpectedly before finishing this task.\n\tclass_name: TrainController\n"
            "The actor is dead because its owner has died. Owner Id: {} Owner Ip address: 192.0.2.2 "
            "Owner worker exit type: INTENDED_SYSTEM_EXIT Worker exit detail: Owner's worker process has crashed.")
    assert ended_by_tune(died.format(me), me)
    assert not ended_by_tune(died.format("0" * 56), me)  # another process's trainer
    assert not ended_by_tune("The actor died unexpectedly before finishing this task.", me)
    # Tune removed the trial's placement group, the controller's: the row stayed FAILED when the driver
    # recorded it after the launch had reconciled (seen once: this message, pids and ids shortened)
    removed = ("The actor died unexpectedly before finishing this task.\n\tclass_name: TrainController\n"
               "The actor is dead because its worker process has died. Worker exit type: INTENDED_SYSTEM_EXIT "
               "Worker exit detail: Destroying worker since its placement group was removed. Placement group id: "
               "7dcc89a0cc77ca47fa21bd06a13502000000, bundle index: -1")
    assert ended_by_tune(removed, me)
    assert not ended_by_tune(removed.replace("placement group was removed", "node was preempted"), me)

    study = tiny_study(data_root, name="stop", evaluation={"metrics": False},
                       sweep={"grid": {"training.lr": [1e-3]}, "asha": {"metric": "val_loss", "max_t": 4}})
    study_run = sweep.prepare(build_plan(StudySpec.model_validate(study)), tmp_path / "out", echo=lambda _: None)
    trial = study_run.plan.trials[0]

    def stopped(_tasks):
        raise TrialStopped("the scheduler ended this trial's driver")

    with pytest.raises(TrialStopped):
        drive_group(study_run, [trial], stopped)
    assert statuses(study_run.out) == {trial.trial_id: "RUNNING"}
    reconcile_asha(study_run, ran=[trial.trial_id], tune_errored=set())
    assert statuses(study_run.out) == {trial.trial_id: "STOPPED"}
