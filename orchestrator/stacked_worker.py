"""A group of trials trained as one stacked model in this process (`--local`, resources.stack).

The members' records are each trial's own, written by the same `LocalTrialHooks` as a trial
run alone (Parquet parts, MLflow metrics, EMA snapshots, sample grids, summary.json, and the
resume file trial_files/<id>/resume.pt): diffusion_core.training.stacked calls each member's hooks with
a context of that member's own model, EMA, schedule, splits and state. A member whose loss
diverges gets `on_diverged` (its summary.json says FAILED with the DivergedError) and leaves
the group; the others go on. Each member's wall_seconds is the group's: they trained at once.

Resume: each member restarts from its own resume file. train_stacked needs every member at
one step, so the runner stacks a group again only if its resume files agree
(`resume_steps`); otherwise its members run alone, each from its own file.
"""
from __future__ import annotations

import torch

from diffusion_core.capabilities import Member
from diffusion_core.data import load_splits
from diffusion_core.training.stacked import train_stacked

from .stacking import member
from .worker import LocalTrialHooks, TrialHooks, TrialTask, restarts_so_far, write_local_worker_file


def resume_steps(resume_files) -> set[int]:
    """The steps of the members' resume files (layout.resume_file; 0: none yet)."""
    return {LocalTrialHooks.load_resume_file(f)[1] for f in resume_files}


def stacked_worker(tasks: list[TrialTask], device: str | torch.device) -> None:
    """train_stacked over the tasks' trials, each with its own LocalTrialHooks."""
    states = {}
    for task in tasks:
        write_local_worker_file(task, device)
        states[task.trial.trial_id] = LocalTrialHooks.load_resume_file(task.resume_file)[0]
    members, _ = build_members(tasks, states, LocalTrialHooks)
    train_stacked(members, device=device, **group_options(tasks))


def group_options(tasks: list[TrialTask]) -> dict:
    """train_stacked's group-wide arguments, from the members' trials (both stacked workers)."""
    return dict(eval_seed=tasks[0].trial.evaluation.seed,          # equal across a group (stacking.can_stack)
                cuda_graph=tasks[0].trial.training.cuda_graph,     # equal across a group (check_stackable)
                deferred_sync=all(t.trial.training.deferred_sync for t in tasks))  # when hooks see losses, not what


def build_members(tasks: list[TrialTask], states: dict[str, dict | None],
                  hooks_class: type[TrialHooks]) -> tuple[list[Member], dict[str, TrialHooks]]:
    """The train_stacked members of the tasks, each resuming from `states[trial_id]` (None: from
    the start) with its own hooks (returned by trial id)."""
    members, hooks_of, splits_of = [], {}, {}
    for task in tasks:
        tid, resume_state = task.trial.trial_id, states.get(task.trial.trial_id)
        step = int(resume_state["step"]) if resume_state is not None else 0
        hooks = hooks_of[tid] = hooks_class(task, 0, step, restarts_so_far(task, resume_state))
        data = task.trial.data
        if data not in splits_of:  # seeds of one data config share its tensors
            splits_of[data] = load_splits(data)
        members.append(member(task.trial, hooks=hooks, splits=splits_of[data], resume_state=resume_state))
    return members, hooks_of
