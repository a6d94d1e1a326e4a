"""95% intervals of FID, IS, precision and recall from one evaluation's samples (half-sampling).

One draw of n samples gives one FID; the next evaluation's draw another (from 1,000 samples they
move by a factor 1.4-2.5 late in the thesis run). The interval says how far the number would move
with another draw of n samples from the same weights, without sampling again: each metric is
recomputed `n_boot` times on a random half of the n samples' classifier features (and class
probabilities), drawn without replacement, against the same reference.

Why halves, not the usual bootstrap (n draws with replacement): a resample's duplicate points
make the covariance noisier and break recall's k-NN balls (a duplicate is its own neighbour at
distance 0). A half of a fixed sample varies about the whole sample's value about as much as the
whole sample varies from draw to draw (Var = s^2/m (1 - m/n) = s^2/n at m = n/2: the delete-half
jackknife, exact for a mean). The interval is observed +- 1.96 sd of the halves' values (a half's
metric is biased -- FID up, recall down: fewer points -- so its spread is used, not its centre), kept
in the metric's range: IS in [1, classes], precision and recall in [0, 1]; FID's on the log scale
(observed x/ exp(1.96 sd of log FID)): FID is positive and its noise multiplicative.

Checked against independent draws (tests/test_metrics.py): with half the MNIST test set as the
reference and 1,000 real images of the other half as the samples, each interval's implied sd was 1.0-1.5x
the sd over five disjoint 1,000-image draws (FID on the log scale: 1.2x).

IS has a second, independent reading: the thesis averaged IS over five independent sample sets;
`inception_score_std` is the standard deviation over `splits` parts of one draw (what the `evals`
table has always recorded), and sweeping `evaluation.seed` draws independent sample sets. The
figures draw the interval recorded here.
"""
from __future__ import annotations

from statistics import NormalDist

import numpy as np
import torch

from ..config import INTERVAL_KEYS, INTERVAL_METRICS
from .fid import feature_statistics, frechet_distance, sqrtm_psd
from .inception_score import inception_score
from .precision_recall import _as_tensor, _sq_dists

LEVEL = 0.95
N_BOOT = 50            # halves per evaluation: ~0.3 s each on one CPU core (FID's eigh, recall's radii)


def normal_interval(replicates: np.ndarray, observed: float, low: float = -np.inf, high: float = np.inf,
                    level: float = LEVEL, log: bool = False) -> tuple[float, float]:
    """observed +- z sd(replicates) (z = 1.96 at 95%), kept in [low, high]; log: the same on the log
    scale (observed x/ exp(z sd(log replicates)), for a positive quantity)."""
    r = np.asarray(replicates, dtype=np.float64)
    r = r[np.isfinite(r) & (r > 0)] if log else r[np.isfinite(r)]
    if r.size < 2 or not np.isfinite(observed) or (log and observed <= 0):
        return float("nan"), float("nan")
    z = float(NormalDist().inv_cdf((1 + level) / 2))
    if log:
        f = float(np.exp(z * np.log(r).std(ddof=1)))
        return float(np.clip(observed / f, low, high)), float(np.clip(observed * f, low, high))
    half = z * float(r.std(ddof=1))
    return float(np.clip(observed - half, low, high)), float(np.clip(observed + half, low, high))


def _recall(d_gen_ref: torch.Tensor, d_gen_gen: torch.Tensor, idx: torch.Tensor, k: int) -> float:
    """Recall of the generated samples `idx`: each carries the ball of its k-th nearest other sample
    among them; the share of reference points inside any ball."""
    d = d_gen_gen[idx][:, idx]
    d.fill_diagonal_(float("inf"))
    r_sq = d.kthvalue(k, dim=1).values
    return float((d_gen_ref[idx] <= r_sq[:, None]).any(dim=0).float().mean())   # rows gathered: contiguous


def half_sample_intervals(gen_features, probs, ref_mu: np.ndarray, ref_sigma: np.ndarray, ref_features,
                          ref_radii: torch.Tensor, observed: dict, *, splits: int = 5, k: int = 3,
                          n_boot: int = N_BOOT, level: float = LEVEL, seed: int = 0) -> dict[str, float]:
    """INTERVAL_KEYS ({metric}_lo / _hi) for the n samples' features (n, D) and class probabilities
    (n, C) against the reference (mean, covariance, features and their k-NN radii). `observed`: the
    metrics of all n samples (fid, inception_score, precision, recall), which the intervals centre on."""
    feats = np.asarray(gen_features, dtype=np.float64)
    p = probs.detach().cpu().double().numpy() if isinstance(probs, torch.Tensor) else np.asarray(probs, np.float64)
    n, classes = feats.shape[0], p.shape[1]
    m = n // 2
    if m <= k or m < 2 * splits:
        return dict.fromkeys(INTERVAL_KEYS, float("nan"))
    g = torch.Generator().manual_seed(seed)
    halves = [torch.randperm(n, generator=g)[:m] for _ in range(n_boot)]
    ref, gen = _as_tensor(ref_features), _as_tensor(feats)
    d_gen_ref = _sq_dists(gen, ref, (ref * ref).sum(1))            # (n, n_ref): squared distances, once
    d_gen_gen = _sq_dists(gen, gen, (gen * gen).sum(1))
    inside = (d_gen_ref <= (ref_radii.float() ** 2)[None, :]).any(1).numpy()
    ref_root = sqrtm_psd(ref_sigma)                                 # FID's reference side, once
    reps = {name: np.empty(n_boot) for name in INTERVAL_METRICS}
    for b, idx in enumerate(halves):
        i = idx.numpy()
        mu, sigma = feature_statistics(feats[i])
        reps["fid"][b] = frechet_distance(ref_mu, ref_sigma, mu, sigma, sigma1_root=ref_root).total
        reps["inception_score"][b] = inception_score(p[i], splits=splits)["inception_score"]
        reps["precision"][b] = inside[i].mean()
        reps["recall"][b] = _recall(d_gen_ref, d_gen_gen, idx, k)
    ranges = {"fid": (0.0, np.inf), "inception_score": (1.0, float(classes)), "precision": (0.0, 1.0),
              "recall": (0.0, 1.0)}
    out = {}
    for name in INTERVAL_METRICS:
        out[f"{name}_lo"], out[f"{name}_hi"] = normal_interval(reps[name], float(observed[name]), *ranges[name],
                                                               level=level, log=name == "fid")
    return out


__all__ = ["INTERVAL_KEYS", "INTERVAL_METRICS", "LEVEL", "N_BOOT", "half_sample_intervals",
           "normal_interval"]
