"""A Gaussian toy data set on which the optimal denoiser is known in closed form: the one-component,
full-rank case of the mixture in molrg.py.

Data x_0 ~ N(m, S) in d dimensions. Under the forward process (31),
x_t = sqrt(a) x_0 + sqrt(1 - a) eps with a = alpha_bar_t, so x_t and eps are jointly
Gaussian with

    x_t ~ N(sqrt(a) m, C_t),   C_t = a S + (1 - a) I,   Cov(eps, x_t) = sqrt(1 - a) I.

Hence the MMSE noise predictor (MoLRG.optimal_eps with one component) and its error (the noise
floor that no network can beat):

    E[eps | x_t]          = sqrt(1 - a) C_t^{-1} (x_t - sqrt(a) m)
    floor(t) = E||eps - E[eps|x_t]||^2 / d = (1/d) tr(I - (1 - a) C_t^{-1})
             = (1/d) sum_i a lambda_i / (a lambda_i + 1 - a),  lambda_i the eigenvalues of S.
"""
from __future__ import annotations

import torch

from ..molrg import MoLRG
from ..diffusion.schedules import NoiseSchedule


class GaussianToy(MoLRG):
    def __init__(self, mean: torch.Tensor, cov: torch.Tensor):
        g = MoLRG.gaussian(mean, cov)
        super().__init__(g.weights, g.means, g.bases, g.variances, 0.0)
        self.mean, self.cov = g.means[0], torch.as_tensor(cov, dtype=torch.float64)
        self.evals, self.evecs = g.variances[0], g.bases[0]
        self._chol = self.evecs * self.evals.sqrt()  # S = L L^T with L = V diag(sqrt(lambda))

    @classmethod
    def random(cls, d: int, seed: int = 0, scale: float = 1.0) -> "GaussianToy":
        """A random mean and a well-conditioned random covariance (eigenvalues in [0.05, 2] * scale)."""
        g = torch.Generator().manual_seed(seed)
        q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
        evals = torch.linspace(0.05, 2.0, d, dtype=torch.float64) * scale
        return cls(torch.randn(d, generator=g, dtype=torch.float64) * 0.5, q @ torch.diag(evals) @ q.T)

    def sample(self, n: int, generator: torch.Generator | None = None, dtype=torch.float32) -> torch.Tensor:
        """n draws of x_0 (its one component needs no labels; MoLRG.sample gives them too)."""
        z = torch.randn(n, self.d, generator=generator, dtype=torch.float64)
        return (self.mean + z @ self._chol.T).to(dtype)

    def noise_floor(self, t: torch.Tensor | int, schedule: NoiseSchedule) -> torch.Tensor:
        """floor(t) = E||eps - E[eps|x_t]||^2 / d, float64, for each t."""
        a = schedule.alpha_bar[torch.as_tensor(t).long()].to(torch.float64)
        a = a.reshape(-1, 1)
        return (a * self.evals / (a * self.evals + 1 - a)).mean(1).reshape(torch.as_tensor(t).shape)

    def eps_model(self, schedule: NoiseSchedule):
        """The optimal predictor as a callable eps(x_t, t), for the samplers."""
        return lambda x_t, t: self.optimal_eps(x_t, t, schedule)
