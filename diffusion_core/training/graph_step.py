"""One training step (forward, backward, gradient clipping, Adam) replayed as a CUDA graph.

At batch 16 a step of the thesis U-Net is ~1,000 small kernels; launched one by one from Python
the GPU waits on the host (issue 11: 38 steps/s eager on an H200). Captured once with
`torch.cuda.graph` and replayed, the whole step is one launch. What that needs, and `train()`
(`TrainConfig.cuda_graph`) and `train_stacked(cuda_graph=True)` arrange:

- static inputs: each step's inputs (batch, t, noise) are copied into buffers the graph reads;
- Adam with `capturable=True` (the step count lives on the device);
- no host sync inside the step: the loss is returned as the graph's static output tensor
  (overwritten by the next replay: clone what you keep), and logged losses are fetched later;
- warm-up: `warmup` real steps run eagerly on a side stream first (allocations, cuDNN
  autotuning and Adam's state exist before capture); the capture itself runs nothing, so the
  step it records is then replayed once to really take it. Python side effects of `step_fn`
  happen once, at capture, never at replays (a host counter in it must be kept by the caller);
- random draws inside the step: CUDA's default generator is registered with the graph by
  `torch.cuda.graph` itself; any other CUDA generator the step draws from (the stacked members'
  dropout streams) must be passed as `generators`: each is registered with the graph before
  capture (`CUDAGraph.register_generator_state`; an unregistered one raises at capture), and every
  replay then advances its offset by what one step draws, as an eager step would.

Contract per device. CUDA (`capture=True`): after `warmup` eager steps, each call is one replay
of the captured step; the arithmetic is the eager step's, so losses match it to float tolerance
(benchmarks/bench_no_host.py checks it with dropout 0); dropout masks are drawn from the same
generators but at graph-assigned Philox offsets, so with dropout they are statistically
equivalent, not bit-equal. Needs a GPU. CPU or any device (`capture=False`, internal): the same
step in its graph form, run eagerly: static input buffers and one static output tensor that
every call overwrites (so a caller that forgets to clone is caught on the CPU too); no streams,
no capture. The tests use it to check the graph form's arithmetic against the ordinary step.
The EMA update stays outside the graph (one kernel; see the callers).
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch


class GraphedStep:
    """`GraphedStep(step_fn)(*inputs)` -> step_fn's output tensor (static: overwritten next call)."""

    def __init__(self, step_fn: Callable[..., torch.Tensor], warmup: int = 3,
                 generators: Sequence[torch.Generator] = (), capture: bool = True):
        self.step_fn, self.warmup, self.capture = step_fn, warmup, capture
        self.generators = list(generators)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static: tuple[torch.Tensor, ...] | None = None
        self.static_loss: torch.Tensor | None = None
        self.eager_steps = 0

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        if self.static is None:
            self.static = tuple(v.clone() for v in inputs)
        if len(inputs) != len(self.static) or any(v.shape != b.shape for v, b in zip(inputs, self.static)):
            raise ValueError(f"GraphedStep inputs changed shape ({[tuple(v.shape) for v in inputs]} vs "
                             f"{[tuple(b.shape) for b in self.static]}): build a new GraphedStep (recapture)")
        for buf, v in zip(self.static, inputs):
            buf.copy_(v, non_blocking=True)
        if not self.capture:  # the graph form, eagerly: one static output, overwritten each call
            loss = self.step_fn(*self.static).detach()
            if self.static_loss is None:
                self.static_loss = torch.empty_like(loss)
            return self.static_loss.copy_(loss)
        if self.graph is not None:
            self.graph.replay()
            return self.static_loss
        if self.eager_steps < self.warmup:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                loss = self.step_fn(*self.static)
            torch.cuda.current_stream().wait_stream(side)
            self.eager_steps += 1
            return loss.detach().clone()
        self.graph = torch.cuda.CUDAGraph()
        for g in self.generators:  # before capture: registering during it is refused by torch
            self.graph.register_generator_state(g)
        with torch.cuda.graph(self.graph):
            self.static_loss = self.step_fn(*self.static).detach()
        self.graph.replay()
        return self.static_loss
