"""A stacked group's members sampled in one batched pass equal their own `Evaluator.sample` (issue 11, item 3).

Three members of different weights (seeds, learning rates), trained together by train_stacked on real
MNIST for 20 steps (T = 40 so that DDPM runs all its steps quickly). Each member's samples from the
stacked pass must equal its own Evaluator.sample: the same x_T, the same ancestral noise stream, the
same sampler steps; only the grouped convolutions sum in another order. Measured on the 2-core dev CPU
(torch 2.14): max |difference| 9.5e-7 in [-1, 1] units before the uint8 conversion; uint8 identical for
DDIM eta = 0 (the evaluations in train_stacked), 1 of 37,632 pixels one level apart for DDPM and for DDIM
eta = 1 (a value at a rounding edge). Tolerances: 1e-4 in [-1, 1] units, and at most 0.1% of uint8 pixels
one level apart; a member's rows swapped with another's, a noise stream restarted per batch, x_T in
another order or the raw weights for the EMA ones move samples by far more.
"""
from __future__ import annotations

import pytest
import torch

import diffusion_core.evaluation as evaluation
import diffusion_core.diffusion.stacked_sampling as stacked_sampling
from diffusion_core import NoiseSchedule, TrainConfig, UNetConfig
from diffusion_core.capabilities import Member
from diffusion_core.config import DiffusionConfig, EvalConfig
from diffusion_core.data import Splits, from_unit_range
from diffusion_core.evaluation import DrawnSamples, Evaluator
from diffusion_core.training.stacked import train_stacked
from diffusion_core.diffusion.stacked_sampling import sample_members, sample_stacked, sampling_key, stacked_eps_of_models

TINY = UNetConfig(base_width=8, channel_mult=(1, 2), blocks_per_level=1, dropout=0.0)
DIFFUSION = DiffusionConfig(T=40)
# 16 samples in batches of 12: a full and a partial batch, the noise stream running across both.
EVAL = EvalConfig(n_samples=16, grid_images=8, sampler="ddim", steps=8, batch_size=12, metrics=False,
                  residual_images=8, t_grid=3)
OTHER = EvalConfig(**{**EVAL.__dict__, "steps": 5})   # samples otherwise: falls back to sampling alone
FLOAT_TOL, UINT8_FRACTION = 1e-4, 1e-3


class RecordingHooks:
    """At each evaluation: the samples train_stacked handed over, the member's own Evaluator.sample,
    and the EvalResult of Evaluator.evaluate given those samples."""

    def __init__(self, cfg: EvalConfig):
        self.cfg, self.seen = cfg, []

    def on_eval(self, ctx):
        ev = Evaluator(ctx.schedule, ctx.splits.val, self.cfg, reverse_variance=DIFFUSION.reverse_variance)
        drawn = ctx.eval_samples
        self.seen.append((ctx.step, drawn, ev.sample(ctx.ema_model), ev.evaluate(ctx.ema_model, ctx.model, samples=drawn)))


@pytest.fixture(scope="module")
def group(mnist_splits):
    """train_stacked over three members (two evaluations each; the third samples otherwise); their hooks
    and results."""
    splits = Splits(mnist_splits.train.subset(torch.arange(256)), mnist_splits.val.subset(torch.arange(32)))
    configs = (EVAL, EVAL, OTHER)
    hooks = [RecordingHooks(c) for c in configs]
    members = [Member(TrainConfig(epochs=100, batch_size=16, lr=lr, ema_decay=0.8, max_steps=20, seed=seed,
                                  eval_every=10, eval_start=10),
                      TINY, diffusion=DIFFUSION, hooks=h, splits=splits, evaluation=h.cfg, name=f"m{seed}")
               for seed, (lr, h) in enumerate(zip((2e-3, 1e-3, 3e-3), hooks))]
    results = train_stacked(members, eval_seed=EVAL.seed, device="cpu", batched_sampling=True)
    return splits, hooks, [r.result.ema_model for r in results]


def unit_range(monkeypatch):
    """Samples in [-1, 1] floats, not uint8: the comparison before the conversion."""
    for module in (evaluation, stacked_sampling):
        monkeypatch.setattr(module, "from_unit_range", lambda x: x.clamp(-1, 1))


def assert_same_samples(stacked: torch.Tensor, own: torch.Tensor) -> None:
    assert stacked.shape == own.shape and stacked.dtype == own.dtype == torch.uint8
    apart = (stacked.int() - own.int()).abs()
    assert int(apart.max()) <= 1 and float((apart > 0).float().mean()) <= UINT8_FRACTION
    assert float(((own > 0) & (own < 255)).float().mean()) > 0.2  # not all clamped: a comparison of values


@pytest.mark.parametrize("sampler, forward_images", [(dict(sampler="ddpm"), None),
                                                     (dict(sampler="ddim", steps=8, eta=1.0), 6)])
def test_stacked_samples_equal_each_members_own(group, sampler, forward_images, monkeypatch):
    """forward_images 6: the stacked network called on 2 images of each member at a time."""
    splits, _, models = group
    cfg = EvalConfig(**{**EVAL.__dict__, **sampler})
    evaluators = [Evaluator(NoiseSchedule.make("linear", DIFFUSION.T), splits.val, cfg) for _ in models]
    unit_range(monkeypatch)  # floats in [-1, 1]; from_unit_range of them is what the uint8 samples would be
    own = [ev.sample(m) for ev, m in zip(evaluators, models)]
    stacked = sample_stacked(evaluators, stacked_eps_of_models(models)(list(range(len(models)))), forward_images)
    assert max(float((s - o).abs().max()) for s, o in zip(stacked, own)) <= FLOAT_TOL
    for s, o in zip(stacked, own):
        assert_same_samples(from_unit_range(s), from_unit_range(o))
    assert (own[0] - own[1]).abs().mean() > 0.05  # the members' samples differ


def test_members_sampled_otherwise_fall_back(group):
    splits, _, models = group
    schedule = NoiseSchedule.make("linear", DIFFUSION.T)
    evaluators = [Evaluator(schedule, splits.val, c) for c in (EVAL, EVAL, OTHER)]
    drawn = sample_members(evaluators, models, stacked_eps_of_models(models))
    assert drawn[2] is None                      # samples alone, in its own evaluation
    for d, ev, m in zip(drawn[:2], evaluators, models):
        assert isinstance(d, DrawnSamples) and d.seconds > 0
        assert_same_samples(d.images, ev.sample(m))
    with pytest.raises(ValueError, match="sampling configs"):
        sample_stacked(evaluators, stacked_eps_of_models(models)([0, 1, 2]))
    # What the samples do not depend on may differ; another residual image count draws another x_T.
    key = sampling_key(evaluators[0], models[0])
    assert sampling_key(Evaluator(schedule, splits.val, EvalConfig(**{**EVAL.__dict__, "is_splits": 3, "t_grid": 5})),
                        models[1]) == key
    assert sampling_key(Evaluator(schedule, splits.val, EvalConfig(**{**EVAL.__dict__, "residual_images": 4})),
                        models[1]) != key
    assert sampling_key(Evaluator(schedule, splits.val, EvalConfig(**{**EVAL.__dict__, "compile": True})),
                        models[1]) is None


def test_train_stacked_hands_each_member_its_own_samples(group):
    _, hooks, _ = group
    assert len(hooks[2].seen) == 2
    for _, drawn, own, result in hooks[2].seen:   # sampled otherwise: sampled alone, in its evaluation
        assert drawn is None and torch.equal(result.samples, own[:EVAL.n_samples])
    for h in hooks[:2]:
        assert [step for step, *_ in h.seen] == [10, 20]
        for _, drawn, own, result in h.seen:
            assert isinstance(drawn, DrawnSamples)
            assert_same_samples(drawn.images, own)
            assert torch.equal(result.samples, drawn.images[:EVAL.n_samples])   # evaluate used them ...
            assert torch.equal(result.grid, drawn.images[:EVAL.grid_images])
            assert result.seconds >= drawn.seconds                                # ... and counts their time
    assert not torch.equal(hooks[0].seen[-1][1].images, hooks[1].seen[-1][1].images)


def test_evaluate_uses_the_samples_it_is_given(group):
    splits, _, models = group
    ev = Evaluator(NoiseSchedule.make("linear", DIFFUSION.T), splits.val, EVAL)
    given = torch.arange(16 * 784).remainder(256).to(torch.uint8).view(16, 1, 28, 28)
    result = ev.evaluate(models[0], samples=DrawnSamples(given, 2.5))
    assert torch.equal(result.samples, given) and torch.equal(result.grid, given[:EVAL.grid_images])
    assert result.seconds >= 2.5
    with pytest.raises(ValueError, match="drawn samples"):
        ev.evaluate(models[0], samples=DrawnSamples(given[:10], 0.0))


def test_on_the_cpu_members_sample_alone_unless_asked(mnist_splits):
    """batched_sampling=None batches on a GPU only: on the CPU the batched pass is slower (BENCHMARKS.md)."""
    splits = Splits(mnist_splits.train.subset(torch.arange(64)), mnist_splits.val.subset(torch.arange(32)))
    hooks = [RecordingHooks(EVAL) for _ in range(2)]
    members = [Member(TrainConfig(epochs=100, batch_size=16, max_steps=4, seed=seed, eval_every=4, eval_start=4),
                      TINY, diffusion=DIFFUSION, hooks=h, splits=splits, evaluation=EVAL, name=f"m{seed}")
               for seed, h in enumerate(hooks)]
    train_stacked(members, eval_seed=EVAL.seed, device="cpu")
    assert [drawn for h in hooks for _, drawn, _, _ in h.seen] == [None, None]
