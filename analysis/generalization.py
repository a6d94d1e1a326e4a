"""`studyctl generalization DIR`: memorization -> generalization across disjoint training sets.

For every pair of COMPLETED trials that differ only in `data.subset_index` (same N, width,
seed, ...), at every evaluation step both hold an EMA snapshot of, both models sample
with DDIM eta = 0 from the study's fixed evaluation noise (the same z as the trials'
own evaluations) and diffusion_core.estimators.generalization measures: same-noise similarity,
nearest images in the own and the other subset (Gu et al.'s d1 < d2/3), held-out real
images scored the same way (baseline), and, for N <= `optimum_max_n`, the distance to
the exact empirical optimal denoiser per t. Writes, atomically:

    <study>/generalization/generalization.parquet            one row per pair x step x member
    <study>/generalization/distance_to_memorization.parquet  one row per pair x step x member x t
    <study>/generalization/samples/<pair>_step_<step>.npz    same-noise samples + nearest images

Models are rebuilt from the snapshots' own core configs (records.snapshots), so this runs
on any study folder.
"""
from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from diffusion_core.config import DataConfig, EvalConfig
from diffusion_core.data import ImageSet, load_splits, subset_indices
from diffusion_core.evaluation import Evaluator
from diffusion_core.estimators.generalization import (distance_to_memorization, mean_interval, nearest_in_subsets,
                                           same_noise_similarity)
from diffusion_core.diffusion.samplers import DDIMSampler
from diffusion_core.diffusion.schedules import NoiseSchedule
from records.atomic import atomic_write
from records.layout import (eval_samples_file, generalization_samples_file,
                            generalization_samples_name, generalization_table, memorization_distance_table,
                            snapshot_files, train_indices_file)
from records.parquet import write_atomic_frame
from records.snapshots import load_snapshot

from .tables import load_study

PAIR_FIELD = "data.subset_index"
OPTIMUM_T = (5, 20, 50, 100, 200, 400, 700)
GRID_SAMPLES = 8          # same-noise samples kept per pair and step for the figure grid


# ------------------------------------------------------------------ pairs
def find_pairs(trials: pd.DataFrame, statuses: tuple[str, ...] = ("COMPLETED",)) -> list[dict]:
    """Pairs of trials (in `statuses`) whose configs are equal except data.subset_index.
    Each: {trial_a, trial_b, subset_a, subset_b}."""
    if trials.empty or PAIR_FIELD not in trials:
        return []
    done = trials[trials["status"].isin(statuses)]
    keys = [c for c in done.columns if "." in c and c != PAIR_FIELD]
    pairs = []
    for _, g in (done.groupby(keys, dropna=False) if keys else [((), done)]):
        g = g.sort_values(PAIR_FIELD)
        rows = g.to_dict("records")
        for i in range(len(rows)):
            for j in range(i + 1, len(rows)):
                a, b = rows[i], rows[j]
                if a[PAIR_FIELD] == b[PAIR_FIELD]:
                    continue  # the same subset twice (e.g. a repeated trial): not a data pair
                pairs.append({"trial_a": a["trial_id"], "trial_b": b["trial_id"], "subset_a": int(a[PAIR_FIELD]),
                              "subset_b": int(b[PAIR_FIELD])})
    return pairs


def _pair_id(cfg: dict, swept: list[str], subset_a: int, subset_b: int) -> str:
    parts = [f"{k.split('.')[-1]}={_get(cfg, k)}" for k in swept if k != PAIR_FIELD]
    return ",".join(parts + [f"subsets={subset_a}-{subset_b}"])


def _get(cfg: dict, dotted: str):
    section, key = dotted.split(".")
    return cfg[section][key]


def slug(pair_id: str) -> str:
    """A file- and MLflow-safe form of a pair id."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", pair_id)


def _subset_images(data: DataConfig, study_dir: Path, trial_id: str, cache: dict) -> tuple[ImageSet, ImageSet]:
    """(training subset, validation split) of a trial, checked against its recorded indices.
    The whole split is loaded once per `cache` (every pair shares it) and subset as load_splits does."""
    whole = dataclasses.replace(data, subset_size=None, subset_index=0)
    if whole not in cache:
        cache[whole] = load_splits(whole)
    splits = cache[whole]
    idx = subset_indices(len(splits.train), data.subset_size, data.subset_index, data.subset_mode, data.data_seed)
    recorded = train_indices_file(study_dir, trial_id)
    if recorded.exists() and not np.array_equal(np.load(recorded), idx.numpy()):
        raise ValueError(f"trial {trial_id}: its recorded training subset ({recorded}) differs from the one "
                         f"rebuilt from its config; was data.data_seed or the split changed?")
    return splits.train.subset(idx), splits.val


# ------------------------------------------------------------------ statistics
def _member_row(stats, sim_cos, sim_mse) -> dict:
    row = {}
    for name, values in (("same_noise_cosine", sim_cos), ("same_noise_mse", sim_mse),
                         ("memorized_fraction", stats.memorized.astype(float)),
                         ("memorized_fraction_other", stats.memorized_other.astype(float)),
                         ("nn_cosine_own", stats.cosine_own), ("nn_cosine_other", stats.cosine_other)):
        if values is None:
            row.update({name: np.nan, f"{name}_lo": np.nan, f"{name}_hi": np.nan})
            continue
        mean, lo, hi = mean_interval(values)
        row.update({name: mean, f"{name}_lo": lo, f"{name}_hi": hi})
    row.update(d1_own_median=float(np.median(stats.d1_own)), d2_own_median=float(np.median(stats.d2_own)),
               d1_other_median=float(np.median(stats.d1_other)),
               d1_over_d2_median=float(np.median(stats.d1_own / np.maximum(stats.d2_own, 1e-12))),
               own_over_other_median=float(np.median(stats.own_over_other)))
    return row


def _optimum_rows(net, schedule, train_x0, eps, base: dict, member: str, step: int) -> list[dict]:
    """Distance to f*_D over the whole subset D, at (up to) len(eps) of its training images."""
    n = min(eps.shape[0], train_x0.shape[0])
    ts = [t for t in OPTIMUM_T if t <= schedule.T]
    res = distance_to_memorization(net, schedule, train_x0, train_x0[:n], eps[:n], ts)
    return [{**base, "member": member, "step": step, "t": t, "distance_to_memorization": d,
             "model_error": m, "optimum_error": o, "n_points": n}
            for t, d, m, o in zip(res.t, res.distance, res.model_error, res.optimum_error)]


def _save_npz(path: Path, **arrays) -> None:
    with atomic_write(path) as fh:
        np.savez_compressed(fh, **arrays)


def _sampler(val: ImageSet, schedule: NoiseSchedule, ev: EvalConfig, n_samples: int, device: torch.device,
             clip_x0: float | None) -> Evaluator:
    """An Evaluator holding the study's fixed evaluation noise, sampling DDIM eta = 0: the same
    z as the trials' evaluations (same seed, same residual draw before the noise). With
    clip_x0 = 1 each step's x0 estimate is clipped to the data range [-1, 1] (diffusers'
    clip_sample): an early model's small bias in eps at t ~ T is otherwise amplified by
    1/sqrt(alpha_bar_T) (~160, linear schedule) into a saturated background."""
    cfg = EvalConfig(n_samples=n_samples, grid_images=1, sampler="ddim", steps=ev.steps or 50, eta=0.0,
                     residual_images=ev.residual_images, seed=ev.seed, metrics=False, batch_size=ev.batch_size,
                     t_grid=2)
    evaluator = Evaluator(schedule, val, cfg, device=device)
    evaluator.sampler = DDIMSampler(schedule, steps=cfg.steps, eta=0.0, clip_x0=clip_x0)
    return evaluator


def kept_samples(study_dir: Path, trial_id: str, step: int, ev: EvalConfig, n: int,
                 clip_x0: float | None) -> torch.Tensor | None:
    """The trial's own evaluation samples at `step` (evaluation.keep_samples) when they are exactly
    what `_sampler` would draw again: DDIM eta = 0 with the same steps and clipping, fp32, the same
    fixed noise (the same evaluation config drew it), at least n of them; else None."""
    f = eval_samples_file(study_dir, trial_id, step)
    if not (ev.keep_samples and ev.sampler == "ddim" and ev.eta == 0 and ev.clip_x0 == clip_x0
            and ev.precision == "fp32" and f.exists()):
        return None
    x = np.load(f)
    return torch.from_numpy(x[:n]) if len(x) >= n else None


@torch.no_grad()
def generalization(study_dir: str | os.PathLike, *, n_samples: int | None = None, optimum_max_n: int = 1024,
                   optimum_points: int = 256, clip_x0: float | None = 1.0, device: str | None = None,
                   include_running: bool = False, reuse_samples: bool = True,
                   progress: bool = True) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Measure every pair at every common evaluation step; write and return (samples table,
    distance-to-memorization table). n_samples: same-noise samples per model (default: the
    study's evaluation.n_samples). include_running: also pair trials still RUNNING (their
    evaluations so far), for a study that is not finished. reuse_samples: read the samples a
    trial's evaluation kept (`kept_samples`) instead of sampling the snapshot again; the same
    numbers, without the sampling (column samples_reused)."""
    study = load_study(study_dir)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    pairs = find_pairs(study.trials, ("COMPLETED", "RUNNING") if include_running else ("COMPLETED",))
    if not pairs:
        raise ValueError(f"no pair of COMPLETED trials differing only in {PAIR_FIELD}; sweep "
                         f"{PAIR_FIELD}: [0, 1] with subset_mode disjoint to get them")
    rows, opt_rows, cache = [], [], {}
    for pair in tqdm(pairs, desc="pairs", disable=not progress):
        steps_a, steps_b = (snapshot_files(study.dir, pair[k]) for k in ("trial_a", "trial_b"))
        steps = sorted(set(steps_a) & set(steps_b))
        if not steps:
            continue
        snap_a, snap_b = load_snapshot(steps_a[steps[-1]]), load_snapshot(steps_b[steps[-1]])
        cfg_a, data_a, ev = snap_a.config, snap_a.data, snap_a.evaluation
        if data_a.subset_mode != "disjoint" or data_a.subset_size is None:
            raise ValueError(f"trials {pair['trial_a']}/{pair['trial_b']}: data.subset_mode is "
                             f"{data_a.subset_mode!r} with subset_size {data_a.subset_size}; "
                             f"the generalization pairs need 'disjoint' subsets of a set size")
        schedule = NoiseSchedule.from_config(snap_a.schedule)
        train_a, val = _subset_images(data_a, study.dir, pair["trial_a"], cache)
        train_b, _ = _subset_images(snap_b.data, study.dir, pair["trial_b"], cache)
        own = {"a": train_a.batch().to(device), "b": train_b.batch().to(device)}
        other = {"a": own["b"], "b": own["a"]}
        n = n_samples or ev.n_samples
        sampler = _sampler(val, schedule, ev, n, device, clip_x0)
        pid = _pair_id(cfg_a, study.swept, pair["subset_a"], pair["subset_b"])
        base = {"study": study.name, "pair_id": pid, "trial_a": pair["trial_a"], "trial_b": pair["trial_b"],
                **{k: _get(cfg_a, k) for k in study.swept if k != PAIR_FIELD},
                "subset_size": len(train_a), "base_width": snap_a.model.base_width,
                "seed": cfg_a["training"]["seed"], "n_samples": n, "clip_x0": clip_x0}
        g = torch.Generator().manual_seed(ev.seed + 2)   # the noise of the optimum's training points
        eps = torch.randn((min(optimum_points, len(train_a)), *train_a.shape), generator=g).to(device)
        # Baseline: held-out real images scored as if they were samples of model a.
        held = val.batch(torch.arange(min(n, len(val)))).to(device)
        rows.append({**base, "member": "heldout", "trial": "", "step": steps[-1],
                     **_member_row(nearest_in_subsets(held, own["a"], own["b"], device=device), None, None)})
        for step in steps:
            samples, nets, reused = {}, {}, {}
            for m, snaps in (("a", steps_a), ("b", steps_b)):
                nets[m] = load_snapshot(snaps[step], device).net("ema", device)
                kept = kept_samples(study.dir, pair[f"trial_{m}"], step, ev, n, clip_x0) if reuse_samples else None
                reused[m] = kept is not None
                samples[m] = kept if reused[m] else sampler.sample(nets[m])[:n]
            cos, mse = same_noise_similarity(samples["a"], samples["b"])
            nearest = {}
            for m in ("a", "b"):
                nearest[m] = nearest_in_subsets(samples[m], own[m], other[m], device=device)
                rows.append({**base, "member": m, "trial": pair[f"trial_{m}"], "step": step,
                             **_member_row(nearest[m], cos, mse), "samples_reused": reused[m],
                             "samples_file": generalization_samples_name(slug(pid), step)})
                if len(own[m]) <= optimum_max_n:
                    opt_rows += _optimum_rows(nets[m], schedule, own[m], eps, base, m, step)
            k = min(GRID_SAMPLES, n)
            u8 = {m: train.images.cpu() for m, train in (("a", train_a), ("b", train_b))}
            _save_npz(generalization_samples_file(study.dir, slug(pid), step),
                      a=samples["a"][:k].numpy(), b=samples["b"][:k].numpy(),
                      nn_a=u8["a"][torch.as_tensor(nearest["a"].nn_own[:k])].numpy(),
                      nn_b=u8["b"][torch.as_tensor(nearest["b"].nn_own[:k])].numpy())
    table, opt_table = pd.DataFrame(rows), pd.DataFrame(opt_rows)
    write_atomic_frame(generalization_table(study.dir), table)
    if len(opt_table):
        write_atomic_frame(memorization_distance_table(study.dir), opt_table)
    else:  # no subset small enough this time: an older table would describe other trials
        memorization_distance_table(study.dir).unlink(missing_ok=True)
    return table, opt_table


def load_tables(study_dir: str | os.PathLike) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(generalization table, distance-to-memorization table); empty frames when absent."""
    read = lambda p: pd.read_parquet(p) if p.exists() else pd.DataFrame()  # noqa: E731
    return read(generalization_table(study_dir)), read(memorization_distance_table(study_dir))
