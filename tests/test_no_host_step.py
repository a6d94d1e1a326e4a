"""The no-host-in-the-loop options of train() (issue 11) keep the CPU run's numbers exactly.

deferred_sync only moves *when* logged losses are fetched (every log_every steps, at epoch ends,
evaluations and the end) — the values, their steps and the hooks' calls must be bit-identical
to the eager run. device_noise draws (t, eps) on the training device: on the CPU that is the
same generator and the same stream (pinned here), on a GPU another one (the GPU tests below,
skipped on a CPU). cuda_graph needs a GPU and says so; on a GPU its replayed step keeps the eager
step's losses.
"""
from __future__ import annotations

import math

import pytest
import torch

from diffusion_core import TrainConfig, UNetConfig, train
from diffusion_core.data import Splits

TINY = UNetConfig(base_width=8, channel_mult=(1, 2), blocks_per_level=1, dropout=0.1)


def cfg(**kw) -> TrainConfig:
    # 16 steps per epoch of 256 images; every step logged for 5 steps, then every 4th.
    base = dict(epochs=2, batch_size=16, lr=1e-3, ema_decay=0.9, max_steps=22, seed=3, log_every_first=5,
                log_every=4, eval_start=10, eval_every=10)
    return TrainConfig(**{**base, **kw})


class Calls:
    def __init__(self):
        self.seen = []

    def on_step(self, ctx, loss):  # the step the loss belongs to, and the step training has reached
        self.seen.append(("step", ctx.step, ctx.epoch, loss, ctx.state.step))

    def on_epoch(self, ctx, losses):
        self.seen.append(("epoch", ctx.step, losses.epoch, losses.train, losses.val, losses.val_raw,
                          losses.train_eval))

    def on_eval(self, ctx):
        self.seen.append(("eval", ctx.step))


@pytest.fixture(scope="module")
def splits(mnist_splits):
    return Splits(mnist_splits.train.subset(torch.arange(256)), mnist_splits.val.subset(torch.arange(32)))


def run(splits, **kw):
    calls = Calls()
    result = train(model=TINY, training=cfg(**kw), splits=splits, device="cpu", hooks=calls)
    return result, calls.seen


def test_deferred_sync_reports_the_eager_losses_exactly(splits):
    eager, eager_calls = run(splits)
    deferred, deferred_calls = run(splits, deferred_sync=True)
    assert [s for s, _ in eager.train_losses] == [1, 2, 3, 4, 5, 8, 12, 16, 20]
    assert deferred.train_losses == eager.train_losses
    assert deferred.epoch_losses == eager.epoch_losses
    # Hooks: the same calls in the same order with the same values (the step a loss belongs to) ...
    assert [c[:4] for c in deferred_calls] == [c[:4] for c in eager_calls]
    # ... but fetched later: steps 1-4 when training reaches step 4 (a log_every boundary), step 5 at 8.
    assert all(c[4] == c[1] for c in eager_calls if c[0] == "step")
    assert [c[4] for c in deferred_calls if c[0] == "step"][:6] == [4, 4, 4, 4, 8, 8]


class Noise:
    """on_start hook: where training draws its (t, eps) noise from, and that generator's first draw."""

    def on_start(self, ctx):
        self.device = ctx.state.generator.device
        self.state = ctx.state.generator.get_state().clone()


def test_device_noise_keeps_the_cpu_stream_on_the_cpu(splits):
    """On the CPU the training device is the CPU: device_noise must leave the seeded stream alone
    (same generator seed, same draws), so a CPU run's numbers do not depend on the flag."""
    eager, _ = run(splits, max_steps=6)
    on_device, _ = run(splits, max_steps=6, device_noise=True)
    assert on_device.train_losses == eager.train_losses
    plain, noise = Noise(), Noise()
    train(model=TINY, training=cfg(max_steps=1), splits=splits, device="cpu", hooks=plain)
    train(model=TINY, training=cfg(max_steps=1, device_noise=True), splits=splits, device="cpu", hooks=noise)
    assert plain.device.type == noise.device.type == "cpu" and torch.equal(plain.state, noise.state)


GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device: on a CPU the training device "
                         "is the CPU, so device_noise and cuda_graph have nothing to move or capture")


@GPU
def test_device_noise_draws_on_the_gpu(splits):
    """Without device_noise the noise is drawn on the CPU (the same stream on any device); with it,
    from a generator on the GPU: another stream, so other (finite) losses from the same seed."""
    plain, noise = Noise(), Noise()
    cpu_drawn = train(model=TINY, training=cfg(max_steps=6), splits=splits, device="cuda", hooks=plain)
    gpu_drawn = train(model=TINY, training=cfg(max_steps=6, device_noise=True), splits=splits, device="cuda",
                      hooks=noise)
    assert plain.device.type == "cpu" and noise.device.type == "cuda"
    losses = [v for _, v in gpu_drawn.train_losses]
    assert all(map(math.isfinite, losses)) and losses != [v for _, v in cpu_drawn.train_losses]


@GPU
def test_cuda_graph_replays_the_eager_step(splits):
    """The captured step is the eager step's arithmetic: with dropout 0 and the same device noise the
    per-step losses agree to float tolerance (measured 4.3e-5 on an H200, TF32 convolutions pick
    algorithms per run; benchmarks/bench_no_host.py), and the graph trains past its warm-up steps."""
    model = UNetConfig(base_width=8, channel_mult=(1, 2), blocks_per_level=1, dropout=0.0)
    kw = dict(max_steps=20, log_every_first=20, device_noise=True)
    eager = train(model=model, training=cfg(**kw), splits=splits, device="cuda")
    graph = train(model=model, training=cfg(cuda_graph=True, **kw), splits=splits, device="cuda")
    assert [s for s, _ in graph.train_losses] == list(range(1, 21))
    e, g = (torch.tensor([v for _, v in r.train_losses], dtype=torch.float64) for r in (eager, graph))
    assert float(((g - e).abs() / e.abs()).max()) < 1e-3


def test_cuda_graph_is_refused_without_a_gpu(splits):
    with pytest.raises(ValueError, match="cuda_graph=True needs one CUDA device"):
        run(splits, cuda_graph=True)
    for mode in ("reduce-overhead", "max-autotune"):  # compile's own CUDA graphs cannot be captured again
        with pytest.raises(ValueError, match=f"cuda_graph=True with compile_mode='{mode}'.*allowed with cuda_graph"):
            cfg(cuda_graph=True, compile=True, compile_mode=mode)
    for mode in ("default", "max-autotune-no-cudagraphs"):  # inductor's kernels, captured by our graph:
        # the configuration is valid, so train() gets as far as the device check (not a config error)
        with pytest.raises(ValueError, match=r"cuda_graph=True needs one CUDA device .*device cpu"):
            run(splits, cuda_graph=True, compile=True, compile_mode=mode)
