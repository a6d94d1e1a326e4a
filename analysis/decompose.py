"""`studyctl decompose DIR`: the per-timestep bias^2 / variance / noise decomposition.

Trials that differ only in seed and/or training subset form a group (K >= 2 models).
Their final EMA snapshots are evaluated on the same fixed points (x_0 from the
validation split, eps and the t-grid from the evaluation seed), and
diffusion_core.decomposition splits the residual exactly into bias^2 + noise and
variance. The noise floor is that of the empirical optimal denoiser over the full
48,000-image training split — the minimum of the training objective — measured on
n_points training images with the same eps and t, so bias^2 = (bias^2 + noise) - noise_floor.

Why training points for the floor: on a held-out image at small t that denoiser snaps
to the nearest training image, and its error a/(1 - a) ||x_0 - y_nn||^2 / d (about 1e3 at
t = 1 on MNIST) measures distance to the training set, not noise. On training points it
is the irreducible error of the distribution the trials were fitted to; at large t the
two coincide. The floor is computed once per schedule.

Cost of the floor on this 2-core CPU: n_points x |t-grid| x 48,000 x 784 multiply-adds
(256 points x 12 timesteps ~ 1.2e11, about a minute); it is cached per study in
<study>/decomposition_floor.parquet.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd
import torch
from tqdm.auto import tqdm

from diffusion_core.data import DataConfig, load_splits
from diffusion_core.decomposition import empirical_noise_floor, ensemble_terms
from diffusion_core.schedules import NoiseSchedule
from diffusion_core.unet import UNet

from .tables import load_study

# Fields along which members of one ensemble may differ.
ENSEMBLE_FIELDS = ("training.seed", "data.subset_index", "data.data_seed")


def latest_ema_snapshot(study_dir: Path, trial_id: str) -> Path | None:
    folder = study_dir / "trial_files" / trial_id / "ema"
    snaps = sorted(p for p in folder.glob("*.pt") if not p.name.startswith(".")) if folder.is_dir() else []
    return snaps[-1] if snaps else None


def load_ema_model(path: Path, device: torch.device):
    from orchestrator.spec import to_core

    snap = torch.load(path, map_location=device, weights_only=True)
    config = snap["config"] if isinstance(snap["config"], dict) else json.loads(snap["config"])
    data, model_cfg, diffusion, _, _ = to_core(config)
    net = UNet(model_cfg).to(device)
    net.load_state_dict(snap["ema"])
    return net.eval(), data, diffusion, int(snap["step"])


def group_trials(study) -> dict[str, list[str]]:
    """group id -> completed trial ids that differ only in ENSEMBLE_FIELDS."""
    trials = study.trials
    if trials.empty:
        return {}
    done = trials[trials["status"] == "COMPLETED"]
    keys = [c for c in study.swept if c in done and c not in ENSEMBLE_FIELDS]
    groups: dict[str, list[str]] = {}
    for vals, g in (done.groupby(keys, dropna=False) if keys else [((), done)]):
        vals = vals if isinstance(vals, tuple) else (vals,)
        gid = ",".join(f"{k.split('.')[-1]}={v}" for k, v in zip(keys, vals)) or "all"
        groups[gid] = sorted(g["trial_id"])
    return groups


@torch.no_grad()
def decompose(study_dir: str | os.PathLike, *, n_points: int = 256, t_grid: list[int] | None = None,
              eval_seed: int = 0, noise_floor: bool = True, device: str | None = None,
              progress: bool = True) -> pd.DataFrame:
    """Compute and write <study>/decomposition/decomposition.parquet; returns the table."""
    study = load_study(study_dir)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    groups = {g: ids for g, ids in group_trials(study).items() if len(ids) >= 2}
    if not groups:
        raise ValueError("no group of >= 2 completed trials differing only in "
                         f"{', '.join(ENSEMBLE_FIELDS)}; sweep seeds (sweep.seeds) to get ensembles")
    rows = []
    floors: dict[tuple, dict[int, float]] = {}
    for gid, ids in groups.items():
        members = []
        for tid in ids:
            snap = latest_ema_snapshot(study.dir, tid)
            if snap is not None:
                members.append((tid, *load_ema_model(snap, device)))
        if len(members) < 2:
            continue
        _, _, data, diffusion, _ = members[0]
        schedule = NoiseSchedule.from_config(diffusion.schedule)
        ts = t_grid or sorted({1, 2, 5, 10, 20, 50, 100, 200, 300, 500, 700, schedule.T})
        ts = [t for t in ts if 1 <= t <= schedule.T]
        # The same points for every group: validation x_0 and eps from the evaluation seed.
        base = DataConfig(dataset=data.dataset, root=data.root, split_seed=data.split_seed,
                          image_size=data.image_size)
        splits = load_splits(base)
        g = torch.Generator().manual_seed(eval_seed)
        idx = torch.randperm(len(splits.val), generator=g)[:n_points]
        x0 = splits.val.batch(idx).to(device)
        eps = torch.randn(x0.shape, generator=g).to(device)
        key = (diffusion.schedule, data.dataset, data.image_size, n_points, eval_seed)
        if noise_floor and key not in floors:
            train_x0 = splits.train.batch().to(device)
            floor_x0 = train_x0[torch.randperm(len(train_x0), generator=g)[:n_points].to(device)]
            floors[key] = {t: float(empirical_noise_floor(floor_x0, eps, t, schedule, train_x0).mean())
                           for t in tqdm(ts, desc=f"noise floor ({diffusion.schedule.name})", disable=not progress)}
        swept = {c: study.param(ids[0], c) for c in study.swept if c not in ENSEMBLE_FIELDS}
        for t in tqdm(ts, desc=f"decomposing {gid}", disable=not progress):
            tt = torch.full((n_points,), t, dtype=torch.long, device=device)
            x_t = schedule.q_sample(x0, tt, eps)
            preds = torch.stack([m[1](x_t, tt) for m in members])
            terms = ensemble_terms(eps, preds)
            floor = floors.get(key, {}).get(t, float("nan"))
            b2n = float(terms.bias2_plus_noise.mean())
            rows.append({"study": study.name, "group_id": gid, **swept, "t": t,
                         "residual": float(terms.residual.mean()), "bias2_plus_noise": b2n,
                         "variance": float(terms.variance.mean()), "noise_floor": floor, "bias2": b2n - floor,
                         "k_models": len(members), "n_points": n_points,
                         "trial_ids": ",".join(m[0] for m in members)})
    table = pd.DataFrame(rows)
    out = study.dir / "decomposition"
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / ".decomposition.parquet.tmp"
    table.to_parquet(tmp, index=False)
    tmp.replace(out / "decomposition.parquet")
    return table
