"""The fast-path training options keep the loss curve of the plain fp32 loop (issue 6, CPU part).

A tiny U-Net (base width 8, channel_mult (1, 2), 24,089 parameters) trains for 40 steps on 1,024
real MNIST images with one seed; every option must reproduce the fp32 baseline's per-step loss
sequence within its precision's tolerance. Measured on the 2-core AMD EPYC dev machine
(torch 2.14 CPU), 60 steps, max over steps of |loss - loss_fp32| / loss_fp32:

    channels_last            3.2e-7    (same float ops, different summation order in oneDNN)
    fused Adam (CPU kernel)  2.3e-7
    torch.compile (inductor) 2.2e-7
    bf16 autocast            8.9e-4    (mean 2.8e-4; the loss is a mean over 25k squared errors,
                                        so bf16 rounding in the forward averages out)

Tolerances below: 1e-4 for the fp32 reorderings (~300x the measured drift, which grows with
the number of steps of a chaotic training run, so other CPUs / oneDNN versions have room),
1e-2 for bf16 (~10x the measured drift; a loss computed in bf16 or a broken autocast —
e.g. GroupNorm statistics in bf16 with no fp32 accumulation — would show up as a
systematically different curve long before that).

Dropout is 0 here on purpose: with dropout > 0, channels_last draws the Bernoulli mask in
memory (NHWC) order and inductor uses its own RNG, so those runs see a *different but equally
valid* dropout mask stream and their curves differ from fp32 by up to ~1e-2 per step
(measured 8.5e-3 over 40 steps at dropout 0.1) — not a numerical error, a different random
draw. bf16 alone keeps the fp32 mask stream.
"""
from __future__ import annotations

import os
import shutil

import pytest
import torch

from diffusion_core import TrainConfig, UNetConfig, subset_indices, train
from diffusion_core.data import Splits

TINY = UNetConfig(base_width=8, channel_mult=(1, 2), blocks_per_level=1, dropout=0.0)
STEPS = 40
FP32_RTOL = 1e-4
BF16_RTOL = 1e-2


def cfg(**kw) -> TrainConfig:
    return TrainConfig(epochs=100, batch_size=32, lr=1e-3, ema_decay=0.9, max_steps=STEPS, seed=0,
                       log_every_first=1000, val_every=10 ** 9, eval_start=10 ** 9, **kw)


class Seen:
    """on_start hook: records what the fast path actually set up (so a silently ignored option fails)."""

    def on_start(self, ctx):
        opt = ctx.state.optimizer
        self.fused = bool(opt.param_groups[0].get("fused"))
        conv = ctx.model.down_blocks[0][0].conv1.weight  # (8, 8, 3, 3): the layouts differ
        self.channels_last = conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()


@pytest.fixture(scope="module")
def run(mnist_splits):
    idx = subset_indices(len(mnist_splits.train), 1024, index=0, mode="disjoint", seed=0)

    def go(**kw):
        splits = Splits(mnist_splits.train.subset(idx), mnist_splits.val.subset(torch.arange(64)))
        seen = Seen()
        result = train(model=TINY, training=cfg(**kw), splits=splits, device="cpu", hooks=seen)
        losses = torch.tensor([v for _, v in result.train_losses], dtype=torch.float64)
        assert [s for s, _ in result.train_losses] == list(range(1, STEPS + 1))
        return losses, seen
    return go


@pytest.fixture(scope="module")
def baseline(run):
    losses, seen = run()
    assert not seen.fused and not seen.channels_last  # CPU default: the plain reference loop
    # it trains: ~1.09 at step 1, ~0.2 over the last 10 steps
    assert losses[0] > 0.8 and losses[-10:].mean() < 0.5 * losses[0]
    return losses


def max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a - b).abs() / b.abs()).max())


@pytest.mark.parametrize("options, rtol", [
    (dict(channels_last=True), FP32_RTOL),
    (dict(fused_adam=True), FP32_RTOL),
    (dict(channels_last=True, fused_adam=True), FP32_RTOL),
    (dict(precision="bf16"), BF16_RTOL),
    (dict(precision="bf16", channels_last=True, fused_adam=True), BF16_RTOL),
], ids=["channels_last", "fused_adam", "channels_last+fused_adam", "bf16", "bf16+channels_last+fused_adam"])
def test_fast_path_keeps_the_loss_curve(run, baseline, options, rtol):
    losses, seen = run(**options)
    assert seen.fused == options.get("fused_adam", False)
    assert seen.channels_last == options.get("channels_last", False)
    err = max_rel(losses, baseline)
    assert err < rtol, f"{options}: per-step loss differs from fp32 by up to {err:.2e} (tolerance {rtol:.0e})"
    if options.get("precision") == "bf16":
        # autocast really ran in bf16: the curve is close to, but not bit-identical with, fp32
        assert err > 0, "bf16 loss curve is bit-identical to fp32: autocast did not engage"


def test_compile_reaches_torch_compile_and_keeps_the_loss_curve(run, baseline, monkeypatch):
    """training.compile wraps the training forward in torch.compile with its compile_mode, and the
    captured forward + backward (TorchDynamo + AOTAutograd, here with the `aot_eager` backend: the
    same graphs inductor would get, run by eager kernels) keeps the fp32 loss curve. Inductor's
    code generation itself is opt-in (STUDYCTL_TEST_COMPILE=1): for sampling in
    test_compiled_sampling_matches_eager[inductor] (~45 s cold), for training in the test below (a minute)."""
    real = torch.compile
    modes = []

    def aot_eager(fn, mode=None, **kw):
        modes.append(mode)
        return real(fn, backend="aot_eager", **kw)

    monkeypatch.setattr(torch, "compile", aot_eager)
    torch._dynamo.reset()
    try:
        losses, _ = run(compile=True, compile_mode="max-autotune-no-cudagraphs")
    finally:
        torch._dynamo.reset()
    assert modes == ["max-autotune-no-cudagraphs"]  # once, with the configured mode: the option is not ignored
    err = max_rel(losses, baseline)
    assert err < FP32_RTOL, f"compile (aot_eager): per-step loss differs from fp32 by up to {err:.2e}"


def test_compile_with_inductor_keeps_the_loss_curve(run, baseline):
    if os.environ.get("STUDYCTL_TEST_COMPILE") != "1":
        pytest.skip("a cold inductor compile of forward + backward takes 55-80 s on a shared 2-core CPU (~10 s "
                    "with a warm inductor cache), a tenth of the suite's time; the graphs it compiles are checked "
                    "by test_compile_reaches_torch_compile_and_keeps_the_loss_curve, inductor's kernels by "
                    "test_compiled_sampling_matches_eager[inductor] (also opt-in). Measured by hand: per-step loss within 2.2e-7 of fp32 "
                    "over 60 steps. Set STUDYCTL_TEST_COMPILE=1 to run it")
    if not (shutil.which("gcc") or shutil.which("cc") or shutil.which("clang")):
        pytest.skip("torch.compile on CPU needs a C++ compiler (inductor), none on PATH")
    losses, _ = run(compile=True)
    err = max_rel(losses, baseline)
    assert err < FP32_RTOL, f"compile: per-step loss differs from fp32 by up to {err:.2e}"


# ------------------------------------------------------------------ sampling fast path
@pytest.fixture(scope="module")
def sampling(mnist_splits):
    """A tiny network (fixed init) and an evaluator factory: DDIM-10 on T = 200, 48 samples in
    batches of 32 (so the last batch has another shape)."""
    from diffusion_core import NoiseSchedule, ScheduleConfig, UNet
    from diffusion_core.config import EvalConfig
    from diffusion_core.evaluation import Evaluator

    torch.manual_seed(0)
    net = UNet(TINY).eval()
    schedule = NoiseSchedule.from_config(ScheduleConfig(T=200))
    val = mnist_splits.val.subset(torch.arange(64))

    def sample(**kw):
        ev = Evaluator(schedule, val, EvalConfig(n_samples=48, grid_images=16, sampler="ddim", steps=10,
                                                 metrics=False, batch_size=32, **kw))
        return ev, ev.sample(net).float()
    return sample


def test_bf16_sampling_stays_close_to_fp32(sampling):
    _, fp32 = sampling()
    _, bf16 = sampling(precision="bf16")
    diff = (bf16 - fp32).abs()
    # measured: mean 0.09, max 2 uint8 levels (of 255) after 10 DDIM steps
    assert 0 < diff.mean() < 1.0 and diff.max() <= 8, (diff.mean(), diff.max())


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_sampling_matches_eager(sampling, backend, monkeypatch):
    """evaluation.compile samples through one torch.compile wrapper, reused, with the eager maths.
    In CI the wrapper's graphs run on the `aot_eager` backend (what inductor would get, run by eager
    kernels); inductor's own C++ kernels are opt-in (a cold compile is 45 s of gcc on the 2-core CPU,
    a tenth of the suite): set STUDYCTL_TEST_COMPILE=1."""
    if backend == "inductor":
        if os.environ.get("STUDYCTL_TEST_COMPILE") != "1":
            pytest.skip("a cold inductor compile takes ~45 s on the 2-core CPU; set STUDYCTL_TEST_COMPILE=1 to run it")
        if not (shutil.which("gcc") or shutil.which("cc") or shutil.which("clang")):
            pytest.skip("torch.compile on CPU needs a C++ compiler (inductor), none on PATH")
    else:
        real = torch.compile
        monkeypatch.setattr(torch, "compile", lambda fn, **kw: real(fn, backend=backend, **kw))
    torch._dynamo.reset()
    _, eager = sampling()
    ev, compiled = sampling(compile=True)
    assert (compiled - eager).abs().max() <= 1  # same fp32 maths; at most a rounding flip in uint8
    again = ev.sample(ev._compiled[next(iter(ev._compiled))][0]).float()
    assert torch.equal(again, compiled) and len(ev._compiled) == 1  # one wrapper, reused
    wrapper = ev._compiled[next(iter(ev._compiled))][1]
    assert wrapper is not ev._compiled[next(iter(ev._compiled))][0]  # the sampler really got the compiled one


def test_fast_path_options_are_validated():
    from diffusion_core.config import EvalConfig

    with pytest.raises(ValueError, match="compile_mode='fast'.*reduce-overhead"):
        cfg(compile_mode="fast")
    with pytest.raises(ValueError, match="precision='fp16'.*fp32, bf16"):
        EvalConfig(precision="fp16")
