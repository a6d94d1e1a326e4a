"""A learned reverse variance and the variational bound it is trained with (Improved DDPM).

Nichol & Dhariwal (2021), "Improved Denoising Diffusion Probabilistic Models", sec. 3.1:
the network outputs, besides eps, one number per dimension that interpolates the reverse
variance between its two natural bounds, in the log domain:

    (iDDPM 15)  Sigma_theta(x_t, t) = exp(v log beta_t + (1 - v) log beta_tilde_t),
                v = (out + 1) / 2      (the network's raw output `out`, as in their code: out = 0 -> midway)

so v = 0 gives beta_tilde_t (the posterior variance, eq. 40 of the thesis) and v = 1 gives
beta_t. beta_tilde_1 = 0, so its log is clipped to log beta_tilde_2 at t = 1 (their code
does the same; t = 1 only enters the decoder term below).

Sigma_theta gets no gradient from L_simple; it is trained by the hybrid objective

    (iDDPM 16)  L_hybrid = L_simple + lambda * L_vlb,   lambda = 0.001,

    L_vlb = L_0 + sum_{t>=2} L_{t-1},
    L_{t-1} = KL( q(x_{t-1} | x_t, x_0) || p_theta(x_{t-1} | x_t) )      (t >= 2)
    L_0     = -log p_theta(x_0 | x_1)   (a discretized Gaussian decoder over 256 levels)

estimated, with t ~ Uniform{1..T}, by T * L_{t-1}. The mean inside L_vlb uses a
stop-gradient on eps (sec. 3.1: "L_vlb guides Sigma_theta, L_simple guides mu_theta").
The L_vlb terms are in bits per dimension (mean over dimensions / log 2), as in their code;
at T = 1000, lambda * T * L_{t-1} = L_{t-1}: exactly their `mse + vb`.
"""
from __future__ import annotations

import math

import torch

from .schedules import NoiseSchedule

HYBRID_LAMBDA = 1e-3


def interpolation(out: torch.Tensor) -> torch.Tensor:
    """v in [0, 1] from the network's raw variance output (iDDPM: v = (out + 1) / 2, clamped)."""
    return ((out + 1.0) / 2.0).clamp(0.0, 1.0)


def log_variance_bounds(schedule: NoiseSchedule, t: torch.Tensor, like: torch.Tensor):
    """(log beta_tilde_t clipped at t = 1 to t = 2, log beta_t), broadcast like `like`, float64 -> like.dtype."""
    t = t.long().cpu()
    tilde = schedule.beta_tilde.clone()
    tilde[1] = tilde[2] if schedule.T >= 2 else schedule.betas[1]
    shape = (-1, *([1] * (like.dim() - 1)))
    lo = tilde[t].log().to(like.device, like.dtype).reshape(shape)
    hi = schedule.betas[t].log().to(like.device, like.dtype).reshape(shape)
    return lo, hi


def learned_log_variance(schedule: NoiseSchedule, t: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """(iDDPM 15) log Sigma_theta = v log beta_t + (1 - v) log beta_tilde_t, per dimension."""
    lo, hi = log_variance_bounds(schedule, t, v)
    return v * hi + (1.0 - v) * lo


def normal_kl(mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor, logvar2: torch.Tensor) -> torch.Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) per dimension, in nats.

    = 1/2 (log s2^2 - log s1^2 + (s1^2 + (m1 - m2)^2) / s2^2 - 1)."""
    return 0.5 * (logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2).pow(2) * torch.exp(-logvar2) - 1.0)


def _std_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))


def discretized_gaussian_log_likelihood(x0: torch.Tensor, mean: torch.Tensor, log_var: torch.Tensor,
                                        levels: int = 256) -> torch.Tensor:
    """log p(x0) per dimension (nats) for x0 on `levels` evenly spaced values in [-1, 1] (Ho et al. 2020 eq. 13).

    Each value owns the bin of half-width 1/(levels - 1) around it; the two end bins extend to -inf / +inf."""
    half = 1.0 / (levels - 1)
    inv_std = torch.exp(-0.5 * log_var)
    upper = _std_normal_cdf((x0 - mean + half) * inv_std)
    lower = _std_normal_cdf((x0 - mean - half) * inv_std)
    prob = torch.where(x0 < -1 + 1e-3, upper, torch.where(x0 > 1 - 1e-3, 1.0 - lower, upper - lower))
    return torch.log(prob.clamp_min(1e-12))


def vlb_terms(schedule: NoiseSchedule, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor,
              eps_pred: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """L_{t-1} per example in bits per dimension: the KL term for t >= 2, the decoder NLL for t = 1.

    eps_pred should be detached by the caller when training (the stop-gradient of iDDPM 3.1)."""
    x0, x_t, eps_pred, v = x0.double(), x_t.double(), eps_pred.double(), v.double()
    mean_p = schedule.mean_from_eps(x_t, t, eps_pred)
    log_var_p = learned_log_variance(schedule, t, v)
    mean_q = schedule.posterior_mean(x0, x_t, t)
    log_var_q, _ = log_variance_bounds(schedule, t, x_t)   # log beta_tilde_t (t >= 2 is all this is used for)
    kl = normal_kl(mean_q, log_var_q, mean_p, log_var_p).flatten(1).mean(1)
    nll = -discretized_gaussian_log_likelihood(x0, mean_p, log_var_p).flatten(1).mean(1)
    return torch.where(t.to(kl.device) == 1, nll, kl) / math.log(2.0)


__all__ = ["HYBRID_LAMBDA", "interpolation", "learned_log_variance", "log_variance_bounds", "normal_kl",
           "discretized_gaussian_log_likelihood", "vlb_terms"]
