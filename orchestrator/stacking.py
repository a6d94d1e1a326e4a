"""Which trials of a plan train together as one stacked model (`resources.stack: K`, issue 11).

diffusion_core.training.stacked.train_stacked trains K members in one process as one model;
diffusion_core.capabilities.check_stackable says which members may share it: the same U-Net and batch size, and nothing
a group cannot honour (diffusion_core.capabilities.SUPPORT's "stacked" refusals, e.g. compile).
On top of that, the members of one group here share what train_stacked takes once for all of
them: the evaluation seed (the fixed validation draws) and Adam's betas and eps.

Groups are formed in plan order, first fit: each trial joins the first open group (fewer
than K members) it can share, else opens a new one. A trial that fits no group trains
alone, exactly as with stack: 1.
"""
from __future__ import annotations

from diffusion_core.capabilities import Member, check_stackable, refusals

from .plan import Plan, Trial


def member(trial: Trial, **kw) -> Member:
    """The train_stacked member of a trial (its configs; hooks, splits, resume state in `kw`)."""
    return Member(trial.training, trial.model, trial.data, trial.diffusion, name=trial.trial_id,
                  evaluation=trial.evaluation, **kw)


def can_stack(trials: list[Trial]) -> bool:
    first = trials[0]
    if any(t.evaluation.seed != first.evaluation.seed or t.training.adam_betas != first.training.adam_betas
           or t.training.adam_eps != first.training.adam_eps for t in trials):
        return False
    try:
        check_stackable([member(t) for t in trials])
    except ValueError:
        return False
    return True


def stack_groups(plan: Plan, trial_ids: list[str] | None = None) -> list[list[Trial]]:
    """The trials (all, or those of `trial_ids`, in plan order) in groups of at most
    resources.stack; a group of one trains alone."""
    k = plan.spec.resources.stack
    wanted = None if trial_ids is None else set(trial_ids)
    groups: list[list[Trial]] = []
    for t in plan.trials:
        if wanted is not None and t.trial_id not in wanted:
            continue
        home = next((g for g in groups if len(g) < k and can_stack(g + [t])), None) if k > 1 else None
        if home is None:
            groups.append([t])
        else:
            home.append(t)
    return groups


def describe(groups: list[list[Trial]], k: int) -> str:
    """What `studyctl validate` prints about the grouping."""
    stacked = [g for g in groups if len(g) > 1]
    alone = sum(len(g) == 1 for g in groups)
    lines = [f"resources.stack={k}: {len(stacked)} stacked group(s), {alone} trial(s) alone"]
    lines += [f"  group {i}: {', '.join(t.trial_id for t in g)}" for i, g in enumerate(stacked)]
    for g in groups:  # what a stacked group cannot honour (diffusion_core.capabilities) keeps a trial alone
        found = refusals("stacked", member(g[0])) if len(g) == 1 else []
        if found:
            lines.append(f"  {g[0].trial_id} alone: {'; '.join(message for _, message in found)}")
    return "\n".join(lines)
