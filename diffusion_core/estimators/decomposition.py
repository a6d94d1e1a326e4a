"""The bias-variance decomposition of a denoiser over an ensemble of models: unbiased estimators.

Models f_1..f_K (noise predictors) differ only in training randomness (seed, possibly the
training subset D) and are evaluated on the same held-out points (x_0, t, eps). Per point,
per dimension (||.||^2 / d), with f^ = (1/K) sum_k f_k (Geman, Bienenstock & Doursat 1992):

    residual          r^  = (1/K) sum_k ||eps - f_k||^2
    variance          V^  = (1/(K-1)) sum_k ||f_k - f^||^2          unbiased for E_seed||f - E f||^2
    bias^2 + noise    BN^ = ||eps - f^||^2 - V^/K                  unbiased: E||eps - f^||^2 = BN + V/K
    identity (exact for every sample)   r^ = ||eps - f^||^2 + (K-1)/K V^ = BN^ + V^.

Dividing the variance by K instead (the old estimator) has expectation (K-1)/K of it.

Two levels (J training subsets x S seeds, Neal et al. 2018; Adlam & Pennington 2020), with
f^_j the mean over seeds of subset j and f^ the mean over all:

    V^_opt  = (1/J) sum_j (1/(S-1)) sum_s ||f_js - f^_j||^2        E_D[Var_seed(f | D)]
    V^_data = (1/(J-1)) sum_j ||f^_j - f^||^2 - V^_opt / S          Var_D(E_seed[f | D]); may be < 0
    BN^     = ||eps - f^||^2 - V^_data / J - V^_opt / (J S)
    identity (exact)   mean_js ||eps - f_js||^2 = BN^ + V^_data + V^_opt.

Where the optimal denoiser f* = E[eps | x_t] is exact (a Gaussian, gaussian.GaussianToy; a
mixture of low-rank Gaussians, molrg.MoLRG) pass its values as `optimal`: the same estimators
then split bias^2 from noise, per point,

    noise   = ||eps - f*||^2                       E: the noise
    bias2   = ||f^ - f*||^2 - V^/K                 unbiased for ||E f - f*||^2
              (two-level: - V^_data/J - V^_opt/(JS))
    cross   = 2 <eps - f*, f* - f^>                E = 0: E[eps - f* | x_t] = 0, f^ a function of x_t
    identity (exact for every sample)   r^ = noise + bias2 + variance + cross,
                                        bias2_plus_noise = noise + bias2 + cross.

Elsewhere f* is unknown and only bias2_plus_noise exists. The empirical distribution of a
finite set D has an exact f*_D (`empirical_optimal_eps`); on the training points of D,
`memorization_terms` gives each model's distance to that memorizing denoiser (Kadkhodaie et
al. 2024; Gu et al. 2023), which is not bias^2 of the population problem. See
docs/decomposition.md and docs/ground_truth.md.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .intervals import bootstrap_se, combined_interval, jackknife_se
from ..diffusion.schedules import NoiseSchedule


@dataclass
class EnsembleTerms:
    """Per-point estimates (float64, shape (n,)); residual = bias2_plus_noise + variance exactly,
    and where f* was given also residual = noise + bias2 + variance + cross exactly."""
    residual: torch.Tensor            # mean over models of ||eps - f_k||^2 / d
    bias2_plus_noise: torch.Tensor    # ||eps - f^||^2 / d - (variance terms) / (number of models)
    variance: torch.Tensor            # unbiased total variance over training randomness
    variance_data: torch.Tensor | None = None   # two-level only: Var_D(E_seed[f | D])
    variance_opt: torch.Tensor | None = None    # two-level only: E_D[Var_seed(f | D)]
    noise: torch.Tensor | None = None           # f* given: ||eps - f*||^2 / d
    bias2: torch.Tensor | None = None           # f* given: ||f^ - f*||^2 / d - (variance terms) / (models)
    cross: torch.Tensor | None = None           # f* given: 2 <eps - f*, f* - f^> / d, mean 0

    def identity_gap(self) -> torch.Tensor | None:
        """Per point residual - (noise + bias2 + variance + cross): 0 up to round-off (None without f*)."""
        if self.noise is None:
            return None
        return self.residual - (self.noise + self.bias2 + self.variance + self.cross)


@dataclass
class MemorizationTerms:
    """Per-point terms on training points of one subset D, against its exact f*_D.
    distance_to_memorization = ensemble_distance_to_memorization + variance exactly."""
    train_residual: torch.Tensor                    # mean_k ||eps - f_k||^2 / d
    min_train_loss: torch.Tensor                    # ||eps - f*_D||^2 / d: the training objective's minimum
    distance_to_memorization: torch.Tensor          # mean_k ||f_k - f*_D||^2 / d
    ensemble_distance_to_memorization: torch.Tensor  # ||f^ - f*_D||^2 / d - variance / K: unbiased for ||E f - f*_D||^2
    variance: torch.Tensor                          # (1/(K-1)) sum_k ||f_k - f^||^2 / d; NaN for K = 1


def _flat(eps: torch.Tensor, predictions: torch.Tensor, lead: int) -> tuple[torch.Tensor, torch.Tensor]:
    if predictions.dim() != eps.dim() + lead or predictions.shape[lead:] != eps.shape:
        raise ValueError(f"predictions {tuple(predictions.shape)} must be ({'J, S' if lead == 2 else 'K'}, "
                         f"*eps.shape) with eps {tuple(eps.shape)}")
    return eps.double().flatten(1), predictions.double().flatten(lead + 1)


def _sq(x: torch.Tensor) -> torch.Tensor:
    return x.pow(2).mean(-1)   # per-dimension squared norm over the last axis


def _optimal(optimal: torch.Tensor | None, e: torch.Tensor) -> torch.Tensor | None:
    if optimal is None:
        return None
    if optimal.shape[0] != e.shape[0] or optimal[0].numel() != e.shape[1]:
        raise ValueError(f"optimal {tuple(optimal.shape)} must have eps's shape (n = {e.shape[0]} points of "
                         f"{e.shape[1]} values)")
    return optimal.double().flatten(1)


def _with_truth(terms: EnsembleTerms, e: torch.Tensor, p_bar: torch.Tensor, o: torch.Tensor | None,
                variance_over_models: torch.Tensor) -> EnsembleTerms:
    """Fill noise / bias2 / cross from the exact f* values o (n, D); variance_over_models is the
    variance part that E||f^ - f*||^2 carries beyond ||E f - f*||^2 (V/K, or V_data/J + V_opt/(JS))."""
    if o is not None:
        terms.noise = _sq(e - o)
        terms.bias2 = _sq(p_bar - o) - variance_over_models
        terms.cross = 2.0 * ((e - o) * (o - p_bar)).mean(-1)
    return terms


def ensemble_terms(eps: torch.Tensor, predictions: torch.Tensor,
                   optimal: torch.Tensor | None = None) -> EnsembleTerms:
    """eps: (n, ...) true noise; predictions: (K, n, ...) from K iid models; optimal: (n, ...) the exact
    f*(x_t) at the same points, or None (then bias^2 and noise stay together)."""
    e, p = _flat(eps, predictions, 1)
    o = _optimal(optimal, e)
    k = p.shape[0]
    if k < 2:
        raise ValueError(f"need K >= 2 models for a variance, got K={k}")
    p_bar = p.mean(0)
    residual = _sq(e[None] - p).mean(0)
    variance = _sq(p - p_bar[None]).sum(0) / (k - 1)
    return _with_truth(EnsembleTerms(residual, _sq(e - p_bar) - variance / k, variance), e, p_bar, o, variance / k)


def two_level_terms(eps: torch.Tensor, predictions: torch.Tensor,
                    optimal: torch.Tensor | None = None) -> EnsembleTerms:
    """eps: (n, ...); predictions: (J, S, n, ...): J training subsets, S seeds on each; optimal as
    ensemble_terms."""
    e, p = _flat(eps, predictions, 2)
    o = _optimal(optimal, e)
    j, s = p.shape[:2]
    if j < 2 or s < 2:
        raise ValueError(f"need J >= 2 subsets and S >= 2 seeds per subset, got J={j}, S={s}")
    p_j = p.mean(1)                                              # (J, n, D) mean over seeds
    p_bar = p_j.mean(0)
    residual = _sq(e[None, None] - p).mean((0, 1))
    v_opt = (_sq(p - p_j[:, None]).sum(1) / (s - 1)).mean(0)
    v_data = _sq(p_j - p_bar[None]).sum(0) / (j - 1) - v_opt / s
    over_models = v_data / j + v_opt / (j * s)
    b2n = _sq(e - p_bar) - over_models
    return _with_truth(EnsembleTerms(residual, b2n, v_data + v_opt, v_data, v_opt), e, p_bar, o, over_models)


def memorization_terms(eps: torch.Tensor, predictions: torch.Tensor, optimal: torch.Tensor) -> MemorizationTerms:
    """eps, optimal = f*_D(x_t): (n, ...) on training points of D; predictions: (K, n, ...) from
    K >= 1 models trained on D (seeds only)."""
    e, p = _flat(eps, predictions, 1)
    o = optimal.double().flatten(1)
    k = p.shape[0]
    p_bar = p.mean(0)
    distance = _sq(p - o[None]).mean(0)
    if k >= 2:
        variance = _sq(p - p_bar[None]).sum(0) / (k - 1)
        ensemble = _sq(p_bar - o) - variance / k
    else:
        variance, ensemble = torch.full_like(distance, float("nan")), distance
    return MemorizationTerms(_sq(e[None] - p).mean(0), _sq(e - o), distance, ensemble, variance)


def summarize(terms_fn: Callable[[torch.Tensor], object], predictions: torch.Tensor, n_boot: int = 1000,
              seed: int = 0) -> dict[str, float | str]:
    """Point estimates (mean over points) of every term of terms_fn(predictions) with 95% intervals.

    `predictions` has the unit of the jackknife first (models, or subsets in a two-level
    design); terms_fn maps a stack of predictions to EnsembleTerms/MemorizationTerms.
    Returns {name: estimate, name_lo, name_hi, ..., "interval": which sources it covers}."""
    full = terms_fn(predictions)
    names = [n for n, v in vars(full).items() if v is not None]
    per_point = torch.stack([getattr(full, n) for n in names])          # (m, n)
    se_points = bootstrap_se(per_point, n_boot, seed)
    units = predictions.shape[0]
    loo = []
    for drop in range(units):
        keep = [i for i in range(units) if i != drop]
        try:
            t = terms_fn(predictions[keep])
            loo.append(torch.stack([getattr(t, n).mean() for n in names]))
        except ValueError:   # too few models left for a variance (K = 2, or J = 2)
            loo = []
            break
    if loo and bool((torch.stack(loo).isnan() & per_point.mean(1).isfinite()).any()):
        loo = []             # a term the leave-one-out sets cannot estimate: no model part at all
    se_models = jackknife_se(torch.stack(loo, 1)) if loo else torch.full((len(names),), float("nan"))
    out: dict[str, float | str] = {}
    for i, n in enumerate(names):
        est = float(per_point[i].mean())
        se_m = float(se_models[i])
        lo, hi = combined_interval(est, float(se_points[i]), se_m)
        out.update({n: est, f"{n}_lo": lo, f"{n}_hi": hi})
    out["interval"] = "points+models" if loo else "points"
    return out


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
