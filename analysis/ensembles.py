"""Which trials form an ensemble, and how to load their snapshots (for `studyctl decompose`).

An ensemble is a set of completed trials that differ only in training randomness: the
training seed and/or the training subset (ENSEMBLE_FIELDS). Every other swept field is
part of the group key, so an ensemble never pools unlike trials. Within a group the
design decides the estimator (diffusion_core.decomposition):

- one training subset, several seeds        -> "seeds": K iid models, variance over seeds;
- several subsets, one model on each         -> "subsets": K models that differ in D and seed;
- several subsets x several seeds (crossed)  -> "subsets x seeds": the two-level split into
  data and optimization variance (Neal et al. 2018), balanced to S = the fewest seeds any
  subset has (the lowest seeds are kept).

Everything is read from the study folder: the snapshot study.yaml and the EMA snapshots
(trial_files/<id>/ema/step_*.pt, which hold the trial's config dict, the EMA weights and,
since issue 9, the raw weights). No import of the orchestrator.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from diffusion_core.data import DataConfig
from diffusion_core.schedules import ScheduleConfig
from diffusion_core.unet import UNet, UNetConfig

ENSEMBLE_FIELDS = ("training.seed", "data.subset_index", "data.data_seed")
SUBSET_FIELDS = ("data.subset_index", "data.data_seed")


def _known(cls, section: dict) -> dict:
    """The keys of a config section that the dataclass takes (a study file may carry more)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in section.items() if k in names}


def core_configs(cfg: dict) -> tuple[DataConfig, UNetConfig, ScheduleConfig]:
    """A trial's config dict (sections data/model/diffusion/...) -> the diffusion_core configs."""
    d, m, f = cfg["data"], cfg["model"], cfg["diffusion"]
    native = 28 if d.get("dataset", "mnist") == "mnist" else 32
    channels = 1 if d.get("dataset", "mnist") == "mnist" else 3
    model = UNetConfig(**{**_known(UNetConfig, m), "in_channels": channels,
                          "image_size": d.get("image_size") or native,
                          "channel_mult": tuple(m.get("channel_mult", (1, 2, 4)))})
    schedule = ScheduleConfig(**{**_known(ScheduleConfig, f), "name": f.get("schedule", "linear")})
    return DataConfig(**_known(DataConfig, d)), model, schedule


def study_snapshot(study_dir: Path) -> dict:
    """The study.yaml the launch wrote into the study folder ({} if absent)."""
    f = Path(study_dir) / "study.yaml"
    return yaml.safe_load(f.read_text()) or {} if f.exists() else {}


def snapshots(study_dir: Path, trial_id: str) -> dict[int, Path]:
    """step -> EMA snapshot file of one trial (every evaluation keeps one)."""
    folder = Path(study_dir) / "trial_files" / trial_id / "ema"
    files = sorted(p for p in folder.glob("step_*.pt")) if folder.is_dir() else []
    return {int(p.stem.split("_")[-1]): p for p in files}


@dataclass
class Member:
    trial_id: str
    snapshot: dict     # {"ema": state, "raw": state (newer snapshots), "step", "config"}

    def weights(self) -> list[str]:
        return [w for w in ("ema", "raw") if w in self.snapshot]

    def net(self, weights: str, device: torch.device) -> UNet:
        _, model_cfg, _ = core_configs(self.snapshot["config"])
        net = UNet(model_cfg).to(device)
        net.load_state_dict(self.snapshot[weights])
        return net.eval()    # eval mode: dropout off, as in Residual(t)


def load_member(path: Path, trial_id: str) -> Member:
    snap = torch.load(path, map_location="cpu", weights_only=True)
    return Member(trial_id, snap)


@dataclass
class Design:
    kind: str                   # "seeds" | "subsets" | "subsets x seeds"
    units: list[list[str]]      # trial ids [subset][seed]; "seeds"/"subsets": one row per model

    @property
    def trial_ids(self) -> list[str]:
        return [t for row in self.units for t in row]

    @property
    def two_level(self) -> bool:
        return self.kind == "subsets x seeds"


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


def _value(study, trial_id: str, col: str):
    v = study.param(trial_id, col)
    return 0 if v is None else v


def subsets_of(study, ids: list[str]) -> dict[tuple, list[str]]:
    """training subset (subset_index, data_seed) -> its trial ids, ordered by training seed."""
    out: dict[tuple, list[str]] = {}
    for tid in ids:
        out.setdefault(tuple(_value(study, tid, c) for c in SUBSET_FIELDS), []).append(tid)
    return {k: sorted(v, key=lambda t: _value(study, t, "training.seed")) for k, v in sorted(out.items())}


def design_of(study, ids: list[str]) -> Design | None:
    """The estimator's design for one group's trials (None: fewer than 2 models)."""
    subsets = list(subsets_of(study, ids).values())
    if len(subsets) == 1:
        return Design("seeds", [[t] for t in subsets[0]]) if len(subsets[0]) >= 2 else None
    s = min(len(v) for v in subsets)
    if s >= 2:
        return Design("subsets x seeds", [v[:s] for v in subsets])
    return Design("subsets", [[v[0]] for v in subsets])
