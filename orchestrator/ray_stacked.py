"""Stacked groups under Ray (`resources.stack: K` without --local, issue 11).

    run_tune -> tune_units(study, todo): the groups of orchestrator/stacking.py, each one Tune trial
      -> ray_runner.run_unit -> drive_group(study, members, fit): each member's RUNNING row,
         MLflow child run and outcome, as under --local
           fit = TorchTrainer(ray_stacked_worker, ONE worker): train_stacked over the members,
                 each with its own GroupMemberHooks (records, snapshots, sample grids: TrialHooks)

One worker: train_stacked is a single process (no DDP), so resources.workers_per_trial applies
to the trials that train alone; run_tune says so. A member that diverges is FAILED with its
DivergedError and leaves the group (train_stacked); the others go on.

Checkpoints: Ray Train takes one report per step per worker, so the members do not report
(GroupMemberHooks.on_eval_all_ranks does nothing); after all evaluations of a step,
train_stacked's on_group_eval (GroupCheckpoint) reports ONE checkpoint: group.json (step,
members) and <trial id>.pt, each member's TrainState-format state (weights, EMA, Adam, noise
and dropout RNG, epoch bookkeeping), for every member still training. After each report, a
member's trial_files/<id>/ray_checkpoint.json points at its state there.

Restarts and resume: a worker restart (FailureConfig) or a resume of the same group (its Tune
name is derived from its members' ids, so it is the same Ray Train run) restores from
ray.train.get_checkpoint(); a member whose summary.json says FAILED, or that reached its last
step, stays out. On `studyctl resume` the groups are recomputed from the unfinished trials (as
--local does); a group whose members' pointers are at different steps runs its members alone,
each one as a group of one resuming from its pointer (a trial with no pointer runs as a plain
trial, `run_trial`), and a trial that trained alone before (its own Ray Train run) stays alone.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from diffusion_core.training.stacked import MemberState, train_stacked
from diffusion_core.training.engine import TrainContext

from records.atomic import write_json
from records.layout import (checkpoint_name, group_manifest_file, group_member_state_file, ray_checkpoint_pointer,
                            ray_train_dir, worker_file)

from .plan import Plan, Trial
from .stacked_worker import build_members, group_options
from .status import read_summary
from .worker import TrialHooks, TrialTask

@dataclass(frozen=True)
class Unit:
    """One Tune trial: a plain trial (stacked=False, name = its trial id) or a stacked group."""
    name: str
    trials: tuple[Trial, ...]
    stacked: bool


def group_name(trials: list[Trial] | tuple[Trial, ...]) -> str:
    """The Tune trial / Ray Train run name of a group: its first member's id, how many more, and a
    hash of all ids (another membership is another run; the same one resumes the same run)."""
    ids = [t.trial_id for t in trials]
    return f"{ids[0]}+{len(ids) - 1}-{hashlib.sha1('+'.join(ids).encode()).hexdigest()[:6]}"


def read_pointer(out: Path, trial_id: str) -> dict | None:
    """The member's latest group checkpoint ({"run", "step", "state"}), if its state file is there."""
    try:
        p = json.loads(ray_checkpoint_pointer(out, trial_id).read_text())
    except (OSError, ValueError):
        return None
    return p if (Path(out) / p["state"]).is_file() else None


def tune_units(out: Path, plan: Plan, todo: list[str], echo: Callable[[str], None]) -> list[Unit]:
    """The trials `todo` as Tune trials: with resources.stack > 1 the groups of stack_groups
    (module docstring: which run alone on resume); else one per trial."""
    from .stacking import stack_groups

    if plan.spec.resources.stack == 1:
        return [Unit(tid, (plan.trial(tid),), False) for tid in todo]
    units = []
    for group in stack_groups(plan, todo):
        pointers = {t.trial_id: read_pointer(out, t.trial_id) for t in group}
        steps = {p["step"] if p else 0 for p in pointers.values()}
        trained_alone = [t.trial_id for t in group if (ray_train_dir(out) / t.trial_id).exists()]
        if len(group) > 1 and len(steps) == 1 and not trained_alone:
            units.append(Unit(group_name(group), tuple(group), True))
            continue
        if len(group) > 1:
            echo(f"trials {', '.join(t.trial_id for t in group)} resume from different checkpoints: each runs alone")
        units += [Unit(group_name([t]), (t,), True) if pointers[t.trial_id] else Unit(t.trial_id, (t,), False)
                  for t in group]
    return units


class GroupMemberHooks(TrialHooks):
    """A member's TrialHooks under Ray: its records as a trial alone; its state goes into the
    group's one checkpoint per step (GroupCheckpoint) instead of a report of its own."""

    def on_eval_all_ranks(self, ctx: TrainContext) -> None:
        pass


class GroupCheckpoint:
    """train_stacked's on_group_eval under Ray: one report per evaluation step of the group."""

    def __init__(self, run: str, out: Path, hooks: dict[str, TrialHooks]):
        self.run, self.out, self.hooks = run, Path(out), hooks

    def __call__(self, step: int, states: dict[str, MemberState]) -> None:
        import ray.train

        metrics = {"step": step, "members_training": len(states)}
        if not states:
            ray.train.report(metrics)
            return
        for tid in states:  # a member that did not evaluate now: its rows so far, before the checkpoint
            self.hooks[tid].flush(step)
        name = checkpoint_name(step)
        tmp = Path(tempfile.mkdtemp(prefix=f"ckpt-{self.run}-"))
        try:
            for tid, state in states.items():
                torch.save(state.state_dict(), group_member_state_file(tmp, tid))
            group_manifest_file(tmp).write_text(json.dumps({"run": self.run, "step": step, "members": list(states)}))
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(tmp)),
                             checkpoint_dir_name=name)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        # after the report: the checkpoint is in storage (a pointer may lag it, never lead it)
        for tid in states:
            state_file = group_member_state_file(ray_train_dir(self.out) / self.run / name, tid).relative_to(self.out)
            write_json(ray_checkpoint_pointer(self.out, tid), {"run": self.run, "step": step, "state": str(state_file)})


def training_ended(out: Path, trial_id: str) -> bool:
    """The member diverged (FAILED) or reached its last step in an earlier try: it stays out."""
    s = read_summary(out, trial_id)
    return s.get("status") == "FAILED" or (s.get("step") is not None and s.get("step") == s.get("total_steps"))


def _load_group(d: Path, trial_ids: list[str], not_before: int) -> dict[str, dict] | None:
    """The members' states from one group checkpoint folder, if it holds them all and is not older."""
    try:
        held = json.loads(group_manifest_file(d).read_text())
    except (OSError, ValueError):
        return None
    if not set(trial_ids) <= set(held["members"]) or held["step"] < not_before:
        return None
    return {tid: torch.load(group_member_state_file(d, tid), weights_only=True, map_location="cpu") for tid in trial_ids}


def restore_states(out: Path, trial_ids: list[str], ckpt) -> dict[str, dict | None]:
    """Each member's resume state: Ray's checkpoint of this run if it holds them all and is not
    older than their pointers; else the folder of the newest pointer, if it holds them all (a worker
    killed while writing the pointers, before Ray registered that checkpoint: the folder is complete
    in storage, the pointers come after the report); else each member's pointer (None: from the start)."""
    pointers = {tid: read_pointer(out, tid) for tid in trial_ids}
    newest = max((p for p in pointers.values() if p), key=lambda p: p["step"], default=None)
    not_before = newest["step"] if newest else 0
    if ckpt is not None:
        with ckpt.as_directory() as d:
            states = _load_group(Path(d), trial_ids, not_before)
        if states is not None:
            return states
    if newest is not None:
        states = _load_group((Path(out) / newest["state"]).parent, trial_ids, not_before)
        if states is not None:
            return states
    return {tid: torch.load(Path(out) / p["state"], weights_only=True, map_location="cpu") if p else None
            for tid, p in pointers.items()}


def ray_stacked_worker(config: dict) -> None:
    """TorchTrainer's train_loop_per_worker of a group (config: {"tasks": [TrialTask], "run": name})."""
    import ray
    import ray.train
    import ray.train.torch

    run, out = config["run"], config["tasks"][0].study_dir
    tasks: list[TrialTask] = [t for t in config["tasks"] if not training_ended(out, t.trial.trial_id)]
    if not tasks:
        return
    for task in tasks:
        write_json(worker_file(out, task.trial.trial_id, 0),
                   {"rank": 0, "pid": os.getpid(), "node_id": ray.get_runtime_context().get_node_id(),
                    "host": socket.gethostname(), "world_size": 1, "group": run})
    states = restore_states(out, [t.trial.trial_id for t in tasks], ray.train.get_checkpoint())
    members, hooks = build_members(tasks, states, GroupMemberHooks)
    train_stacked(members, device=ray.train.torch.get_device(), on_group_eval=GroupCheckpoint(run, out, hooks),
                  **group_options(tasks))
