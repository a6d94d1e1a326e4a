"""Training objectives on the noise prediction.

L_simple (eq. 72):   E_{x0, t, eps} ||eps - eps_theta(x_t, t)||^2          (Ho et al. 2020)
L_elbo   (eq. 70):   E_{x0, t, eps} w_t ||eps - eps_theta(x_t, t)||^2,
                     w_t = beta_t^2 / (2 sigma_t^2 alpha_t (1 - alpha_bar_t))
L_hybrid (iDDPM 16): L_simple + lambda T L_{t-1}, lambda = 0.001, for a learned reverse
                     variance (variance.py; Nichol & Dhariwal 2021)

Both are reported per pixel (mean over the d dimensions), as Residual(t) is, so the
numbers of the loss curves and of the residual curves share one scale.
"""
from __future__ import annotations

from typing import Callable

import torch

from ..config import LOSSES
from .schedules import NoiseSchedule
from .variance import HYBRID_LAMBDA, interpolation, vlb_terms



def per_example_mse(eps: torch.Tensor, eps_pred: torch.Tensor) -> torch.Tensor:
    """||eps - eps_pred||^2 / d for each example, shape (batch,)."""
    return (eps.float() - eps_pred.float()).pow(2).flatten(1).mean(1)


def diffusion_loss(model: Callable, schedule: NoiseSchedule, x0: torch.Tensor, *, kind: str = "simple",
                   reverse_variance: str = "beta", t: torch.Tensor | None = None,
                   eps: torch.Tensor | None = None, generator: torch.Generator | None = None,
                   y: torch.Tensor | None = None) -> torch.Tensor:
    """Monte-Carlo estimate of the loss on a batch (Algorithm 1). Returns a scalar.

    t and eps are drawn here unless given (fixed draws make validation losses comparable).
    y: class labels for a class-conditional model (the null label where dropped).
    """
    if kind not in LOSSES:
        raise ValueError(f"unknown loss {kind!r}; allowed: {', '.join(LOSSES)}")
    if t is None:
        t = schedule.sample_timesteps(x0.shape[0], generator=generator, device=x0.device)
    if eps is None:
        eps = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    x_t = schedule.q_sample(x0, t, eps)
    kwargs = {} if y is None else {"y": y}
    if kind == "hybrid":
        eps_pred, var_out = model(x_t, t, return_variance=True, **kwargs)
        if var_out is None:
            raise ValueError("loss 'hybrid' needs a model with a learned variance (UNetConfig.learn_sigma=True)")
        # The stop-gradient of iDDPM sec. 3.1: L_vlb trains the variance only, L_simple the mean.
        vlb = vlb_terms(schedule, x0, x_t, t, eps_pred.detach(), interpolation(var_out.float()))
        return per_example_mse(eps, eps_pred).mean() + HYBRID_LAMBDA * schedule.T * vlb.float().mean()
    err = per_example_mse(eps, model(x_t, t, **kwargs))
    if kind == "elbo":
        w = schedule.elbo_weight(t.cpu(), reverse_variance).to(err.device, err.dtype)
        err = w * err
    return err.mean()


__all__ = ["diffusion_loss", "per_example_mse", "LOSSES"]
