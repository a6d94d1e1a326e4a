"""Launching a study: the plan's trials run, each recorded to Parquet + MLflow.

    launch(plan, out)                      (launcher process; the plan is built once by the command)
      -> prepare: study.yaml snapshot, MLflow parent run, PENDING rows for every trial
      -> the trials not yet finished, by one of two runners sharing driver.drive_trial:
           ray_runner.run_tune     a Ray Tune sweep of Ray Train TorchTrainers
           local_runner.run_local  --local: no Ray, in this process (or a few processes)
      -> interrupted trials marked, the status table printed, the exit code returned
"""
from __future__ import annotations

import contextlib
import dataclasses
import signal
import threading
import time
from pathlib import Path
from typing import Callable

import yaml

from records.atomic import write_text
from records.ground_truth import save_molrg
from records.layout import STUDY_FILE, study_file
from records.parquet import read_table

from . import tracking
from .driver import SetupError, StudyRun, record_outcome
from .plan import Plan
from .status import FINISHED, read_summary, statuses, summary_lines


def warm_metric_cache(plan: Plan, echo: Callable[[str], None] = print) -> None:
    """Compute the metrics' reference statistics once, here, before trials run side by side
    (each would otherwise compute the same classifier features). Cached on disk
    ($STUDYCTL_CACHE_DIR) by diffusion_core.metrics, so later launches pay nothing."""
    need = {(t.data.root, t.data.split_seed) for t in plan.trials
            if t.evaluation.metrics and t.data.dataset == "mnist" and t.data.image_size in (None, 28)}
    if not need:
        return
    from diffusion_core import metrics

    try:
        clf = metrics.load_classifier("cpu")
        for root, split_seed in sorted(need, key=str):
            metrics.reference_statistics(clf, "val", data_root=root, split_seed=split_seed)
    except Exception as e:  # the trials will log the same problem; training can still go on
        echo(f"warning: metric reference statistics unavailable ({type(e).__name__}: {e})")


def prepare(plan: Plan, out: Path, echo: Callable[[str], None] = print) -> StudyRun:
    """Output folder, snapshot, MLflow experiment + parent run, PENDING rows."""
    spec = plan.spec
    if spec.tracking.enabled:
        try:
            import mlflow  # noqa: F401
        except ImportError:
            raise SetupError("MLflow is not installed here: `pip install mlflow`, or run without it "
                             "(`--no-tracking`, i.e. tracking.enabled: false; the Parquet records are "
                             "complete without it)") from None
    out.mkdir(parents=True, exist_ok=True)
    snap = {**spec.to_file(), "output": str(out)}
    snap_file = study_file(out)
    if snap_file.exists():
        if not _same_study(yaml.safe_load(snap_file.read_text()), snap, str(snap_file)):
            raise SetupError(f"{out} already holds a different study (its {STUDY_FILE} differs from this one). "
                             f"Use `studyctl resume {out}` to finish it, or pass --output with a new folder.")
    else:
        write_text(snap_file, yaml.safe_dump(snap, sort_keys=False))
    uri = tracking.tracking_uri(spec.tracking.uri, out) if spec.tracking.enabled else None
    exp_id = tracking.ensure_experiment(uri, spec.tracking.experiment or spec.name, out)
    parent = tracking.ensure_parent_run(uri, exp_id, spec.name, out,
                                        {"study": spec.name, "trials": len(plan.trials),
                                         "swept": ",".join(plan.swept) or "-"})
    study = StudyRun(plan, out, uri, exp_id, parent)
    warm_metric_cache(plan, echo)
    # molrg: fit (or read from the cache) each mixture once, before trials start side by side, and keep
    # it with the records so analysis rebuilds the exact distribution from the study folder alone.
    for data in {dataclasses.replace(t.data, subset_size=None, subset_index=0, val_size=None) for t in plan.trials
                 if t.data.dataset == "molrg"}:
        save_molrg(out, data)
    known = statuses(out)
    for t in plan.trials:
        if t.trial_id not in known:
            study.writer(t).write_trial(status="PENDING", updated_at=time.time())
    return study


def _same_study(old, snap: dict, source: str) -> bool:
    """Whether a study folder's snapshot is this study: equal, or equal once read with today's schema
    (a field added since the folder was written takes its default, which is what the study ran with)."""
    if old == snap:
        return True
    from .spec import StudyError, parse_study

    try:
        return isinstance(old, dict) and {**parse_study(old, source).to_file(), "output": old.get("output")} == snap
    except StudyError:    # a key removed since: the folder holds a study this version cannot read
        return False


def launch(plan: Plan, out: Path, *, address: str | None = None, local: bool = False,
           echo: Callable[[str], None] = print) -> int:
    """Run (or finish) a study. Returns the process exit code: 0 all finished, 1 some trial failed.

    local=True runs the trials one after another in this process, without Ray (a notebook, a
    single GPU box without Ray): same records, same MLflow runs, one worker per trial."""
    from .ray_runner import concurrency, init_ray

    spec = plan.spec
    device = None
    if local:
        from .local_runner import local_device

        device = local_device(spec.resources.gpus_per_worker)  # before anything is written: a bad setup changes nothing
        if spec.sweep is not None and spec.sweep.asha is not None:
            raise SetupError("sweep.asha needs Ray Tune's scheduler: run without --local, or remove sweep.asha")
    if not local and any(statuses(out).get(t.trial_id) not in FINISHED for t in plan.trials):
        # The cluster must fit one trial before any record or MLflow run exists.
        init_ray(address or spec.ray_address)
        try:
            concurrency(spec.resources, 1)
        except SetupError:
            if not address and not spec.ray_address:
                import ray

                ray.shutdown()
            raise
    study = prepare(plan, out, echo=echo)
    try:
        return _launch_prepared(study, address, device, echo)
    except KeyboardInterrupt:  # never leave the study's MLflow run RUNNING
        tracking.end_run(study.mlflow_uri, study.parent_run_id, "KILLED")
        raise
    except Exception:
        tracking.end_run(study.mlflow_uri, study.parent_run_id, "FAILED")
        raise


def _launch_prepared(study: StudyRun, address: str | None, device: str | None, echo: Callable[[str], None]) -> int:
    """The trials not yet finished; `device` set: --local on it, else Ray."""
    plan, out = study.plan, study.out
    known = statuses(out)
    todo = [t.trial_id for t in plan.trials if known.get(t.trial_id) not in FINISHED]
    echo(f"study {plan.spec.name}: {len(plan.trials)} trials, {len(plan.trials) - len(todo)} already finished, "
         f"{len(todo)} to run")
    echo(f"records: {out}    MLflow: {study.mlflow_uri or 'off (tracking.enabled: false)'}")
    try:
        with sigterm_as_interrupt():
            if todo and device is not None:
                from .local_runner import run_local

                run_local(study, todo, device, echo)
            elif todo:
                from .ray_runner import run_tune

                run_tune(study, todo, address, echo)
    except KeyboardInterrupt:
        _mark_interrupted(study, todo)
        tracking.end_run(study.mlflow_uri, study.parent_run_id, "KILLED")
        echo(f"interrupted — `studyctl resume {out}{' --local' if device else ''}` continues")
        return 130
    # A trial whose driver or process died (killed, out of memory) left a RUNNING row.
    _mark_interrupted(study, todo)
    final = statuses(out)
    failed = [t.trial_id for t in plan.trials if final.get(t.trial_id) == "FAILED"]
    tracking.end_run(study.mlflow_uri, study.parent_run_id, "FAILED" if failed else "FINISHED")
    summary_lines(out, echo)
    if failed:
        echo(f"FAILED: {len(failed)} trial(s): {', '.join(failed)} — see the `error` column "
             f"(`studyctl status {out}`){' and the MLflow child runs' if study.mlflow_uri else ''}.")
        return 1
    unfinished = [t.trial_id for t in plan.trials if final.get(t.trial_id) not in FINISHED]
    if unfinished:
        echo(f"{len(unfinished)} trial(s) did not finish: {', '.join(unfinished)}; run `studyctl resume {out}`.")
        return 1
    echo(f"all {len(plan.trials)} trials finished. Next: studyctl status {out}   |   studyctl ui {out}")
    return 0


@contextlib.contextmanager
def sigterm_as_interrupt():
    """SIGTERM (a scheduler's or `kill`'s stop) takes the Ctrl-C path: records and MLflow runs
    are closed as interrupted instead of being left RUNNING."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    before = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, before)


def _mark_interrupted(study: StudyRun, ran: list[str]) -> None:
    """After the sweep stopped: trials of this launch still RUNNING have no process left (their
    driver was stopped with the launch): record them INTERRUPTED and end their runs KILLED."""
    trials = read_table(study.out, "trials")
    if trials.empty:
        return
    rows = trials.set_index("trial_id")
    for tid in ran:
        if tid in rows.index and rows.loc[tid, "status"] == "RUNNING":
            s = read_summary(study.out, tid)
            s.setdefault("wall_seconds", rows.loc[tid, "wall_seconds"])
            run_id = rows.loc[tid, "mlflow_run_id"]
            record_outcome(study, study.plan.trial(tid), s, "INTERRUPTED", None,
                           run_id if isinstance(run_id, str) else None, "KILLED")
