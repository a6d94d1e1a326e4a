"""Exact sample quality on molrg studies (table `sample_quality`), against the true mixture.

Per trial, at its final snapshot (or every one: steps="all"), the EMA weights draw n samples with
DDIM eta = 0 (`evaluation.steps` steps when the study samples with DDIM, else 50) and **no x0
clipping** (mixture draws are not bounded to [-1, 1]) from the evaluation seed's stream (after
the residual's eps, as the Evaluator draws its starting noise). Measured against the mixture
p = sum_c pi_c N(mu_c, U_c diag(lambda_c) U_c^T + sigma_0^2 I) (diffusion_core.molrg):

* `log_density`: mean log p(x) in nats per image (higher is better), 95% interval (bootstrap);
* `subspace_distance`: mean ||x - nearest affine subspace mu_c + span U_c||^2 / d; a draw of the
  mixture sits at sigma_0^2 (d - r)/d on average;
* `coverage_c<k>`: the fraction of samples whose posterior component argmax_c w_c(x) is k, beside
  `weight_c<k>` = pi_k; `coverage_kl` = KL(coverage || pi) in nats (0 log 0 = 0): an exact
  mode-collapse measure, with a percentile-bootstrap interval;
* `pixel_fd` (= `pixel_fd_mean_term` + `pixel_fd_cov_term`): the Frechet distance in pixel space
  between the samples' mean and covariance and the mixture's exact ones;
* `fid` (+ terms): the Frechet distance in the MNIST classifier's feature space against
  `n_reference` held-out mixture draws (the validation split's first images), both clipped to
  [-1, 1] before the classifier (its input range); `fraction_outside_unit` says how many pixel
  values that clipping touched.

Rows with `source` = "heldout_mixture" are the same measures of n held-out mixture draws (the
test split's first n): the floor (or ceiling) that finite n allows: KL, the Frechet distances
and the FID of a perfect model are not 0 at finite n.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from diffusion_core.config import SPLIT_SIZES
from diffusion_core.estimators.intervals import bootstrap_se, combined_interval
from diffusion_core.diffusion.samplers import DDIMSampler
from diffusion_core.diffusion.schedules import NoiseSchedule
from records.layout import snapshot_files
from records.snapshots import load_snapshot

from .references import train_size

DEFAULT_SAMPLES = 256        # a CPU study: DDIM 50 steps x 256 samples per trial and snapshot
DEFAULT_REFERENCE = 2_000    # held-out mixture draws the FID compares against
DEFAULT_DDIM_STEPS = 50


def _interval(name: str, per_sample: torch.Tensor, n_boot: int, seed: int) -> dict[str, float]:
    est = float(per_sample.mean())
    lo, hi = combined_interval(est, float(bootstrap_se(per_sample[None].double(), n_boot, seed)[0]), None)
    return {name: est, f"{name}_lo": lo, f"{name}_hi": hi}


def coverage_kl(components: np.ndarray, weights: np.ndarray) -> float:
    """KL(q || pi) in nats of the empirical component frequencies q (0 log 0 = 0)."""
    q = np.bincount(components, minlength=len(weights)) / len(components)
    nz = q > 0
    return float((q[nz] * np.log(q[nz] / weights[nz])).sum())


def quality_measures(x: torch.Tensor, truth, classifier, reference_features: torch.Tensor,
                     n_boot: int = 1000, seed: int = 0) -> dict[str, float]:
    """Every measure of the module docstring for samples x (n, 1, 28, 28), float."""
    from diffusion_core.metrics import fid_from_features

    x = x.float().cpu()
    out = {"n_samples": len(x), **_interval("log_density", truth.log_prob(x), n_boot, seed),
           **_interval("subspace_distance", truth.subspace_distance(x), n_boot, seed)}
    comp = truth.component_of(x).numpy()
    weights = truth.weights.numpy()
    out["coverage_kl"] = coverage_kl(comp, weights)
    rng = np.random.default_rng(seed)
    boot = [coverage_kl(comp[rng.integers(0, len(comp), len(comp))], weights) for _ in range(n_boot)]
    out["coverage_kl_lo"], out["coverage_kl_hi"] = (float(v) for v in np.quantile(boot, [0.025, 0.975]))
    q = np.bincount(comp, minlength=len(weights)) / len(comp)
    out.update({f"coverage_c{k}": float(q[k]) for k in range(len(weights))})
    out.update({f"weight_c{k}": float(weights[k]) for k in range(len(weights))})
    fd = pixel_frechet(x.flatten(1).double().numpy(), *_moments(truth))
    out.update({"pixel_fd": fd.total, "pixel_fd_mean_term": fd.mean_term, "pixel_fd_cov_term": fd.cov_term})
    out["fraction_outside_unit"] = float((x.abs() > 1).float().mean())
    fid = fid_from_features(classifier.features(x.clamp(-1, 1)), reference_features)
    out.update({"fid": fid.total, "fid_mean_term": fid.mean_term, "fid_cov_term": fid.cov_term,
                "n_reference": len(reference_features)})
    return out


def _moments(truth) -> tuple[np.ndarray, np.ndarray]:
    """The mixture's exact mean and covariance as numpy float64 (computed once per mixture)."""
    if not hasattr(truth, "_moments_np"):
        truth._moments_np = (truth.mean().numpy(), truth.covariance().numpy())
    return truth._moments_np


def pixel_frechet(x: np.ndarray, mu: np.ndarray, sigma: np.ndarray):
    """frechet_distance(mean(x), cov(x), mu, sigma) for samples x (n, d), through the n x n problem when
    n <= d: with cov(x) = A A^T, A = (x - mean) / sqrt(n - 1) (d x n), the nonzero eigenvalues of
    cov(x)^1/2 sigma cov(x)^1/2 are those of A^T sigma A, so Tr((cov(x) sigma)^1/2) = sum sqrt(eig(A^T sigma A)):
    exact, O(d^2 n) instead of two d x d eigendecompositions."""
    from diffusion_core.metrics import FrechetDistance, frechet_distance

    n, d = x.shape
    m = x.mean(0)
    if n > d:
        return frechet_distance(m, np.cov(x, rowvar=False), mu, sigma)
    a = (x - m).T / np.sqrt(n - 1)
    small = a.T @ sigma @ a
    tr_sqrt = float(np.sqrt(np.clip(np.linalg.eigvalsh((small + small.T) / 2), 0.0, None)).sum())
    mean_term = float((m - mu) @ (m - mu))
    cov_term = max(float((a * a).sum() + np.trace(sigma) - 2.0 * tr_sqrt), 0.0)
    return FrechetDistance(mean_term + cov_term, mean_term, cov_term)


def starting_noise(snap, n: int, seed: int) -> torch.Tensor:
    """n starting points x_T from the evaluation seed's stream, after the residual's eps (as the Evaluator)."""
    g = torch.Generator().manual_seed(seed)
    shape = (snap.model.in_channels, snap.model.image_size, snap.model.image_size)
    n_val = snap.data.val_size or SPLIT_SIZES[snap.data.dataset][1]
    torch.randn((min(snap.evaluation.residual_images, n_val), *shape), generator=g)   # the residual's eps
    return torch.randn((n, *shape), generator=g)


@torch.no_grad()
def draw(snap, n: int, seed: int, device, batch: int = 256) -> tuple[torch.Tensor, int]:
    """(samples (n, C, H, W) float32 on the CPU, DDIM steps) of the snapshot's EMA weights, unclipped."""
    schedule = NoiseSchedule.from_config(snap.schedule)
    steps = snap.evaluation.steps if snap.evaluation.sampler == "ddim" and snap.evaluation.steps else \
        DEFAULT_DDIM_STEPS
    sampler = DDIMSampler(schedule, steps=steps, eta=0.0, clip_x0=None)
    net = snap.net("ema", device)
    x_T = starting_noise(snap, n, seed)
    out = [sampler.sample(net, tuple(x_T[lo:lo + batch].shape), device=device, x_T=x_T[lo:lo + batch]).float().cpu()
           for lo in range(0, n, batch)]
    return torch.cat(out), steps


def sample_quality(study, trial_ids: list[str], data, *, steps: str = "final", n_samples: int | None = None,
                   n_reference: int | None = None, eval_seed: int | None = None, device="cpu",
                   progress: bool = True, n_boot: int = 1000) -> pd.DataFrame:
    """The sample_quality table (module docstring) of the given trials; `data`: decompose.StudyData."""
    from diffusion_core.metrics import load_classifier

    n, n_reference = int(n_samples or DEFAULT_SAMPLES), int(n_reference or DEFAULT_REFERENCE)
    if n < 2:
        raise ValueError(f"option 'quality_samples': bad value {n}: allowed: >= 2 (a covariance needs 2 samples)")
    classifier = load_classifier(device)
    rows, floors = [], {}
    for tid in tqdm(trial_ids, desc="sample quality", disable=not progress):
        files = snapshot_files(study.dir, tid)
        if not files:
            continue
        for step in (sorted(files)[-1:] if steps == "final" else sorted(files)):
            snap = load_snapshot(files[step])
            seed = int(eval_seed if eval_seed is not None else snap.evaluation.seed)
            truth = data.truth(snap.data)
            key = (data.heldout_key(snap.data), seed)
            if key not in floors:
                splits = data.heldout_splits(snap.data)
                ref = classifier.features(splits.val.batch(torch.arange(min(n_reference, len(splits.val))))
                                          .clamp(-1, 1))
                held = splits.test.batch(torch.arange(min(n, len(splits.test))))
                floors[key] = (ref, {"study": study.name, "trial_id": "", "source": "heldout_mixture",
                                     "eval_seed": seed, **quality_measures(held, truth, classifier, ref, n_boot, seed)})
            ref = floors[key][0]
            x, ddim_steps = draw(snap, n, seed, device)
            rows.append({"study": study.name, "trial_id": tid, "source": "model",
                         **{c: study.param(tid, c) for c in study.swept}, "train_size": train_size(snap.data),
                         "step": step, "weights": "ema", "sampler": "ddim", "ddim_steps": ddim_steps, "eta": 0.0,
                         "clip_x0": "none", "eval_seed": seed,
                         **quality_measures(x, truth, classifier, ref, n_boot, seed)})
    return pd.DataFrame(rows + [f for _, f in floors.values()])

