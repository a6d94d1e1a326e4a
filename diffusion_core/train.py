"""The training loop: one function, plain PyTorch, single process or DDP.

The loop is one function to read top to bottom, as in NVlabs/edm. Its configs — the dataclasses its
signature takes — live in config.py, without torch; the fixed-draw losses it records at epoch ends
(validation, raw weights, a training batch) in validation.py.

`train()` runs the thesis configuration by default (TrainConfig() + UNetConfig() +
DiffusionConfig() + DataConfig()). It works in a notebook as is; under
`torch.distributed` (the Ray Train worker in orchestrator/ calls this same function)
it wraps the model in DDP, shards each epoch across ranks and all-reduces the logged
losses. Everything around the loop — writing records, evaluating samples, checkpoints —
arrives through `hooks`, so this file knows nothing of Ray or MLflow.

Randomness: the training seed drives initialisation, data order and training noise;
validation t and eps come from `eval_seed`, identical for every trial (DESIGN.md).
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn as nn

from .capabilities import check_path
from .config import GRAPHING_COMPILE_MODES, DataConfig, DiffusionConfig, TrainConfig, UNetConfig
from .data import epoch_batches, load_splits, steps_per_epoch
from .distributed import all_mean, pick_device, rank_and_world
from .ema import EMA
from .graph_step import GraphedStep
from .losses import diffusion_loss
from .schedules import NoiseSchedule
from .validation import EpochEvalDraws
from .unet import UNet, count_parameters



def validates_at(training: TrainConfig, step: int, epoch_steps: int, total_steps: int) -> bool:
    """Whether the epoch ending at `step` computes its evaluation-mode losses (TrainConfig.val_every):
    a function of the step only, so a resumed run agrees."""
    n = training.val_every
    return n is None or step == total_steps or step // n > (step - epoch_steps) // n


def logs_at(training: TrainConfig, step: int) -> bool:
    """Whether the loss of `step` is logged (Fig. 26b: every step at first, then every log_every)."""
    return step <= training.log_every_first or step % training.log_every == 0


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
    state: "TrainState"
    # The run's evaluation.Evaluator (train(evaluation=...), Member.evaluation), built once by the engine
    # (Evaluator.of_run); None without an evaluation config.
    evaluator: Any = None
    # During on_eval of a stacked member (diffusion_core.stacked): its samples of this evaluation, drawn
    # with the group's other members in one pass (evaluation.DrawnSamples; pass them to Evaluator.evaluate).
    # None: the hook samples itself (always in train()).
    eval_samples: Any = None


class TrainHooks(Protocol):  # every method optional; called on rank 0 only unless noted
    def on_start(self, ctx: TrainContext) -> None: ...
    def on_step(self, ctx: TrainContext, loss: float) -> None: ...
    def on_epoch(self, ctx: TrainContext, losses: "EpochLosses") -> None: ...
    def on_eval(self, ctx: TrainContext) -> None: ...
    def on_eval_all_ranks(self, ctx: TrainContext) -> None: ...  # every rank, after on_eval (collectives
    #   such as a checkpoint that each DDP rank must report, e.g. ray.train.report, belong here)
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


@dataclass
class TrainState:
    """Everything needed to resume bit-for-bit: state_dicts and RNG states, no pickled modules."""
    model: nn.Module
    ema: EMA
    optimizer: torch.optim.Optimizer
    generator: torch.Generator
    step: int = 0
    epoch_loss_sum: float | torch.Tensor = 0.0   # this rank's sum of step losses in the current epoch
    epoch_loss_count: int = 0

    def state_dict(self) -> dict:
        """A snapshot: tensors are copied, so it stays valid while training goes on (a hook may keep it)."""
        state = copy.deepcopy({"model": self.model.state_dict(), "ema": self.ema.state_dict(),
                               "optimizer": self.optimizer.state_dict(), "step": self.step,
                               "generator": self.generator.get_state(), "cpu_rng": torch.get_rng_state(),
                               "epoch_loss_sum": float(self.epoch_loss_sum),
                               "epoch_loss_count": self.epoch_loss_count})
        device = next(self.model.parameters()).device
        if device.type == "cuda":  # dropout masks on a GPU come from its own generator
            state["cuda_rng"] = torch.cuda.get_rng_state(device)
        return state

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.ema.load_state_dict(state["ema"], updates_if_missing=int(state["step"]))
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = int(state["step"])
        self.generator.set_state(state["generator"].cpu() if hasattr(state["generator"], "cpu") else state["generator"])
        torch.set_rng_state(state["cpu_rng"])
        device = next(self.model.parameters()).device
        if device.type == "cuda" and state.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(state["cuda_rng"].cpu(), device)
        self.epoch_loss_sum = float(state["epoch_loss_sum"])
        self.epoch_loss_count = int(state["epoch_loss_count"])


@dataclass
class TrainResult:
    step: int
    epochs: int
    train_losses: list[tuple[int, float]]           # (step, loss) as logged
    epoch_losses: list[EpochLosses]
    model: nn.Module
    ema_model: nn.Module
    schedule: NoiseSchedule
    parameters: int
    wall_seconds: float


@dataclass(frozen=True)
class TrialConfigs:
    """The configs of one run, as capabilities.check_path reads them."""
    data: DataConfig
    model: UNetConfig
    diffusion: DiffusionConfig
    training: TrainConfig


def run_evaluator(evaluation, schedule: NoiseSchedule, splits, data: DataConfig, diffusion: DiffusionConfig,
                  device: torch.device):
    """The run's Evaluator (evaluation.Evaluator.of_run; None without an EvalConfig): one place for
    train() and every train_stacked member."""
    if evaluation is None:
        return None
    from .evaluation import Evaluator  # evaluation.py imports this module

    return Evaluator.of_run(evaluation, schedule, splits, data, diffusion.reverse_variance, device)


def build_model(model_cfg: UNetConfig, seed: int, device: torch.device) -> UNet:
    torch.manual_seed(seed)
    return UNet(model_cfg).to(device)


def noise_generator(training: TrainConfig, device: torch.device, rank: int = 0) -> torch.Generator:
    """A run's training-noise stream ((t, eps) of each step, then class-conditional label dropout), per
    rank: on the CPU, so the stream is the same on any device, or with training.device_noise on the
    training device (no host-to-device copy per step; on a GPU another stream). train() and every
    train_stacked member draw from this."""
    noise_device = device if training.device_noise else torch.device("cpu")
    return torch.Generator(noise_device).manual_seed(training.seed * 1_000_003 + rank)


def draw_noise(schedule: NoiseSchedule, shape: torch.Size, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """One step's (t, eps) for a batch of `shape`, in this order, on the generator's device."""
    t = schedule.sample_timesteps(shape[0], generator=generator, device=generator.device)
    return t, torch.randn(shape, generator=generator, device=generator.device)


def _host_to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The CPU-drawn training noise onto the device. A copy from pageable memory makes PyTorch
    sync the stream (the host waits for the GPU to drain, every step); from pinned memory
    it is queued and the host runs ahead to launch the next kernels."""
    if device.type != "cuda" or x.device.type == "cuda":
        return x.to(device)
    return x.pin_memory().to(device, non_blocking=True)


def train(*, data: DataConfig = DataConfig(), model: UNetConfig = UNetConfig(),
          diffusion: DiffusionConfig = DiffusionConfig(), training: TrainConfig = TrainConfig(),
          eval_seed: int = 0, hooks: TrainHooks | None = None, resume_state: dict | None = None,
          splits=None, device: str | torch.device | None = None, progress: bool = False,
          evaluation=None) -> TrainResult:
    """Train a DDPM noise predictor. Returns losses and the raw and EMA models.

    data/model/diffusion/training: typed configs (defaults = the thesis, Table 1).
    eval_seed:    seed of every evaluation draw (validation t/eps), shared by all trials.
    hooks:        optional callbacks (TrainHooks) for records, evaluation and checkpoints.
    resume_state: a TrainState.state_dict() to continue from (same configs).
    splits:       pre-loaded data.Splits (else loaded from `data`).
    evaluation:   an evaluation.EvalConfig: the run's Evaluator, built once (rank 0), for the hooks (ctx.evaluator).
    """
    t_start = time.time()
    rank, world = rank_and_world()
    # what this path (one process, or DDP) cannot honour, before any work (capabilities.SUPPORT)
    check_path("ddp" if world > 1 else "alone", TrialConfigs(data, model, diffusion, training))
    device = pick_device(device)
    schedule = NoiseSchedule.from_config(diffusion.schedule_config)

    if splits is None:
        splits = load_splits(data)
    if data.on_device:
        splits.train, splits.val = splits.train.to(device), splits.val.to(device)
    n_train = len(splits.train)
    if training.batch_size > n_train:
        raise ValueError(f"batch_size={training.batch_size} is larger than the training set ({n_train} images)")
    epoch_steps = steps_per_epoch(n_train, training.batch_size, world)
    total_steps = training.epochs * epoch_steps
    if training.max_steps is not None:
        total_steps = min(total_steps, training.max_steps)

    model = diffusion.model_config(model)
    net = build_model(model, training.seed, device)
    memory_format = torch.channels_last if training.channels_last else torch.contiguous_format
    net = net.to(memory_format=memory_format)
    ema = EMA(net, training.ema_decay, warmup=training.ema_warmup)
    forward = net
    if world > 1:
        forward = nn.parallel.DistributedDataParallel(
            net, device_ids=[device.index] if device.type == "cuda" else None)
    if training.compile:
        forward = torch.compile(forward, mode=training.compile_mode)
    if training.cuda_graph and (device.type != "cuda" or world > 1):
        raise ValueError(f"TrainConfig.cuda_graph=True needs one CUDA device and no DDP (device {device}, "
                         f"world size {world}); allowed on this run: cuda_graph=False")
    if training.cuda_graph and diffusion.loss != "simple":  # the ELBO weight is looked up on the host
        raise ValueError(f"TrainConfig.cuda_graph=True needs diffusion.loss='simple' (got {diffusion.loss!r})")
    fused = training.fused_adam if training.fused_adam is not None else device.type == "cuda"
    optimizer = torch.optim.Adam(net.parameters(), lr=training.lr, betas=training.adam_betas,
                                 eps=training.adam_eps, fused=fused or None, capturable=training.cuda_graph)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=training.precision == "bf16",
                              cache_enabled=not training.cuda_graph)  # cached casts must not outlive a capture
    generator = noise_generator(training, device, rank)
    noise_device = generator.device
    state = TrainState(net, ema, optimizer, generator)
    if resume_state is not None:
        state.load_state_dict(resume_state)

    eval_draws = EpochEvalDraws.of(splits, schedule, eval_seed, training.train_eval_images)
    ctx = TrainContext(state.step, state.step / epoch_steps, net, ema.module, schedule, splits, device, rank, world,
                       epoch_steps, total_steps, state)
    is_main = rank == 0
    if is_main:  # hooks evaluate on rank 0 only
        ctx.evaluator = run_evaluator(evaluation, schedule, splits, data, diffusion, device)

    def call(name, *args, all_ranks: bool = False):
        fn = getattr(hooks, name, None) if hooks is not None else None
        if fn is not None and (is_main or all_ranks):
            fn(ctx, *args)

    def should_eval(step: int) -> bool:
        return evaluates_at(training, step, total_steps)

    train_losses: list[tuple[int, float]] = []
    epoch_losses: list[EpochLosses] = []
    call("on_start")
    bar = None
    if progress and is_main:
        from tqdm.auto import tqdm
        bar = tqdm(total=total_steps, initial=state.step, desc="training", unit="step")

    cuda_graphs = training.compile and training.compile_mode in GRAPHING_COMPILE_MODES and device.type == "cuda"

    def step_fn(x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        with autocast:
            loss = diffusion_loss(forward, schedule, x0, kind=diffusion.loss,
                                  reverse_variance=diffusion.reverse_variance, t=t, eps=eps, y=y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if training.grad_clip is not None:
            nn.utils.clip_grad_norm_(net.parameters(), training.grad_clip)
        optimizer.step()
        return loss

    if training.cuda_graph and (model.class_conditional or diffusion.loss == "hybrid"):
        raise ValueError("TrainConfig.cuda_graph=True supports the unconditional L_simple step only "
                         "(not model.class_conditional or loss 'hybrid')")
    graphed = GraphedStep(step_fn) if training.cuda_graph else None
    pending_losses: list[tuple[int, torch.Tensor]] = []  # logged steps' losses, still on the device

    def flush_losses() -> None:
        """Fetch the pending logged losses (one sync, one all-reduce) and report them in step order."""
        values = all_mean(torch.stack([v for _, v in pending_losses]).float(), world).tolist()
        now = ctx.step, ctx.epoch
        for (step, _), value in zip(pending_losses, values):
            if not math.isfinite(value):
                raise DivergedError.at_step(value, step, epoch_steps)
            train_losses.append((step, value))
            ctx.step, ctx.epoch = step, step / epoch_steps  # what hooks see is the step the loss belongs to
            call("on_step", value)
        ctx.step, ctx.epoch = now
        pending_losses.clear()
    net.train()
    while state.step < total_steps:
        epoch = state.step // epoch_steps
        batches = epoch_batches(n_train, training.batch_size, epoch, training.seed, rank=rank, world_size=world,
                                device=splits.train.images.device)
        for idx in batches[state.step - epoch * epoch_steps:]:
            if cuda_graphs:  # a new iteration: the previous step's graph outputs may be overwritten
                torch.compiler.cudagraph_mark_step_begin()
            x0 = splits.train.batch(idx).to(device, non_blocking=True).contiguous(memory_format=memory_format)
            t, eps = (_host_to_device(v, device) for v in draw_noise(schedule, x0.shape, generator))
            y = None
            if model.class_conditional:  # classifier-free guidance: drop labels to the null label
                drop = torch.rand(x0.shape[0], generator=generator, device=noise_device) < training.label_dropout
                y = splits.train.labels.to(idx.device)[idx].to(drop.device).long()
                y = _host_to_device(torch.where(drop, torch.full_like(y, model.num_classes), y), device)
            loss = graphed(x0, t, eps) if graphed is not None else step_fn(x0, t, eps, y)
            ema.update(net)
            state.step += 1
            ctx.step, ctx.epoch = state.step, state.step / epoch_steps

            log_now = logs_at(training, state.step)
            end_of_epoch = state.step % epoch_steps == 0 or state.step == total_steps
            # Losses accumulate on the device; they are fetched (a sync) only when logged.
            state.epoch_loss_sum = state.epoch_loss_sum + loss.detach().double()
            state.epoch_loss_count += 1
            if log_now:  # a graph's loss is overwritten by the next replay: keep a copy
                pending_losses.append((state.step, loss.detach().clone() if graphed else loss.detach()))
            if pending_losses and (not training.deferred_sync or state.step % training.log_every == 0
                                   or end_of_epoch or should_eval(state.step) or state.step >= total_steps):
                flush_losses()
            if bar is not None:
                bar.update(1)
                if log_now and train_losses:
                    bar.set_postfix(loss=f"{train_losses[-1][1]:.4f}", epoch=f"{ctx.epoch:.2f}")
            if end_of_epoch:
                train_loss = float(all_mean(torch.as_tensor(state.epoch_loss_sum, dtype=torch.float64,
                                                             device=device), world)) / max(state.epoch_loss_count, 1)
                if not math.isfinite(train_loss):
                    raise DivergedError.in_epoch(train_loss, epoch + 1, state.step)
                val_loss = val_raw = train_eval = None
                if validates_at(training, state.step, epoch_steps, total_steps):
                    val_loss, val_raw, train_eval = eval_draws.losses(ema.module, net, schedule, splits.val, rank,
                                                                      world)
                losses = EpochLosses(math.ceil(state.step / epoch_steps), state.step, train_loss, val_loss, val_raw,
                                     train_eval, ema.init_share)
                epoch_losses.append(losses)
                call("on_epoch", losses)
                state.epoch_loss_sum, state.epoch_loss_count = 0.0, 0
            if should_eval(state.step):
                # Evaluation draws from its own seeded generators, but what it builds (e.g. the
                # metrics classifier, made at the first evaluation) would consume the global RNG
                # that drives dropout: isolate it, or a resumed run leaves the uninterrupted one.
                with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                    call("on_eval")
                call("on_eval_all_ranks", all_ranks=True)
                net.train()
            if state.step >= total_steps:
                break
    if bar is not None:
        bar.close()
    call("on_end")
    return TrainResult(state.step, math.ceil(state.step / epoch_steps), train_losses, epoch_losses, net, ema.module,
                       schedule, count_parameters(net), time.time() - t_start)

