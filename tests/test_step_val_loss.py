"""Fig. 26b's validation curve (TrainConfig.val_loss_first): at each logged step among the first N,
the loss of one validation minibatch at the weights the step's training loss sees, without touching
the training (its losses are bit-identical with the option off), the same alone and stacked."""
from __future__ import annotations

import math

import pytest
import torch

from diffusion_core import TrainConfig, UNetConfig, subset_indices, train
from diffusion_core.capabilities import Member, refusals
from diffusion_core.config import DiffusionConfig
from diffusion_core.data import Splits
from diffusion_core.diffusion.schedules import NoiseSchedule
from diffusion_core.training.engine import val_logs_at
from diffusion_core.training.stacked import train_stacked
from diffusion_core.training.train import build_model
from diffusion_core.training.validation import StepValDraws, minibatch_loss

SCHEDULE = NoiseSchedule.from_config(DiffusionConfig().schedule_config)  # train()'s, by default
TINY = UNetConfig(base_width=8, channel_mult=(1, 2), blocks_per_level=1)
STEPS, FIRST = 8, 6


def cfg(**kw) -> TrainConfig:
    # logged: steps 1-4 (log_every_first), then every 2nd; validation minibatch at the logged steps <= 6
    base = dict(epochs=100, batch_size=16, lr=1e-3, ema_decay=0.9, max_steps=STEPS, seed=0, log_every_first=4,
                log_every=2, eval_every=10 ** 6, eval_start=10 ** 6, val_every=10 ** 6, val_loss_first=FIRST)
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture(scope="module")
def make_splits(mnist_splits):
    idx = subset_indices(len(mnist_splits.train), 256, index=0, mode="disjoint", seed=0)
    return lambda: Splits(mnist_splits.train.subset(idx), mnist_splits.val.subset(torch.arange(40)))


class ExpectNext:
    """After step s (on_step, weights w_s), the validation minibatch loss that step s + 1 must record."""

    def __init__(self, splits, schedule):
        self.draws = StepValDraws(splits.val, schedule, eval_seed=0, batch_size=16)
        self.expected, self.seen = {}, {}

    def on_start(self, ctx):
        self.expected[ctx.step + 1] = float(minibatch_loss(ctx.model, ctx.schedule, *self.draws.at(ctx.step + 1, ctx.device)))

    def on_step(self, ctx, loss, val_loss=None):
        if val_loss is not None:
            self.seen[ctx.step] = val_loss
        self.expected[ctx.step + 1] = float(minibatch_loss(ctx.model, ctx.schedule, *self.draws.at(ctx.step + 1, ctx.device)))


def test_recorded_at_the_logged_steps_at_the_weights_before_the_update(make_splits):
    splits = make_splits()
    hook = ExpectNext(splits, SCHEDULE)
    # log every step so the hook sees every intermediate weight; record the minibatch at steps 1..6
    res = train(model=TINY, training=cfg(log_every_first=STEPS), splits=splits, device="cpu", hooks=hook)
    assert [s for s, _ in res.val_losses] == list(range(1, FIRST + 1)) == sorted(hook.seen)
    for s, v in res.val_losses:
        assert v == hook.expected[s] == hook.seen[s], s
    # step 1: the initial weights (build_model's), the first 16 validation images in order, by hand
    net = build_model(TINY, 0, torch.device("cpu")).eval()
    x0, t, eps, _ = StepValDraws(splits.val, SCHEDULE, 0, 16).at(1, torch.device("cpu"))
    assert torch.equal(x0, splits.val.batch(torch.arange(16)))
    ab = SCHEDULE.alpha_bar[t].float().view(-1, 1, 1, 1)
    with torch.no_grad():
        by_hand = (eps - net(ab.sqrt() * x0 + (1 - ab).sqrt() * eps, t)).pow(2).mean().item()
    assert res.val_losses[0][1] == pytest.approx(by_hand, rel=1e-6)
    assert 0.5 < by_hand < 2.0  # an untrained predictor: about E||eps||^2 / d = 1


def test_the_training_is_untouched_and_only_logged_steps_record(make_splits):
    on = train(model=TINY, training=cfg(), splits=make_splits(), device="cpu")
    off = train(model=TINY, training=cfg(val_loss_first=0), splits=make_splits(), device="cpu")
    assert on.train_losses == off.train_losses and off.val_losses == []  # bit-identical: no RNG consumed
    assert [s for s, _ in on.train_losses] == [1, 2, 3, 4, 6, 8]
    assert [s for s, _ in on.val_losses] == [s for s in (1, 2, 3, 4, 6) if val_logs_at(cfg(), s)] == [1, 2, 3, 4, 6]
    assert all(math.isfinite(v) and v > 0 for _, v in on.val_losses)
    # the batches walk the validation split in order: step 3 starts at image 32, wrapping past 40
    idx = StepValDraws(make_splits().val, SCHEDULE, 0, 16).at(3, torch.device("cpu"))[0]
    assert torch.equal(idx, make_splits().val.batch(torch.tensor([*range(32, 40), *range(8)])))


def test_a_stacked_member_records_what_it_records_alone(make_splits):
    trainings = [cfg(seed=0), cfg(seed=1, lr=2e-3)]
    alone = [train(model=TINY, training=tr, splits=make_splits(), device="cpu") for tr in trainings]
    stacked = train_stacked([Member(training=tr, model=TINY, splits=make_splits(), name=f"m{i}")
                             for i, tr in enumerate(trainings)], device="cpu")
    for a, m in zip(alone, stacked):
        assert [s for s, _ in m.result.val_losses] == [s for s, _ in a.val_losses] == [1, 2, 3, 4, 6]
        assert [v for _, v in m.result.val_losses] == pytest.approx([v for _, v in a.val_losses], rel=1e-5)


def test_refused_beside_a_training_loss_that_is_not_l_simple():
    class Configs:  # what capabilities.refusals reads
        training = cfg()
        diffusion = DiffusionConfig(loss="elbo")
    for path in ("alone", "ddp", "stacked"):
        fields = [f for f, _ in refusals(path, Configs)]
        assert fields == ["training.val_loss_first"], (path, fields)
    Configs.training = cfg(val_loss_first=0)
    assert refusals("alone", Configs) == []
