"""Sample quality in MNIST's own feature space (pure PyTorch + NumPy/SciPy).

    from diffusion_core.metrics import load_classifier, reference_statistics, evaluate_samples
    clf = load_classifier("cpu")
    ref = reference_statistics(clf, "val", data_root="../shared/data")    # cached on disk
    m = evaluate_samples(samples, ref, clf, train_images)                  # flat dict of floats

`samples` are (N, 1, 28, 28) images, float in [-1, 1] or uint8. Keys: fid,
fid_mean_term, fid_cov_term, inception_score, inception_score_std, h_y, h_y_given_x,
precision, recall, memorized_fraction, their 95% intervals fid_lo / fid_hi,
inception_score_lo / _hi, precision_lo / _hi, recall_lo / _hi (half-sampling, metrics/intervals.py; NaN
with interval_halves=0), plus extras (nn_distance_*, inception_score_arith,
n_samples, n_reference).

`inception_fid_cifar10()` is the Inception-V3 FID of clean-fid for CIFAR-10; it needs
clean-fid's Inception weights and CIFAR-10 reference statistics on disk and fails fast
with instructions when they are not there (this code never downloads).
"""
from __future__ import annotations

import os
import socket
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from .classifier import (ClassifierWeightsError, MnistResNet, load_classifier, sha256_file, train_classifier,
                         PROVENANCE_PATH, WEIGHTS_PATH)
from ..config import INTERVAL_KEYS, METRIC_KEYS
from .fid import (FrechetDistance, ReferenceStats, feature_statistics, fid_from_features, frechet_distance,
                  real_vs_real_fid, reference_statistics, resolve_cache_dir)
from .inception_score import inception_score
from .intervals import half_sample_intervals
from .memorization import MemorizationResult, as_unit_images, memorization, nearest_two
from .precision_recall import knn_radii, precision_recall

@contextmanager
def _stage(timings: dict | None, name: str):
    t0 = time.perf_counter()
    yield
    if timings is not None:
        timings[name] = timings.get(name, 0.0) + time.perf_counter() - t0


def evaluate_samples(samples, reference: ReferenceStats | str, classifier: MnistResNet, train_images=None, *,
                     splits: int = 5, k: int = 3, data_root: str | os.PathLike | None = None,
                     cache_dir: str | os.PathLike | None = None, memorization_ratio: float = 3.0,
                     memorization_device: str | torch.device | None = None, batch_size: int = 500,
                     timings: dict | None = None, labels: torch.Tensor | None = None, interval_halves: int = 0,
                     interval_seed: int = 0) -> dict:
    """All sample metrics as one flat dict of floats.

    reference: a ReferenceStats (from `reference_statistics`) or a split name ("val",
    "test") to load/compute it (with data_root, cache_dir). train_images: the training
    images (ImageSet or uint8/float tensor) for memorization; None skips it (NaN).
    memorization_device: where the pixel-space nearest-neighbour search runs (default: the
    classifier's device). timings: a dict to receive seconds per stage (features, fid,
    inception_score, precision_recall, memorization). The reference's k-NN radii are
    computed on first use and kept on the ReferenceStats object.
    labels: the class each sample was asked for (class-conditional sampling): adds
    conditional_accuracy (the classifier agrees with the asked-for label) and fid_class_mean
    (per-class FID against the reference images the classifier puts in that class, averaged
    over classes); NaN without labels.
    interval_halves: random halves of the samples for the 95% intervals of FID, IS, precision and
    recall (metrics/intervals.py, seeded by interval_seed); 0 leaves the interval keys NaN.
    """
    if isinstance(reference, str):
        reference = reference_statistics(classifier, reference, data_root=data_root, cache_dir=cache_dir)
    sha = getattr(classifier, "sha256", None)
    if sha and reference.classifier_sha256 != sha:
        raise ValueError(f"reference statistics were computed with classifier {reference.classifier_sha256[:12]}, "
                         f"not this one ({sha[:12]})")
    x = as_unit_images(samples)
    with _stage(timings, "features"):
        feats, probs = classifier.features_and_probs(x, batch_size=batch_size)
        feats = feats.cpu().double().numpy()
    with _stage(timings, "fid"):
        fd = frechet_distance(reference.mu, reference.sigma, *feature_statistics(feats))
    with _stage(timings, "inception_score"):
        iscore = inception_score(probs, splits=splits)
    with _stage(timings, "precision_recall"):
        pr = precision_recall(reference.features, feats.astype(np.float32), k=k, real_radii=reference.knn_radii(k))
    out = {"fid": fd.total, "fid_mean_term": fd.mean_term, "fid_cov_term": fd.cov_term,
           "inception_score": iscore["inception_score"], "inception_score_std": iscore["inception_score_std"],
           "h_y": iscore["h_y"], "h_y_given_x": iscore["h_y_given_x"],
           "precision": pr["precision"], "recall": pr["recall"], "memorized_fraction": float("nan")}
    out.update(dict.fromkeys(INTERVAL_KEYS, float("nan")))
    if interval_halves:
        with _stage(timings, "intervals"):
            out.update(half_sample_intervals(feats, probs, reference.mu, reference.sigma, reference.features,
                                             reference.knn_radii(k), out, splits=splits, k=k,
                                             n_boot=interval_halves, seed=interval_seed))
    if train_images is not None:
        with _stage(timings, "memorization"):
            mem_device = memorization_device if memorization_device is not None else classifier.device
            mem = memorization(x, train_images, ratio=memorization_ratio, device=mem_device)
        out["memorized_fraction"] = mem.memorized_fraction
        out.update(mem.summary("nn_distance"))
    out["conditional_accuracy"] = out["fid_class_mean"] = float("nan")
    if labels is not None:
        out.update(conditional_metrics(feats, probs, labels, reference, classifier))
    out["inception_score_arith"] = iscore["inception_score_arith"]
    out["n_samples"] = int(x.shape[0])
    out["n_reference"] = reference.n
    return out


def conditional_metrics(feats: np.ndarray, probs: torch.Tensor, labels: torch.Tensor, reference: ReferenceStats,
                        classifier: MnistResNet) -> dict:
    """Conditional accuracy and the mean per-class FID of class-conditional samples.

    The reference images of class c are those the classifier assigns to c (its head applied
    to the cached reference features; 99.6% test accuracy), since the cached statistics keep
    features, not labels. A class with fewer than 2 samples gets no FID (left out of the mean)."""
    labels = labels.cpu().long().numpy()
    pred = probs.argmax(1).cpu().numpy() if hasattr(probs, "argmax") else np.asarray(probs).argmax(1)
    accuracy = float((pred == labels).mean())
    with torch.no_grad():
        ref_logits = classifier.fc(torch.as_tensor(reference.features, dtype=torch.float32,
                                                     device=classifier.device))
    ref_class = ref_logits.argmax(1).cpu().numpy()
    fids = []
    for c in np.unique(labels):
        mine, ref = feats[labels == c], reference.features[ref_class == c].astype(np.float64)
        if len(mine) >= 2 and len(ref) >= 2:
            fids.append(frechet_distance(*feature_statistics(ref), *feature_statistics(mine)).total)
    return {"conditional_accuracy": accuracy, "fid_class_mean": float(np.mean(fids)) if fids else float("nan")}


# ------------------------------------------------------------------------ CIFAR-10 (clean-fid)
class InceptionUnavailableError(RuntimeError):
    pass


def _cleanfid_paths(weights_dir: str | os.PathLike | None, mode: str, split: str, res: int = 32):
    import cleanfid

    wdir = Path(weights_dir) if weights_dir is not None else Path("/tmp")  # clean-fid's own default on Linux
    weights = wdir / "inception-2015-12-05.pt"
    stats = Path(os.path.dirname(cleanfid.__file__)) / "stats" / f"cifar10_{mode}_{split}_{res}.npz".lower()
    return weights, stats


def inception_fid_cifar10(samples, *, mode: str = "clean", split: str = "train", device: str | torch.device = "cpu",
                          batch_size: int = 100, weights_dir: str | os.PathLike | None = None) -> dict:
    """Inception-V3 FID of CIFAR-10 samples ((N, 3, 32, 32), uint8 or [-1, 1]) against clean-fid's
    published CIFAR-10 statistics ({mode}, {split}). Needs, on disk (never downloaded here):
    clean-fid's Inception weights `inception-2015-12-05.pt` in `weights_dir` (default /tmp, where
    clean-fid keeps them) and `cifar10_{mode}_{split}_32.npz` in clean-fid's stats folder.
    Raises InceptionUnavailableError at once when either is missing."""
    try:
        import cleanfid  # noqa: F401
        from cleanfid import fid as cfid
        from cleanfid.inception_torchscript import InceptionV3W
        from cleanfid.resize import build_resizer
    except ImportError as e:
        raise InceptionUnavailableError(f"clean-fid is not importable ({e}); pip install clean-fid") from e
    if mode not in ("clean", "legacy_tensorflow"):
        raise ValueError(f"mode {mode!r}; allowed: clean, legacy_tensorflow")
    weights, stats = _cleanfid_paths(weights_dir, mode, split)
    missing = [str(p) for p in (weights, stats) if not p.exists()]
    if missing:
        raise InceptionUnavailableError(
            "Inception FID for CIFAR-10 needs files that are not on this machine: " + ", ".join(missing) +
            ". Fix: on a machine with internet, fetch https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/"
            "pretrained/metrics/inception-2015-12-05.pt into the weights folder and "
            f"https://www.cs.cmu.edu/~clean-fid/stats/{stats.name} into {stats.parent}, then copy them here. "
            "MNIST runs should use evaluate_samples() (classifier features) instead.")
    old_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(5.0)    # belt and braces: nothing below should touch the network
    try:
        x = samples
        if isinstance(x, np.ndarray):
            x = torch.from_numpy(x)
        if x.dtype != torch.uint8:
            x = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        imgs = x.permute(0, 2, 3, 1).cpu().numpy()                 # NHWC uint8, as clean-fid expects
        net = InceptionV3W(str(weights.parent), download=False, resize_inside=(mode == "legacy_tensorflow"))
        net = net.to(device).eval()
        model = lambda b: net(b)                                  # noqa: E731  (features from [0,255] NCHW)
        resizer = build_resizer(mode)                             # clean: PIL bicubic to 299x299
        feats = []
        for i in range(0, len(imgs), batch_size):
            batch = np.stack([np.asarray(resizer(im), dtype=np.float32) for im in imgs[i:i + batch_size]])
            batch = torch.from_numpy(batch).permute(0, 3, 1, 2)   # NCHW floats in [0, 255], as ResizeDataset
            feats.append(cfid.get_batch_features(batch, model, torch.device(device)))
        feats = np.concatenate(feats)
        with np.load(stats) as z:
            mu_r, sigma_r = z["mu"], z["sigma"]
        fd = frechet_distance(mu_r, sigma_r, *feature_statistics(feats))
        return {"fid": fd.total, "fid_mean_term": fd.mean_term, "fid_cov_term": fd.cov_term, "n_samples": len(imgs)}
    finally:
        socket.setdefaulttimeout(old_timeout)


__all__ = [
    "INTERVAL_KEYS", "METRIC_KEYS", "half_sample_intervals", "evaluate_samples", "inception_fid_cifar10", "InceptionUnavailableError",
    "MnistResNet", "load_classifier", "train_classifier", "ClassifierWeightsError", "sha256_file",
    "WEIGHTS_PATH", "PROVENANCE_PATH",
    "FrechetDistance", "ReferenceStats", "feature_statistics", "frechet_distance", "fid_from_features",
    "reference_statistics", "real_vs_real_fid", "resolve_cache_dir",
    "inception_score", "precision_recall", "knn_radii",
    "memorization", "nearest_two", "MemorizationResult", "as_unit_images",
]
