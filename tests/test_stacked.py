"""K trials trained as one stacked model equal K separate `train()` runs (issue 11, CPU part).

Three members that differ in everything a group may differ in — seed, noise schedule, learning
rate, EMA decay and warm-up, training subset, gradient clipping — with dropout 0.1, 12 steps of batch 16 on
real MNIST. Each member's per-step losses, epoch train losses and EMA validation losses must equal its own
`train()` run's. Measured on the 2-core dev CPU (torch 2.14), 20 steps: max relative difference 2.2e-7
per step (grouped convolutions and vmap sum in another order than K separate convolutions;
the dropout masks are the same bits, see stacked_model.py); tolerance 1e-5, ~50x that, while
a wrong mask stream, data order, noise stream or learning rate moves a step's loss by >1e-2.
"""
from __future__ import annotations

import copy

import pytest
import torch

from diffusion_core import DataConfig, TrainConfig, UNetConfig, subset_indices, train
from diffusion_core.capabilities import Member
from diffusion_core.config import DiffusionConfig
from diffusion_core.data import Splits
from diffusion_core.training.stacked import train_stacked

TINY = UNetConfig(base_width=8, channel_mult=(1, 2), blocks_per_level=1, dropout=0.1)
STEPS, RTOL = 12, 1e-5
NAN_LR = 1e30


def tc(**kw) -> TrainConfig:
    base = dict(epochs=100, batch_size=16, lr=1e-3, ema_decay=0.9, max_steps=STEPS, seed=0, log_every_first=1000,
                eval_start=10 ** 9)
    return TrainConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def members_and_runs(mnist_splits):
    """Three members (two training subsets: one epoch = 8 steps for the 128-image ones) and their separate runs."""
    val = mnist_splits.val.subset(torch.arange(48))

    def subset(index: int) -> Splits:
        idx = subset_indices(len(mnist_splits.train), 128, index=index, mode="disjoint", seed=0)
        return Splits(mnist_splits.train.subset(idx), val)

    cosine = DiffusionConfig(schedule="cosine")
    specs = [dict(training=tc(seed=0, ema_warmup=True), splits=subset(0)),
             dict(training=tc(seed=1, lr=2e-3, ema_decay=0.5), splits=subset(1), diffusion=cosine),
             dict(training=tc(seed=2, grad_clip=0.5, ema_warmup=True), splits=Splits(mnist_splits.train.subset(torch.arange(256)),
                                                                    val))]
    separate = []
    for s in specs:
        r = train(model=TINY, training=s["training"], splits=s["splits"],
                  diffusion=s.get("diffusion", DiffusionConfig()), device="cpu")
        separate.append(r)
    return specs, separate


def losses(result) -> torch.Tensor:
    return torch.tensor([v for _, v in result.train_losses], dtype=torch.float64)


def assert_same_run(stacked, separate) -> None:
    assert [s for s, _ in stacked.train_losses] == [s for s, _ in separate.train_losses]
    rel = (losses(stacked) - losses(separate)).abs() / losses(separate)
    assert rel.max() < RTOL, f"per-step losses differ by {rel.max():.2e} (relative)"
    assert_same_run_epochs(stacked, separate)


def assert_same_run_epochs(stacked, separate) -> None:
    """Epoch losses: the EMA and raw weights' validation losses (warm-up included), the raw weights' fixed
    training batch, and the initial weights' share."""
    assert len(stacked.epoch_losses) == len(separate.epoch_losses) >= 1
    for a, b in zip(stacked.epoch_losses, separate.epoch_losses):
        assert (a.epoch, a.step) == (b.epoch, b.step)
        assert a.train == pytest.approx(b.train, rel=RTOL) and a.val == pytest.approx(b.val, rel=RTOL)
        # the raw weights' eval-mode losses: train()'s records, computed by the same code (issue 23)
        assert a.val_raw == pytest.approx(b.val_raw, rel=RTOL) and b.val_raw is not None
        assert a.train_eval == pytest.approx(b.train_eval, rel=RTOL) and b.train_eval is not None
        assert a.ema_init_share == pytest.approx(b.ema_init_share, rel=1e-9)


class Checkpoint:
    """Keeps the member's state_dict at its first evaluation (what a LocalTrialHooks checkpoint saves)."""
    state = None

    def on_eval_all_ranks(self, ctx):
        self.state = self.state or ctx.state.state_dict()


def test_stacked_members_equal_separate_runs_and_resume_in_train(members_and_runs):
    specs, separate = members_and_runs
    ckpt = Checkpoint()
    members = [Member(s["training"], TINY, diffusion=s.get("diffusion", DiffusionConfig()), splits=s["splits"],
                      name=f"m{i}") for i, s in enumerate(specs)]
    members[0].training = tc(seed=0, ema_warmup=True, eval_start=5, eval_every=5)  # a checkpoint at step 5
    members[0].hooks = ckpt
    results = train_stacked(members, device="cpu")
    assert [r.status for r in results] == ["FINISHED"] * 3
    for r, sep in zip(results, separate):
        assert_same_run(r.result, sep)
    assert ((losses(separate[1]) - losses(separate[0])).abs() / losses(separate[0])).max() > 0.05  # they differ

    # The member's checkpoint has TrainState's format: train() resumes it where the stacked run was.
    assert ckpt.state["step"] == 5 and set(ckpt.state) >= {"model", "ema", "optimizer", "generator", "cpu_rng"}
    resumed = train(model=TINY, training=specs[0]["training"], splits=specs[0]["splits"], device="cpu",
                    resume_state=copy.deepcopy(ckpt.state))  # torch's Adam adopts (and then steps) its tensors
    rel = (losses(resumed) - losses(separate[0])[5:]).abs() / losses(separate[0])[5:]
    assert [s for s, _ in resumed.train_losses] == list(range(6, STEPS + 1)) and rel.max() < RTOL
    # ... and so does a stacked group: its EMA warm-up continues at update 5, its initial-weight share too.
    (again,) = train_stacked([Member(specs[0]["training"], TINY, splits=specs[0]["splits"], resume_state=ckpt.state)],
                             device="cpu")
    rel_again = (losses(again.result) - losses(resumed)).abs() / losses(resumed)
    assert again.status == "FINISHED" and rel_again.max() < RTOL  # not bit-equal: seen 1 ulp apart in a full run
    assert_same_run_epochs(again.result, separate[0])


def test_vmap_backend_equals_separate_runs(members_and_runs):
    specs, separate = members_and_runs
    members = [Member(s["training"], TINY, diffusion=s.get("diffusion", DiffusionConfig()), splits=s["splits"])
               for s in specs[:2]]
    for r, sep in zip(train_stacked(members, device="cpu", backend="vmap", deferred_sync=True), separate):
        assert_same_run(r.result, sep)


class Diverged:
    def on_diverged(self, err):
        self.err = err


def test_diverging_member_fails_alone(members_and_runs):
    specs, separate = members_and_runs
    seen = Diverged()
    members = [Member(specs[0]["training"], TINY, splits=specs[0]["splits"], name="ok0"),
               Member(tc(seed=5, lr=NAN_LR), TINY, splits=specs[0]["splits"], name="nan", hooks=seen),
               Member(specs[2]["training"], TINY, splits=specs[2]["splits"], name="ok2")]
    ok0, bad, ok2 = train_stacked(members, device="cpu")
    assert bad.status == "FAILED" and bad.error.startswith("DivergedError: training loss became")
    assert "lower the learning rate" in str(seen.err)
    n_logged = len(bad.result.train_losses)
    assert n_logged < STEPS and bad.result.step == n_logged + 1  # it left the group at its first NaN step
    assert ok0.status == ok2.status == "FINISHED"
    assert_same_run(ok0.result, separate[0])
    assert_same_run(ok2.result, separate[2])


def test_unstackable_members_are_refused():
    ok = Member(tc(), TINY, data=DataConfig())
    with pytest.raises(ValueError, match="training.channels_last=True is not supported when stacking"):
        train_stacked([ok, Member(tc(channels_last=True), TINY)], device="cpu")
    with pytest.raises(ValueError, match="batch_size must equal member 0's"):
        train_stacked([ok, Member(tc(batch_size=8), TINY)], device="cpu")
