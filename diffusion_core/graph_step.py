"""One training step (forward, backward, gradient clipping, Adam) replayed as a CUDA graph.

At batch 16 a step of the thesis U-Net is ~1,000 small kernels; launched one by one from Python
the GPU waits on the host (issue 11: 38 steps/s eager on an H200). Captured once with
`torch.cuda.graph` and replayed, the whole step is one launch. What that needs, and `train()`
arranges when `TrainConfig.cuda_graph` is set:

- static inputs: each step's batch and noise are copied into buffers the graph reads;
- Adam with `capturable=True` (the step count lives on the device) and fused;
- no host sync inside the step: the loss is returned as the graph's static output tensor
  (overwritten by the next replay: clone what you keep), and logged losses are fetched later;
- warm-up: `warmup` real steps run eagerly on a side stream first (allocations, cuDNN
  autotuning and Adam's state exist before capture); the capture itself runs nothing, so the
  step it records is then replayed once to really take it.

The EMA update stays outside the graph (one foreach kernel; its decay may change per step).
Dropout inside the graph draws from CUDA's default generator, which `torch.cuda.graph`
advances at each replay. Needs a GPU: nothing here runs on the CPU.
"""
from __future__ import annotations

from typing import Callable

import torch


class GraphedStep:
    def __init__(self, step_fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor], warmup: int = 3):
        self.step_fn, self.warmup = step_fn, warmup
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static: tuple[torch.Tensor, ...] | None = None
        self.static_loss: torch.Tensor | None = None
        self.eager_steps = 0

    def __call__(self, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        if self.static is None:
            self.static = tuple(v.clone() for v in (x0, t, eps))
        for buf, v in zip(self.static, (x0, t, eps)):
            buf.copy_(v, non_blocking=True)
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
        with torch.cuda.graph(self.graph):
            self.static_loss = self.step_fn(*self.static).detach()
        self.graph.replay()
        return self.static_loss
