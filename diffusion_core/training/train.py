"""`train()`: one DDPM run, plain PyTorch, single process or DDP.

`train()` runs the thesis configuration by default (TrainConfig() + UNetConfig() +
DiffusionConfig() + DataConfig()). It works in a notebook as is; under
`torch.distributed` (the Ray Train worker in orchestrator/ calls this same function)
it wraps the model in DDP, shards each epoch across ranks and all-reduces the logged
losses. It builds the run — model, optimizer, EMA, the step — and hands it to the one training
loop (engine.run_group) as a group of one (`SingleGroup`); a stacked group (stacked.py) goes through
the same loop. Everything around the loop — writing records, evaluating samples, checkpoints —
arrives through `hooks`, so this file knows nothing of Ray or MLflow.

Randomness: the training seed drives initialisation, data order and training noise;
validation t and eps come from `eval_seed`, identical for every trial (docs/ARCHITECTURE.md, "Randomness").
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from ..capabilities import check_path
from ..config import GRAPHING_COMPILE_MODES, DataConfig, DiffusionConfig, TrainConfig, UNetConfig
from ..data import epoch_batches, load_splits, steps_per_epoch
from .distributed import all_mean, pick_device, rank_and_world
from .ema import EMA
from .engine import EpochLosses, Run, TrainContext, TrainHooks, run_group
from .graph_step import GraphedStep
from ..diffusion.losses import diffusion_loss
from ..diffusion.schedules import NoiseSchedule
from ..model.unet import UNet, count_parameters
from .validation import EpochEvalDraws, StepValDraws, minibatch_loss


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
    val_losses: list[tuple[int, float]] = field(default_factory=list)  # (step, validation minibatch loss)


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
    from ..evaluation import Evaluator  # evaluation.py imports this module

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
    state = TrainState(net, ema, optimizer, generator)
    if resume_state is not None:
        state.load_state_dict(resume_state)

    ctx = TrainContext(state.step, state.step / epoch_steps, net, ema.module, schedule, splits, device, rank, world,
                       epoch_steps, total_steps, state)
    if rank == 0:  # hooks evaluate on rank 0 only
        ctx.evaluator = run_evaluator(evaluation, schedule, splits, data, diffusion, device)
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
    run = Run("run", training, hooks, ctx, is_main=rank == 0)
    group = SingleGroup(run, state, splits, training, model, schedule, step_fn,
                        GraphedStep(step_fn) if training.cuda_graph else None, cuda_graphs, memory_format,
                        EpochEvalDraws.of(splits, schedule, eval_seed, training.train_eval_images),
                        StepValDraws(splits.val, schedule, eval_seed, training.batch_size))
    bar = None
    if progress and rank == 0:
        from tqdm.auto import tqdm
        bar = tqdm(total=total_steps, initial=state.step, desc="training", unit="step")
    net.train()
    try:
        run_group(group, deferred_sync=training.deferred_sync, bar=bar)
    finally:
        if bar is not None:
            bar.close()
    if run.diverged is not None:
        raise run.diverged
    return TrainResult(state.step, math.ceil(state.step / epoch_steps), run.train_losses, run.epoch_losses, net,
                       ema.module, schedule, count_parameters(net), time.time() - t_start, run.val_losses)


class SingleGroup:
    """A run alone (or one DDP rank of it) as the engine's group of one (engine.Group): the step is
    the plain model's (or its DDP / compiled forward, or the CUDA graph of the whole step), what it
    fetches is averaged over the ranks, and its numbers live in its TrainState (resumable)."""

    def __init__(self, run: Run, state: TrainState, splits, training: TrainConfig, model: UNetConfig,
                 schedule: NoiseSchedule, step_fn, graphed: GraphedStep | None, cuda_graphs: bool,
                 memory_format: torch.memory_format, eval_draws: EpochEvalDraws, step_val: StepValDraws):
        self.runs, self.state, self.splits, self.training, self.model = [run], state, splits, training, model
        self.schedule, self.step_fn, self.graphed, self.cuda_graphs = schedule, step_fn, graphed, cuda_graphs
        self.memory_format, self.eval_draws, self.step_val = memory_format, eval_draws, step_val
        self.ctx = run.ctx
        self.device, self.rank, self.world = self.ctx.device, self.ctx.rank, self.ctx.world_size
        self._batches: tuple[int | None, torch.Tensor | None] = (None, None)

    @property
    def step(self) -> int:
        return self.state.step

    def _batch(self, step: int) -> torch.Tensor:
        """The indices of (0-based) step `step`: this rank's share of its epoch's permutation."""
        epoch_steps = self.ctx.steps_per_epoch
        epoch = step // epoch_steps
        if self._batches[0] != epoch:
            self._batches = (epoch, epoch_batches(len(self.splits.train), self.training.batch_size, epoch,
                                                  self.training.seed, rank=self.rank, world_size=self.world,
                                                  device=self.splits.train.images.device))
        return self._batches[1][step - epoch * epoch_steps]

    def train_step(self) -> torch.Tensor:
        """The batch, its (t, eps) and labels from the run's generator (in this order), one optimizer
        step, the EMA update; (1,) loss on the device, added to the epoch's sum."""
        state, device, model = self.state, self.device, self.model
        if self.cuda_graphs:  # a new iteration: the previous step's graph outputs may be overwritten
            torch.compiler.cudagraph_mark_step_begin()
        idx = self._batch(state.step)
        x0 = self.splits.train.batch(idx).to(device, non_blocking=True).contiguous(memory_format=self.memory_format)
        t, eps = (_host_to_device(v, device) for v in draw_noise(self.schedule, x0.shape, state.generator))
        y = None
        if model.class_conditional:  # classifier-free guidance: drop labels to the null label
            drop = torch.rand(x0.shape[0], generator=state.generator, device=state.generator.device) \
                < self.training.label_dropout
            y = self.splits.train.labels.to(idx.device)[idx].to(drop.device).long()
            y = _host_to_device(torch.where(drop, torch.full_like(y, model.num_classes), y), device)
        loss = self.graphed(x0, t, eps) if self.graphed is not None else self.step_fn(x0, t, eps, y)
        state.ema.update(state.model)
        state.step += 1
        # Losses accumulate on the device; they are fetched (a sync) only when logged.
        state.epoch_loss_sum = state.epoch_loss_sum + loss.detach().double()
        state.epoch_loss_count += 1
        return loss.reshape(1)

    def step_val_losses(self) -> torch.Tensor:
        """The raw weights (not the DDP / compiled forward: no hooks, no recompilation), eval mode."""
        draws = self.step_val.at(self.state.step + 1, self.device, self.rank, self.world)
        return minibatch_loss(self.state.model, self.schedule, *draws)

    def fetch(self, losses: list[torch.Tensor]) -> list[list[float]]:
        return [[v] for v in all_mean(torch.stack(losses).float().reshape(-1), self.world).tolist()]

    def epoch_train_losses(self, runs: list[Run]) -> list[float]:
        s = self.state
        total = all_mean(torch.as_tensor(s.epoch_loss_sum, dtype=torch.float64, device=self.device), self.world)
        return [float(total) / max(s.epoch_loss_count, 1)]

    def reset_epoch(self, run: Run) -> None:
        self.state.epoch_loss_sum, self.state.epoch_loss_count = 0.0, 0

    def epoch_eval_losses(self, run: Run) -> tuple[float, float, float]:
        return self.eval_draws.losses(self.state.ema.module, self.state.model, self.schedule, self.splits.val,
                                      self.rank, self.world)

    def init_share(self, run: Run) -> float:
        return self.state.ema.init_share

    def refresh(self, run: Run) -> None:  # the run's modules are the live ones
        pass

    def after_eval(self) -> None:
        self.state.model.train()

    def keep(self, runs: list[Run]) -> None:
        self.runs = runs
