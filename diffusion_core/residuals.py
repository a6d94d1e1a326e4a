"""Per-timestep residual, thesis eq. (130):

    Residual(t) = E_{x0, eps} ||eps - eps_theta(x_t, t)||^2 / d

on a fixed batch x0 with fixed eps (one draw per image, shared by every t), so curves of
different checkpoints and trials differ only through the network.
"""
from __future__ import annotations

from typing import Callable

import torch

from .diffusion.losses import per_example_mse
from .diffusion.schedules import NoiseSchedule


def default_t_grid(T: int, n: int = 40) -> torch.Tensor:
    """Timesteps covering 1..T: half log-spaced (the error sits at small t), half linear."""
    if n < 2:
        raise ValueError(f"t-grid size n={n} must be >= 2")
    log = torch.logspace(0, torch.log10(torch.tensor(float(T))), n // 2, dtype=torch.float64)
    lin = torch.linspace(1, T, n - n // 2, dtype=torch.float64)
    return torch.unique(torch.cat([log, lin]).round().long().clamp(1, T))


def _per_t_mean(per_example: Callable, schedule: NoiseSchedule, x0: torch.Tensor, eps: torch.Tensor,
                t_grid: torch.Tensor, batch_size: int, y: torch.Tensor | None) -> torch.Tensor:
    """mean over the fixed batch of per_example(x_t, t, eps, labels-kwargs), for each t (float64)."""
    out = torch.empty(len(t_grid), dtype=torch.float64)
    n = x0.shape[0]
    for i, t in enumerate(t_grid.tolist()):
        total = 0.0
        for lo in range(0, n, batch_size):
            xb, eb = x0[lo:lo + batch_size], eps[lo:lo + batch_size]
            tt = torch.full((xb.shape[0],), t, dtype=torch.long, device=xb.device)
            kw = {} if y is None else {"y": y[lo:lo + batch_size]}
            total += float(per_example(schedule.q_sample(xb, tt, eb), tt, eb, kw).sum())
        out[i] = total / n
    return out


@torch.no_grad()
def residual_curve(eps_model: Callable, schedule: NoiseSchedule, x0: torch.Tensor, eps: torch.Tensor,
                   t_grid: torch.Tensor, batch_size: int = 512, y: torch.Tensor | None = None) -> torch.Tensor:
    """Residual(t) for each t in t_grid (float64, shape (len(t_grid),)).

    x0 and eps are fixed tensors of equal shape; the same eps is used at every t.
    y: the images' labels, for a class-conditional model (its conditional residual).
    """
    if x0.shape != eps.shape:
        raise ValueError(f"x0 {tuple(x0.shape)} and eps {tuple(eps.shape)} must have the same shape")
    schedule.check_t(t_grid)
    return _per_t_mean(lambda x_t, tt, eb, kw: per_example_mse(eb, eps_model(x_t, tt, **kw)),
                       schedule, x0, eps, t_grid, batch_size, y)


@torch.no_grad()
def variance_interpolation_curve(model, schedule: NoiseSchedule, x0: torch.Tensor, eps: torch.Tensor,
                                 t_grid: torch.Tensor, batch_size: int = 512,
                                 y: torch.Tensor | None = None) -> torch.Tensor:
    """Mean learned interpolation v per t (iDDPM eq. 15: 0 = beta_tilde_t, 1 = beta_t) on the residual batch."""
    from .diffusion.variance import interpolation

    def mean_v(x_t, tt, eb, kw):
        return interpolation(model(x_t, tt, return_variance=True, **kw)[1].double()).flatten(1).mean(1)

    return _per_t_mean(mean_v, schedule, x0, eps, t_grid, batch_size, y)
