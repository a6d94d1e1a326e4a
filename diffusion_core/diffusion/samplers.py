"""Reverse-process samplers: DDPM ancestral (thesis Algorithm 2, corrected) and DDIM.

`eps_model(x_t, t)` is any callable returning the predicted noise (or the pair (eps, raw
variance output) of a model with a learned variance, see variance.py); `t` is a LongTensor of
1-indexed timesteps of shape (batch,). Both samplers are seeded through a
`torch.Generator` so the same seed gives the same images, and can return intermediate
frames for progressive-generation figures.
"""
from __future__ import annotations

from typing import Callable

import torch
from tqdm.auto import tqdm

from ..config import SAMPLERS
from .schedules import NoiseSchedule
from .variance import interpolation, learned_log_variance

EpsModel = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _split(out) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(eps, variance output or None) from what an eps model returned."""
    return out if isinstance(out, tuple) else (out, None)


def _frame_steps(n_steps: int, n_frames: int) -> set[int]:
    if n_frames <= 0:
        return set()
    idx = torch.linspace(0, n_steps - 1, min(n_frames, n_steps)).round().long().tolist()
    return set(idx)


class DDPMSampler:
    """Ancestral sampling, Ho et al. (2020) Algorithm 2 with the factor 1/sqrt(alpha_t):

        x_{t-1} = 1/sqrt(alpha_t) (x_t - beta_t / sqrt(1 - alpha_bar_t) eps_theta(x_t, t)) + sigma_t z   (47, 53)

    sigma_t^2 = beta_t ("beta"), beta_tilde_t ("beta_tilde"), or the model's own Sigma_theta
    ("learned": iDDPM eq. 15, the model returns (eps, variance output)); no noise is added at t = 1.
    """

    def __init__(self, schedule: NoiseSchedule, reverse_variance: str = "beta", clip_x0: float | None = None):
        if reverse_variance != "learned":
            schedule.reverse_variance(torch.tensor([1]), reverse_variance)  # validates the name
        self.schedule = schedule
        self.reverse_variance = reverse_variance
        self.clip_x0 = clip_x0  # None = the thesis's unclipped update

    def step(self, eps: torch.Tensor, t: int, x_t: torch.Tensor, noise: torch.Tensor | None,
             var_out: torch.Tensor | None = None) -> torch.Tensor:
        s = self.schedule
        tt = torch.full((x_t.shape[0],), t, dtype=torch.long)
        if self.clip_x0 is None:
            mean = s.mean_from_eps(x_t, tt, eps)
        else:  # clipping x_0 needs the (equivalent) posterior-mean form (39)
            x0 = s.predict_x0(x_t, tt, eps).clamp(-self.clip_x0, self.clip_x0)
            mean = s.posterior_mean(x0, x_t, tt)
        if t == 1 or noise is None:
            return mean
        if self.reverse_variance == "learned":
            if var_out is None:
                raise ValueError("reverse_variance 'learned' needs a model that returns (eps, variance output)")
            tt_dev = torch.full((x_t.shape[0],), t, dtype=torch.long)
            sigma = torch.exp(0.5 * learned_log_variance(s, tt_dev, interpolation(var_out.to(x_t.dtype))))
            return mean + sigma * noise
        sigma = float(s.reverse_variance(t, self.reverse_variance)) ** 0.5
        return mean + sigma * noise

    @torch.no_grad()
    def sample(self, eps_model: EpsModel, shape: tuple[int, ...], *, generator: torch.Generator | None = None,
               device: torch.device | str = "cpu", x_T: torch.Tensor | None = None, n_frames: int = 0,
               progress: bool = False) -> torch.Tensor | tuple[torch.Tensor, list[tuple[int, torch.Tensor]]]:
        """Draw samples; with n_frames > 0 also return [(t, x_t), ...] snapshots (t = 0 is the output)."""
        x = torch.randn(shape, generator=generator, device=device) if x_T is None else x_T.to(device).clone()
        T = self.schedule.T
        keep = _frame_steps(T, n_frames)
        frames = []
        for i, t in enumerate(tqdm(range(T, 0, -1), desc="DDPM sampling", disable=not progress, leave=False)):
            if i in keep:
                frames.append((t, x.detach().cpu().clone()))
            eps, var_out = _split(eps_model(x, torch.full((shape[0],), t, device=device, dtype=torch.long)))
            noise = torch.randn(x.shape, generator=generator, device=device, dtype=x.dtype) if t > 1 else None
            x = self.step(eps.to(x.dtype), t, x, noise, var_out)
        if n_frames:
            frames.append((0, x.detach().cpu().clone()))
            return x, frames
        return x


class DDIMSampler:
    """DDIM (Song et al. 2021, eq. 12) on an evenly spaced subsequence of `steps` timesteps:

        x0_hat  = (x_t - sqrt(1 - a_t) eps) / sqrt(a_t)
        sigma   = eta * sqrt((1 - a_s)/(1 - a_t)) * sqrt(1 - a_t/a_s)
        x_s     = sqrt(a_s) x0_hat + sqrt(1 - a_s - sigma^2) eps + sigma z

    with a = alpha_bar, s the next (smaller) timestep and a_0 = 1. eta = 0 is deterministic;
    eta = 1 with steps = T is the DDPM sampler with sigma^2 = beta_tilde.
    """

    def __init__(self, schedule: NoiseSchedule, steps: int = 50, eta: float = 0.0, clip_x0: float | None = None):
        if not 1 <= steps <= schedule.T:
            raise ValueError(f"DDIM steps={steps!r} must lie in 1..T={schedule.T}")
        if eta < 0:
            raise ValueError(f"DDIM eta={eta!r} must be >= 0")
        self.schedule, self.steps, self.eta, self.clip_x0 = schedule, steps, eta, clip_x0
        ts = torch.linspace(schedule.T, 1, steps, dtype=torch.float64).round().long()
        self.timesteps = torch.unique_consecutive(ts)  # descending, T first, 1 last

    def step(self, eps: torch.Tensor, t: int, t_prev: int, x_t: torch.Tensor,
             noise: torch.Tensor | None) -> torch.Tensor:
        s = self.schedule
        a_t = float(s.alpha_bar[t])
        a_s = float(s.alpha_bar[t_prev])  # alpha_bar[0] = 1
        x0 = (x_t - (1 - a_t) ** 0.5 * eps) / a_t ** 0.5
        if self.clip_x0 is not None:
            x0 = x0.clamp(-self.clip_x0, self.clip_x0)
            eps = (x_t - a_t ** 0.5 * x0) / (1 - a_t) ** 0.5
        sigma = self.eta * ((1 - a_s) / (1 - a_t)) ** 0.5 * (1 - a_t / a_s) ** 0.5
        x = a_s ** 0.5 * x0 + max(1 - a_s - sigma ** 2, 0.0) ** 0.5 * eps
        if sigma > 0 and noise is not None:
            x = x + sigma * noise
        return x

    @torch.no_grad()
    def sample(self, eps_model: EpsModel, shape: tuple[int, ...], *, generator: torch.Generator | None = None,
               device: torch.device | str = "cpu", x_T: torch.Tensor | None = None, n_frames: int = 0,
               progress: bool = False) -> torch.Tensor | tuple[torch.Tensor, list[tuple[int, torch.Tensor]]]:
        x = torch.randn(shape, generator=generator, device=device) if x_T is None else x_T.to(device).clone()
        ts = self.timesteps.tolist()
        keep = _frame_steps(len(ts), n_frames)
        frames = []
        for i, t in enumerate(tqdm(ts, desc="DDIM sampling", disable=not progress, leave=False)):
            if i in keep:
                frames.append((t, x.detach().cpu().clone()))
            t_prev = ts[i + 1] if i + 1 < len(ts) else 0
            eps, _ = _split(eps_model(x, torch.full((shape[0],), t, device=device, dtype=torch.long)))
            noise = (torch.randn(x.shape, generator=generator, device=device, dtype=x.dtype)
                     if self.eta > 0 and t_prev > 0 else None)
            x = self.step(eps.to(x.dtype), t, t_prev, x, noise)
        if n_frames:
            frames.append((0, x.detach().cpu().clone()))
            return x, frames
        return x


def make_sampler(schedule: NoiseSchedule, name: str = "ddpm", *, steps: int | None = None,
                 eta: float = 0.0, reverse_variance: str = "beta",
                 clip_x0: float | None = None) -> DDPMSampler | DDIMSampler:
    if name == "ddpm":
        return DDPMSampler(schedule, reverse_variance=reverse_variance, clip_x0=clip_x0)
    if name == "ddim":
        return DDIMSampler(schedule, steps=steps or 50, eta=eta, clip_x0=clip_x0)
    raise ValueError(f"unknown sampler {name!r}; allowed: {', '.join(SAMPLERS)}")


__all__ = ["DDPMSampler", "DDIMSampler", "make_sampler", "SAMPLERS"]
