"""Standard errors for ensemble estimates: a bootstrap over points and a jackknife over models.

An estimate here is a mean over n evaluation points of a per-point value computed from K
models. Its uncertainty has two sources (docs/decomposition.md):

- the finite set of points: the bootstrap over points (Efron 1979) resamples the n points
  with replacement, holding the models fixed;
- the finite set of models: the delete-one jackknife over models (Quenouille 1956; Tukey
  1958; Efron & Stein 1981) recomputes the estimate with each model (or, in a two-level
  design, each training subset) left out, holding the points fixed.

`combined_interval` adds the two variances (the sources are separate draws) and returns
a normal 95% interval. Where the jackknife is impossible (a variance from K = 2 models
leaves one model out of two: no variance is left) only the points' part is available,
and the interval understates the model-to-model uncertainty; callers say so.
"""
from __future__ import annotations

import torch

Z95 = 1.959963984540054


def bootstrap_se(per_point: torch.Tensor, n_boot: int = 1000, seed: int = 0) -> torch.Tensor:
    """Bootstrap standard error of the mean over points, for each row of `per_point` (m, n).

    Every row is resampled with the same point indices (the rows are quantities measured on
    the same points), via a (n_boot, n) matrix of resampling counts."""
    per_point = per_point.double()
    n = per_point.shape[-1]
    if n < 2:
        return torch.full(per_point.shape[:-1], float("nan"), dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(n, (n_boot, n), generator=g)
    counts = torch.zeros(n_boot, n, dtype=torch.float64).scatter_add_(1, idx, torch.ones(n_boot, n,
                                                                                         dtype=torch.float64))
    means = per_point.cpu() @ counts.T / n                                  # (m, n_boot)
    return means.std(-1)


def jackknife_se(leave_one_out: torch.Tensor) -> torch.Tensor:
    """Delete-one jackknife standard error from the K leave-one-out estimates, per row (m, K):
    se^2 = (K - 1)/K * sum_k (theta_(k) - mean_k theta_(k))^2."""
    theta = leave_one_out.double()
    k = theta.shape[-1]
    if k < 2:
        return torch.full(theta.shape[:-1], float("nan"), dtype=torch.float64)
    return ((k - 1) / k * (theta - theta.mean(-1, keepdim=True)).pow(2).sum(-1)).sqrt()


def combined_interval(estimate: float, se_points: float, se_models: float | None) -> tuple[float, float]:
    """Normal 95% interval from the two standard errors (se_models None/NaN: points only)."""
    var = se_points ** 2
    if se_models is not None and se_models == se_models:   # not NaN
        var += se_models ** 2
    half = Z95 * var ** 0.5
    return estimate - half, estimate + half
