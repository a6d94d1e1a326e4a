"""Memorization -> generalization on the data axis: the per-sample measurements.

Two models trained on disjoint subsets D_a, D_b of the same size N, sampled with DDIM
eta = 0 from the same starting noise z (a deterministic map z -> G(z)), are compared
sample by sample (Kadkhodaie et al., ICLR 2024, "Generalization in diffusion models
arises from geometry-adaptive harmonic representations"):

- same-noise similarity of G_a(z) and G_b(z): the cosine of the two images' centred pixel
  values (each image minus its own mean: Pearson's correlation over pixels), so identical
  images score 1 whatever they are -- two blank images included, which the cosine of raw
  [0, 1] intensities scored 0 (zero vectors) -- and two different digits score well below 1;
  and the per-pixel MSE in the models' [-1, 1] scale. Small while each model reproduces its
  own training images, near 1 / 0 once both learn the same density.
- nearest training images (Gu et al. 2023, "On Memorization in Diffusion Models"):
  d1 <= d2 the distances (L2 over pixels, [-1, 1]) to the nearest and second-nearest image
  of the model's own subset; a sample is memorized when d1 < d2 / 3. The same against the
  other subset (which the model never saw) is the control, and held-out real images
  scored the same way are the baseline a generalizing model should look like.
- distance to the memorizing optimum: on training points of D, the exact empirical
  optimal denoiser f*_D (decomposition.empirical_optimal_eps) is the minimiser of the
  training loss; E||f_theta(x_t) - f*_D(x_t)||^2 / d is 0 for a model that has memorized
  D exactly (DECOMPOSITION.md, "A finite training set").

Intervals: `mean_interval` is a percentile bootstrap over the samples (the only
randomness at fixed weights and fixed noise is which z were drawn).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .decomposition import empirical_optimal_eps
from ..metrics.memorization import as_unit_images, memorization
from ..diffusion.schedules import NoiseSchedule

MEMORIZATION_RATIO = 3.0   # Gu et al. (2023): memorized when d1 < d2 / 3


def same_noise_similarity(samples_a, samples_b) -> tuple[np.ndarray, np.ndarray]:
    """Per-sample (cosine of the centred pixel values, per-pixel MSE in [-1, 1]) of two sample sets
    drawn from the same noise, row i against row i. Inputs: uint8 or [-1, 1] images.

    The cosine is Pearson's correlation over pixels: invariant to each image's brightness offset
    and scale (the MSE measures those). A constant image (a blank) has no centred direction: two
    constant images score 1 (no structure either side: they agree), a constant against a
    non-constant one 0."""
    a = as_unit_images(samples_a).flatten(1).double()
    b = as_unit_images(samples_b).flatten(1).double()
    if a.shape != b.shape:
        raise ValueError(f"same-noise samples must pair up row by row: got {tuple(a.shape)} and {tuple(b.shape)}")
    ca, cb = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
    na, nb = ca.norm(dim=1), cb.norm(dim=1)
    tiny = 1e-9   # a centred norm this small is a constant image up to round-off (one uint8 level: 2/255)
    flat_a, flat_b = na <= tiny, nb <= tiny
    cos = (ca * cb).sum(1) / (na * nb).clamp_min(tiny * tiny)
    cos = torch.where(flat_a & flat_b, torch.ones_like(cos), torch.where(flat_a | flat_b, torch.zeros_like(cos), cos))
    mse = (a - b).pow(2).mean(1)
    return cos.numpy(), mse.numpy()


@dataclass
class NearestStats:
    """Each sample's nearest images in its own training subset and in the other subset."""
    d1_own: np.ndarray            # (n,) distance to the nearest own training image
    d2_own: np.ndarray            # (n,) ... to the second nearest
    nn_own: np.ndarray            # (n,) index (into the own subset) of the nearest
    d1_other: np.ndarray          # (n,) distance to the nearest image of the other subset
    d2_other: np.ndarray
    nn_other: np.ndarray
    cosine_own: np.ndarray        # (n,) same_noise_similarity's cosine with the nearest own image
    cosine_other: np.ndarray
    ratio: float = MEMORIZATION_RATIO

    @property
    def memorized(self) -> np.ndarray:
        """Gu et al.: d1 < d2 / 3 within the own subset."""
        return self.d1_own < self.d2_own / self.ratio

    @property
    def memorized_other(self) -> np.ndarray:
        """The same test against the subset the model never saw (a control: ~0 expected)."""
        return self.d1_other < self.d2_other / self.ratio

    @property
    def own_over_other(self) -> np.ndarray:
        """d1_own / d1_other: < 1 when a sample sits closer to its own training data."""
        return self.d1_own / np.maximum(self.d1_other, 1e-12)


def _nearest_cosine(samples: torch.Tensor, images: torch.Tensor, idx: np.ndarray) -> np.ndarray:
    cos, _ = same_noise_similarity(samples, images[torch.as_tensor(idx, dtype=torch.long)])
    return cos


def nearest_in_subsets(samples, own_images, other_images, *, ratio: float = MEMORIZATION_RATIO,
                       device: str | torch.device | None = None) -> NearestStats:
    """Nearest and second-nearest images of each sample in `own_images` and `other_images`
    (diffusion_core.metrics.memorization does the search)."""
    x = as_unit_images(samples)
    own, other = as_unit_images(own_images), as_unit_images(other_images)
    m_own = memorization(x, own, ratio=ratio, device=device)
    m_other = memorization(x, other, ratio=ratio, device=device)
    return NearestStats(m_own.d1, m_own.d2, m_own.nn_index, m_other.d1, m_other.d2, m_other.nn_index,
                        _nearest_cosine(x, own, m_own.nn_index), _nearest_cosine(x, other, m_other.nn_index),
                        ratio)


@dataclass
class OptimumDistance:
    t: list[int]
    distance: list[float]          # E||f_theta(x_t) - f*_D(x_t)||^2 / d  (0 = memorized D exactly)
    model_error: list[float]       # E||eps - f_theta(x_t)||^2 / d       (training loss at t)
    optimum_error: list[float]     # E||eps - f*_D(x_t)||^2 / d          (its minimum over all functions)


@torch.no_grad()
def distance_to_memorization(eps_model, schedule: NoiseSchedule, train_x0: torch.Tensor, points_x0: torch.Tensor,
                             eps: torch.Tensor, t_grid, *, batch_size: int = 256) -> OptimumDistance:
    """Distance of a noise predictor to the exact empirical optimal denoiser f*_D of its whole
    training set `train_x0` (N, ...) in [-1, 1], per t, at the training points `points_x0`
    (some or all of D) noised with the fixed `eps`."""
    if eps.shape != points_x0.shape:
        raise ValueError(f"eps {tuple(eps.shape)} must match the points {tuple(points_x0.shape)}")
    out = OptimumDistance([], [], [], [])
    n = points_x0.shape[0]
    for t in [int(t) for t in t_grid]:
        dist = mod = opt = 0.0
        for lo in range(0, n, batch_size):
            x0, e = points_x0[lo:lo + batch_size], eps[lo:lo + batch_size]
            tt = torch.full((x0.shape[0],), t, dtype=torch.long, device=x0.device)
            x_t = schedule.q_sample(x0, tt, e)
            f_star = empirical_optimal_eps(x_t, t, schedule, train_x0).double().flatten(1)
            f = eps_model(x_t, tt).double().flatten(1)
            ed = e.double().flatten(1)
            dist += float((f - f_star).pow(2).mean(1).sum())
            mod += float((ed - f).pow(2).mean(1).sum())
            opt += float((ed - f_star).pow(2).mean(1).sum())
        out.t.append(t)
        out.distance.append(dist / n)
        out.model_error.append(mod / n)
        out.optimum_error.append(opt / n)
    return out


def mean_interval(values, *, level: float = 0.95, n_boot: int = 1000, seed: int = 0) -> tuple[float, float, float]:
    """(mean, lower, upper): percentile bootstrap interval of the mean over the samples."""
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        return float("nan"), float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, v.size, size=(n_boot, v.size))].mean(1)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(v.mean()), float(lo), float(hi)


__all__ = ["MEMORIZATION_RATIO", "NearestStats", "OptimumDistance", "distance_to_memorization", "mean_interval",
           "nearest_in_subsets", "same_noise_similarity"]
