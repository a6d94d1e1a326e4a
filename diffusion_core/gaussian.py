"""A Gaussian toy data set on which the optimal denoiser is known in closed form.

Data x_0 ~ N(m, S) in d dimensions. Under the forward process (31),
x_t = sqrt(a) x_0 + sqrt(1 - a) eps with a = alpha_bar_t, so x_t and eps are jointly
Gaussian with

    x_t ~ N(sqrt(a) m, C_t),   C_t = a S + (1 - a) I,   Cov(eps, x_t) = sqrt(1 - a) I.

Hence the MMSE noise predictor and its error (the noise floor that no network can beat):

    E[eps | x_t]          = sqrt(1 - a) C_t^{-1} (x_t - sqrt(a) m)
    floor(t) = E||eps - E[eps|x_t]||^2 / d = (1/d) tr(I - (1 - a) C_t^{-1})
             = (1/d) sum_i a lambda_i / (a lambda_i + 1 - a),  lambda_i the eigenvalues of S.
"""
from __future__ import annotations

import torch

from .schedules import NoiseSchedule


class GaussianToy:
    def __init__(self, mean: torch.Tensor, cov: torch.Tensor):
        mean = torch.as_tensor(mean, dtype=torch.float64).flatten()
        cov = torch.as_tensor(cov, dtype=torch.float64)
        d = mean.numel()
        if cov.shape != (d, d):
            raise ValueError(f"cov must be {d}x{d} to match mean, got {tuple(cov.shape)}")
        if not torch.allclose(cov, cov.T):
            raise ValueError("cov must be symmetric")
        evals, evecs = torch.linalg.eigh(cov)
        if float(evals.min()) < 0:
            raise ValueError(f"cov must be positive semi-definite (smallest eigenvalue {float(evals.min()):.3g})")
        self.mean, self.cov, self.d = mean, cov, d
        self.evals, self.evecs = evals, evecs
        self._chol = evecs * evals.clamp_min(0).sqrt()  # S = L L^T with L = V diag(sqrt(lambda))

    @classmethod
    def random(cls, d: int, seed: int = 0, scale: float = 1.0) -> "GaussianToy":
        """A random mean and a well-conditioned random covariance (eigenvalues in [0.05, 2] * scale)."""
        g = torch.Generator().manual_seed(seed)
        q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
        evals = torch.linspace(0.05, 2.0, d, dtype=torch.float64) * scale
        return cls(torch.randn(d, generator=g, dtype=torch.float64) * 0.5, q @ torch.diag(evals) @ q.T)

    def sample(self, n: int, generator: torch.Generator | None = None, dtype=torch.float32) -> torch.Tensor:
        z = torch.randn(n, self.d, generator=generator, dtype=torch.float64)
        return (self.mean + z @ self._chol.T).to(dtype)

    def optimal_eps(self, x_t: torch.Tensor, t: torch.Tensor, schedule: NoiseSchedule) -> torch.Tensor:
        """E[eps | x_t] for a batch (n, d) and timesteps (n,) — computed in the eigenbasis of S."""
        a = schedule.alpha_bar[torch.as_tensor(t).long().cpu()].to(torch.float64)[:, None]  # (n, 1)
        centred = (x_t.to(torch.float64).cpu() - a.sqrt() * self.mean) @ self.evecs          # V^T (x - sqrt(a) m)
        coef = (1 - a).sqrt() / (a * self.evals + 1 - a)                                       # diag of C_t^{-1}
        return ((centred * coef) @ self.evecs.T).to(x_t.dtype).to(x_t.device)

    def noise_floor(self, t: torch.Tensor | int, schedule: NoiseSchedule) -> torch.Tensor:
        """floor(t) = E||eps - E[eps|x_t]||^2 / d, float64, for each t."""
        a = schedule.alpha_bar[torch.as_tensor(t).long()].to(torch.float64)
        a = a.reshape(-1, 1)
        return (a * self.evals / (a * self.evals + 1 - a)).mean(1).reshape(torch.as_tensor(t).shape)

    def eps_model(self, schedule: NoiseSchedule):
        """The optimal predictor as a callable eps(x_t, t), for the samplers."""
        return lambda x_t, t: self.optimal_eps(x_t, t, schedule)
