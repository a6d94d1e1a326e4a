"""Reference denoisers, and each model's per-t distance to them (table `reference_distances`).

On the held-out points of `studyctl decompose` (the first n validation images, eps from the
evaluation seed), at every t of its grid, every snapshot, EMA and raw weights, each completed
trial's noise predictor f is compared with

* `memorizing`: f*_D, the exact optimal denoiser of the empirical distribution of the trial's own
  training set D (decomposition.empirical_optimal_eps): the optimum of the training objective, a
  model that reproduces its training images (Gu et al. 2023; Kadkhodaie et al. 2024);
* `gaussian_linear`: the optimal denoiser of N(m_D, S_D), the Gaussian with D's empirical mean and
  covariance (molrg.MoLRG.of_data): linear in x_t; Li, Dai & Qu (NeurIPS 2024) find generalizing
  denoisers close to it;
* `optimal` (molrg studies only): the true f* = E[eps | x_t] of the data distribution.

Columns `distance_<name>` = mean over points of ||f - f_ref||^2 / d with a 95% interval from a
bootstrap over the points (one model: no model part; `interval` = "points"), and, per training set,
the references' distances to each other (`<a>_to_<b>`) for scale. Cost, once per training set of N
images: f*_D is n_points x |t-grid| x N x d multiply-adds, the Gaussian one eigh of a d x d matrix
plus n_points x |t-grid| x d^2; both are cached across the trials that share the training set.
"""
from __future__ import annotations

import dataclasses
from itertools import combinations

import torch

from diffusion_core.config import DataConfig, SPLIT_SIZES
from diffusion_core.estimators.decomposition import empirical_optimal_eps
from diffusion_core.estimators.intervals import bootstrap_se, combined_interval
from diffusion_core.diffusion.schedules import NoiseSchedule

REFERENCES = ("memorizing", "gaussian_linear", "optimal")
LABELS = {"memorizing": "memorizing f*_D (own training set)",
          "gaussian_linear": "Gaussian-linear (own training set's mean, covariance)",
          "optimal": "true f* (the mixture)"}


def training_key(data: DataConfig) -> DataConfig:
    """The training set a DataConfig names, whatever its validation/device fields."""
    return dataclasses.replace(data, val_size=None, on_device=False)


def train_size(data: DataConfig) -> int:
    """N: the number of training images a DataConfig names."""
    return int(data.subset_size or SPLIT_SIZES[data.dataset][0])


def x_t_at(x0: torch.Tensor, eps: torch.Tensor, t: int, schedule: NoiseSchedule) -> torch.Tensor:
    """x_t exactly as the network sees it (float32 as x0), returned as float64 for the references."""
    return schedule.q_sample(x0, torch.full((len(x0),), t, dtype=torch.long), eps).double()


class ReferenceValues:
    """The reference denoisers' values at the held-out x_t, computed once per (training set, points).

    `train(data)` is the training set of a DataConfig as one float64 tensor (the caller caches it);
    `truth(data)` is the true mixture (molrg.MoLRG) of a molrg DataConfig, or None elsewhere."""

    def __init__(self, train, truth):
        self._train, self._truth = train, truth
        self._cache: dict[tuple, dict[str, dict[int, torch.Tensor]]] = {}

    def at(self, data: DataConfig, schedule: NoiseSchedule, points_key: tuple, x0: torch.Tensor,
           eps: torch.Tensor, ts: list[int]) -> dict[str, dict[int, torch.Tensor]]:
        """{reference name: {t: (n, ...) float64}} for the trial trained on `data`."""
        key = (training_key(data), tuple(schedule.alpha_bar.tolist()), points_key)
        if key not in self._cache:
            train = self._train(data)
            gaussian = _gaussian_of(train)
            truth = self._truth(data)
            out: dict[str, dict[int, torch.Tensor]] = {name: {} for name in REFERENCES if
                                                       name != "optimal" or truth is not None}
            for t in ts:
                x_t = x_t_at(x0, eps, t, schedule)
                out["memorizing"][t] = empirical_optimal_eps(x_t, t, schedule, train)
                out["gaussian_linear"][t] = gaussian.optimal_eps(x_t, t, schedule)
                if truth is not None:
                    out["optimal"][t] = truth.optimal_eps(x_t, t, schedule)
            self._cache[key] = out
        return self._cache[key]


def _gaussian_of(train: torch.Tensor):
    from diffusion_core.molrg import MoLRG

    return MoLRG.of_data(train)


def _sq(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a.double() - b.double()).flatten(1).pow(2).mean(1)


def _with_interval(name: str, per_point: torch.Tensor, n_boot: int, seed: int) -> dict[str, float]:
    est = float(per_point.mean())
    lo, hi = combined_interval(est, float(bootstrap_se(per_point[None], n_boot, seed)[0]), None)
    return {name: est, f"{name}_lo": lo, f"{name}_hi": hi}


def distances(prediction: torch.Tensor, refs: dict[str, dict[int, torch.Tensor]], t: int, n_boot: int,
              seed: int) -> dict[str, float]:
    """One model's row at one t: distance_<ref> (+ _lo/_hi) for every reference present, the references'
    distances to each other, NaN for a reference this data set has not (no true f* off molrg)."""
    row: dict[str, float] = {}
    for name in REFERENCES:
        if name in refs:
            row.update(_with_interval(f"distance_{name}", _sq(prediction, refs[name][t]), n_boot, seed))
        else:
            row.update({f"distance_{name}{s}": float("nan") for s in ("", "_lo", "_hi")})
    for a, b in combinations(REFERENCES, 2):
        row[f"{a}_to_{b}"] = float(_sq(refs[a][t], refs[b][t]).mean()) if a in refs and b in refs else float("nan")
    row["interval"] = "points"
    return row
