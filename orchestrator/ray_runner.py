"""The trials as a Ray Tune sweep, each trial driving a Ray Train TorchTrainer.

    run_tune(study, todo)                  (launcher process)
      -> tune.Tuner(run_unit, param_space={"trial_id": grid_search(unit names)})
           run_unit(config, study, units)  (a Tune trial: a light driver actor, 0 CPU)
             -> run_trial: drive_trial(study, trial, fit): TorchTrainer(train_worker, N DDP workers,
                FailureConfig(max_failures))
             -> or, resources.stack > 1, a stacked group (ray_stacked.py): drive_group(study, members,
                fit): TorchTrainer(ray_stacked_worker, 1 worker)

The plan travels to the drivers once, through tune.with_parameters (Ray's object store);
Tune's config holds only the trial id, so its tables stay readable. Trial ids are
deterministic (plan.trial_id): `resume` skips finished trials and Ray Train finds the
checkpoints of an interrupted trial (same run name, same storage).
"""
from __future__ import annotations

import logging
import math
import os
import time
from typing import Callable

from records.layout import ray_train_dir, ray_tune_dir

from .driver import SetupError, StudyRun, TrialFailed, TrialStopped, drive_group, drive_trial, record_outcome
from .ray_stacked import Unit, ray_stacked_worker, tune_units
from .status import read_summary, statuses
from .worker import train_worker


def run_trial(config: dict, study: StudyRun) -> None:
    """One Tune trial: drive a TorchTrainer for the trial `config["trial_id"]` of the plan."""
    workers = study.plan.spec.resources.workers_per_trial
    drive_trial(study, study.plan.trial(config["trial_id"]),
                lambda task: fit_trainer(study, train_worker, {"task": task}, task.trial.trial_id, workers))


def run_unit(config: dict, study: StudyRun, units: dict[str, Unit]) -> None:
    """One Tune trial: a trial alone (run_trial), or a stacked group in one TorchTrainer worker
    (ray_stacked.py) with each member recorded as its own trial; raises if any member failed."""
    unit = units[config["trial_id"]]
    if not unit.stacked:
        run_trial(config, study)
        return
    errors = drive_group(study, list(unit.trials), lambda tasks: fit_trainer(
        study, ray_stacked_worker, {"tasks": tasks, "run": unit.name}, unit.name, 1))
    failed = [f"{t.trial_id}: {e}" for t, e in zip(unit.trials, errors) if e]
    if failed:
        raise TrialFailed(f"group {unit.name}: {'; '.join(failed)}")


def fit_trainer(study: StudyRun, loop: Callable[[dict], None], loop_config: dict, name: str, workers: int) -> None:
    """A Ray Train TorchTrainer of `workers` workers running `loop`, its run `name` in the study's storage."""
    import ray
    from ray.exceptions import ActorDiedError
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    r = study.plan.spec.resources
    # Set in this driver process: Ray Train hands it to the controller it starts (a user's value wins).
    os.environ.setdefault(WORKER_GROUP_START_TIMEOUT_ENV, str(WORKER_GROUP_START_TIMEOUT_S))
    use_gpu = r.gpus_per_worker > 0
    per_worker = {"CPU": r.cpus_per_worker}
    if use_gpu:
        per_worker["GPU"] = r.gpus_per_worker
    trainer = TorchTrainer(
        loop, train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu, resources_per_worker=per_worker,
                                     placement_strategy=r.placement_strategy),
        run_config=RunConfig(name=name, storage_path=str(ray_train_dir(study.out)),
                             failure_config=FailureConfig(max_failures=r.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=r.keep_checkpoints),
                             callbacks=[TuneReportCallback()]))
    try:
        trainer.fit()
    except ActorDiedError as e:
        if ended_by_tune(str(e), ray.get_runtime_context().get_worker_id()):
            raise TrialStopped(f"{name}: the scheduler ended this trial's driver") from e
        raise


def ended_by_tune(actor_died_message: str, worker_id: str) -> bool:
    """Whether an ActorDiedError says the TorchTrainer's controller died because Tune is ending
    this trial (ASHA stopped it), not because training failed. Ray says so in one of two ways:
    - its owner, this driver process (`worker_id`), is exiting: "The actor is dead because its owner
      has died. Owner Id: <worker id> ...";
    - the trial's placement group, which the controller runs in, was removed: "... Destroying worker
      since its placement group was removed." Tune removes it only when it ends the trial.
    Either way the driver must record nothing: were it to record FAILED after the launch reconciled
    the stopped trials (reconcile_asha), the row would stay FAILED (seen once on an idle machine)."""
    return ("owner has died" in actor_died_message and f"Owner Id: {worker_id}" in actor_died_message) or \
        "its placement group was removed" in actor_died_message


def concurrency(study_resources, n_todo: int, workers: int | None = None) -> int:
    """Trials at a time: what the Ray cluster fits (or resources.max_concurrent_trials); a trial
    has `workers` workers (default resources.workers_per_trial; a stacked group has 1)."""
    import ray

    r = study_resources
    workers = workers or r.workers_per_trial
    res = ray.cluster_resources()
    fit = math.floor(res.get("CPU", 1) / (workers * r.cpus_per_worker))
    if r.gpus_per_worker > 0:
        fit = min(fit, math.floor(res.get("GPU", 0) / (workers * r.gpus_per_worker)))
    if fit < 1:
        raise SetupError(
            f"one trial needs {workers} x (CPU {r.cpus_per_worker}, GPU {r.gpus_per_worker}) but the "
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
        # One machine is never preempted: without Ray Train's PreemptionWatcher each trial starts
        # one process fewer (8 -> 7 Ray processes per trial; each start imports Ray). Set here,
        # before the local Ray starts, so its processes inherit it; a user's own value wins.
        os.environ.setdefault(PREEMPTION_WATCHER_ENV, "0")
        ray.init(num_cpus=os.cpu_count() or 1, include_dashboard=False, log_to_driver=True,
                 runtime_env={"worker_process_setup_hook": quiet_placement_group_cleaner})


PREEMPTION_WATCHER_ENV = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"

# How long a trial's worker group may wait for its resources (its placement group). Ray Train's
# default, 60 s, is short on a loaded machine, where the resources a finished trial frees, or the
# CPUs other processes hold, can take longer: the controller then tears the group down and starts
# it again. A stuck start still ends: `concurrency` refuses a cluster too small for one trial, and
# Ray refuses a request no node could hold, so only a busy cluster waits this long.
WORKER_GROUP_START_TIMEOUT_ENV = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"
WORKER_GROUP_START_TIMEOUT_S = 900.0


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


def run_tune(study: StudyRun, todo: list[str], address: str | None, echo: Callable[[str], None]) -> None:
    """The trials `todo` (ids) as a Ray Tune sweep, each driving a Ray Train TorchTrainer."""
    import ray
    from ray import tune

    spec = study.plan.spec
    r = spec.resources
    units = tune_units(study.out, study.plan, todo, echo)
    if any(u.stacked for u in units) and r.workers_per_trial > 1:
        echo(f"resources.stack={r.stack}: each stacked group trains in ONE Ray Train worker (train_stacked is "
             f"one process); resources.workers_per_trial={r.workers_per_trial} applies to the trials alone")
    init_ray(address or spec.ray_address)
    try:
        # a stacked group counts as one trial of one worker
        conc = concurrency(r, len(units), None if any(not u.stacked for u in units) else 1)
        echo(f"Ray: {ray.cluster_resources()}; up to {conc} trial(s) at a time"
             + (f"; {sum(u.stacked for u in units)} stacked group(s)" if r.stack > 1 else ""))
        scheduler = None
        if spec.sweep is not None and spec.sweep.asha is not None:
            a = spec.sweep.asha
            scheduler = tune.schedulers.ASHAScheduler(
                metric=a.metric, mode=a.mode, time_attr="training_iteration", grace_period=a.grace_period,
                reduction_factor=a.reduction_factor, max_t=a.max_t)
        outcome = _tune_outcome()
        tuner = tune.Tuner(
            # A driver only waits for its TorchTrainer: it holds a token of memory, no CPU, so the
            # workers get every CPU (Tune refuses an all-zero request).
            tune.with_resources(tune.with_parameters(run_unit, study=study, units={u.name: u for u in units}),
                                {"cpu": 0, "memory": 32 * 1024 ** 2}),
            # a Tune trial's name: its trial id, or its group's name (ray_stacked.group_name)
            param_space={"trial_id": tune.grid_search([u.name for u in units])},
            tune_config=tune.TuneConfig(max_concurrent_trials=conc, scheduler=scheduler,
                                        trial_name_creator=lambda t: t.config["trial_id"],
                                        trial_dirname_creator=lambda t: t.config["trial_id"]),
            run_config=tune.RunConfig(name=f"tune-{time.strftime('%Y%m%d-%H%M%S')}",
                                      storage_path=str(ray_tune_dir(study.out)),
                                      failure_config=tune.FailureConfig(max_failures=0), verbose=1,
                                      callbacks=[outcome]))
        # Ctrl-C should stop the launch now, as under --local (launch records the interruption);
        # Tune's own handler would instead wind the sweep down and return as if it had ended.
        os.environ.setdefault("TUNE_DISABLE_SIGINT_HANDLER", "1")
        tuner.fit()  # trial errors are in our records (and Tune's table above)
    finally:
        if not address and not spec.ray_address:
            ray.shutdown()
    reconcile_asha(study, ran=todo, tune_errored=outcome.errored)


def _tune_outcome():
    """A Tune callback noting which trials Tune itself saw fail (their driver raised TrialFailed).
    Built on call: Ray is imported lazily so that `studyctl --help` stays fast."""
    from ray.tune import Callback

    class TuneOutcome(Callback):
        def __init__(self):
            self.errored: set[str] = set()

        def on_trial_error(self, iteration, trials, trial, **info):
            self.errored.add(trial.config["trial_id"])

    return TuneOutcome()


def reconcile_asha(study: StudyRun, ran: list[str], tune_errored: set[str]) -> None:
    """Record the trials a scheduler (ASHA) stopped: they never reach their driver's end.

    When ASHA stops a trial, Tune ends its driver's process, and the TorchTrainer it owns dies with
    it. The driver is either killed before it records anything or sees its trainer die first and
    raises TrialStopped, recording nothing (fit_trainer): its row stays RUNNING. (Were the trainer
    to die first for another reason, the driver records FAILED; that row is reconciled too.) Tune's
    own verdict decides: a trial Tune did not see fail was stopped by the scheduler, possibly at its very last step (reports reaching
    max_t), and a trial whose training finished is COMPLETED whoever ended its driver."""
    from records.parquet import read_table

    spec = study.plan.spec
    if spec.sweep is None or spec.sweep.asha is None:
        return
    trials = read_table(study.out, "trials")
    known = statuses(study.out)
    run_ids = {} if trials.empty else dict(zip(trials["trial_id"], trials["mlflow_run_id"]))
    for tid in ran:
        if tid in tune_errored or known.get(tid) not in ("RUNNING", "FAILED"):
            continue
        s = read_summary(study.out, tid)
        finished = s.get("step") is not None and s.get("step") == s.get("total_steps")
        record_outcome(study, study.plan.trial(tid), s, "COMPLETED" if finished else "STOPPED",
                       None if finished else f"stopped early by ASHA at step {s.get('step')}",
                       run_ids.get(tid), "FINISHED" if finished else "KILLED")
