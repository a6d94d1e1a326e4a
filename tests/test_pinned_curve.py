"""A seeded tiny training run pinned to numbers recorded from the code (issue 23, item 4).

The other training tests compare paths with each other (stacked vs alone, deferred vs eager,
resumed vs uninterrupted): a change that moves every path alike passes them all. This one pins the
behaviour itself, the way diffusers pins numeric slices of its pipelines: a 24-step run of a tiny
U-Net (dropout on, EMA with warm-up) on real MNIST, on the CPU with one thread, and
- its logged losses at a few steps and its epoch-end losses (train, EMA and raw validation, the raw
  weights' fixed training batch, the initial weights' EMA share),
- Residual(t) of its EMA weights at two timesteps on fixed validation images and noise,
- a checksum of 8 DDIM-10 samples of its EMA weights from a seeded generator,
and the same for the two members of a stacked group (train_stacked, K = 2; member 0 is the lone run's
config, so its numbers are pinned against the same literals).

The literals were recorded (`python tests/test_pinned_curve.py` prints them) from the code before the
engine refactor of issue 23 and must not move with it. Tolerance rtol 1e-5: the stacked member's
grouped convolutions differ from the lone run's by ~2e-8 here; lowering every EMA decay by 1e-4
(ema.warmup_decay) fails both tests: the EMA validation losses move by 2.3e-5 relative, the
initial weights' share by 5e-3, Residual(500) by 4e-5 (checked when this test was written).
"""
from __future__ import annotations

import math

import pytest
import torch

from diffusion_core import (DDIMSampler, DiffusionConfig, TrainConfig, UNetConfig, residual_curve,
                            subset_indices, train)
from diffusion_core.capabilities import Member
from diffusion_core.data import Splits
from diffusion_core.training.stacked import train_stacked

TINY = UNetConfig(base_width=8, channel_mult=(1, 2), blocks_per_level=1, dropout=0.1)
STEPS = 24                    # 256 images / batch 16: epochs end at steps 16 and 24 (the last, partial)
LOGGED = (1, 2, 8, 16, 24)    # the steps whose logged losses are pinned
RESIDUAL_T = (10, 500)
RTOL = 1e-5


def config(**kw) -> TrainConfig:
    base = dict(epochs=100, batch_size=16, lr=1e-3, ema_decay=0.9, ema_warmup=True, max_steps=STEPS, seed=0,
                log_every_first=1000, eval_start=10 ** 9)
    return TrainConfig(**{**base, **kw})


# Member 1 of the stacked group differs in everything a group may differ in that is cheap to run.
LONE = dict(training=config(), diffusion=DiffusionConfig())
OTHER = dict(training=config(seed=1, lr=2e-3, ema_decay=0.5, ema_warmup=False, grad_clip=0.5),
             diffusion=DiffusionConfig(schedule="cosine"))


@pytest.fixture()
def one_thread():
    """One CPU thread: the reduction order, hence the bits, does not depend on the thread count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_splits(mnist_splits) -> Splits:
    idx = subset_indices(len(mnist_splits.train), 256, index=0, mode="disjoint", seed=0)
    return Splits(mnist_splits.train.subset(idx), mnist_splits.val.subset(torch.arange(64)))


@torch.no_grad()
def fingerprint(result, splits: Splits) -> dict:
    """The numbers pinned of one run (a TrainResult)."""
    logged = dict(result.train_losses)
    out = {f"loss@{s}": logged[s] for s in LOGGED}
    for e in result.epoch_losses:
        for name in ("train", "val", "val_raw", "train_eval", "ema_init_share"):
            out[f"epoch{e.epoch}.{name}"] = getattr(e, name)
    g = torch.Generator().manual_seed(123)
    x0 = splits.val.batch(torch.arange(32))
    eps = torch.randn(x0.shape, generator=g)
    res = residual_curve(result.ema_model.eval(), result.schedule, x0, eps, torch.tensor(RESIDUAL_T))
    out.update({f"residual@{t}": float(r) for t, r in zip(RESIDUAL_T, res)})
    samples = DDIMSampler(result.schedule, steps=10).sample(result.ema_model.eval(), (8, 1, 28, 28),
                                                            generator=torch.Generator().manual_seed(7)).double()
    weights = torch.arange(1, samples.numel() + 1, dtype=torch.float64).view_as(samples) / samples.numel()
    out["samples.abs_sum"] = float(samples.abs().sum())
    out["samples.weighted_sum"] = float((samples * weights).sum())  # moves if samples or pixels swap
    return out


def lone_run(mnist_splits) -> dict:
    splits = make_splits(mnist_splits)
    return fingerprint(train(model=TINY, splits=splits, device="cpu", **LONE), splits)


def stacked_runs(mnist_splits) -> list[dict]:
    splits = make_splits(mnist_splits)
    members = [Member(model=TINY, splits=splits, name=f"m{i}", **spec) for i, spec in enumerate((LONE, OTHER))]
    results = train_stacked(members, device="cpu")
    assert [r.status for r in results] == ["FINISHED", "FINISHED"]
    return [fingerprint(r.result, splits) for r in results]


# Recorded from the code before the issue-23 engine refactor (1 CPU thread, torch 2.14.1, the dev CPU).
PINNED_LONE = {
    'loss@1': 1.1072585582733154,
    'loss@2': 1.0112444162368774,
    'loss@8': 0.6565057039260864,
    'loss@16': 0.4735265076160431,
    'loss@24': 0.4024266004562378,
    'epoch1.train': 0.6972843706607819,
    'epoch1.val': 0.44237828254699707,
    'epoch1.val_raw': 0.41693204641342163,
    'epoch1.train_eval': 0.4214600920677185,
    'epoch1.ema_init_share': 4.894822501499041e-07,
    'epoch2.train': 0.40978583693504333,
    'epoch2.val': 0.34470218420028687,
    'epoch2.val_raw': 0.3219284117221832,
    'epoch2.train_eval': 0.32567837834358215,
    'epoch2.ema_init_share': 2.5928835717489787e-08,
    'residual@10': 1.061133623123169,
    'residual@500': 0.2725321054458618,
    'samples.abs_sum': 381597.225799853,
    'samples.weighted_sum': 20919.08978015202,
}
PINNED_OTHER = {
    'loss@1': 1.0594290494918823,
    'loss@2': 0.947798490524292,
    'loss@8': 0.5371449589729309,
    'loss@16': 0.34445491433143616,
    'loss@24': 0.28478550910949707,
    'epoch1.train': 0.5840141270309687,
    'epoch1.val': 0.3260742127895355,
    'epoch1.ema_init_share': 1.52587890625e-05,
    'epoch2.train': 0.2949705123901367,
    'epoch2.val': 0.238338440656662,
    'epoch2.ema_init_share': 5.960464477539063e-08,
    'residual@10': 0.907642126083374,
    'residual@500': 0.1941978931427002,
    'samples.abs_sum': 36897630.340942144,
    'samples.weighted_sum': -1209896.2347996363,
}


def assert_pinned(got: dict, pinned: dict, what: str) -> None:
    assert set(got) == set(pinned), f"{what}: pinned {sorted(pinned)}, got {sorted(got)}"
    bad = {k: (got[k], v) for k, v in pinned.items()
           if got[k] is None or not math.isclose(got[k], v, rel_tol=RTOL, abs_tol=1e-12)}
    assert not bad, f"{what}: moved from the pinned numbers (got, pinned): {bad}"


def test_the_tiny_run_is_pinned(mnist_splits, one_thread):
    assert_pinned(lone_run(mnist_splits), PINNED_LONE, "train()")


# A stacked member's raw weights' eval-mode losses were left empty (None) before issue 23; they are
# now train()'s computation (train.EpochEvalDraws): member 0's equal the lone run's literals above, and
# member 1's were recorded when they appeared (every other number of both members is unchanged).
RAW_EVAL_KEYS = {k for k in PINNED_LONE if k.endswith((".val_raw", ".train_eval"))}
PINNED_OTHER_RAW_EVAL = {
    "epoch1.val_raw": 0.3136080503463745,
    "epoch1.train_eval": 0.31909021735191345,
    "epoch2.val_raw": 0.23448073863983154,
    "epoch2.train_eval": 0.23958534002304077,
}


def test_the_stacked_members_are_pinned(mnist_splits, one_thread):
    member0, member1 = stacked_runs(mnist_splits)
    assert_pinned(member0, PINNED_LONE, "train_stacked member 0 (the lone run's config)")
    assert_pinned(member1, {**PINNED_OTHER, **PINNED_OTHER_RAW_EVAL}, "train_stacked member 1")


if __name__ == "__main__":  # record the literals: python tests/test_pinned_curve.py
    import os
    import pprint

    from diffusion_core import mnist_splits as load

    torch.set_num_threads(1)
    splits = load(os.environ.get("STUDYCTL_DATA_ROOT", "/work/shared/data"), split_seed=0)
    pprint.pprint(lone_run(splits), sort_dicts=False)
    for fp in stacked_runs(splits):
        pprint.pprint(fp, sort_dicts=False)
