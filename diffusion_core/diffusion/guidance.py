"""Classifier-free guidance (Ho & Salimans 2022) as an eps model for the samplers.

One network is trained both conditionally and unconditionally (the label is replaced by
the null label with probability `label_dropout`). At sampling time

    (CFG 6)  eps_tilde(x_t, c) = eps(x_t, null) + s (eps(x_t, c) - eps(x_t, null))

s = 0 is the unconditional model, s = 1 the plain conditional one, s > 1 trades diversity
for fidelity. (Ho & Salimans write (1 + w) eps_c - w eps_u: s = 1 + w.) Both branches run
in one batched forward pass. A learned variance is taken from the conditional branch.
"""
from __future__ import annotations

import torch
import torch.nn as nn


def balanced_labels(n: int, num_classes: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Labels 0, 1, ..., num_classes - 1, 0, 1, ...: every class asked for equally often (uniform)."""
    return torch.arange(n, device=device) % num_classes


class GuidedModel:
    """An eps model (x_t, t) -> eps for fixed labels `y` at guidance scale `scale`.

    The sampler hands batches of len(y); `with_variance` makes it return (eps, variance output)."""

    def __init__(self, model: nn.Module, y: torch.Tensor, scale: float = 1.0, with_variance: bool = False):
        if scale < 0:
            raise ValueError(f"guidance scale {scale!r} must be >= 0 (0: unconditional, 1: conditional)")
        self.model, self.y, self.scale, self.with_variance = model, y, float(scale), with_variance
        self.null = torch.full_like(y, model.null_label)

    def __call__(self, x: torch.Tensor, t: torch.Tensor):
        if self.scale == 1.0:
            eps, var = self.model(x, t, y=self.y.to(x.device), return_variance=True)
        elif self.scale == 0.0:
            eps, var = self.model(x, t, y=self.null.to(x.device), return_variance=True)
        else:
            y = torch.cat([self.y, self.null]).to(x.device)
            both, var_both = self.model(torch.cat([x, x]), torch.cat([t, t]), y=y, return_variance=True)
            eps_c, eps_u = both.chunk(2)
            eps = eps_u + self.scale * (eps_c - eps_u)
            var = None if var_both is None else var_both.chunk(2)[0]
        return (eps, var) if self.with_variance else eps


__all__ = ["GuidedModel", "balanced_labels"]
