"""The members of a stacked group sampled in one batched pass (issue 11, item 3).

At an evaluation step each member of a `train_stacked` group draws its samples with its own EMA
weights from the fixed starting noise x_T of the evaluation seed (evaluation.py). Sampling is most
of an evaluation's time, and one member's batch of 28x28 images is too small to keep the hardware
busy; so here the members whose samples are drawn alike run as one: every sampler step is one
forward of the stacked EMA network (stacked_model.StackedUNet: the K EMA weight sets as one
grouped network) over K x batch images.

Each member gets what its own `Evaluator.sample(ema_model)` returns, to float tolerance: the same
x_T batches in the same order, the same ancestral noise (each member's stream is a generator seeded
cfg.seed + 1 and drawn batch by batch, step by step, with one member's batch shape; members batched
together share the evaluation seed, so their K streams are one stream, drawn once and broadcast),
and the same `sampler.step` on the K x batch images (elementwise arithmetic: the same bits per
image). Only the network differs: grouped convolutions sum in another order than K separate ones
(~1e-7 relative per forward). tests/test_stacked_sampling.py pins the agreement; BENCHMARKS.md
("Stacked evaluation sampling") the speed.

Members whose sampling differs (sample count, sampler, steps, eta, clipping, batch, precision,
schedule, reverse variance, x_T) are batched only with their equals; a member alone, a compiled
sampling network (its CUDA graphs are per model) or a class-conditional / learned-variance model
(guided and variance-returning eps models are not written for the stacked forward; train_stacked
refuses these models anyway) gets None: it samples in its own `Evaluator.evaluate`, as before.
"""
from __future__ import annotations

import dataclasses
import hashlib
import time
from typing import Callable

import torch
import torch.nn as nn

from ..config import EvalConfig
from ..data import from_unit_range
from ..evaluation import DrawnSamples, Evaluator, _num_classes
from .samplers import DDIMSampler, DDPMSampler
from ..model.stacked_model import StackedUNet

# eps of the stacked EMA network: x_t (K, B, C, H, W), t (K, B) -> (K, B, C, H, W), member k in row k.
StackedEps = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

# EvalConfig fields that do not change the samples (residuals, metrics, figures, files): members
# that differ only in these share a pass. Any other field -- including one added later -- must match.
_NOT_SAMPLING = ("is_splits", "interval_halves", "t_grid", "residual_images", "metrics", "progressive_t", "progressive_rows",
                 "keep_samples")
_DEFAULTS = {f.name: f.default for f in dataclasses.fields(EvalConfig) if f.name in _NOT_SAMPLING}

# Images per stacked forward on a CPU (K members x a share of each one's batch). A CPU forward of the
# 28x28 U-Net is compute- and cache-bound, not launch-bound: on the 2-core dev CPU (1 thread, width 16,
# K = 8) one forward over 8 x 128 images took 2.2x as long as 8 separate 128-image forwards, and 8 x 8
# to 8 x 16 images per forward as long as them; the whole pass ran at 0.79x of sampling one member after
# another with this cap, 0.55x without (BENCHMARKS.md, "Stacked evaluation sampling"). On a GPU
# every sampler step is one forward over all K x batch images (a step of one member's batch is
# launch-bound there).
CPU_FORWARD_IMAGES = 128


def sampling_key(evaluator: Evaluator, model: nn.Module) -> tuple | None:
    """Members with equal keys draw their samples alike from one x_T and can share a pass; None:
    this member samples alone (compiled network, class-conditional or learned variance)."""
    if evaluator.cfg.compile or _num_classes(model) or getattr(model.config, "learn_sigma", False):
        return None
    return (repr(model.config), *_sampling_config(evaluator))


def _sampling_config(evaluator: Evaluator) -> tuple:
    """Everything of an evaluator its samples depend on, but the weights."""
    # x_T is drawn after the residual eps from the seed's one generator, so it depends on more than the
    # seed (the residual image count): compare x_T itself. It lives on the CPU (a CPU generator drew it).
    x_T = hashlib.sha1(evaluator.x_T.contiguous().numpy().tobytes()).hexdigest()
    schedule = hashlib.sha1(evaluator.schedule.betas.numpy().tobytes()).hexdigest()
    return (dataclasses.replace(evaluator.cfg, **_DEFAULTS), str(evaluator.device), x_T, tuple(evaluator.x_T.shape),
            schedule, getattr(evaluator.sampler, "reverse_variance", None))


def sample_members(evaluators: list[Evaluator], ema_models: list[nn.Module],
                   stacked_eps_of: Callable[[list[int]], StackedEps],
                   forward_images: int | None = None) -> list[DrawnSamples | None]:
    """Each member's samples, members with equal `sampling_key`s in one batched pass through
    stacked_eps_of(their indices); None for a member that samples alone. Seconds: each member's
    share of its pass (so the members' eval_seconds add up to the group's time). forward_images: see
    sample_stacked."""
    batches: dict[tuple, list[int]] = {}
    for i, (ev, model) in enumerate(zip(evaluators, ema_models)):
        key = sampling_key(ev, model)
        batches.setdefault(("alone", i) if key is None else key, []).append(i)
    out: list[DrawnSamples | None] = [None] * len(evaluators)
    for rows in batches.values():
        if len(rows) < 2:  # nothing to share: its own Evaluator.sample, in its own evaluation
            continue
        t0 = time.time()
        images = sample_stacked([evaluators[i] for i in rows], stacked_eps_of(rows), forward_images)
        seconds = (time.time() - t0) / len(rows)
        for i, member_images in zip(rows, images):
            out[i] = DrawnSamples(member_images, seconds)
    return out


@torch.no_grad()
def sample_stacked(evaluators: list[Evaluator], stacked_eps: StackedEps,
                   forward_images: int | None = None) -> list[torch.Tensor]:
    """`[ev.sample(model_k) for each member k]` in one pass: stacked_eps has member k's EMA weights in
    row k; the evaluators share a `sampling_key` (checked). forward_images: at most this many images
    (K x a share of the batch) per call of stacked_eps; None: all K x batch on a GPU, CPU_FORWARD_IMAGES
    on a CPU. The network is per image (no batch statistics), so this changes no sample."""
    first = evaluators[0]
    if first.cfg.compile or len({_sampling_config(ev) for ev in evaluators}) > 1:
        raise ValueError("sample_stacked: the members' sampling configs, schedules or x_T differ (or compile "
                         "is on); group them with sample_members")
    cfg, device, k = first.cfg, first.device, len(evaluators)
    if forward_images is None:
        forward_images = None if device.type == "cuda" else CPU_FORWARD_IMAGES
    per_call = cfg.batch_size if forward_images is None else max(1, forward_images // k)
    if per_call < cfg.batch_size:
        stacked_eps = _in_pieces(stacked_eps, per_call)
    for ev in evaluators:
        ev.num_classes = 0  # as Evaluator.sample records it: the metrics then ask for no labels
    generator = torch.Generator(device=device).manual_seed(cfg.seed + 1)  # every member's stream (see above)
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16")
    out: list[list[torch.Tensor]] = [[] for _ in range(k)]
    for lo in range(0, first.x_T.shape[0], cfg.batch_size):
        xT = first.x_T[lo:lo + cfg.batch_size].to(device)
        with amp:
            x = _reverse(first.sampler, stacked_eps, xT.expand(k, *xT.shape).clone(), generator)
        for member_out, images in zip(out, from_unit_range(x.float()).cpu()):
            member_out.append(images)
    return [torch.cat(o) for o in out]


def _reverse(sampler, stacked_eps: StackedEps, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """The loop of sampler.sample (samplers.py) for K members at once: its timesteps, its noise draws
    (one member's batch shape, broadcast to the K members), its `step` on the flattened K x B batch."""
    k, b, shape = x.shape[0], x.shape[1], x.shape[2:]
    if isinstance(sampler, DDPMSampler):
        plan = [(t, t - 1, t > 1) for t in range(sampler.schedule.T, 0, -1)]       # noise but at t = 1
    elif isinstance(sampler, DDIMSampler):
        ts = sampler.timesteps.tolist()
        prev = ts[1:] + [0]
        plan = [(t, s, sampler.eta > 0 and s > 0) for t, s in zip(ts, prev)]   # noise only when eta > 0
    else:
        raise TypeError(f"no stacked sampling loop for {type(sampler).__name__}")
    for t, t_prev, noisy in plan:
        eps = stacked_eps(x, torch.full((k, b), t, device=x.device, dtype=torch.long))
        noise = None
        if noisy:
            z = torch.randn((b, *shape), generator=generator, device=x.device, dtype=x.dtype)
            noise = z.expand(k, *z.shape).reshape(k * b, *shape)
        eps, flat = eps.to(x.dtype).reshape(k * b, *shape), x.reshape(k * b, *shape)
        if isinstance(sampler, DDPMSampler):
            x = sampler.step(eps, t, flat, noise)
        else:
            x = sampler.step(eps, t, t_prev, flat, noise)
        x = x.view(k, b, *shape)
    return x


def _in_pieces(stacked_eps: StackedEps, per_member: int) -> StackedEps:
    """stacked_eps called on at most `per_member` images of each member at a time."""
    def eps(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return torch.cat([stacked_eps(x[:, lo:lo + per_member], t[:, lo:lo + per_member])
                          for lo in range(0, x.shape[1], per_member)], dim=1)
    return eps


def stacked_eps_of_models(models: list[nn.Module], backend: str = "auto") -> Callable[[list[int]], StackedEps]:
    """stacked_eps_of for `sample_members` from K separate models of one config (tests, benchmarks;
    train_stacked uses its group's EMA rows instead)."""
    stacked = StackedUNet(models, [torch.Generator() for _ in models], backend)

    def of(rows: list[int]) -> StackedEps:
        params = stacked.views_of(stacked.flat[rows])
        return lambda x, t: stacked.forward(x, t, params=params, train=False)

    return of


__all__ = ["DrawnSamples", "StackedEps", "sample_members", "sample_stacked", "sampling_key", "stacked_eps_of_models"]
