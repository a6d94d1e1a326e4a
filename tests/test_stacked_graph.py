"""train_stacked(cuda_graph=True) on the CPU: its captured step's graph form, run eagerly, gives
the ordinary stacked step's per-member losses (issue 11).

The graph form (diffusion_core/training/graph_step.py, capture=False) is what a GPU captures: static
input buffers, capturable Adam (bias corrections on the device), one static loss output that each
step overwrites. Three members that differ in seed, schedule, learning rate and gradient
clipping, dropout 0.1 (the masks come from the same per-member generators), 6 steps with deferred
sync (so a logged loss that is not cloned would read a later step's value), and one member that
stops at step 3 (the group's rows change: the graph is rebuilt for the new shapes). Measured on
the 2-core dev CPU (torch 2.14): bit-identical. Tolerance 1e-5 relative all the same (capturable
Adam's bias corrections are device float64 tensors, the ordinary step's Python floats: another
platform may round them apart), while a stale input buffer or an uncloned logged loss moves a
step's loss by >4e-2 (checked on broken copies). Also: the refusals (no CUDA device, ELBO, vmap),
before any work; and a study's training.cuda_graph reaching a stacked group's train_stacked.
"""
from __future__ import annotations

import pytest
import torch

from diffusion_core import TrainConfig, UNetConfig
from diffusion_core.capabilities import Member
from diffusion_core.config import DiffusionConfig
from diffusion_core.data import Splits
from diffusion_core.training.stacked import train_stacked

TINY = UNetConfig(base_width=8, channel_mult=(1, 2), blocks_per_level=1, dropout=0.1)
STEPS, RTOL = 6, 1e-5


def tc(**kw) -> TrainConfig:
    base = dict(epochs=100, batch_size=16, lr=1e-3, ema_decay=0.9, max_steps=STEPS, seed=0, log_every_first=1000,
                log_every=4, eval_start=10 ** 9)
    return TrainConfig(**{**base, **kw})


def members(splits) -> list[Member]:
    cosine = DiffusionConfig(schedule="cosine")
    return [Member(tc(seed=0), TINY, splits=splits, name="a"),
            Member(tc(seed=1, lr=3e-3, max_steps=3), TINY, splits=splits, diffusion=cosine, name="b"),
            Member(tc(seed=2, grad_clip=0.05), TINY, splits=splits, name="c")]


def per_step(result) -> torch.Tensor:
    return torch.tensor([v for _, v in result.result.train_losses], dtype=torch.float64)


def test_graph_form_equals_the_eager_stacked_step(mnist_splits):
    splits = Splits(mnist_splits.train.subset(torch.arange(256)), mnist_splits.val.subset(torch.arange(16)))
    eager = train_stacked(members(splits), device="cpu")
    graph = train_stacked(members(splits), device="cpu", deferred_sync=True, cuda_graph=True, _graph_capture=False)
    assert [r.status for r in graph] == ["FINISHED"] * 3
    for g, e, n in zip(graph, eager, (STEPS, 3, STEPS)):
        assert [s for s, _ in g.result.train_losses] == list(range(1, n + 1))
        rel = ((per_step(g) - per_step(e)).abs() / per_step(e)).max()
        assert rel < RTOL, f"member {g.name}: per-step losses differ by {rel:.2e} (relative)"
        # Its end: the epoch's mean step loss (summed from the static output) and the EMA weights' validation loss.
        (ge,), (ee,) = g.result.epoch_losses, e.result.epoch_losses
        assert g.result.step == ge.step == n and ge.train == pytest.approx(ee.train, rel=RTOL)
        assert ge.val == pytest.approx(ee.val, rel=RTOL)
    # The members' losses are not all alike (a shared or shifted row would show here).
    assert (per_step(graph[0]) - per_step(graph[2])).abs().min() > 1e-3


def test_cuda_graph_refusals_come_before_any_work():
    # No splits: a refusal after the data loading would first load MNIST; these must come before it.
    ok = Member(tc(), TINY, name="a")
    with pytest.raises(ValueError, match=r"cuda_graph=True\) needs a CUDA device \(got cpu\)"):
        train_stacked([ok], device="cpu", cuda_graph=True)
    elbo = Member(tc(), TINY, diffusion=DiffusionConfig(loss="elbo"), name="w")
    with pytest.raises(ValueError, match=r"member 1 \('w'\): diffusion.loss='elbo' .* allowed: 'simple'"):
        train_stacked([ok, elbo], device="cpu", cuda_graph=True, _graph_capture=False)
    with pytest.raises(ValueError, match=r"needs backend='grouped' \(got backend='vmap'\)"):
        train_stacked([ok], device="cpu", backend="vmap", cuda_graph=True, _graph_capture=False)
    attn = UNetConfig(base_width=8, channel_mult=(1, 2), blocks_per_level=1, attention=True)
    with pytest.raises(ValueError, match=r"model.attention=True selects vmap"):
        train_stacked([Member(tc(), attn)], device="cpu", cuda_graph=True, _graph_capture=False)


def test_a_study_opts_in_with_training_cuda_graph(tmp_path, data_root):
    """resources.stack + training.cuda_graph: the group's train_stacked gets cuda_graph=True (on this
    CPU it refuses, which is how the test sees it arrived); members that differ in it do not stack."""
    from orchestrator.plan import build_plan
    from orchestrator.spec import parse_study
    from orchestrator.sweep import launch

    from diffusion_core.capabilities import check_stackable
    try:
        from .orchestrator_helpers import tiny_study
    except ImportError:
        from orchestrator_helpers import tiny_study

    study = tiny_study(data_root, name="graph", training={"cuda_graph": True}, sweep={"seeds": [0, 1]},
                       resources={"workers_per_trial": 1, "stack": 2}, analysis={"figures": False})
    plan, said = build_plan(parse_study(study)), []
    assert launch(plan, tmp_path / "graph", local=True, echo=said.append) == 1
    assert any("stacked on cpu" in line for line in said)
    for t in plan.trials:
        assert any(f"trial {t.trial_id} failed: ValueError: train_stacked(cuda_graph=True) needs a CUDA device "
                   f"(got cpu)" in line for line in said), said
    with pytest.raises(ValueError, match=r"member 1 \('b'\): training.cuda_graph=False must equal member 0's"):
        check_stackable([Member(tc(cuda_graph=True), TINY, name="a"), Member(tc(), TINY, name="b")])


def test_capturable_flat_adam_counts_its_steps_on_the_device():
    """A captured step's Python runs once, at capture, so the capturable FlatAdam's step count is its
    device counter (what replays advance), read back for checkpoints; it must equal the host count."""
    from diffusion_core.training.stacked_optim import FlatAdam

    grads = torch.randn(3, 2, 5, generator=torch.Generator().manual_seed(0))
    host = FlatAdam(torch.zeros(2, 5), [1e-3, 3e-3], (0.9, 0.999), 1e-8)
    device = FlatAdam(torch.zeros(2, 5), [1e-3, 3e-3], (0.9, 0.999), 1e-8, capturable=True)
    for g in grads:
        host.step(g)
        device.step(g)
    assert host.step_count == device.step_count == 3
    torch.testing.assert_close(device.flat, host.flat, rtol=1e-6, atol=0)
    device.set_step(10)
    assert device.step_count == 10
