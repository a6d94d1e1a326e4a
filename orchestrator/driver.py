"""A trial's driver: the one function both runners call per trial (Ray Tune, or --local).

    drive_trial(study, trial, fit)
      -> MLflow child run (found again on resume), RUNNING row
      -> fit(TrialTask): a Ray Train TorchTrainer (ray_runner.py) or the trial in this
         process (local_runner.py)
      -> COMPLETED / FAILED row with the reason, summary.json, child run ended

    drive_group(study, trials, fit)   (resources.stack: K trials in one stacked model, --local)
      -> the same begin_trial / finish_trial steps for each member around one fit(tasks)

`StudyRun` is what every driver of one launch shares: the plan (built once by the command)
and the study's MLflow context. It is pickled to the drivers as is, so no driver expands or
validates the study again.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from records.atomic import write_json
from records.layout import summary_file
from records.parquet import RecordWriter, time_split

from . import tracking
from .plan import Plan, Trial
from .status import read_summary
from .worker import TrialTask


class TrialFailed(RuntimeError):
    """A trial ended FAILED (its training raised, diverged or exhausted its restarts)."""


class TrialStopped(RuntimeError):
    """The trial's driver is being ended by the sweep's scheduler (ASHA stops it; Tune ends the
    driver's process, and the TorchTrainer it owns dies with it). Nothing is recorded: whichever
    way the race goes, the launch records the stop afterwards (ray_runner.reconcile_asha)."""


class SetupError(RuntimeError):
    """The study cannot start here (resources, a missing package, another study's folder):
    raised before any trial runs."""


@dataclass(frozen=True)
class StudyRun:
    """One launch of a study: its plan, folder and MLflow parent run (shared by all its drivers)."""
    plan: Plan
    out: Path
    mlflow_uri: str | None
    experiment_id: str | None
    parent_run_id: str | None

    def writer(self, trial: Trial) -> RecordWriter:
        """The records of `trial`: rows carry the swept fields, its `trials` row every field."""
        p = self.plan
        params = p.params[trial.trial_id]
        return RecordWriter(self.out, p.spec.name, trial.trial_id, {k: params[k] for k in p.swept}, p.row_types,
                            params, p.trial_types)


def drive_trial(study: StudyRun, trial: Trial, fit: Callable[[TrialTask], None]) -> None:
    """Record `trial` as RUNNING (and its MLflow child run), run `fit(task)` — a Ray TorchTrainer,
    or the trial in this process — and record how it ended; raise TrialFailed if it failed."""
    error, = drive_group(study, [trial], lambda tasks: fit(tasks[0]))
    if error:
        raise TrialFailed(f"trial {trial.trial_id} failed: {error}")


def drive_group(study: StudyRun, trials: list[Trial], fit: Callable[[list[TrialTask]], None]) -> list[str | None]:
    """drive_trial for trials trained together in one process (resources.stack): each gets its own
    RUNNING row, MLflow child run and outcome; `fit(tasks)` trains them all. A member's own failure
    (a divergence) is in its summary.json; an exception of `fit` fails every member. Returns each
    trial's failure message (None: completed)."""
    tasks = [begin_trial(study, t) for t in trials]
    error = None
    try:
        fit(tasks)
    except TrialStopped:  # not a failure: the rows stay RUNNING until the launch reconciles them
        raise
    except Exception as e:  # TrainingFailedError after max_failures restarts, or a setup error
        error = f"{type(e).__name__}: {e}"
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM (launch turns it into KeyboardInterrupt)
        for task in tasks:
            interrupt_trial(study, task)
        raise
    return [finish_trial(study, task, error) for task in tasks]


def begin_trial(study: StudyRun, trial: Trial) -> TrialTask:
    """The trial's MLflow child run (found again on resume) and RUNNING row: the task to fit."""
    out, tid, uri = study.out, trial.trial_id, study.mlflow_uri
    params = {"trial_id": tid, "study": study.plan.spec.name, **study.plan.params[tid]}
    run_id = tracking.ensure_child_run(uri, study.experiment_id, study.parent_run_id, study.plan.spec.name, tid,
                                       params, run_name=study.plan.label(tid))
    wall_before = float(read_summary(out, tid).get("wall_seconds") or 0.0)
    writer = study.writer(trial)
    writer.write_trial(status="RUNNING", mlflow_run_id=run_id, wall_seconds=wall_before, updated_at=time.time())
    return TrialTask(trial, writer, uri, run_id, wall_before, time.time())


def interrupt_trial(study: StudyRun, task: TrialTask) -> None:
    s = read_summary(study.out, task.trial.trial_id)
    s["wall_seconds"] = task.wall_before + time.time() - task.driver_started_at
    record_outcome(study, task.trial, s, "INTERRUPTED", None, task.mlflow_run_id, "KILLED")


def finish_trial(study: StudyRun, task: TrialTask, error: str | None) -> str | None:
    """Record how the fitted trial ended (`error`: fit raised; else its summary.json says);
    returns its failure message, None if it completed."""
    tid, uri, run_id = task.trial.trial_id, study.mlflow_uri, task.mlflow_run_id
    s = read_summary(study.out, tid)
    if error is None and s.get("status") == "FAILED":
        error = s.get("error") or "failed"
    s["wall_seconds"] = task.wall_before + time.time() - task.driver_started_at
    tracking.log_metrics(uri, run_id, [("wall_seconds", s["wall_seconds"], int(s.get("step") or 0))])
    record_outcome(study, task.trial, s, "FAILED" if error else "COMPLETED", error, run_id,
                   "FAILED" if error else "FINISHED")
    return error


def record_outcome(study: StudyRun, trial: Trial, summary: dict, status: str, error: str | None,
                   run_id: str | None, run_status: str) -> None:
    """A trial's final state, everywhere it is kept: summary.json, its `trials` row, its MLflow
    run (tags, then ended with run_status: FINISHED | FAILED | KILLED)."""
    summary.update(status=status, error=error)
    write_json(summary_file(study.out, trial.trial_id), summary)
    study.writer(trial).write_trial(
        status=status, error=error[:4000] if error else None, parameters=summary.get("parameters"),
        wall_seconds=summary.get("wall_seconds"), step=summary.get("step"), total_steps=summary.get("total_steps"),
        restarts=summary.get("restarts"), mlflow_run_id=run_id, updated_at=time.time(),
        **time_split(study.out, trial.trial_id, summary.get("wall_seconds")))
    if run_id:
        tracking.set_tags(study.mlflow_uri, run_id, {"status": status, "error": error or ""})
        tracking.end_run(study.mlflow_uri, run_id, run_status)
