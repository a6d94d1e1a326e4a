"""Which trials form an ensemble (for `studyctl decompose`).

An ensemble is a set of completed trials that differ only in training randomness: the
training seed and/or the training subset (ENSEMBLE_FIELDS). Every other swept field is
part of the group key, so an ensemble never pools unlike trials. Within a group the
design decides the estimator (diffusion_core.estimators.decomposition):

- one training subset, several seeds        -> "seeds": K iid models, variance over seeds;
- several subsets, one model on each         -> "subsets": K models that differ in D and seed;
- several subsets x several seeds (crossed)  -> "subsets x seeds": the two-level split into
  data and optimization variance (Neal et al. 2018), balanced to S = the fewest seeds any
  subset has (the lowest seeds are kept).

The members' EMA snapshots (records.snapshots) hold the weights and the core configs that
rebuild each model.
"""
from __future__ import annotations

from dataclasses import dataclass

ENSEMBLE_FIELDS = ("training.seed", "data.subset_index", "data.data_seed")
SUBSET_FIELDS = ("data.subset_index", "data.data_seed")


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
