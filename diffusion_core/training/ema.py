"""Exponential moving average of parameters (thesis eq. 101):

    theta_hat^(k) = lambda_k * theta_hat^(k-1) + (1 - lambda_k) * theta^(k)

with lambda_k = lambda (the thesis) or, with `warmup`, the warm-up of diffusers' EMAModel
(use_ema_warmup=False branch): lambda_k = min(lambda, (1 + k) / (10 + k)) for the k-th
update, k = 0, 1, 2, ... (diffusers returns 0 for its very first update instead of 1/10;
either way the initial weights are gone within a few steps).

Why a warm-up: without one the EMA starts as a copy of the *initial* (random) weights and
keeps the share prod_k lambda_k = lambda^k of them: 0.9999^8000 = 45% after 8,000 steps.
Its losses then measure that lag, not generalization. `init_share` is that product,
tracked exactly (and saved, so a resumed run continues it) so records can say when an
EMA evaluation is still dominated by the initialization.

Buffers (none in the thesis U-Net: GroupNorm keeps no running stats) are copied.
The EMA copy is a plain module in eval mode, so it can be sampled from directly.
"""
from __future__ import annotations

import copy
import math

import torch
import torch.nn as nn


def warmup_decay(decay: float, k: int) -> float:
    """lambda_k of the k-th update (k = 0, 1, ...) under the warm-up: min(lambda, (1 + k) / (10 + k))."""
    return min(decay, (1.0 + k) / (10.0 + k))


def init_share_crossing(decay: float, share: float, warmup: bool = False) -> int:
    """The first step k after which the EMA holds at most `share` of the initial weights:
    prod_{j<k} lambda_j <= share (plain EMA: lambda^k, so k = ceil(ln share / ln lambda))."""
    if not 0 < share < 1 or not 0 <= decay < 1:
        raise ValueError(f"share={share!r} must be in (0, 1) and decay={decay!r} in [0, 1)")
    if not warmup:
        k = math.ceil(math.log(share) / math.log(decay)) if decay > 0 else 1
        return k - 1 if k > 1 and decay ** (k - 1) <= share else k   # guard the log's round-off
    prod, k = 1.0, 0
    while prod > share:
        prod *= warmup_decay(decay, k)
        k += 1
    return k


class EMA:
    def __init__(self, model: nn.Module, decay: float = 0.9999, warmup: bool = False):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay={decay!r} must lie in [0, 1)")
        self.decay, self.warmup = decay, warmup
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.updates = 0          # k: updates made so far
        self.init_share = 1.0     # prod of the decays so far: the initial weights' share of the EMA

    def current_decay(self) -> float:
        """lambda_k of the next update."""
        return warmup_decay(self.decay, self.updates) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        decay = self.current_decay()
        ema_params = list(self.module.parameters())
        params = [p.detach() for p in model.parameters()]
        # lerp: e <- e + (1 - lambda)(p - e) == lambda e + (1 - lambda) p, one fused kernel over the list
        torch._foreach_lerp_(ema_params, params, 1.0 - decay)
        for b_ema, b in zip(self.module.buffers(), model.buffers()):
            b_ema.copy_(b)
        self.init_share *= decay
        self.updates += 1

    def state_dict(self) -> dict:
        return {"decay": self.decay, "warmup": self.warmup, "updates": self.updates,
                "init_share": self.init_share, "module": self.module.state_dict()}

    def load_state_dict(self, state: dict, updates_if_missing: int | None = None) -> None:
        """`updates_if_missing`: for a state saved before the warm-up existed (no "updates" key):
        the optimizer step, as those runs updated the EMA once per step with a constant decay."""
        self.decay = float(state["decay"])
        self.module.load_state_dict(state["module"])
        if "updates" in state:
            self.warmup, self.updates = bool(state["warmup"]), int(state["updates"])
            self.init_share = float(state["init_share"])
        elif updates_if_missing is not None:
            self.warmup, self.updates = False, int(updates_if_missing)
            self.init_share = self.decay ** self.updates
        else:
            raise ValueError("EMA state has no 'updates' (saved by an older version): pass updates_if_missing")
