"""One engine (issue 23, item 1): train() and train_stacked are one loop, engine.run_group, over a group
of one or of K; what they share exists once: the run's Evaluator (built once by the engine,
Evaluator.of_run, handed to its hooks), the training-noise stream, the epoch-end records, divergence.
Their numbers: tests/test_pinned_curve.py, tests/test_stacked.py."""
from __future__ import annotations

import pytest
import torch

import diffusion_core.evaluation as evaluation
from diffusion_core import TrainConfig, UNetConfig, train
from diffusion_core.capabilities import Member
from diffusion_core.config import EvalConfig
from diffusion_core.data import Splits
from diffusion_core.training.stacked import train_stacked

TINY = UNetConfig(base_width=8, channel_mult=(1, 2), blocks_per_level=1)
EVAL = EvalConfig(n_samples=8, grid_images=4, sampler="ddim", steps=3, metrics=False, residual_images=8, t_grid=3)


class SeesEvaluator:
    def __init__(self):
        self.seen = []

    def on_start(self, ctx):
        self.seen.append(("start", ctx.evaluator))

    def on_eval(self, ctx):
        self.seen.append(("eval", ctx.evaluator))


@pytest.fixture()
def counted(monkeypatch):
    """Every Evaluator built, in order."""
    built = []
    original = evaluation.Evaluator.__init__

    def init(self, *args, **kw):
        built.append(self)
        original(self, *args, **kw)
    monkeypatch.setattr(evaluation.Evaluator, "__init__", init)
    return built


def test_each_run_builds_one_evaluator_and_hands_it_to_its_hooks(mnist_splits, counted):
    splits = Splits(mnist_splits.train.subset(torch.arange(64)), mnist_splits.val.subset(torch.arange(16)))
    tc = [TrainConfig(epochs=100, batch_size=16, max_steps=4, seed=s, eval_every=2, eval_start=2) for s in (0, 1)]
    hooks = [SeesEvaluator() for _ in range(3)]
    train_stacked([Member(tc[i], TINY, hooks=hooks[i], splits=splits, evaluation=EVAL, name=f"m{i}") for i in (0, 1)],
                  device="cpu", batched_sampling=True)
    train(model=TINY, training=tc[0], splits=splits, device="cpu", hooks=hooks[2], evaluation=EVAL)
    assert len(counted) == 3  # one per run (a stacked member built two before issue 23)
    for h, ev in zip(hooks, counted):
        assert [kind for kind, _ in h.seen] == ["start", "eval", "eval"]
        assert all(e is ev for _, e in h.seen)
        assert ev.cfg == EVAL and torch.equal(ev.train_images.images, splits.train.images)  # of_run: for memorization
    # without an evaluation config there is none, and nothing is built
    h = SeesEvaluator()
    train(model=TINY, training=tc[0], splits=splits, device="cpu", hooks=h)
    assert len(counted) == 3 and {e for _, e in h.seen} == {None}


def test_a_stacked_member_draws_its_noise_as_train_does(mnist_splits, monkeypatch):
    """Each member's (t, eps) stream is train()'s noise_generator of its own TrainConfig, device_noise
    included (on the CPU both streams are the CPU's, so the wiring is what can be seen here; before
    issue 23 a member drew from a CPU generator whatever device_noise said)."""
    import diffusion_core.training.stacked as stacked
    from diffusion_core.training.train import noise_generator

    made = []

    def recording(training, device, rank=0):
        g = noise_generator(training, device, rank)
        made.append((training.seed, training.device_noise, g))
        return g
    monkeypatch.setattr(stacked, "noise_generator", recording)
    splits = Splits(mnist_splits.train.subset(torch.arange(32)), mnist_splits.val.subset(torch.arange(8)))
    tc = [TrainConfig(epochs=100, batch_size=16, max_steps=2, seed=s, device_noise=s == 1, eval_start=10 ** 9)
          for s in (0, 1)]
    results = train_stacked([Member(t, TINY, splits=splits, name=f"m{t.seed}") for t in tc], device="cpu")
    assert [(seed, dn) for seed, dn, _ in made] == [(0, False), (1, True)]
    alone = train(model=TINY, training=tc[1], splits=splits, device="cpu")
    stacked_losses = results[1].result.train_losses
    assert [s for s, _ in stacked_losses] == [s for s, _ in alone.train_losses] == [1, 2]
    assert [v for _, v in stacked_losses] == pytest.approx([v for _, v in alone.train_losses], rel=1e-5)


def test_a_run_alone_and_a_stacked_group_go_through_the_one_loop(mnist_splits, monkeypatch):
    """train() is a group of one and train_stacked a group of K in engine.run_group: each call runs the
    loop once, with a group of that many members (the step is all a path brings)."""
    import diffusion_core.training.engine as engine
    import diffusion_core.training.stacked as stacked
    import diffusion_core.training.train as train_module

    seen = []
    real = engine.run_group

    def recording(group, **kw):
        seen.append((type(group).__name__, len(group.runs)))
        return real(group, **kw)
    monkeypatch.setattr(train_module, "run_group", recording)
    monkeypatch.setattr(stacked, "run_group", recording)
    splits = Splits(mnist_splits.train.subset(torch.arange(32)), mnist_splits.val.subset(torch.arange(8)))
    tc = [TrainConfig(epochs=100, batch_size=16, max_steps=2, seed=s, eval_start=10 ** 9) for s in (0, 1, 2)]
    train(model=TINY, training=tc[0], splits=splits, device="cpu")
    train_stacked([Member(t, TINY, splits=splits, name=f"m{t.seed}") for t in tc], device="cpu")
    assert seen == [("SingleGroup", 1), ("_Group", 3)]


class Diverges:
    def __init__(self):
        self.diverged = []

    def on_diverged(self, err):
        self.diverged.append(str(err))


def test_divergence_is_one_mechanism_for_a_run_alone_and_a_member(mnist_splits):
    """A NaN loss: the engine calls the member's on_diverged once; a run alone then raises the same
    error, a stacked member leaves FAILED with it while the other member finishes."""
    from diffusion_core.training.engine import DivergedError

    splits = Splits(mnist_splits.train.subset(torch.arange(32)), mnist_splits.val.subset(torch.arange(8)))
    bad, good = (TrainConfig(epochs=100, batch_size=16, max_steps=4, seed=s, lr=lr, eval_start=10 ** 9)
                 for s, lr in ((0, 1e9), (1, 1e-3)))
    alone = Diverges()
    with pytest.raises(DivergedError) as raised:
        train(model=TINY, training=bad, splits=splits, device="cpu", hooks=alone)
    assert alone.diverged == [str(raised.value)]
    member = Diverges()
    results = train_stacked([Member(bad, TINY, hooks=member, splits=splits, name="bad"),
                             Member(good, TINY, splits=splits, name="good")], device="cpu")
    assert [r.status for r in results] == ["FAILED", "FINISHED"]
    assert member.diverged == [str(raised.value)] and results[0].error == f"DivergedError: {raised.value}"
    assert results[1].result.step == 4 and results[0].result.step < 4
