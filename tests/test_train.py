"""Training on real MNIST: the loss goes down, runs are seeded and resumable bit-for-bit, NaNs stop
the run with a message, and the EMA follows eq. (101) exactly."""
from __future__ import annotations


import pytest
import torch
import torch.nn as nn

from diffusion_core import (EMA, DivergedError, NoiseSchedule, TrainConfig, UNetConfig, subset_indices, train,
                            validation_loss)
from diffusion_core.data import Splits
from diffusion_core.train import build_model, fixed_validation_draws

TINY = UNetConfig(base_width=8, channel_mult=(1, 2), blocks_per_level=1)   # 24,089 parameters
STEPS, MID = 90, 45  # 1,000 images / batch 32 = 31 steps per epoch: 3 epochs (ends at 31, 62, 90)


def cfg(**kw) -> TrainConfig:
    base = dict(epochs=100, batch_size=32, lr=1e-3, ema_decay=0.9, max_steps=STEPS, seed=0,
                eval_every=MID, eval_start=MID, log_every_first=1000)
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture(scope="module")
def make_splits(mnist_splits):
    """Fresh Splits (train() rebinds their fields) over a 1,000-image disjoint subset and 500 validation images."""
    idx = subset_indices(len(mnist_splits.train), 1000, index=0, mode="disjoint", seed=0)

    def make():
        return Splits(mnist_splits.train.subset(idx), mnist_splits.val.subset(torch.arange(500)))
    return make


class KeepState:
    """on_eval hook that keeps the TrainState.state_dict() of each evaluation step."""

    def __init__(self):
        self.states = {}

    def on_eval(self, ctx):
        self.states[ctx.step] = ctx.state.state_dict()


@pytest.fixture(scope="module")
def run_a(make_splits):
    hook = KeepState()
    result = train(model=TINY, training=cfg(), splits=make_splits(), device="cpu", hooks=hook)
    return result, hook.states


def test_training_lowers_validation_loss(run_a, make_splits):
    result, _ = run_a
    assert result.step == STEPS and result.parameters == 24_089
    assert [e for e, _, _ in result.epoch_losses] == [1, 2, 3]
    assert [s for s, _ in result.train_losses] == list(range(1, STEPS + 1))
    # validation loss at initialisation, same fixed (t, eps) draws: ~1.09 (an untrained net's output is
    # not the conditional mean; any predictor that outputs ~0 would score E||eps||^2/d = 1)
    sp = make_splits()
    schedule = NoiseSchedule.make()
    vt, ve = fixed_validation_draws(sp.val, schedule, eval_seed=0)
    init = validation_loss(build_model(TINY, 0, torch.device("cpu")).eval(), schedule, sp.val, vt, ve)
    assert 0.9 < init < 1.3
    vals = [v for _, _, v in result.epoch_losses]
    # measured: 0.34, 0.19, 0.14 (EMA weights, decay 0.9) after 31 / 62 / 90 steps. Bound with margin: 0.25,
    # i.e. under a quarter of the initial loss; and it decreases epoch over epoch.
    assert vals[-1] < 0.25 and vals[-1] < 0.25 * init, vals
    assert vals[0] > vals[1] > vals[2]
    # the EMA model reported by train() is the one the validation loss used
    assert validation_loss(result.ema_model, schedule, sp.val, vt, ve) == pytest.approx(vals[-1], rel=1e-6)
    # train losses: the first steps ~1, the last epoch's mean far lower
    assert result.train_losses[0][1] > 0.6
    assert result.epoch_losses[-1][1] < 0.3


def test_same_seed_identical_different_seed_differs(run_a, make_splits):
    a, _ = run_a
    b = train(model=TINY, training=cfg(), splits=make_splits(), device="cpu")
    assert b.train_losses == a.train_losses            # exact equality, every step
    assert b.epoch_losses == a.epoch_losses
    for pa, pb in zip(a.model.parameters(), b.model.parameters()):
        assert torch.equal(pa, pb)
    c = train(model=TINY, training=cfg(seed=1, max_steps=5), splits=make_splits(), device="cpu")
    assert [s for s, _ in c.train_losses] == [1, 2, 3, 4, 5]
    assert all(lc != la for (_, lc), (_, la) in zip(c.train_losses, a.train_losses))


def test_resume_mid_run_reproduces_uninterrupted_run(run_a, make_splits):
    a, states = run_a
    assert sorted(states) == [MID, STEPS]
    mid = states[MID]
    assert mid["step"] == MID
    # the kept state is a snapshot: training on after it was taken did not change it
    assert not torch.equal(mid["model"]["conv_in.weight"], a.model.conv_in.weight)
    r = train(model=TINY, training=cfg(), splits=make_splits(), device="cpu", resume_state=mid)
    assert r.step == STEPS
    assert r.train_losses == [(s, v) for s, v in a.train_losses if s > MID]     # exact, every step
    assert r.epoch_losses == [e for e in a.epoch_losses if e[0] >= 2]           # epoch 2 was in progress
    for pa, pr in zip(a.model.parameters(), r.model.parameters()):
        assert torch.equal(pa, pr)
    for pa, pr in zip(a.ema_model.parameters(), r.ema_model.parameters()):
        assert torch.equal(pa, pr)


def test_nan_weights_raise_diverged_error_naming_step(make_splits):
    class Poison:
        def on_step(self, ctx, loss):
            if ctx.step == 3:
                with torch.no_grad():
                    ctx.model.conv_out.weight.fill_(float("nan"))

    with pytest.raises(DivergedError) as e:
        train(model=TINY, training=cfg(max_steps=20), splits=make_splits(), device="cpu", hooks=Poison())
    msg = str(e.value)
    assert "nan" in msg and "at step 4" in msg and "learning rate" in msg


def test_huge_learning_rate_diverges(make_splits):
    with pytest.raises(DivergedError, match=r"at step \d+"):
        train(model=TINY, training=cfg(lr=1e6, max_steps=30), splits=make_splits(), device="cpu")


def test_bad_train_config_messages(make_splits):
    with pytest.raises(ValueError, match=r"lr=-0\.1.*positive"):
        TrainConfig(lr=-0.1)
    with pytest.raises(ValueError, match=r"batch_size=0.*>= 1"):
        TrainConfig(batch_size=0)
    with pytest.raises(ValueError, match=r"batch_size=2000.*1000 images"):
        train(model=TINY, training=cfg(batch_size=2000), splits=make_splits(), device="cpu")


# ------------------------------------------------------------------------------- EMA
def test_ema_update_is_exact():
    """theta_hat <- d theta_hat + (1 - d) theta (eq. 101)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    ema = EMA(net, decay=0.75)
    # dyadic numbers: d * e + (1 - d) * p is exact in float32, so equality must be exact
    with torch.no_grad():
        for p in ema.module.parameters():
            p.copy_(torch.randint(-64, 64, p.shape) / 8)
        for p in net.parameters():
            p.copy_(torch.randint(-64, 64, p.shape) / 8)
    before = [p.clone() for p in ema.module.parameters()]
    net[1].running_mean.fill_(0.5)
    ema.update(net)
    for e0, e1, p in zip(before, ema.module.parameters(), net.parameters()):
        assert torch.equal(e1, 0.75 * e0 + 0.25 * p)
    assert torch.equal(ema.module[1].running_mean, net[1].running_mean)       # buffers are copied
    # general values, float64: equal to rounding
    net64, = [nn.Linear(5, 5).double()]
    ema64 = EMA(net64, decay=0.9)
    with torch.no_grad():
        for p in net64.parameters():
            p.add_(torch.randn_like(p))
    e_before = [p.clone() for p in ema64.module.parameters()]
    ema64.update(net64)
    for e0, e1, p in zip(e_before, ema64.module.parameters(), net64.parameters()):
        torch.testing.assert_close(e1, 0.9 * e0 + 0.1 * p, rtol=1e-15, atol=1e-15)
    # k updates against a fixed theta: theta_hat_k - theta = d^k (theta_hat_0 - theta)
    for _ in range(4):
        ema64.update(net64)
    for e0, e5, p in zip(e_before, ema64.module.parameters(), net64.parameters()):
        torch.testing.assert_close(e5 - p, 0.9 ** 5 * (e0 - p), rtol=1e-12, atol=1e-14)
    assert not any(p.requires_grad for p in ema64.module.parameters()) and not ema64.module.training
    with pytest.raises(ValueError, match=r"decay=1\.0.*\[0, 1\)"):
        EMA(net, decay=1.0)


def test_ema_state_roundtrip():
    net = nn.Linear(3, 3)
    a = EMA(net, 0.99)
    with torch.no_grad():
        net.weight.add_(1)
    a.update(net)
    b = EMA(nn.Linear(3, 3), 0.5)
    b.load_state_dict(a.state_dict())
    assert b.decay == 0.99 and torch.equal(b.module.weight, a.module.weight)
