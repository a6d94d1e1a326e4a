"""Noise schedules and the closed-form Gaussian maths of the DDPM forward process.

Timesteps are 1-indexed as in the thesis and Ho et al. (2020): t = 1..T. Every
per-timestep table has length T + 1 and index 0 holds the "clean" values
(alpha_bar_0 = 1, beta_0 = 0), so `alpha_bar[t - 1]` is always defined and the
posterior at t = 1 needs no special case.

Equation numbers refer to the thesis
(../shared/papers/thesis-bias-variance-tradeoff-in-diffusion-models.txt).
Two of its misprints are *not* copied here: the ancestral step uses 1/sqrt(alpha_t)
(eqs. 47, 53 — Algorithm 2 prints 1/sqrt(alpha_bar_t)), and the posterior mean has
1 - alpha_bar_t in its denominator (eq. 39 — eq. 45 prints 1 - alpha_bar_{t-1}).
"""
from __future__ import annotations

import math

import torch

from ..config import SCHEDULES, ScheduleConfig

def _check_T(T: int) -> None:
    if not isinstance(T, int) or isinstance(T, bool) or T < 2:
        raise ValueError(f"T (number of diffusion steps) must be an integer >= 2, got {T!r}")


def make_betas(name: str, T: int, beta_start: float = 1e-4, beta_end: float = 0.02,
               cosine_s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    """beta_1..beta_T in float64 (length T).

    linear:    beta_t evenly spaced in [beta_start, beta_end]            (thesis eq. 99)
    quadratic: sqrt(beta_t) evenly spaced, i.e. the "scaled linear" schedule
    cosine:    alpha_bar(t) = f(t)/f(0), f(t) = cos^2(((t/T + s)/(1 + s)) pi/2),
               beta_t = 1 - alpha_bar(t)/alpha_bar(t-1) clipped at max_beta (Nichol & Dhariwal 2021)
    sigmoid:   beta_t = beta_start + (beta_end - beta_start) * sigmoid(linspace(-6, 6, T))
    """
    _check_T(T)
    if name not in SCHEDULES:
        raise ValueError(f"unknown noise schedule {name!r}; allowed: {', '.join(SCHEDULES)}")
    if name != "cosine" and not (0.0 < beta_start <= beta_end < 1.0):
        raise ValueError(
            f"beta_start={beta_start!r}, beta_end={beta_end!r}: need 0 < beta_start <= beta_end < 1")
    if name == "linear":
        return torch.linspace(beta_start, beta_end, T, dtype=torch.float64)
    if name == "quadratic":
        return torch.linspace(beta_start ** 0.5, beta_end ** 0.5, T, dtype=torch.float64) ** 2
    if name == "sigmoid":
        x = torch.linspace(-6.0, 6.0, T, dtype=torch.float64)
        return beta_start + (beta_end - beta_start) * torch.sigmoid(x)
    # cosine
    steps = torch.arange(T + 1, dtype=torch.float64) / T
    f = torch.cos((steps + cosine_s) / (1 + cosine_s) * math.pi / 2) ** 2
    alpha_bar = f / f[0]
    betas = 1.0 - alpha_bar[1:] / alpha_bar[:-1]
    return betas.clamp(max=max_beta)


class NoiseSchedule:
    """Precomputed tables of a variance schedule plus the forward/posterior maths.

    All tables are float64 on the CPU and have length T + 1 (index 0 = clean data);
    the methods cast to the input's dtype and device.
    """

    def __init__(self, betas: torch.Tensor, name: str = "custom"):
        betas = torch.as_tensor(betas, dtype=torch.float64).flatten()
        _check_T(int(betas.numel()))
        if not bool(((betas > 0) & (betas < 1)).all()):
            raise ValueError("every beta_t must lie in (0, 1)")
        self.name = name
        self.T = int(betas.numel())
        zero = torch.zeros(1, dtype=torch.float64)
        one = torch.ones(1, dtype=torch.float64)
        self.betas = torch.cat([zero, betas])                            # beta_t
        self.alphas = 1.0 - self.betas                                    # (20) alpha_t = 1 - beta_t
        self.alpha_bar = torch.cumprod(self.alphas, 0)                    # (30) prod_{i<=t} alpha_i
        self.alpha_bar_prev = torch.cat([one, self.alpha_bar[:-1]])       # alpha_bar_{t-1}
        self.sqrt_alpha_bar = self.alpha_bar.sqrt()
        self.sqrt_one_minus_alpha_bar = (1.0 - self.alpha_bar).sqrt()
        # (40) beta_tilde_t = (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t) * beta_t  (0 at t = 1)
        denom = torch.where(self.alpha_bar < 1, 1.0 - self.alpha_bar, one)
        self.beta_tilde = (1.0 - self.alpha_bar_prev) / denom * self.betas
        self.beta_tilde[0] = 0.0
        # (39) mu_q = coef_x0 * x_0 + coef_xt * x_t
        self.posterior_coef_x0 = self.alpha_bar_prev.sqrt() * self.betas / denom
        self.posterior_coef_xt = self.alphas.sqrt() * (1.0 - self.alpha_bar_prev) / denom
        # (53) mu_theta = 1/sqrt(alpha_t) * (x_t - beta_t / sqrt(1 - alpha_bar_t) * eps)
        self.recip_sqrt_alpha = 1.0 / self.alphas.sqrt()
        self.eps_coef = self.betas / self.sqrt_one_minus_alpha_bar.clamp_min(1e-300)
        self.eps_coef[0] = 0.0
        self._device_tables: dict[tuple[str, str], torch.Tensor] = {}

    def _gather(self, name: str, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """table[t] reshaped to broadcast against `like` (batch first), in like's dtype/device.

        The float64 tables stay on the CPU (samplers read Python floats off them); a copy per
        device is made once: copying a table at every training step would be a blocking
        host-to-device transfer, a stream sync per step on a GPU."""
        table = getattr(self, name)
        if like.device.type != "cpu":
            key = (name, str(like.device))
            if key not in self._device_tables:
                self._device_tables[key] = table.to(like.device)
            table = self._device_tables[key]
        out = table[t.to(like.device).long()].to(like.dtype)
        return out.reshape(-1, *([1] * (like.dim() - 1)))

    @classmethod
    def from_config(cls, cfg: ScheduleConfig) -> "NoiseSchedule":
        return cls(make_betas(cfg.name, cfg.T, cfg.beta_start, cfg.beta_end), name=cfg.name)

    @classmethod
    def make(cls, name: str = "linear", T: int = 1000, **kw) -> "NoiseSchedule":
        return cls.from_config(ScheduleConfig(name=name, T=T, **kw))

    # ------------------------------------------------------------------ checks
    def check_t(self, t: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t)
        if t.numel() and (int(t.min()) < 1 or int(t.max()) > self.T):
            raise ValueError(f"timesteps must lie in 1..{self.T}, got range "
                             f"{int(t.min())}..{int(t.max())}")
        return t

    def sample_timesteps(self, n: int, generator: torch.Generator | None = None,
                         device: torch.device | str = "cpu") -> torch.Tensor:
        """t ~ Uniform{1..T} (Algorithm 1, line 3)."""
        return torch.randint(1, self.T + 1, (n,), generator=generator, device=device)

    # ----------------------------------------------------------------- forward
    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """(31) x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps."""
        return (self._gather("sqrt_alpha_bar", t, x0) * x0
                + self._gather("sqrt_one_minus_alpha_bar", t, x0) * eps)

    def predict_x0(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """(44) x_0 = (x_t - sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_bar_t)."""
        return ((x_t - self._gather("sqrt_one_minus_alpha_bar", t, x_t) * eps)
                / self._gather("sqrt_alpha_bar", t, x_t))

    # --------------------------------------------------------------- posterior
    def posterior_mean(self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """(39) mu_q(x_t, x_0) of q(x_{t-1} | x_t, x_0)."""
        return (self._gather("posterior_coef_x0", t, x_t) * x0
                + self._gather("posterior_coef_xt", t, x_t) * x_t)

    def posterior_variance(self, t: torch.Tensor) -> torch.Tensor:
        """(40) sigma_q^2(t) = beta_tilde_t, float64."""
        return self.beta_tilde[torch.as_tensor(t).long()]

    def mean_from_eps(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """(53) mu_theta(x_t, t) = 1/sqrt(alpha_t) (x_t - beta_t/sqrt(1 - alpha_bar_t) eps).

        The factor is 1/sqrt(alpha_t); Algorithm 2 of the thesis misprints it as
        1/sqrt(alpha_bar_t). Algebraically equal to posterior_mean(predict_x0(...)).
        """
        return self._gather("recip_sqrt_alpha", t, x_t) * (x_t - self._gather("eps_coef", t, x_t) * eps)

    def reverse_variance(self, t: torch.Tensor, kind: str = "beta") -> torch.Tensor:
        """sigma_t^2 of p_theta(x_{t-1} | x_t): beta_t ("beta", Ho et al.) or beta_tilde_t ("beta_tilde")."""
        if kind == "beta":
            return self.betas[torch.as_tensor(t).long()]
        if kind == "beta_tilde":
            return self.beta_tilde[torch.as_tensor(t).long()]
        raise ValueError(f"unknown reverse variance {kind!r}; allowed: beta, beta_tilde")

    # ----------------------------------------------------------------- weights
    def elbo_weight(self, t: torch.Tensor, reverse_variance: str = "beta") -> torch.Tensor:
        """(70) w_t = (1 - alpha_t)^2 / (2 sigma_t^2 alpha_t (1 - alpha_bar_t)), float64.

        With sigma_t^2 = beta_tilde_t the weight is infinite at t = 1 (beta_tilde_1 = 0):
        there the L_0 decoder term of the ELBO applies, so we fall back to beta_1.
        """
        t = torch.as_tensor(t).long()
        var = self.reverse_variance(t, reverse_variance)
        var = torch.where(var > 0, var, self.betas[t])
        return self.betas[t] ** 2 / (2 * var * self.alphas[t] * (1 - self.alpha_bar[t]))

    def snr(self, t: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t).long()
        return self.alpha_bar[t] / (1 - self.alpha_bar[t])

    def __repr__(self) -> str:
        return (f"NoiseSchedule(name={self.name!r}, T={self.T}, beta_1={self.betas[1]:.3g}, "
                f"beta_T={self.betas[-1]:.3g}, alpha_bar_T={self.alpha_bar[-1]:.3g})")
