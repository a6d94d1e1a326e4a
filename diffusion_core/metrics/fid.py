"""Frechet distance in the MNIST classifier's feature space, with cached reference statistics.

    FID = ||mu_r - mu_g||^2 + Tr(S_r + S_g - 2 (S_r^1/2 S_g S_r^1/2)^1/2)
        =      mean term    +            covariance term

Tr((S_r S_g)^1/2) is computed in the symmetric form Tr((S_r^1/2 S_g S_r^1/2)^1/2): both
square roots are of symmetric PSD matrices, taken with `eigh`, and the tiny negative
eigenvalues that finite-sample covariances (and round-off) produce are clipped to 0
instead of failing -- so a rank-deficient covariance (fewer samples than features, a
collapsed generator) is fine. All of it in float64. The two terms sum to the total.

Reference statistics (features, mean, covariance) for the MNIST validation split, the
test set and the training split are computed once per classifier and cached as .npz,
keyed by the classifier's sha256, the dataset, the split and the split seed.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from ..atomic import atomic_write
from ..cache import resolve_cache_dir

REFERENCE_SPLITS = ("val", "test", "train")


class FrechetDistance(NamedTuple):
    total: float
    mean_term: float
    cov_term: float


# ------------------------------------------------------------------------ statistics
def _as_numpy64(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def feature_statistics(features) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and unbiased covariance (D, D) of (N, D) features, float64."""
    f = _as_numpy64(features)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"need (N >= 2, D) features, got shape {f.shape}")
    mu = f.mean(axis=0)
    c = f - mu
    sigma = c.T @ c / (f.shape[0] - 1)
    return mu, sigma


def sqrtm_psd(a: np.ndarray) -> np.ndarray:
    """Square root of a symmetric PSD matrix (symmetrised first; negative eigenvalues clipped to 0)."""
    a = _as_numpy64(a)
    w, v = np.linalg.eigh((a + a.T) / 2)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray, sigma1_root: np.ndarray | None = None) -> float:
    """Tr((S1 S2)^1/2) = Tr((S1^1/2 S2 S1^1/2)^1/2), via eigh with clipping (sigma1_root: S1^1/2, if
    already computed -- the reference side of many distances)."""
    r = sqrtm_psd(sigma1) if sigma1_root is None else sigma1_root
    m = r @ _as_numpy64(sigma2) @ r
    w = np.linalg.eigvalsh((m + m.T) / 2)
    return float(np.sqrt(np.clip(w, 0.0, None)).sum())


def frechet_distance(mu1, sigma1, mu2, sigma2, sigma1_root: np.ndarray | None = None) -> FrechetDistance:
    """(total, mean term, covariance term); mean_term + cov_term == total.

    The covariance term is >= 0 in exact arithmetic; round-off can leave it at -1e-12
    or so for (nearly) identical covariances, which is clipped to 0.
    """
    mu1, mu2 = np.atleast_1d(_as_numpy64(mu1)), np.atleast_1d(_as_numpy64(mu2))
    s1, s2 = np.atleast_2d(_as_numpy64(sigma1)), np.atleast_2d(_as_numpy64(sigma2))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.shape[0],) * 2:
        raise ValueError(f"shape mismatch: mu {mu1.shape} vs {mu2.shape}, sigma {s1.shape} vs {s2.shape}")
    diff = mu1 - mu2
    mean_term = float(diff @ diff)
    cov_term = float(np.trace(s1) + np.trace(s2) - 2.0 * trace_sqrt_product(s1, s2, sigma1_root))
    cov_term = max(cov_term, 0.0)
    return FrechetDistance(mean_term + cov_term, mean_term, cov_term)


def fid_from_features(features_a, features_b) -> FrechetDistance:
    return frechet_distance(*feature_statistics(features_a), *feature_statistics(features_b))


# ------------------------------------------------------------------------ reference cache
@dataclass
class ReferenceStats:
    """Real-data features (float32, (N, D)), their mean/covariance (float64) and what they are of."""
    features: np.ndarray
    mu: np.ndarray
    sigma: np.ndarray
    dataset: str
    split: str
    classifier_sha256: str
    path: Path | None = None
    _radii: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def n(self) -> int:
        return int(self.features.shape[0])

    def knn_radii(self, k: int = 3) -> torch.Tensor:
        """k-NN radii of the reference features (precision/recall), computed once per k and kept."""
        if k not in self._radii:
            from .precision_recall import knn_radii
            self._radii[k] = knn_radii(self.features, k)
        return self._radii[k]


def _classifier_sha(classifier) -> str:
    sha = getattr(classifier, "sha256", None)
    if not sha:
        raise ValueError("classifier has no .sha256 (load it with load_classifier()) -- needed to key the cache")
    return sha


def cache_key(classifier_sha256: str, dataset: str, split: str, split_seed: int = 0) -> str:
    return f"refstats-{dataset}-{split}-splitseed{split_seed}-clf{classifier_sha256[:16]}"


def _atomic_savez(path: Path, **arrays) -> None:
    with atomic_write(path) as f:
        np.savez(f, **arrays)


def _split_images(split: str, data_root, split_seed: int) -> torch.Tensor:
    from ..data import load_mnist, mnist_splits

    if split == "test":
        return load_mnist(data_root, train=False).images
    s = mnist_splits(data_root, split_seed=split_seed)
    return {"train": s.train, "val": s.val}[split].images


def reference_statistics(classifier, split: str = "val", *, data_root: str | os.PathLike | None = None,
                         split_seed: int = 0, cache_dir: str | os.PathLike | None = None, dataset: str = "mnist",
                         refresh: bool = False, batch_size: int = 500) -> ReferenceStats:
    """Features + mean/cov of MNIST `split` ("val": the 12,000-image validation split, "test": the
    10,000-image test set, "train": the 48,000-image training split), cached on disk."""
    if dataset != "mnist":
        raise ValueError(f"reference statistics in classifier features exist for mnist only, not {dataset!r}")
    if split not in REFERENCE_SPLITS:
        raise ValueError(f"unknown split {split!r}; allowed: {', '.join(REFERENCE_SPLITS)}")
    sha = _classifier_sha(classifier)
    path = resolve_cache_dir(cache_dir) / f"{cache_key(sha, dataset, split, split_seed)}.npz"
    if path.exists() and not refresh:
        try:
            with np.load(path, allow_pickle=False) as z:
                if str(z["classifier_sha256"]) == sha:
                    return ReferenceStats(z["features"], z["mu"], z["sigma"], dataset, split, sha, path)
        except (OSError, ValueError, KeyError):
            pass  # unreadable / stale file: recompute and replace it
    images = _split_images(split, data_root, split_seed)
    feats = classifier.features(images, batch_size=batch_size).cpu().numpy().astype(np.float32)
    mu, sigma = feature_statistics(feats)
    _atomic_savez(path, features=feats, mu=mu, sigma=sigma, classifier_sha256=np.array(sha),
                  dataset=np.array(dataset), split=np.array(split), split_seed=np.array(split_seed),
                  created=np.array(time.strftime("%Y-%m-%dT%H:%M:%S")))
    return ReferenceStats(feats, mu, sigma, dataset, split, sha, path)


def real_vs_real_fid(classifier, *, data_root: str | os.PathLike | None = None, n: int = 10_000, seed: int = 0,
                     split_seed: int = 0, cache_dir: str | os.PathLike | None = None,
                     batch_size: int = 500) -> FrechetDistance:
    """The FID floor: `n` images drawn (seeded) from the training split vs `n` from the test set
    (all 10,000 when n >= 10,000). Says what "0" means for a finite sample in these features."""
    from ..data import mnist_splits

    test = reference_statistics(classifier, "test", data_root=data_root, split_seed=split_seed, cache_dir=cache_dir,
                                batch_size=batch_size)
    train = mnist_splits(data_root, split_seed=split_seed).train
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(train), generator=g)[:min(n, len(train))]
    a = classifier.features(train.images[idx], batch_size=batch_size).cpu().numpy()
    b = test.features
    if n < test.n:
        b = b[torch.randperm(test.n, generator=g)[:n].numpy()]
    return fid_from_features(a, b)
