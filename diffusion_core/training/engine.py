"""The one training loop. A run alone (train.py) is a group of one; K trials stacked into one model
(stacked.py) are a group of K. Both build a Group — what one optimizer step of every member is and
where the members' numbers live — and hand it to `run_group`, which owns everything a step does
around it: which losses are logged and when they are fetched, the epoch-end records, evaluations,
divergence, the members leaving, and every hook call. A feature of the loop therefore exists once.

    run_group(group)
      each step:  group.step_val_losses()                 Fig. 26b's validation minibatch, early logged steps
                  group.train_step()                      one optimizer step of every member
                  logged losses -> hooks.on_step          (fetched at once when deferred_sync)
                  epoch end -> EpochLosses -> on_epoch    (validation.py's fixed draws)
                  evaluation -> on_eval, on_eval_all_ranks
                  NaN / inf -> on_diverged, the member leaves FAILED; last step -> on_end, FINISHED

Under DDP (a group of one, every rank) the group averages what it fetches over the ranks, and hooks
run on rank 0 only (on_eval_all_ranks on every rank).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Protocol

import torch
import torch.nn as nn

from ..config import TrainConfig
from ..diffusion.schedules import NoiseSchedule


def validates_at(training: TrainConfig, step: int, epoch_steps: int, total_steps: int) -> bool:
    """Whether the epoch ending at `step` computes its evaluation-mode losses (TrainConfig.val_every):
    a function of the step only, so a resumed run agrees."""
    n = training.val_every
    return n is None or step == total_steps or step // n > (step - epoch_steps) // n


def logs_at(training: TrainConfig, step: int) -> bool:
    """Whether the loss of `step` is logged (Fig. 26b: every step at first, then every log_every)."""
    return step <= training.log_every_first or step % training.log_every == 0


def val_logs_at(training: TrainConfig, step: int) -> bool:
    """Whether `step` records its validation minibatch loss beside its logged training loss (Fig. 26b)."""
    return step <= training.val_loss_first and logs_at(training, step)


def evaluates_at(training: TrainConfig, step: int, total_steps: int) -> bool:
    """Whether hooks.on_eval runs after `step`: every eval_every steps from eval_start, and at the last."""
    return step == total_steps or (step >= training.eval_start and step % training.eval_every == 0)


class DivergedError(RuntimeError):
    """The loss became NaN or infinite: the run cannot continue."""

    @classmethod
    def at_step(cls, value: float, step: int, epoch_steps: int) -> "DivergedError":
        return cls(f"training loss became {value} at step {step} (epoch {step / epoch_steps:.2f}); "
                   f"lower the learning rate or check the data")

    @classmethod
    def in_epoch(cls, value: float, epoch: int, step: int) -> "DivergedError":
        return cls(f"training loss became {value} in epoch {epoch} (step {step}); "
                   f"lower the learning rate or check the data")


@dataclass
class TrainContext:
    """What hooks see: the live objects of the run (read them, don't replace them)."""
    step: int
    epoch: float
    model: nn.Module                 # raw weights (unwrapped from DDP)
    ema_model: nn.Module             # EMA weights, eval mode
    schedule: NoiseSchedule
    splits: Any                      # data.Splits (train subset + validation)
    device: torch.device
    rank: int
    world_size: int
    steps_per_epoch: int
    total_steps: int
    state: Any                       # train.TrainState, or a stacked member's stacked_state.MemberState
    # The run's evaluation.Evaluator (train(evaluation=...), Member.evaluation), built once by the engine
    # (Evaluator.of_run); None without an evaluation config.
    evaluator: Any = None
    # During on_eval of a stacked member: its samples of this evaluation, drawn with the group's other
    # members in one pass (evaluation.DrawnSamples; pass them to Evaluator.evaluate). None: the hook samples.
    eval_samples: Any = None


class TrainHooks(Protocol):  # every method optional; called on rank 0 only unless noted
    def on_start(self, ctx: TrainContext) -> None: ...
    def on_step(self, ctx: TrainContext, loss: float) -> None: ...  # with val_loss=<float> where the step
    #   recorded its validation minibatch loss (TrainConfig.val_loss_first)
    def on_epoch(self, ctx: TrainContext, losses: "EpochLosses") -> None: ...
    def on_eval(self, ctx: TrainContext) -> None: ...
    def on_eval_all_ranks(self, ctx: TrainContext) -> None: ...  # every rank, after on_eval (collectives
    #   such as a checkpoint that each DDP rank must report, e.g. ray.train.report, belong here)
    def on_diverged(self, err: DivergedError) -> None: ...  # the run's loss became NaN/inf; it ends FAILED
    def on_end(self, ctx: TrainContext) -> None: ...


@dataclass(frozen=True)
class EpochLosses:
    """The losses at an epoch's end. `train` is what the optimizer saw (a running mean over the
    epoch's steps, raw weights in train mode: dropout on, the weights moving); the three
    evaluation-mode numbers use fixed (t, eps) draws of the evaluation seed, so they compare like
    with like: train_eval vs val_raw is the generalization gap of the raw weights, val_raw vs val
    the effect of averaging (and of the EMA's lag while ema_init_share is large)."""
    epoch: int
    step: int
    train: float                     # mean step loss over the epoch (dropout on)
    val: float | None                # EMA weights, eval mode, fixed validation draws
    val_raw: float | None            # raw weights, eval mode, the same validation draws
    train_eval: float | None         # raw weights, eval mode, fixed draws on a fixed training batch
    ema_init_share: float            # the initial weights' share of the EMA (lambda^k without warm-up)


class Run:
    """One member's place in the loop: its schedule of logs / epochs / evaluations, its hooks and
    context, what it has recorded and how it ended (status RUNNING | FINISHED | FAILED)."""

    def __init__(self, name: str, training: TrainConfig, hooks, ctx: TrainContext, is_main: bool = True):
        self.name, self.training, self.hooks, self.ctx, self.is_main = name, training, hooks, ctx, is_main
        self.epoch_steps, self.total = ctx.steps_per_epoch, ctx.total_steps
        self.train_losses: list[tuple[int, float]] = []
        self.val_losses: list[tuple[int, float]] = []   # (step, validation minibatch loss): val_loss_first
        self.epoch_losses: list[EpochLosses] = []
        self.status, self.error, self.diverged = "RUNNING", None, None
        self.end_step, self.end_time = None, None   # the step and time.time() at which it ended

    def call(self, group: "Group", name: str, *args, step: int | None = None, all_ranks: bool = False,
             **kwargs) -> None:
        """A hook of this member (rank 0 only unless all_ranks); `step`: the step a fetched loss belongs to."""
        fn = getattr(self.hooks, name, None) if self.hooks is not None else None
        if fn is None or not (self.is_main or all_ranks):
            return
        step = group.step if step is None else step
        self.ctx.step, self.ctx.epoch = step, step / self.epoch_steps
        group.refresh(self)
        fn(*args) if name == "on_diverged" else fn(self.ctx, *args, **kwargs)

    def logs_at(self, step: int) -> bool:
        return logs_at(self.training, step)

    def val_logs_at(self, step: int) -> bool:
        return val_logs_at(self.training, step)

    def should_eval(self, step: int) -> bool:
        return evaluates_at(self.training, step, self.total)


class Group(Protocol):
    """What run_group needs of a group (train.SingleGroup, stacked._Group)."""
    runs: list[Run]                  # the members still training, in row order
    step: int                        # optimizer steps taken (every member is at it)
    device: torch.device
    graphed: Any                     # its CUDA-graph step (whose output the next replay overwrites), or None

    def train_step(self) -> torch.Tensor: ...  # one step of every member: (K,) losses on the device; adds
    #   them to the epoch sums. With a CUDA graph a static output the next step overwrites.
    def step_val_losses(self) -> torch.Tensor: ...  # (K,) validation minibatch losses (validation.StepValDraws)
    #   of the step about to be taken, at the weights its training loss sees; on the device
    def fetch(self, losses: list[torch.Tensor]) -> list[list[float]]: ...   # pending (K,) losses -> floats
    def epoch_train_losses(self, runs: list[Run]) -> list[float]: ...       # each member's epoch mean loss
    def reset_epoch(self, run: Run) -> None: ...
    def epoch_eval_losses(self, run: Run) -> tuple[float, float, float]: ...  # (val, val_raw, train_eval)
    def init_share(self, run: Run) -> float: ...
    def refresh(self, run: Run) -> None: ...   # the member's modules hold its current weights (before a hook)
    def after_eval(self) -> None: ...
    def keep(self, runs: list[Run]) -> None: ...  # only these members go on


def run_group(group: Group, *, deferred_sync: bool = False, bar=None,
              before_evals: Callable[[list[Run]], None] | None = None,
              on_group_eval: Callable[[int, dict[str, Any]], None] | None = None) -> None:
    """Train every member of `group` to its last step (or its divergence), calling its hooks.

    deferred_sync: fetch logged losses (one device sync for all members) only every `log_every` steps,
    at epoch ends, evaluations and a member's last step; hooks see the same calls, later.
    bar:           a tqdm bar to advance per step (a run alone, with progress).
    before_evals:  called with the members evaluating at a step before their on_eval (a stacked group
                   draws their samples in one pass there).
    on_group_eval: called once per step at which any member evaluated, after their hooks, with the
                   state of each member still training, by name (one checkpoint of a stacked group)."""
    runs = list(group.runs)
    pending: list[tuple[int, torch.Tensor]] = []   # (step, (K,) losses) of logged steps, not yet fetched
    pending_val: list[tuple[int, torch.Tensor]] = []   # (step, (K,) validation minibatch losses), likewise
    log_every = runs[0].training.log_every
    eval_device = [group.device] if group.device.type == "cuda" else []

    def finish(run: Run, status: str, error: str | None = None) -> None:
        run.status, run.error, run.end_step, run.end_time = status, error, group.step, time.time()
        group.refresh(run)

    def diverge(run: Run, err: DivergedError) -> None:
        run.diverged = err
        run.call(group, "on_diverged", err)
        finish(run, "FAILED", f"DivergedError: {err}")

    def flush() -> None:
        """One fetch: the pending losses of all members; on_step in step order; NaN -> FAILED."""
        if not pending:
            return
        fetched = group.fetch([v for _, v in pending] + [v for _, v in pending_val])  # one sync for both
        vals = dict(zip((s for s, _ in pending_val), fetched[len(pending):]))
        for (step, _), row_values in zip(pending, fetched[:len(pending)]):
            for i, (r, value) in enumerate(zip(group.runs, row_values)):
                if r.status != "RUNNING" or not r.logs_at(step):
                    continue
                if not math.isfinite(value):
                    diverge(r, DivergedError.at_step(value, step, r.epoch_steps))
                    continue
                r.train_losses.append((step, value))
                if step in vals and r.val_logs_at(step):
                    r.val_losses.append((step, vals[step][i]))
                    r.call(group, "on_step", value, step=step, val_loss=vals[step][i])
                else:
                    r.call(group, "on_step", value, step=step)
        pending.clear()
        pending_val.clear()

    for r in runs:
        r.call(group, "on_start")
    for r in runs:  # resumed at its last step already: nothing to train
        if group.step >= r.total:
            r.call(group, "on_end")
            finish(r, "FINISHED")
    group.keep([r for r in runs if r.status == "RUNNING"])
    while group.runs:
        if any(r.val_logs_at(group.step + 1) for r in group.runs):  # before the update, as the step's loss
            pending_val.append((group.step + 1, group.step_val_losses()))
        loss = group.train_step()
        step = group.step
        if any(r.logs_at(step) for r in group.runs):  # a graph's output is overwritten by the next replay
            pending.append((step, loss.detach().clone() if group.graphed is not None else loss.detach()))
        ends = [r for r in group.runs if step % r.epoch_steps == 0 or step == r.total]
        evals = [r for r in group.runs if r.should_eval(step)]
        if not deferred_sync or ends or evals or step % log_every == 0:
            flush()
        if bar is not None:
            bar.update(1)
            if group.runs[0].logs_at(step) and group.runs[0].train_losses:
                bar.set_postfix(loss=f"{group.runs[0].train_losses[-1][1]:.4f}",
                                epoch=f"{step / group.runs[0].epoch_steps:.2f}")
        live = [r for r in ends if r.status == "RUNNING"]
        if live:
            for r, train_loss in zip(live, group.epoch_train_losses(live)):
                if not math.isfinite(train_loss):
                    diverge(r, DivergedError.in_epoch(train_loss, math.ceil(step / r.epoch_steps), step))
                    continue
                evaluated = (None, None, None)
                if validates_at(r.training, step, r.epoch_steps, r.total):
                    evaluated = group.epoch_eval_losses(r)
                losses = EpochLosses(math.ceil(step / r.epoch_steps), step, train_loss, *evaluated, group.init_share(r))
                r.epoch_losses.append(losses)
                r.call(group, "on_epoch", losses)
                group.reset_epoch(r)
        evaluating = [r for r in evals if r.status == "RUNNING"]
        if evaluating and before_evals is not None:
            before_evals(evaluating)
        for r in evaluating:
            # Evaluation draws from its own seeded generators, but what it builds (e.g. the metrics
            # classifier, made at the first evaluation) would consume the global RNG that drives
            # dropout: isolate it, or a resumed run leaves the uninterrupted one.
            with torch.random.fork_rng(devices=eval_device):
                r.call(group, "on_eval")
            r.call(group, "on_eval_all_ranks", all_ranks=True)
            r.ctx.eval_samples = None  # no later hook call may see this evaluation's samples
        if evals:
            group.after_eval()
            if on_group_eval is not None:
                on_group_eval(step, {r.name: r.ctx.state for r in group.runs if r.status == "RUNNING"})
        for r in group.runs:
            if r.status == "RUNNING" and step >= r.total:
                r.call(group, "on_end")
                finish(r, "FINISHED")
        if any(r.status != "RUNNING" for r in group.runs):
            flush()  # nothing may stay pending across a change of rows
            group.keep([r for r in group.runs if r.status == "RUNNING"])

