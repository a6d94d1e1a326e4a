"""Exponential moving average of parameters (thesis eq. 101):

    theta_hat^(k) = lambda * theta_hat^(k-1) + (1 - lambda) * theta^(k)

Buffers (none in the thesis U-Net: GroupNorm keeps no running stats) are copied.
The EMA copy is a plain module in eval mode, so it can be sampled from directly.
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn


class EMA:
    def __init__(self, model: nn.Module, decay: float = 0.9999):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay={decay!r} must lie in [0, 1)")
        self.decay = decay
        self.module = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        ema_params = list(self.module.parameters())
        params = [p.detach() for p in model.parameters()]
        # lerp: e <- e + (1 - lambda)(p - e) == lambda e + (1 - lambda) p, fused over the list
        torch._foreach_lerp_(ema_params, params, 1.0 - self.decay)
        for b_ema, b in zip(self.module.buffers(), model.buffers()):
            b_ema.copy_(b)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "module": self.module.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.decay = float(state["decay"])
        self.module.load_state_dict(state["module"])
