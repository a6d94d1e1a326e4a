"""The sweep: a Ray Tune run whose trials each drive a Ray Train TorchTrainer.

    launch(spec, out)                      (launcher process)
      -> records + MLflow parent run, PENDING rows for every trial
      -> tune.Tuner(run_trial, one grid point per trial not yet finished)
           run_trial(config)               (a Tune trial: a light driver actor, 0 CPU)
             -> MLflow child run (found again on resume), RUNNING row
             -> TorchTrainer(train_worker, N DDP workers, FailureConfig(max_failures))
             -> COMPLETED / FAILED row with the reason, child run ended

    launch(spec, out, local=True)          (no Ray: `studyctl launch --local`)
      -> the same records, then drive_trial(local_worker) per trial, in this process or in
         max_concurrent_trials processes sharing the device; resume state in resume.pt

We expand the sweep ourselves (spec.expand) instead of letting Tune sample it: trial ids
are then deterministic, which is what lets `resume` skip finished trials and lets Ray
Train find the checkpoints of an interrupted trial (same run name, same storage).
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Callable

import yaml

from records.atomic import write_json, write_text
from records.layout import STUDY_FILE, study_file, summary_file, worker_file
from records.parquet import RecordWriter, param_types, read_table

from . import tracking
from .spec import StudySpec, expand, flatten, swept_fields
from .worker import train_worker

log = logging.getLogger(__name__)

FINISHED = ("COMPLETED", "FAILED", "STOPPED")


class TrialFailed(RuntimeError):
    pass


def snapshot_spec(spec: StudySpec, out: Path) -> dict:
    d = spec.model_dump(mode="json")
    d["output"] = str(out)
    return d


def plan(spec: StudySpec, out: Path) -> dict:
    """Everything the trials need that is common to the study (JSON-serialisable)."""
    trials = expand(spec)
    keys = swept_fields(trials)
    flat = [flatten(t["config"]) for t in trials]
    row_types = param_types({k: [f[k] for f in flat] for k in keys})
    trial_types = param_types({k: [f[k] for f in flat] for k in flat[0]})
    return {"trials": trials, "swept": keys, "row_types": row_types, "trial_types": trial_types, "flat": flat}


def trial_writer(out: Path, spec: StudySpec, p: dict, i: int) -> RecordWriter:
    t, flat = p["trials"][i], p["flat"][i]
    return RecordWriter(out, spec.name, t["trial_id"], {k: flat[k] for k in p["swept"]}, p["row_types"],
                        flat, p["trial_types"])


def statuses(out: Path) -> dict[str, str]:
    df = read_table(out, "trials")
    return {} if df.empty else dict(zip(df["trial_id"], df["status"]))


def _read_summary(out: Path, trial_id: str) -> dict:
    f = summary_file(out, trial_id)
    try:
        return json.loads(f.read_text())
    except (OSError, ValueError):
        return {}


# ------------------------------------------------------------------------ the Tune trial
def run_trial(config: dict, common: dict) -> None:
    """One Tune trial: drive a TorchTrainer for one trial config, record its outcome.

    `config` is Tune's (just the trial's index: Tune's tables stay readable); `common` is
    the study-wide context, bound with tune.with_parameters."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    spec = StudySpec.model_validate(common["spec"])
    r = spec.resources
    use_gpu = r.gpus_per_worker > 0
    per_worker = {"CPU": r.cpus_per_worker}
    if use_gpu:
        per_worker["GPU"] = r.gpus_per_worker

    def fit(worker_cfg: dict) -> None:
        TorchTrainer(
            train_worker, train_loop_config=worker_cfg,
            scaling_config=ScalingConfig(num_workers=r.workers_per_trial, use_gpu=use_gpu,
                                         resources_per_worker=per_worker,
                                         placement_strategy=r.placement_strategy),
            run_config=RunConfig(name=worker_cfg["trial"]["trial_id"],
                                 storage_path=str(Path(common["out"]) / "ray" / "train"),
                                 failure_config=FailureConfig(max_failures=r.max_failures),
                                 checkpoint_config=CheckpointConfig(num_to_keep=spec.evaluation.keep_checkpoints),
                                 callbacks=[TuneReportCallback()])).fit()

    drive_trial(common, config["index"], fit)


def drive_trial(common: dict, i: int, fit: Callable[[dict], None]) -> None:
    """Record trial `i` as RUNNING (and its MLflow child run), run `fit(worker_cfg)` — a Ray
    TorchTrainer, or the trial in this process — and record how it ended; raise TrialFailed
    if it failed."""
    c = common
    spec = StudySpec.model_validate(c["spec"])
    out = Path(c["out"])
    p = plan(spec, out)
    trial = p["trials"][i]
    tid = trial["trial_id"]
    uri = c["mlflow_uri"]
    params = {"trial_id": tid, "study": spec.name, **p["flat"][i]}
    run_id = tracking.ensure_child_run(uri, c["experiment_id"], c["parent_run_id"], spec.name, tid, params)
    before = _read_summary(out, tid)
    wall_before = float(before.get("wall_seconds") or 0.0)
    trial_writer(out, spec, p, i).write_trial(status="RUNNING", mlflow_run_id=run_id, wall_seconds=wall_before,
                                              updated_at=time.time())
    t0 = time.time()
    worker_cfg = {"trial": trial, "study": spec.name, "study_dir": str(out), "mlflow_uri": uri,
                  "mlflow_run_id": run_id, "eval_seed": spec.evaluation.seed,
                  "wall_before": wall_before, "driver_started_at": t0,
                  "row_params": {k: p["flat"][i][k] for k in p["swept"]}, "row_types": p["row_types"],
                  "trial_params": p["flat"][i], "trial_types": p["trial_types"]}
    error = None
    try:
        fit(worker_cfg)
    except Exception as e:  # TrainingFailedError after max_failures restarts, or a setup error
        error = f"{type(e).__name__}: {e}"
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM (launch turns it into KeyboardInterrupt)
        s = _read_summary(out, tid)
        s["wall_seconds"] = wall_before + time.time() - t0
        _record_outcome(common, spec, p, i, s, "INTERRUPTED", None, run_id, "KILLED")
        raise
    s = _read_summary(out, tid)
    if error is None and s.get("status") == "FAILED":
        error = s.get("error") or "failed"
    s["wall_seconds"] = wall_before + time.time() - t0
    tracking.log_metrics(uri, run_id, [("wall_seconds", s["wall_seconds"], int(s.get("step") or 0))])
    _record_outcome(common, spec, p, i, s, "FAILED" if error else "COMPLETED", error, run_id,
                    "FAILED" if error else "FINISHED")
    if error:
        raise TrialFailed(f"trial {tid} failed: {error}")


def _record_outcome(common: dict, spec: StudySpec, p: dict, i: int, summary: dict, status: str,
                    error: str | None, run_id: str | None, run_status: str) -> None:
    """A trial's final state, everywhere it is kept: summary.json, its `trials` row, its MLflow
    run (tags, then ended with run_status: FINISHED | FAILED | KILLED)."""
    out, tid = Path(common["out"]), p["trials"][i]["trial_id"]
    summary.update(status=status, error=error)
    write_json(summary_file(out, tid), summary)
    trial_writer(out, spec, p, i).write_trial(
        status=status, error=error[:4000] if error else None, parameters=summary.get("parameters"),
        wall_seconds=summary.get("wall_seconds"), step=summary.get("step"), total_steps=summary.get("total_steps"),
        restarts=summary.get("restarts"), mlflow_run_id=run_id, updated_at=time.time())
    if run_id:
        tracking.set_tags(common["mlflow_uri"], run_id, {"status": status, "error": error or ""})
        tracking.end_run(common["mlflow_uri"], run_id, run_status)


# ----------------------------------------------------------------------------- launching
def _concurrency(spec: StudySpec, n_todo: int) -> int:
    import ray

    r = spec.resources
    res = ray.cluster_resources()
    fit = math.floor(res.get("CPU", 1) / (r.workers_per_trial * r.cpus_per_worker))
    if r.gpus_per_worker > 0:
        fit = min(fit, math.floor(res.get("GPU", 0) / (r.workers_per_trial * r.gpus_per_worker)))
    if fit < 1:
        raise TrialFailed(
            f"one trial needs {r.workers_per_trial} x (CPU {r.cpus_per_worker}, GPU {r.gpus_per_worker}) but the "
            f"Ray cluster has {res}. Lower resources.workers_per_trial / cpus_per_worker / gpus_per_worker, or "
            f"add nodes.")
    if r.max_concurrent_trials:
        return min(r.max_concurrent_trials, n_todo)
    # Tune would otherwise start every driver and leave their worker groups waiting for resources.
    return max(1, min(fit, n_todo))


def init_ray(address: str | None) -> None:
    import ray

    if ray.is_initialized():
        return
    if address:
        ray.init(address=address, log_to_driver=True)
    else:  # a local Ray sized to this machine, no dashboard (nothing to serve)
        ray.init(num_cpus=os.cpu_count() or 1, include_dashboard=False, log_to_driver=True,
                 runtime_env={"worker_process_setup_hook": quiet_placement_group_cleaner})


PG_CLEANER_LOGGER = "ray.train.v2._internal.execution.controller.placement_group_cleaner"


def quiet_placement_group_cleaner() -> None:
    """Runs in every worker of our local Ray. Ray Train V2 starts a detached PlacementGroupCleaner
    per TorchTrainer that asks the State API once a second whether the Train controller still
    lives (ray-project/ray#58515). The State API is served by the dashboard, which a local Ray
    here runs without: every query fails and logs "Failed to query Ray Train Controller actor
    state" (hundreds of lines per quickstart). The cleaner only matters when a controller dies
    while its Ray session goes on; ours ends with the launch (ray.shutdown frees every placement
    group), so its warnings are noise here: keep that one logger to errors."""
    logging.getLogger(PG_CLEANER_LOGGER).setLevel(logging.ERROR)


def warm_metric_cache(trials: list[dict], echo: Callable[[str], None] = print) -> None:
    """Compute the metrics' reference statistics once, here, before trials run side by side
    (each would otherwise compute the same ~30 s of classifier features). Cached on disk
    ($STUDYCTL_CACHE_DIR) by diffusion_core.metrics, so later launches pay nothing."""
    need = {(t["config"]["data"]["root"], t["config"]["data"]["split_seed"]) for t in trials
            if t["config"]["evaluation"]["metrics"] and t["config"]["data"]["dataset"] == "mnist"
            and t["config"]["data"]["image_size"] in (None, 28)}
    if not need:
        return
    try:
        from diffusion_core import metrics
    except ImportError as e:
        echo(f"warning: diffusion_core.metrics is not available ({e}): no FID/IS/precision/recall columns")
        return
    try:
        clf = metrics.load_classifier("cpu")
        for root, split_seed in sorted(need, key=str):
            metrics.reference_statistics(clf, "val", data_root=root, split_seed=split_seed)
    except Exception as e:  # the trials will log the same problem; training can still go on
        echo(f"warning: metric reference statistics unavailable ({type(e).__name__}: {e})")


def prepare(spec: StudySpec, out: Path, *, echo: Callable[[str], None] = print) -> dict:
    """Output folder, snapshot, MLflow experiment + parent run, PENDING rows. Returns common config."""
    if spec.tracking.enabled:
        try:
            import mlflow  # noqa: F401
        except ImportError:
            raise TrialFailed("MLflow is not installed here: `pip install mlflow`, or run without it "
                              "(`--no-tracking`, i.e. tracking.enabled: false; the Parquet records are "
                              "complete without it)") from None
    out.mkdir(parents=True, exist_ok=True)
    snap = snapshot_spec(spec, out)
    snap_file = study_file(out)
    if snap_file.exists():
        old = yaml.safe_load(snap_file.read_text())
        if old != snap:
            raise TrialFailed(f"{out} already holds a different study (its {STUDY_FILE} differs from this one). "
                              f"Use `studyctl resume {out}` to finish it, or pass --output with a new folder.")
    else:
        write_text(snap_file, yaml.safe_dump(snap, sort_keys=False))
    uri = tracking.tracking_uri(spec.tracking.uri, out) if spec.tracking.enabled else None
    exp_id = tracking.ensure_experiment(uri, spec.tracking.experiment or spec.name, out)
    p = plan(spec, out)
    parent = tracking.ensure_parent_run(uri, exp_id, spec.name, out,
                                        {"study": spec.name, "trials": len(p["trials"]),
                                         "swept": ",".join(p["swept"]) or "-"})
    warm_metric_cache(p["trials"], echo)
    known = statuses(out)
    for i, t in enumerate(p["trials"]):
        if t["trial_id"] not in known:
            trial_writer(out, spec, p, i).write_trial(status="PENDING", updated_at=time.time())
    return {"spec": spec.model_dump(mode="json"), "out": str(out), "mlflow_uri": uri, "experiment_id": exp_id,
            "parent_run_id": parent}


def local_device(spec: StudySpec) -> str:
    """Where `--local` trains: the first GPU if the study asks for GPUs, else the CPU."""
    import torch

    if spec.resources.gpus_per_worker > 0:
        if not torch.cuda.is_available():
            raise TrialFailed(f"resources.gpus_per_worker is {spec.resources.gpus_per_worker:g} but torch sees no "
                              f"CUDA device here: set it to 0 to train on the CPU, or run on a GPU machine")
        return "cuda"
    return "cpu"


def _run_local(spec: StudySpec, p: dict, common: dict, todo: list[int], device: str,
               echo: Callable[[str], None]) -> None:
    """The trials without Ray: one after another in this process (with a progress bar), or
    `resources.max_concurrent_trials` at a time in as many processes sharing the device (packed
    trials: `benchmarks/bench_packing.py` measures what that buys). Each resumes from its own
    trial_files/<id>/resume.pt, and a failed trial does not stop the others."""
    r = spec.resources
    if r.workers_per_trial > 1:
        echo(f"--local: one process per trial (resources.workers_per_trial={r.workers_per_trial} "
             f"applies to Ray runs); the global batch is unchanged")
    k = min(r.max_concurrent_trials or 1, len(todo))
    if k == 1:
        for n, i in enumerate(todo, 1):
            echo(f"[{n}/{len(todo)}] trial {p['trials'][i]['trial_id']} on {device}")
            error = local_trial(common, i, device)
            if error:
                echo(error)
        return
    import concurrent.futures as cf
    import multiprocessing as mp

    threads = max(1, int(r.cpus_per_worker))
    echo(f"{len(todo)} trials, {k} at a time in separate processes on {device} ({threads} CPU thread(s) each)")
    with cf.ProcessPoolExecutor(max_workers=k, mp_context=mp.get_context("spawn")) as pool:
        futures = {pool.submit(local_trial, common, i, device, threads): p["trials"][i]["trial_id"] for i in todo}
        for n, fut in enumerate(cf.as_completed(futures), 1):
            try:
                error = fut.result()
            except Exception as e:  # the process died (killed, out of memory): marked INTERRUPTED after the sweep
                error = f"trial {futures[fut]}: its process died ({type(e).__name__}: {e})"
            echo(f"[{n}/{len(todo)}] {error or f'trial {futures[fut]} finished'}")


def local_trial(common: dict, i: int, device: str, threads: int | None = None) -> str | None:
    """Trial `i` in this process; returns the failure message, None if it completed. With
    `threads` (packed trials) it trains on that many CPU threads, without a progress bar."""
    from .worker import local_worker

    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    try:
        drive_trial(common, i, lambda cfg: local_worker(cfg, device, progress=threads is None))
    except TrialFailed as e:
        return str(e)
    return None


def _run_tune(spec: StudySpec, out: Path, p: dict, common: dict, todo: list[int], address: str | None,
              echo: Callable[[str], None]) -> None:
    """The trials as a Ray Tune sweep, each driving a Ray Train TorchTrainer."""
    import ray
    from ray import tune

    init_ray(address or spec.ray_address)
    try:
        conc = _concurrency(spec, len(todo))
        echo(f"Ray: {ray.cluster_resources()}; up to {conc} trial(s) at a time")
        scheduler = None
        if spec.sweep is not None and spec.sweep.asha is not None:
            a = spec.sweep.asha
            scheduler = tune.schedulers.ASHAScheduler(
                metric=a.metric, mode=a.mode, time_attr="training_iteration", grace_period=a.grace_period,
                reduction_factor=a.reduction_factor, max_t=a.max_t)
        by_index = {i: p["trials"][i]["trial_id"] for i in todo}
        outcome = _tune_outcome()
        tuner = tune.Tuner(
            # A driver only waits for its TorchTrainer: it holds a token of memory, no CPU, so the
            # workers get every CPU (Tune refuses an all-zero request).
            tune.with_resources(tune.with_parameters(run_trial, common=common),
                                {"cpu": 0, "memory": 32 * 1024 ** 2}),
            param_space={"index": tune.grid_search(todo)},
            tune_config=tune.TuneConfig(max_concurrent_trials=conc, scheduler=scheduler,
                                        trial_name_creator=lambda t: by_index[t.config["index"]],
                                        trial_dirname_creator=lambda t: by_index[t.config["index"]]),
            run_config=tune.RunConfig(name=f"tune-{time.strftime('%Y%m%d-%H%M%S')}",
                                      storage_path=str(out / "ray" / "tune"),
                                      failure_config=tune.FailureConfig(max_failures=0), verbose=1,
                                      callbacks=[outcome]))
        # Ctrl-C should stop the launch now, as under --local (launch records the interruption);
        # Tune's own handler would instead wind the sweep down and return as if it had ended.
        os.environ.setdefault("TUNE_DISABLE_SIGINT_HANDLER", "1")
        tuner.fit()  # trial errors are in our records (and Tune's table above)
    finally:
        if not address and not spec.ray_address:
            ray.shutdown()
    _reconcile(spec, out, p, common, ran=todo, tune_errored=outcome.errored)


def launch(spec: StudySpec, out: Path, *, address: str | None = None, local: bool = False,
           echo: Callable[[str], None] = print) -> int:
    """Run (or finish) a study. Returns the process exit code: 0 all finished, 1 some trial failed.

    local=True runs the trials one after another in this process, without Ray (a notebook, a
    single GPU box without Ray): same records, same MLflow runs, one worker per trial."""
    if local:
        device = local_device(spec)  # before anything is written: a bad setup changes nothing
        if spec.sweep is not None and spec.sweep.asha is not None:
            raise TrialFailed("sweep.asha needs Ray Tune's scheduler: run without --local, or remove sweep.asha")
    elif any(statuses(out).get(t["trial_id"]) not in FINISHED for t in expand(spec)):
        # The cluster must fit one trial before any record or MLflow run exists.
        init_ray(address or spec.ray_address)
        try:
            _concurrency(spec, 1)
        except TrialFailed:
            if not address and not spec.ray_address:
                import ray

                ray.shutdown()
            raise
    common = prepare(spec, out, echo=echo)
    try:
        return _launch_prepared(spec, out, common, address, local, device if local else None, echo)
    except KeyboardInterrupt:  # never leave the study's MLflow run RUNNING
        tracking.end_run(common["mlflow_uri"], common["parent_run_id"], "KILLED")
        raise
    except Exception:
        tracking.end_run(common["mlflow_uri"], common["parent_run_id"], "FAILED")
        raise


def _launch_prepared(spec: StudySpec, out: Path, common: dict, address: str | None, local: bool,
                     device: str | None, echo: Callable[[str], None]) -> int:
    p = plan(spec, out)
    known = statuses(out)
    todo = [i for i, t in enumerate(p["trials"]) if known.get(t["trial_id"]) not in FINISHED]
    done = len(p["trials"]) - len(todo)
    echo(f"study {spec.name}: {len(p['trials'])} trials, {done} already finished, {len(todo)} to run")
    echo(f"records: {out}    MLflow: {common['mlflow_uri'] or 'off (tracking.enabled: false)'}")
    try:
        with _sigterm_as_interrupt():
            if todo and local:
                _run_local(spec, p, common, todo, device, echo)
            elif todo:
                _run_tune(spec, out, p, common, todo, address, echo)
    except KeyboardInterrupt:
        _mark_interrupted(spec, out, p, common, todo)
        tracking.end_run(common["mlflow_uri"], common["parent_run_id"], "KILLED")
        echo(f"interrupted — `studyctl resume {out}{' --local' if local else ''}` continues")
        return 130
    # A trial whose driver or process died (killed, out of memory) left a RUNNING row.
    _mark_interrupted(spec, out, p, common, todo)
    final = statuses(out)
    failed = [t["trial_id"] for t in p["trials"] if final.get(t["trial_id"]) == "FAILED"]
    tracking.end_run(common["mlflow_uri"], common["parent_run_id"], "FAILED" if failed else "FINISHED")
    summary_lines(out, echo)
    if failed:
        echo(f"FAILED: {len(failed)} trial(s): {', '.join(failed)} — see the `error` column "
             f"(`studyctl status {out}`){' and the MLflow child runs' if common['mlflow_uri'] else ''}.")
        return 1
    unfinished = [t["trial_id"] for t in p["trials"] if final.get(t["trial_id"]) not in FINISHED]
    if unfinished:
        echo(f"{len(unfinished)} trial(s) did not finish: {', '.join(unfinished)}; run `studyctl resume {out}`.")
        return 1
    echo(f"all {len(p['trials'])} trials finished. Next: studyctl status {out}   |   studyctl ui {out}")
    return 0


@contextlib.contextmanager
def _sigterm_as_interrupt():
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


def _mark_interrupted(spec: StudySpec, out: Path, p: dict, common: dict, ran: list[int]) -> None:
    """After the sweep stopped: trials of this launch still RUNNING have no process left (their
    driver was stopped with the launch): record them INTERRUPTED and end their runs KILLED."""
    trials = read_table(out, "trials")
    if trials.empty:
        return
    rows = trials.set_index("trial_id")
    for i in ran:
        tid = p["trials"][i]["trial_id"]
        if tid in rows.index and rows.loc[tid, "status"] == "RUNNING":
            s = _read_summary(out, tid)
            s.setdefault("wall_seconds", rows.loc[tid, "wall_seconds"])
            run_id = rows.loc[tid, "mlflow_run_id"]
            _record_outcome(common, spec, p, i, s, "INTERRUPTED", None, run_id if isinstance(run_id, str) else None,
                            "KILLED")


def _tune_outcome():
    """A Tune callback noting which trials Tune itself saw fail (their driver raised TrialFailed).
    Built on call: Ray is imported lazily so that `studyctl --help` stays fast."""
    from ray.tune import Callback

    class TuneOutcome(Callback):
        def __init__(self):
            self.errored: set[int] = set()

        def on_trial_error(self, iteration, trials, trial, **info):
            self.errored.add(trial.config["index"])

    return TuneOutcome()


def _reconcile(spec: StudySpec, out: Path, p: dict, common: dict, ran: list[int],
               tune_errored: set[int]) -> None:
    """Record the trials a scheduler (ASHA) stopped: they never reach their driver's end.

    When ASHA stops a trial, Tune removes its placement group. The driver is then either killed
    before it records anything (the row stays RUNNING) or sees its TorchTrainer die first and
    records FAILED (ActorDiedError) — a race. Tune's own verdict decides: a trial Tune did not
    see fail was stopped by the scheduler, possibly at its very last step (reports reaching
    max_t), and a trial whose training finished is COMPLETED whoever ended its driver."""
    if spec.sweep is None or spec.sweep.asha is None:
        return
    trials = read_table(out, "trials")
    known = {} if trials.empty else dict(zip(trials["trial_id"], trials["status"]))
    run_ids = {} if trials.empty else dict(zip(trials["trial_id"], trials["mlflow_run_id"]))
    for i in ran:
        tid = p["trials"][i]["trial_id"]
        if i in tune_errored or known.get(tid) not in ("RUNNING", "FAILED"):
            continue
        s = _read_summary(out, tid)
        finished = s.get("step") is not None and s.get("step") == s.get("total_steps")
        _record_outcome(common, spec, p, i, s, "COMPLETED" if finished else "STOPPED",
                        None if finished else f"stopped early by ASHA at step {s.get('step')}",
                        run_ids.get(tid), "FINISHED" if finished else "KILLED")


# -------------------------------------------------------------------------------- status
def status_table(out: Path):
    """One row per trial: status, progress, latest loss / val loss / metrics."""
    import pandas as pd

    trials = read_table(out, "trials")
    if trials.empty:
        return trials
    cols = ["trial_id", "status"] + [c for c in trials.columns if c not in ("study", "trial_id", "status")
                                     and not c.startswith(("data.", "model.", "diffusion.", "training.",
                                                           "evaluation."))]
    df = trials[cols].copy()
    steps = read_table(out, "train_steps")
    live = {}
    for tid in df["trial_id"]:
        s = _read_summary(out, tid)
        live[tid] = s
    df["step"] = [max(int(live[t].get("step") or 0), int(x) if pd.notna(x) else 0)
                  for t, x in zip(df["trial_id"], df["step"])]
    df["total_steps"] = pd.array([live[t].get("total_steps") or (int(x) if pd.notna(x) else None)
                                  for t, x in zip(df["trial_id"], df["total_steps"])], dtype="Int64")
    df["wall_seconds"] = [max(float(live[t].get("wall_seconds") or 0), float(x) if pd.notna(x) else 0) or None
                          for t, x in zip(df["trial_id"], df["wall_seconds"])]
    df["status"] = [("INTERRUPTED" if st == "RUNNING" and _stale(out, t) else st)
                    for t, st in zip(df["trial_id"], df["status"])]
    df["error"] = df["error"].fillna("") if "error" in df else ""
    df["progress"] = [f"{100 * s / t:.0f}%" if pd.notna(t) and t else "-" for s, t in zip(df["step"], df["total_steps"])]
    if not steps.empty:
        last = steps.sort_values("step").groupby("trial_id").tail(1).set_index("trial_id")["loss"]
        df["loss"] = df["trial_id"].map(last)
    epochs = read_table(out, "epochs")
    if not epochs.empty:
        last = epochs.sort_values("step").groupby("trial_id").tail(1).set_index("trial_id")["val_loss"]
        df["val_loss"] = df["trial_id"].map(last)
    evals = read_table(out, "evals")
    if not evals.empty:
        last = evals.sort_values("step").groupby("trial_id").tail(1).set_index("trial_id")
        for k in ("fid", "inception_score"):
            if k in last and last[k].notna().any():
                df[k] = df["trial_id"].map(last[k])
    keep = [c for c in ("trial_id", "status", "progress", "step", "total_steps", "loss", "val_loss", "fid",
                        "inception_score", "wall_seconds", "error") if c in df]
    return df[keep].sort_values("trial_id").reset_index(drop=True)


def _stale(out: Path, trial_id: str) -> bool:
    """A RUNNING trial whose worker process (on this host) is gone: killed with its launch."""
    try:
        w = json.loads(worker_file(out, trial_id, 0).read_text())
    except (OSError, ValueError):
        return False
    if w.get("host") != socket.gethostname():  # another node: its processes are not visible here
        return False
    try:
        os.kill(int(w["pid"]), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, KeyError, ValueError, TypeError):
        return False
    return False


def summary_lines(out: Path, echo: Callable[[str], None] = print) -> None:
    import pandas as pd

    df = status_table(out)
    if df.empty:
        echo("no trials recorded yet")
        return
    with pd.option_context("display.max_columns", 20, "display.width", 160, "display.max_colwidth", 60):
        echo(df.to_string(index=False))
