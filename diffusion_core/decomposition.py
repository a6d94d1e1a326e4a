"""Per-timestep bias^2 / variance / noise decomposition over an ensemble of denoisers.

K models eps_k trained on different seeds and/or training subsets are evaluated on the
same points (x_0, t, eps). With eps_bar = (1/K) sum_k eps_k the ensemble mean,

    (1/K) sum_k ||eps - eps_k||^2  =  ||eps - eps_bar||^2  +  (1/K) sum_k ||eps_k - eps_bar||^2
          residual                     bias^2 + noise          variance

holds exactly (the cross term vanishes because sum_k (eps_k - eps_bar) = 0). The noise
part is the error of the best possible predictor E[eps | x_t]:

    noise(t) = E ||eps - E[eps | x_t]||^2 / d

known in closed form for Gaussian data (gaussian.GaussianToy.noise_floor) and, for a
finite training set {y_j}, equal to that of the empirical optimal denoiser

    E[x_0 | x_t] = sum_j w_j y_j,   w_j = softmax_j( -||x_t - sqrt(a) y_j||^2 / (2 (1 - a)) ),
    E[eps | x_t] = (x_t - sqrt(a) E[x_0 | x_t]) / sqrt(1 - a),      a = alpha_bar_t,

computed here in chunks over the training set with a streaming log-sum-exp, so 48,000
MNIST images never need an (n x 48,000 x 784) tensor. All quantities are per dimension.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .schedules import NoiseSchedule


@dataclass
class EnsembleTerms:
    residual: torch.Tensor            # (n,) mean_k ||eps - eps_k||^2 / d
    bias2_plus_noise: torch.Tensor    # (n,) ||eps - eps_bar||^2 / d
    variance: torch.Tensor            # (n,) mean_k ||eps_k - eps_bar||^2 / d


def ensemble_terms(eps: torch.Tensor, predictions: torch.Tensor) -> EnsembleTerms:
    """eps: (n, ...) true noise; predictions: (K, n, ...) from K models. Float64 results per point."""
    if predictions.dim() != eps.dim() + 1 or predictions.shape[1:] != eps.shape:
        raise ValueError(f"predictions {tuple(predictions.shape)} must be (K, *eps.shape) with eps {tuple(eps.shape)}")
    if predictions.shape[0] < 2:
        raise ValueError(f"need K >= 2 models for a variance, got K={predictions.shape[0]}")
    e = eps.double().flatten(1)
    p = predictions.double().flatten(2)
    p_bar = p.mean(0)
    residual = (e[None] - p).pow(2).mean(2).mean(0)
    bias2_plus_noise = (e - p_bar).pow(2).mean(1)
    variance = (p - p_bar[None]).pow(2).mean(2).mean(0)
    return EnsembleTerms(residual, bias2_plus_noise, variance)


@torch.no_grad()
def empirical_optimal_eps(x_t: torch.Tensor, t: int, schedule: NoiseSchedule, train_x0: torch.Tensor,
                          chunk: int = 4096) -> torch.Tensor:
    """E[eps | x_t] under the empirical distribution of `train_x0` (N, ...) in [-1, 1], at one t.

    Streams over the training set in chunks with an online softmax (running max, running
    normaliser, running weighted sum), in float64 for the weights.
    """
    a = float(schedule.alpha_bar[t])
    n = x_t.shape[0]
    xf = x_t.flatten(1).double()
    sa, var = a ** 0.5, 1.0 - a
    run_max = torch.full((n,), -float("inf"), dtype=torch.float64, device=x_t.device)
    run_norm = torch.zeros(n, dtype=torch.float64, device=x_t.device)
    run_sum = torch.zeros_like(xf)
    x_sq = xf.pow(2).sum(1, keepdim=True)
    for lo in range(0, train_x0.shape[0], chunk):
        y = train_x0[lo:lo + chunk].to(x_t.device).flatten(1).double() * sa     # sqrt(a) y_j
        d2 = (x_sq + y.pow(2).sum(1)[None] - 2.0 * xf @ y.T).clamp_min(0)      # ||x_t - sqrt(a) y_j||^2
        logits = -d2 / (2.0 * var)
        new_max = torch.maximum(run_max, logits.max(1).values)
        scale = torch.exp(run_max - new_max)
        w = torch.exp(logits - new_max[:, None])
        run_norm = run_norm * scale + w.sum(1)
        run_sum = run_sum * scale[:, None] + w @ y                               # sum_j w_j sqrt(a) y_j
        run_max = new_max
    mean_scaled_x0 = run_sum / run_norm[:, None]                                  # sqrt(a) E[x0 | x_t]
    eps_hat = (xf - mean_scaled_x0) / var ** 0.5
    return eps_hat.reshape(x_t.shape).to(x_t.dtype)


@torch.no_grad()
def empirical_noise_floor(x0: torch.Tensor, eps: torch.Tensor, t: int, schedule: NoiseSchedule,
                          train_x0: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """Per-point ||eps - E_emp[eps | x_t]||^2 / d at timestep t (float64, shape (n,))."""
    tt = torch.full((x0.shape[0],), t, dtype=torch.long, device=x0.device)
    x_t = schedule.q_sample(x0, tt, eps)
    return (eps.double() - empirical_optimal_eps(x_t, t, schedule, train_x0, chunk).double()).flatten(1).pow(2).mean(1)
