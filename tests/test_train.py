"""Training on real MNIST: the loss goes down, runs are seeded and resumable bit-for-bit, NaNs stop
the run with a message, and the EMA follows eq. (101) exactly."""
from __future__ import annotations


import pytest
import torch
import torch.nn as nn

from diffusion_core import (EMA, DivergedError, NoiseSchedule, TrainConfig, UNetConfig, subset_indices, train,
                            validation_loss)
from diffusion_core.data import Splits
from diffusion_core.training.train import build_model
from diffusion_core.training.validation import fixed_validation_draws

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
    assert [e.epoch for e in result.epoch_losses] == [1, 2, 3]
    assert [s for s, _ in result.train_losses] == list(range(1, STEPS + 1))
    # validation loss at initialisation, same fixed (t, eps) draws: ~1.09 (an untrained net's output is
    # not the conditional mean; any predictor that outputs ~0 would score E||eps||^2/d = 1)
    sp = make_splits()
    schedule = NoiseSchedule.make()
    vt, ve = fixed_validation_draws(sp.val, schedule, eval_seed=0)
    init = validation_loss(build_model(TINY, 0, torch.device("cpu")).eval(), schedule, sp.val, vt, ve)
    assert 0.9 < init < 1.3
    vals = [e.val for e in result.epoch_losses]
    # measured: 0.34, 0.19, 0.14 (EMA weights, decay 0.9) after 31 / 62 / 90 steps. Bound with margin: 0.25,
    # i.e. under a quarter of the initial loss; and it decreases epoch over epoch.
    assert vals[-1] < 0.25 and vals[-1] < 0.25 * init, vals
    assert vals[0] > vals[1] > vals[2]
    # the EMA model reported by train() is the one the validation loss used
    assert validation_loss(result.ema_model, schedule, sp.val, vt, ve) == pytest.approx(vals[-1], rel=1e-6)
    # train losses: the first steps ~1, the last epoch's mean far lower
    assert result.train_losses[0][1] > 0.6
    assert result.epoch_losses[-1].train < 0.3


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
    assert r.epoch_losses == [e for e in a.epoch_losses if e.epoch >= 2]        # epoch 2 was in progress
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


def test_ema_warmup_decays_and_initial_share_are_pinned():
    """Warm-up: lambda_k = min(lambda, (1 + k) / (10 + k)); the initial weights' share is their product."""
    from diffusion_core.training.ema import warmup_decay

    assert [warmup_decay(0.9999, k) for k in range(4)] == [0.1, 2 / 11, 3 / 12, 4 / 13]
    assert [warmup_decay(0.2, k) for k in range(4)] == [0.1, 2 / 11, 0.2, 0.2]   # capped at lambda
    net = nn.Linear(4, 4).double()
    ema = EMA(net, decay=0.9999, warmup=True)
    e0 = [p.clone() for p in ema.module.parameters()]
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p))
    for _ in range(4):
        ema.update(net)
    share = 0.1 * (2 / 11) * (3 / 12) * (4 / 13)                           # = 1/715
    assert ema.updates == 4 and ema.init_share == pytest.approx(share, rel=1e-15)
    assert share == pytest.approx(1 / 715, rel=1e-12)
    # against a fixed theta the EMA's distance to it shrinks by exactly that share
    for a, e, p in zip(e0, ema.module.parameters(), net.parameters()):
        torch.testing.assert_close(e - p, share * (a - p), rtol=1e-10, atol=1e-14)
    plain = EMA(net, decay=0.9)
    for _ in range(50):
        plain.update(net)
    assert plain.init_share == pytest.approx(0.9 ** 50, rel=1e-12) and plain.current_decay() == 0.9


def test_ema_foreach_lerp_update_equals_the_reference_loop():
    """The fused _foreach_lerp_ update against the per-tensor eq. (101), through the warm-up."""
    torch.manual_seed(1)
    net = nn.Sequential(nn.Conv2d(1, 3, 3), nn.GroupNorm(1, 3), nn.Linear(4, 2))
    ema = EMA(net, decay=0.95, warmup=True)
    ref = [p.detach().clone() for p in net.parameters()]
    for k in range(30):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(0.1 * torch.randn_like(p))
        d = min(0.95, (1 + k) / (10 + k))
        ema.update(net)
        for r, p in zip(ref, net.parameters()):
            r.lerp_(p.detach(), 1 - d)                       # the reference loop, one tensor at a time
    for r, e in zip(ref, ema.module.parameters()):
        assert torch.equal(r, e)
    net64 = nn.Linear(3, 3).double()
    e64 = EMA(net64, decay=0.9, warmup=True)
    before = [p.clone() for p in e64.module.parameters()]
    with torch.no_grad():
        net64.weight.add_(1.0)
    e64.update(net64)                                         # k = 0: lambda_0 = 0.1
    for b, e, p in zip(before, e64.module.parameters(), net64.parameters()):
        torch.testing.assert_close(e, 0.1 * b + 0.9 * p, rtol=1e-15, atol=1e-15)


def test_ema_state_keeps_warmup_count_and_share():
    net = nn.Linear(3, 3)
    a = EMA(net, 0.99, warmup=True)
    for _ in range(3):
        a.update(net)
    b = EMA(nn.Linear(3, 3), 0.5)
    b.load_state_dict(a.state_dict())
    assert (b.warmup, b.updates, b.init_share) == (True, 3, a.init_share) and b.current_decay() == a.current_decay()
    old = {k: v for k, v in a.state_dict().items() if k in ("decay", "module")}   # a state from before warm-up
    c = EMA(nn.Linear(3, 3), 0.5)
    c.load_state_dict(old, updates_if_missing=7)
    assert (c.warmup, c.updates) == (False, 7) and c.init_share == pytest.approx(0.99 ** 7)


def test_epoch_losses_are_the_eval_mode_losses_of_the_recorded_weights(run_a, make_splits):
    """val_raw / train_eval are the raw weights' losses in eval mode on fixed draws of the evaluation seed;
    ema_init_share = lambda^step (no warm-up)."""
    from diffusion_core.training.validation import fixed_train_draws

    result, _ = run_a
    last = result.epoch_losses[-1]
    sp = make_splits()
    schedule = NoiseSchedule.make()
    vt, ve = fixed_validation_draws(sp.val, schedule, eval_seed=0)
    raw = result.model.eval()
    assert last.val_raw == pytest.approx(validation_loss(raw, schedule, sp.val, vt, ve), rel=1e-6)
    idx, tt, te = fixed_train_draws(sp.train, schedule, eval_seed=0)
    assert len(idx) == 512 and len(set(idx.tolist())) == 512
    assert last.train_eval == pytest.approx(validation_loss(raw, schedule, sp.train.subset(idx), tt, te), rel=1e-6)
    assert [e.step for e in result.epoch_losses] == [31, 62, 90]
    for e in result.epoch_losses:
        assert e.ema_init_share == pytest.approx(0.9 ** e.step, rel=1e-12)
    # eval mode (dropout off) on training images: below the dropout-on running mean of the last epoch
    assert last.train_eval < last.train and last.val_raw < 0.3


def test_evaluation_consumes_no_training_randomness_and_warmup_resumes_exactly(mnist_splits):
    """64 training images at batch 32: an epoch (and its evaluation-mode losses) every 2 steps."""
    def splits():
        return Splits(mnist_splits.train.subset(torch.arange(64)), mnist_splits.val.subset(torch.arange(64)))

    small = dict(max_steps=8, eval_every=4, eval_start=4)
    # val_every=3: the epoch ends at 4 and 6 pass a multiple of 3 steps, 8 is the last step, 2 is neither
    with_eval = train(model=TINY, training=cfg(val_every=3, **small), splits=splits(), device="cpu")
    quiet = train(model=TINY, training=cfg(val_every=10 ** 9, **small), splits=splits(), device="cpu")
    assert quiet.train_losses == with_eval.train_losses                      # exact: same training streams
    assert [e.val_raw is not None for e in with_eval.epoch_losses] == [False, True, True, True]
    assert quiet.epoch_losses[0].val_raw is None
    hook = KeepState()
    warm_cfg = cfg(ema_warmup=True, ema_decay=0.999, **small)
    w = train(model=TINY, training=warm_cfg, splits=splits(), device="cpu", hooks=hook)
    assert hook.states[4]["ema"]["updates"] == 4
    r = train(model=TINY, training=warm_cfg, splits=splits(), device="cpu", resume_state=hook.states[4])
    assert r.epoch_losses == w.epoch_losses[2:] and r.epoch_losses[-1].step == 8   # bit-exact, incl. ema_init_share
    share = 1.0
    for k in range(8):
        share *= min(0.999, (1 + k) / (10 + k))
    assert w.epoch_losses[-1].ema_init_share == pytest.approx(share, rel=1e-12) and share < 1e-4
    for pw, pr in zip(w.ema_model.parameters(), r.ema_model.parameters()):
        assert torch.equal(pw, pr)
