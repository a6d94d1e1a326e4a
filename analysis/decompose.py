"""`studyctl decompose DIR`: the bias-variance decomposition of each ensemble, at every snapshot.

For every group of completed trials that differ only in training seed and/or training
subset (analysis.ensembles), at every evaluation snapshot the group shares, for the EMA
and (where the snapshot holds them) the raw weights, and at every t of the study's
residual grid (`evaluation.t_grid`, or `t_grid=`):

* `decomposition` table, on held-out points: the first n validation images (the same
  images as Residual(t)) with eps drawn from the study's `evaluation.seed`, exactly as the
  Evaluator draws them — so a model's residual here equals its Residual(t) record when
  n_points = evaluation.residual_images. residual = bias2_plus_noise + variance exactly,
  with the unbiased estimators of diffusion_core.decomposition (variance_data /
  variance_opt where subsets are crossed with seeds). bias^2 and noise are not split:
  the optimal denoiser of the data distribution is unknown.
* `distance_to_memorization` table, on training points (the first n images of each
  training subset, the same eps): for the models trained on that one subset, the distance
  to the exact empirical optimal denoiser f*_D of *that* subset and the minimum of its
  training loss (Kadkhodaie et al. 2024; Gu et al. 2023). Not bias^2.

Every estimate carries a 95% interval: a bootstrap over points plus a delete-one
jackknife over models (over subsets in the crossed design) where one is possible
(column `interval`). See docs/decomposition.md.

Cost: K models x |t-grid| x n_points forward passes per snapshot and weights; f*_D costs
n_points x |t-grid| x N x d multiply-adds per subset (256 points x 12 t on 48,000 MNIST
images: 1.2e11) and is computed once per subset.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import pandas as pd
import torch
from tqdm.auto import tqdm

from diffusion_core.data import DataConfig, load_splits
from diffusion_core.decomposition import (empirical_optimal_eps, ensemble_terms, memorization_terms, summarize,
                                          two_level_terms)
from diffusion_core.residuals import default_t_grid
from diffusion_core.schedules import NoiseSchedule
from records.layout import kind_dir, read_study_file, snapshot_files
from records.parquet import write_atomic_frame
from records.snapshots import load_snapshot

from .ensembles import ENSEMBLE_FIELDS, SUBSET_FIELDS, design_of, group_trials, subsets_of
from .tables import load_study

STEPS = ("all", "final")


def resolve_t_grid(t_grid, T: int, source: str = "evaluation.t_grid") -> list[int]:
    """An int n (n timesteps covering 1..T, as Residual(t)) or explicit timesteps -> sorted list."""
    if isinstance(t_grid, int):
        return default_t_grid(T, t_grid).tolist()
    ts = sorted({int(t) for t in t_grid})
    if not ts or ts[0] < 1 or ts[-1] > T:
        raise ValueError(f"'{source}': bad value {list(t_grid)}: timesteps must lie in 1..T={T}")
    return ts


def heldout_points(data: DataConfig, n_points: int, eval_seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_0, eps): the first n validation images and eps from the evaluation seed (as the Evaluator)."""
    base = DataConfig(dataset=data.dataset, root=data.root, split_seed=data.split_seed, image_size=data.image_size)
    val = load_splits(base).val
    x0 = val.batch(torch.arange(min(n_points, len(val))))
    return x0, torch.randn(x0.shape, generator=torch.Generator().manual_seed(eval_seed))


@torch.no_grad()
def _predict(nets, x0: torch.Tensor, eps: torch.Tensor, t: int, schedule: NoiseSchedule, device,
             batch: int = 256) -> torch.Tensor:
    """(K, n, ...) predictions of K networks at one t on fixed (x_0, eps)."""
    out = []
    for lo in range(0, len(x0), batch):
        xb, eb = x0[lo:lo + batch].to(device), eps[lo:lo + batch].to(device)
        tt = torch.full((len(xb),), t, dtype=torch.long, device=device)
        x_t = schedule.q_sample(xb, tt, eb)
        out.append(torch.stack([net(x_t, tt).double().cpu() for net in nets]))
    return torch.cat(out, 1)


def _log_snr(schedule: NoiseSchedule, t: int) -> float:
    return math.log(float(schedule.snr(t)))


@torch.no_grad()
def decompose(study_dir: str | os.PathLike, *, n_points: int = 256, t_grid: int | list[int] | None = None,
              eval_seed: int | None = None, steps: str = "all", device: str | None = None,
              n_boot: int = 1000, progress: bool = True) -> pd.DataFrame:
    """Write <study>/decomposition/ and <study>/distance_to_memorization/; returns the decomposition."""
    if steps not in STEPS:
        raise ValueError(f"option 'steps': bad value {steps!r}: allowed: {', '.join(STEPS)}")
    study = load_study(study_dir)
    if eval_seed is None:
        eval_seed = (read_study_file(study.dir) or {}).get("evaluation", {}).get("seed")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    designs = {g: d for g, ids in group_trials(study).items() if (d := design_of(study, ids)) is not None}
    if not designs:
        raise ValueError("no group of >= 2 completed trials differing only in "
                         f"{', '.join(ENSEMBLE_FIELDS)}; sweep seeds (sweep.seeds) to get ensembles")
    rows, mem_rows = [], []
    for gid, design in designs.items():
        shared = set.intersection(*(set(snapshot_files(study.dir, t)) for t in design.trial_ids))
        if not shared:
            continue
        group_steps = sorted(shared)[-1:] if steps == "final" else sorted(shared)
        first = load_snapshot(snapshot_files(study.dir, design.trial_ids[0])[group_steps[-1]])
        schedule = NoiseSchedule.from_config(first.schedule)
        seed = int(eval_seed if eval_seed is not None else first.evaluation.seed)
        ts = resolve_t_grid(t_grid if t_grid is not None else first.evaluation.t_grid, schedule.T,
                            "--t-grid" if t_grid is not None else "evaluation.t_grid")
        x0, eps = heldout_points(first.data, n_points, seed)
        swept = {c: study.param(design.trial_ids[0], c) for c in study.swept if c not in ENSEMBLE_FIELDS}
        common = {"study": study.name, "group_id": gid, **swept}
        memo = _memorization_setup(study, design, x0, eps, ts, schedule)
        for step in tqdm(group_steps, desc=f"decomposing {gid}", disable=not progress):
            members = {t: load_snapshot(snapshot_files(study.dir, t)[step]) for t in design.trial_ids}
            weights = [w for w in ("ema", "raw") if all(w in m.weights for m in members.values())]
            for w in weights:
                nets = {t: m.net(w, device) for t, m in members.items()}
                for t in ts:
                    preds = _predict([nets[i] for i in design.trial_ids], x0, eps, t, schedule, device)
                    rows.append({**common, "t": t, "log_snr": _log_snr(schedule, t), "step": step, "weights": w,
                                 **_ensemble_estimates(design, eps, preds, n_boot, seed), "design": design.kind,
                                 "k_models": len(design.trial_ids), "j_subsets": len(design.units)
                                 if design.kind != "seeds" else 1, "n_points": len(x0), "eval_seed": seed,
                                 "trial_ids": ",".join(design.trial_ids)})
                    for subset_ids, (xs, es, optimal, subset) in memo.items():
                        p = _predict([nets[i] for i in subset_ids], xs, es, t, schedule, device)
                        est = summarize(lambda q: memorization_terms(es, q, optimal[t]), p, n_boot, seed)
                        mem_rows.append({**common, "t": t, "log_snr": _log_snr(schedule, t), "step": step,
                                         "weights": w, **est, "k_models": len(subset_ids), "n_points": len(xs),
                                         **subset, "eval_seed": seed,
                                         "trial_ids": ",".join(subset_ids)})
    table = pd.DataFrame(rows)
    _write(study.dir, "decomposition", table)
    _write(study.dir, "distance_to_memorization", pd.DataFrame(mem_rows))
    return table


def _ensemble_estimates(design, eps: torch.Tensor, preds: torch.Tensor, n_boot: int, seed: int) -> dict:
    """summarize() of the design's estimator; preds (K, n, ...) are in design.trial_ids order.
    Jackknife unit: a model, or in the crossed design a whole subset (axis 0 of (J, S, n, ...))."""
    if design.two_level:
        j, s = len(design.units), len(design.units[0])
        return summarize(lambda q: two_level_terms(eps, q), preds.reshape(j, s, *preds.shape[1:]), n_boot, seed)
    est = summarize(lambda q: ensemble_terms(eps, q), preds, n_boot, seed)
    return {**est, **{f"variance_{p}{s}": float("nan") for p in ("data", "opt") for s in ("", "_lo", "_hi")}}


def _memorization_setup(study, design, x0, eps, ts, schedule) -> dict:
    """{trial ids of one subset: (train x_0, eps, {t: f*_D(x_t)}, {subset size, index, data seed})} for
    every training subset of the group; f*_D is exact over that subset's images (once per subset)."""
    out = {}
    for key, ids in subsets_of(study, design.trial_ids).items():
        data = load_snapshot(next(iter(snapshot_files(study.dir, ids[0]).values()))).data
        train = load_splits(DataConfig(**{**vars(data), "val_size": None, "on_device": False})).train
        xs = train.batch(torch.arange(min(len(x0), len(train))))
        es = eps[: len(xs)]
        optimal = {}
        for t in ts:
            x_t = schedule.q_sample(xs, torch.full((len(xs),), t, dtype=torch.long), es)
            optimal[t] = empirical_optimal_eps(x_t.double(), t, schedule, train.batch(dtype=torch.float64))
        out[tuple(ids)] = (xs, es, optimal, {"subset_size": len(train), **dict(zip(SUBSET_FIELDS, key))})
    return out


def _write(study_dir: Path, kind: str, table: pd.DataFrame) -> None:
    write_atomic_frame(kind_dir(study_dir, kind) / f"{kind}.parquet", table)
