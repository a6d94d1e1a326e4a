"""The evaluation-mode losses a run records at its epoch ends (EpochLosses.val / val_raw / train_eval):
L_simple on fixed (t, eps) draws of the evaluation seed, so they compare like with like across epochs,
trials and the two training paths (train() and every train_stacked member use this code); and the
validation minibatch loss of each early step, Fig. 26b's second curve (StepValDraws, minibatch_loss)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

from ..data import ImageSet
from ..diffusion.losses import per_example_mse
from ..diffusion.schedules import NoiseSchedule


@torch.no_grad()
def validation_loss(eps_model, schedule: NoiseSchedule, val: ImageSet, t: torch.Tensor, eps: torch.Tensor,
                    batch_size: int = 256, rank: int = 0, world_size: int = 1) -> float:
    """L_simple over the validation split with fixed (t, eps) draws — comparable across epochs."""
    device = val.images.device
    total = torch.zeros(2, dtype=torch.float64, device=device)
    idx_all = torch.arange(len(val), device=device)[rank::world_size]
    for lo in range(0, len(idx_all), batch_size):
        idx = idx_all[lo:lo + batch_size]
        x0 = val.batch(idx)
        tt, ee = t[idx], eps[idx]
        err = per_example_mse(ee, eps_model(schedule.q_sample(x0, tt, ee), tt, **conditioning(eps_model, val.labels[idx])))
        total[0] += err.sum().double()
        total[1] += err.numel()
    if world_size > 1:
        dist.all_reduce(total)
    return float(total[0] / total[1])


def conditioning(model, labels: torch.Tensor) -> dict:
    """{"y": labels} for a class-conditional U-Net (the labels the data carries), {} otherwise."""
    net = getattr(model, "module", model)  # through DDP / torch.compile wrappers
    net = getattr(net, "_orig_mod", net)
    return {"y": labels.to(torch.long)} if getattr(net, "label_emb", None) is not None else {}


def fixed_validation_draws(val: ImageSet, schedule: NoiseSchedule, eval_seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(eval_seed)
    t = schedule.sample_timesteps(len(val), generator=g)
    eps = torch.randn((len(val), *val.shape), generator=g)
    return t.to(val.images.device), eps.to(val.images.device)


def fixed_train_draws(train: ImageSet, schedule: NoiseSchedule, eval_seed: int,
                      n_images: int = 512) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A fixed training batch (min(n_images, N) images chosen by the evaluation seed) and its
    fixed (t, eps): the training-set counterpart of the validation draws. Its own generator
    (not the training streams, not the validation draws' generator) so adding it changes neither."""
    g = torch.Generator().manual_seed(eval_seed + 7_919)  # a stream apart from the validation draws
    n = min(n_images, len(train))
    idx = torch.randperm(len(train), generator=g)[:n].sort().values
    t = schedule.sample_timesteps(n, generator=g)
    eps = torch.randn((n, *train.shape), generator=g)
    device = train.images.device
    return idx.to(device), t.to(device), eps.to(device)


@dataclass(frozen=True)
class EpochEvalDraws:
    """The fixed draws of a run's epoch-end evaluation-mode losses (EpochLosses.val/val_raw/train_eval):
    (t, eps) over the validation split, and a fixed training batch with its own (t, eps)."""
    val_t: torch.Tensor
    val_eps: torch.Tensor
    train_batch: ImageSet
    train_t: torch.Tensor
    train_eps: torch.Tensor

    @classmethod
    def of(cls, splits, schedule: NoiseSchedule, eval_seed: int, train_eval_images: int) -> "EpochEvalDraws":
        val_t, val_eps = fixed_validation_draws(splits.val, schedule, eval_seed)
        idx, tr_t, tr_eps = fixed_train_draws(splits.train, schedule, eval_seed, train_eval_images)
        return cls(val_t, val_eps, splits.train.subset(idx), tr_t, tr_eps)

    def losses(self, ema_model: nn.Module, net: nn.Module, schedule: NoiseSchedule, val: ImageSet,
               rank: int = 0, world_size: int = 1) -> tuple[float, float, float]:
        """(val, val_raw, train_eval): the EMA and the raw weights on the validation draws, the raw
        weights on the training batch; eval mode, fixed draws: no RNG is consumed. The one
        computation of these records, for train() and every train_stacked member."""
        return (validation_loss(ema_model, schedule, val, self.val_t, self.val_eps, rank=rank, world_size=world_size),
                eval_mode_loss(net, schedule, val, self.val_t, self.val_eps, rank, world_size),
                eval_mode_loss(net, schedule, self.train_batch, self.train_t, self.train_eps, rank, world_size))


@torch.no_grad()
def eval_mode_loss(model: nn.Module, schedule: NoiseSchedule, images: ImageSet, t: torch.Tensor, eps: torch.Tensor,
                   rank: int = 0, world_size: int = 1) -> float:
    """`validation_loss` of a model in eval mode (dropout off), restoring its mode after."""
    was_training = model.training
    model.eval()
    try:
        return validation_loss(model, schedule, images, t, eps, rank=rank, world_size=world_size)
    finally:
        model.train(was_training)


@dataclass(frozen=True)
class StepValDraws:
    """Fig. 26b's validation curve (TrainConfig.val_loss_first): the validation minibatch of each step.

    Step s (1-based) takes batch_size images of the validation split in its fixed order, from image
    (s - 1) * batch_size on (wrapping around), with (t, eps) from a generator seeded by
    (evaluation seed, s): a function of the step only, so a resumed run draws what the whole run
    does, every trial of a study sees the same batches, and no training stream is consumed. Under
    DDP every rank draws the whole batch and keeps its share (rank::world), so the ranks' mean is the
    loss a run alone records at equal weights."""
    val: ImageSet
    schedule: NoiseSchedule
    eval_seed: int
    batch_size: int

    def at(self, step: int, device: torch.device, rank: int = 0, world_size: int = 1):
        """(x0, t, eps, labels) of step `step`, this rank's share, on `device`."""
        g = torch.Generator().manual_seed(int(np.random.SeedSequence([self.eval_seed, step, 26]).generate_state(1)[0]))
        idx = (torch.arange(self.batch_size) + (step - 1) * self.batch_size) % len(self.val)
        t = self.schedule.sample_timesteps(self.batch_size, generator=g)
        eps = torch.randn((self.batch_size, *self.val.shape), generator=g)
        idx, t, eps = idx[rank::world_size], t[rank::world_size], eps[rank::world_size]
        vidx = idx.to(self.val.images.device)
        return (self.val.batch(vidx).to(device), t.to(device), eps.to(device),
                self.val.labels[vidx].to(device))


@torch.no_grad()
def minibatch_loss(model: nn.Module, schedule: NoiseSchedule, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor,
                   labels: torch.Tensor) -> torch.Tensor:
    """L_simple of one batch, eval mode (dropout off), as a (1,) tensor on the device (no host sync)."""
    was_training = model.training
    model.eval()
    try:
        pred = model(schedule.q_sample(x0, t, eps), t, **conditioning(model, labels))
        return per_example_mse(eps, pred).mean().reshape(1)
    finally:
        model.train(was_training)
