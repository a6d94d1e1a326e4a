"""Improved precision and recall (Kynkaanniemi et al. 2019) in the classifier's features.

Each feature vector of a set carries a ball whose radius is the distance to its k-th
nearest neighbour within that set (k = 3, the point itself excluded); the union of the
balls estimates the set's manifold.

    precision = fraction of generated samples inside the real manifold
    recall    = fraction of real samples inside the generated manifold

Distances are Euclidean, computed in row chunks (||a||^2 + ||b||^2 - 2ab in float32, at
most `chunk` rows against the whole other set at a time) so memory stays bounded.
"""
from __future__ import annotations

import numpy as np
import torch


def _as_tensor(x) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x)
    return x.detach().float().cpu()


def _sq_dists(a: torch.Tensor, b: torch.Tensor, b_sq: torch.Tensor) -> torch.Tensor:
    a_sq = (a * a).sum(1, keepdim=True)
    return (a_sq + b_sq[None, :] - 2.0 * (a @ b.T)).clamp_min_(0.0)


def knn_radii(features, k: int = 3, chunk: int = 1000) -> torch.Tensor:
    """Distance from each row to its k-th nearest other row (N,)."""
    f = _as_tensor(features)
    n = f.shape[0]
    if n <= k:
        raise ValueError(f"need more than k={k} points, got {n}")
    f_sq = (f * f).sum(1)
    out = torch.empty(n)
    for i in range(0, n, chunk):
        d = _sq_dists(f[i:i + chunk], f, f_sq)
        rows = torch.arange(d.shape[0])
        d[rows, rows + i] = float("inf")                       # exclude the point itself
        out[i:i + chunk] = d.kthvalue(k, dim=1).values
    return out.sqrt()


def coverage_fraction(queries, support, radii: torch.Tensor, chunk: int = 1000) -> float:
    """Fraction of query rows within radii[j] of some support row j."""
    q, s = _as_tensor(queries), _as_tensor(support)
    s_sq = (s * s).sum(1)
    r_sq = radii.float() ** 2
    inside = 0
    for i in range(0, q.shape[0], chunk):
        d = _sq_dists(q[i:i + chunk], s, s_sq)
        inside += int((d <= r_sq[None, :]).any(dim=1).sum())
    return inside / q.shape[0]


def precision_recall(real_features, gen_features, k: int = 3, chunk: int = 1000,
                     real_radii: torch.Tensor | None = None) -> dict:
    """{'precision', 'recall'} of generated vs real features (pass real_radii to reuse them)."""
    real, gen = _as_tensor(real_features), _as_tensor(gen_features)
    if real_radii is None:
        real_radii = knn_radii(real, k, chunk)
    gen_radii = knn_radii(gen, k, chunk)
    return {
        "precision": coverage_fraction(gen, real, real_radii, chunk),
        "recall": coverage_fraction(real, gen, gen_radii, chunk),
    }
