"""`studyctl decompose DIR`: the bias-variance decomposition of each ensemble, at every snapshot.

For every group of completed trials that differ only in training seed and/or training
subset (analysis.ensembles), at every evaluation snapshot the group shares, for the EMA
and (where the snapshot holds them) the raw weights, and at every t of the study's
residual grid (`evaluation.t_grid`, or `t_grid=`):

* `decomposition` table, on held-out points: the first n validation images (the same
  images as Residual(t)) with eps drawn from the study's `evaluation.seed`, exactly as the
  Evaluator draws them — so a model's residual here equals its Residual(t) record when
  n_points = evaluation.residual_images. residual = bias2_plus_noise + variance exactly,
  with the unbiased estimators of diffusion_core.estimators.decomposition (variance_data /
  variance_opt where subsets are crossed with seeds). On MNIST / CIFAR-10 bias^2 and noise
  are not split: the optimal denoiser of the data distribution is unknown. On `molrg`
  studies it is exact (records.ground_truth): the table also has `noise`, `bias2`, `cross`
  and `identity_residual` = max over points of |residual - (noise + bias2 + variance + cross)|
  (round-off only; docs/ground_truth.md).
* `distance_to_memorization` table, on training points (the first n images of each
  training subset, the same eps): for the models trained on that one subset, the distance
  to the exact empirical optimal denoiser f*_D of *that* subset and the minimum of its
  training loss (Kadkhodaie et al. 2024; Gu et al. 2023). Not bias^2.
* `reference_distances` table (analysis.references), on the held-out points, for every
  completed trial (in an ensemble or not): its distance to the memorizing f*_D and to the
  Gaussian-linear denoiser of its own training set, and on molrg to the true f*.
* `sample_quality` table (molrg studies; analysis.sample_quality): exact sample-quality
  measures of each trial's EMA samples against the true mixture, and their floor.

Every estimate carries a 95% interval: a bootstrap over points plus a delete-one
jackknife over models (over subsets in the crossed design) where one is possible
(column `interval`). See docs/decomposition.md and docs/ground_truth.md.

Cost: K models x |t-grid| x n_points forward passes per snapshot and weights; f*_D costs
n_points x |t-grid| x N x d multiply-adds per subset (256 points x 12 t on 48,000 MNIST
images: 1.2e11), on training points and again on the held-out points, once per subset.
"""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from tqdm.auto import tqdm

from diffusion_core.config import DataConfig
from diffusion_core.data import load_splits
from diffusion_core.estimators.decomposition import (empirical_optimal_eps, ensemble_terms, memorization_terms, summarize,
                                          two_level_terms)
from diffusion_core.residuals import default_t_grid
from diffusion_core.diffusion.schedules import NoiseSchedule
from records.layout import analysis_table, read_study_file, snapshot_files
from records.parquet import write_atomic_frame
from records.snapshots import Snapshot, load_snapshot

from .ensembles import ENSEMBLE_FIELDS, SUBSET_FIELDS, design_of, group_trials, subsets_of
from .references import ReferenceValues, distances, train_size, training_key, x_t_at
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


def _heldout_config(data: DataConfig) -> DataConfig:
    """The DataConfig of the validation split only: no training subset, whatever the trial's."""
    base = DataConfig()
    return dataclasses.replace(data, subset_size=None, subset_index=base.subset_index,
                               subset_mode=base.subset_mode, data_seed=base.data_seed, val_size=None,
                               on_device=False)


def heldout_points(data: DataConfig, n_points: int, eval_seed: int, val=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_0, eps): the first n validation images and eps from the evaluation seed (as the Evaluator);
    `val`: the validation split when the caller has it already."""
    val = load_splits(_heldout_config(data)).val if val is None else val
    x0 = val.batch(torch.arange(min(n_points, len(val))))
    return x0, torch.randn(x0.shape, generator=torch.Generator().manual_seed(eval_seed))


class StudyData:
    """What the analysis loads once per decompose run: training sets (float64), held-out points, and the
    true distribution of molrg studies (records.ground_truth.load_molrg; None on other data sets)."""

    def __init__(self, study_dir: Path):
        self.study_dir = study_dir
        self._train: dict[DataConfig, object] = {}
        self._train64: dict[DataConfig, torch.Tensor] = {}
        self._points: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self._heldout: dict[DataConfig, object] = {}
        self._truth: dict[DataConfig, object] = {}

    def train(self, data: DataConfig):
        """The training set (an ImageSet) of a trial's DataConfig."""
        key = training_key(data)
        if key not in self._train:
            self._train[key] = self.heldout_splits(data).train if data.subset_size is None else load_splits(key).train
        return self._train[key]

    def train64(self, data: DataConfig) -> torch.Tensor:
        """Its images as one float64 tensor (what the reference denoisers are computed from)."""
        key = training_key(data)
        if key not in self._train64:
            self._train64[key] = self.train(key).batch(dtype=torch.float64)
        return self._train64[key]

    def heldout_splits(self, data: DataConfig):
        """The validation and test splits (a Splits; its train is the whole training split)."""
        key = _heldout_config(data)
        if key not in self._heldout:
            self._heldout[key] = load_splits(key, with_test=data.dataset == "molrg")
        return self._heldout[key]

    def points(self, data: DataConfig, n_points: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        key = (_heldout_config(data), n_points, seed)
        if key not in self._points:
            self._points[key] = heldout_points(data, n_points, seed, self.heldout_splits(data).val)
        return self._points[key]

    @staticmethod
    def heldout_key(data: DataConfig) -> DataConfig:
        """The DataConfig of the held-out splits (validation, test) whatever the trial's subset."""
        return _heldout_config(data)

    def truth(self, data: DataConfig):
        if data.dataset != "molrg":
            return None
        key = _heldout_config(data)
        if key not in self._truth:
            from records.ground_truth import load_molrg

            self._truth[key] = load_molrg(self.study_dir, data)
        return self._truth[key]


@dataclass
class Setup:
    """What every trial of one group (or one lone trial) is evaluated on."""
    steps: list[int]
    first: Snapshot
    schedule: NoiseSchedule
    seed: int
    ts: list[int]
    x0: torch.Tensor
    eps: torch.Tensor

    @property
    def points_key(self) -> tuple:
        return (self.seed, len(self.x0))


def _setup(study, trial_ids: list[str], steps: str, t_grid, eval_seed, n_points: int,
           data: StudyData) -> Setup | None:
    shared = set.intersection(*(set(snapshot_files(study.dir, t)) for t in trial_ids))
    if not shared:
        return None
    chosen = sorted(shared)[-1:] if steps == "final" else sorted(shared)
    first = load_snapshot(snapshot_files(study.dir, trial_ids[0])[chosen[-1]])
    schedule = NoiseSchedule.from_config(first.schedule)
    seed = int(eval_seed if eval_seed is not None else first.evaluation.seed)
    ts = resolve_t_grid(t_grid if t_grid is not None else first.evaluation.t_grid, schedule.T,
                        "--t-grid" if t_grid is not None else "evaluation.t_grid")
    x0, eps = data.points(first.data, n_points, seed)
    return Setup(chosen, first, schedule, seed, ts, x0, eps)


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


def _swept(study, trial_id: str, exclude=()) -> dict:
    return {c: study.param(trial_id, c) for c in study.swept if c not in exclude}


@torch.no_grad()
def decompose(study_dir: str | os.PathLike, *, n_points: int = 256, t_grid: int | list[int] | None = None,
              eval_seed: int | None = None, steps: str = "all", device: str | None = None,
              n_boot: int = 1000, progress: bool = True, references: bool = True,
              quality_steps: str | None = None, quality_samples: int | None = None) -> pd.DataFrame:
    """Write <study>/decomposition/, distance_to_memorization/, reference_distances/ (references=True) and,
    on molrg studies, sample_quality/ (at the final snapshot, or every one with quality_steps="all";
    quality_samples samples per trial); returns the decomposition."""
    if steps not in STEPS:
        raise ValueError(f"option 'steps': bad value {steps!r}: allowed: {', '.join(STEPS)}")
    if quality_steps is not None and quality_steps not in STEPS:
        raise ValueError(f"option 'quality_steps': bad value {quality_steps!r}: allowed: {', '.join(STEPS)}")
    study = load_study(study_dir)
    if eval_seed is None:
        eval_seed = (read_study_file(study.dir) or {}).get("evaluation", {}).get("seed")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    designs = {g: d for g, ids in group_trials(study).items() if (d := design_of(study, ids)) is not None}
    if not designs:
        raise ValueError("no group of >= 2 completed trials differing only in "
                         f"{', '.join(ENSEMBLE_FIELDS)}; sweep seeds (sweep.seeds) to get ensembles")
    dataset = _dataset(study)
    given = [n for n, v in (("quality_steps", quality_steps), ("quality_samples", quality_samples)) if v is not None]
    if given and dataset != "molrg":
        raise ValueError(f"option {given[0]!r} applies to molrg studies only (this study's data set is {dataset!r})")
    data = StudyData(study.dir)
    refs = ReferenceValues(data.train64, data.truth) if references else None
    rows, mem_rows, ref_rows = [], [], []
    for gid, design in designs.items():
        setup = _setup(study, design.trial_ids, steps, t_grid, eval_seed, n_points, data)
        if setup is None:
            continue
        schedule, ts, x0, eps, seed = setup.schedule, setup.ts, setup.x0, setup.eps, setup.seed
        truth = data.truth(setup.first.data)
        optimal = {t: truth.optimal_eps(x_t_at(x0, eps, t, schedule), t, schedule) for t in ts} if truth else None
        common = {"study": study.name, "group_id": gid, **_swept(study, design.trial_ids[0], ENSEMBLE_FIELDS)}
        memo = _memorization_setup(study, design, x0, eps, ts, schedule, data)
        for step in tqdm(setup.steps, desc=f"decomposing {gid}", disable=not progress):
            members = {t: load_snapshot(snapshot_files(study.dir, t)[step]) for t in design.trial_ids}
            weights = [w for w in ("ema", "raw") if all(w in m.weights for m in members.values())]
            for w in weights:
                nets = {t: m.net(w, device) for t, m in members.items()}
                for t in ts:
                    preds = _predict([nets[i] for i in design.trial_ids], x0, eps, t, schedule, device)
                    est = _ensemble_estimates(design, eps, preds, n_boot, seed, optimal[t] if optimal else None)
                    rows.append({**common, "t": t, "log_snr": _log_snr(schedule, t), "step": step, "weights": w,
                                 **est, "design": design.kind,
                                 "k_models": len(design.trial_ids), "j_subsets": len(design.units)
                                 if design.kind != "seeds" else 1, "n_points": len(x0), "eval_seed": seed,
                                 "trial_ids": ",".join(design.trial_ids)})
                    for subset_ids, (xs, es, opt_d, subset) in memo.items():
                        p = _predict([nets[i] for i in subset_ids], xs, es, t, schedule, device)
                        est = summarize(lambda q: memorization_terms(es, q, opt_d[t]), p, n_boot, seed)
                        mem_rows.append({**common, "t": t, "log_snr": _log_snr(schedule, t), "step": step,
                                         "weights": w, **est, "k_models": len(subset_ids), "n_points": len(xs),
                                         **subset, "eval_seed": seed,
                                         "trial_ids": ",".join(subset_ids)})
                    if refs is not None:
                        for k, tid in enumerate(design.trial_ids):
                            ref_rows.append(_reference_row(study, tid, gid, members[tid], setup, refs, step, w, t,
                                                           preds[k], n_boot))
    if refs is not None:
        in_designs = {t for d in designs.values() for t in d.trial_ids}
        lone = [t for ids in group_trials(study).values() for t in ids if t not in in_designs]
        ref_rows += _lone_reference_rows(study, lone, steps, t_grid, eval_seed, n_points, data, refs, device,
                                         n_boot, progress)
    table = pd.DataFrame(rows)
    _write(study.dir, "decomposition", table)
    _write(study.dir, "distance_to_memorization", pd.DataFrame(mem_rows))
    if refs is not None:
        _write(study.dir, "reference_distances", pd.DataFrame(ref_rows))
    if dataset == "molrg":
        from .sample_quality import sample_quality

        done = [t for ids in group_trials(study).values() for t in ids]
        _write(study.dir, "sample_quality", sample_quality(study, done, data, steps=quality_steps or "final",
                                                           n_samples=quality_samples, eval_seed=eval_seed,
                                                           device=device, progress=progress))
    return table


def _reference_row(study, tid: str, gid: str, snap: Snapshot, setup: Setup, refs: ReferenceValues, step: int,
                   w: str, t: int, prediction: torch.Tensor, n_boot: int) -> dict:
    values = refs.at(snap.data, setup.schedule, setup.points_key, setup.x0, setup.eps, setup.ts)
    return {"study": study.name, "trial_id": tid, "group_id": gid, **_swept(study, tid),
            "train_size": train_size(snap.data), "t": t, "log_snr": _log_snr(setup.schedule, t), "step": step,
            "weights": w, **distances(prediction, values, t, n_boot, setup.seed), "n_points": len(setup.x0),
            "eval_seed": setup.seed}


def _lone_reference_rows(study, trial_ids, steps, t_grid, eval_seed, n_points, data, refs, device, n_boot,
                         progress) -> list[dict]:
    """reference_distances rows of completed trials that are in no ensemble."""
    out = []
    for tid in tqdm(trial_ids, desc="reference distances", disable=not progress or not trial_ids):
        setup = _setup(study, [tid], steps, t_grid, eval_seed, n_points, data)
        if setup is None:
            continue
        for step in setup.steps:
            snap = load_snapshot(snapshot_files(study.dir, tid)[step])
            for w in (w for w in ("ema", "raw") if w in snap.weights):
                net = snap.net(w, device)
                for t in setup.ts:
                    pred = _predict([net], setup.x0, setup.eps, t, setup.schedule, device)[0]
                    out.append(_reference_row(study, tid, "", snap, setup, refs, step, w, t, pred, n_boot))
    return out


def _ensemble_estimates(design, eps: torch.Tensor, preds: torch.Tensor, n_boot: int, seed: int,
                        optimal: torch.Tensor | None = None) -> dict:
    """summarize() of the design's estimator; preds (K, n, ...) are in design.trial_ids order; optimal: the
    exact f* at these points (molrg), which adds noise / bias2 / cross and the identity check.
    Jackknife unit: a model, or in the crossed design a whole subset (axis 0 of (J, S, n, ...))."""
    if design.two_level:
        j, s = len(design.units), len(design.units[0])
        def terms(q):
            return two_level_terms(eps, q, optimal)
        preds = preds.reshape(j, s, *preds.shape[1:])
        est = summarize(terms, preds, n_boot, seed)
    else:
        def terms(q):
            return ensemble_terms(eps, q, optimal)
        est = summarize(terms, preds, n_boot, seed)
        est.update({f"variance_{p}{s}": float("nan") for p in ("data", "opt") for s in ("", "_lo", "_hi")})
    if optimal is not None:
        est["identity_residual"] = float(terms(preds).identity_gap().abs().max())
    return est


def _memorization_setup(study, design, x0, eps, ts, schedule, data: StudyData) -> dict:
    """{trial ids of one subset: (train x_0, eps, {t: f*_D(x_t)}, {subset size, index, data seed})} for
    every training subset of the group; f*_D is exact over that subset's images (once per subset)."""
    out = {}
    for key, ids in subsets_of(study, design.trial_ids).items():
        cfg = load_snapshot(next(iter(snapshot_files(study.dir, ids[0]).values()))).data
        train = data.train(cfg)
        xs = train.batch(torch.arange(min(len(x0), len(train))))
        es = eps[: len(xs)]
        optimal = {}
        for t in ts:
            optimal[t] = empirical_optimal_eps(x_t_at(xs, es, t, schedule), t, schedule, data.train64(cfg))
        out[tuple(ids)] = (xs, es, optimal, {"subset_size": len(train), **dict(zip(SUBSET_FIELDS, key))})
    return out


def _dataset(study) -> str | None:
    """The data set of the study's completed trials (from a snapshot: the core config), None without any."""
    for ids in group_trials(study).values():
        for tid in ids:
            files = snapshot_files(study.dir, tid)
            if files:
                return load_snapshot(next(iter(files.values()))).data.dataset
    return None


def _write(study_dir: Path, kind: str, table: pd.DataFrame) -> None:
    write_atomic_frame(analysis_table(study_dir, kind), table)
