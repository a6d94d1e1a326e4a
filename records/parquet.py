"""Parquet records of a study: one dataset (folder) per kind, part files per trial.

    <study>/trials/<trial_id>.parquet                      one row, rewritten as the status changes
    <study>/train_steps/<trial_id>--s<step>.parquet        one part per evaluation interval
    <study>/epochs/..., <study>/residuals/..., <study>/evals/...   (same naming)

Why part files per evaluation interval: rank 0 buffers the rows of an interval and
writes them right before the checkpoint of that evaluation. When a worker group
restarts from the checkpoint at step S, the parts of steps > S (written, but whose
checkpoint never landed) are deleted and their rows produced again — so the records
have neither holes nor duplicates. Every file is written atomically (records.atomic: a
dot-named temp file, renamed): readers never see a torn file, and pyarrow ignores
dot-files, so `pandas.read_parquet(<study>/<kind>)` always reads a consistent set.

Every row carries `study`, `trial_id` and the swept fields (dotted names such as
`model.base_width`), so any table can be grouped without a join. Schemas are fixed per
kind (and per study for the swept columns), so part files of all trials unify.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from diffusion_core.config import METRIC_KEYS, REAL_DATA_KEYS

from .atomic import TEMP_SUFFIX, atomic_write
from .layout import INTERVAL_KINDS, has_parquet, kind_dir, trial_part_file, trial_part_temp_files, trial_parts

_BASE = {
    "trials": [("study", pa.string()), ("trial_id", pa.string()), ("status", pa.string()), ("error", pa.string()),
               ("parameters", pa.int64()), ("wall_seconds", pa.float64()), ("step", pa.int64()),
               ("total_steps", pa.int64()), ("restarts", pa.int64()), ("mlflow_run_id", pa.string()),
               ("updated_at", pa.float64()),
               # wall_seconds split in two: the trial's evaluations (the sum of its `evals` rows'
               # eval_seconds) and the rest (training steps, start-up, checkpoints): time_split()
               ("eval_seconds", pa.float64()), ("train_seconds", pa.float64())],
    "train_steps": [("study", pa.string()), ("trial_id", pa.string()), ("step", pa.int64()),
                    ("epoch", pa.float64()), ("loss", pa.float64()),
                    # training.val_loss_first: one validation minibatch's loss at the step (Fig. 26b)
                    ("val_batch_loss", pa.float64())],
    "epochs": [("study", pa.string()), ("trial_id", pa.string()), ("epoch", pa.int64()), ("step", pa.int64()),
               ("train_loss", pa.float64()), ("val_loss", pa.float64()), ("val_loss_raw", pa.float64()),
               ("train_loss_eval", pa.float64()), ("ema_init_share", pa.float64())],
    "residuals": [("study", pa.string()), ("trial_id", pa.string()), ("step", pa.int64()), ("epoch", pa.float64()),
                  ("t", pa.int64()), ("residual", pa.float64()), ("weights", pa.string()),
                  ("variance_interpolation", pa.float64())],   # learned variance: mean v at t (iDDPM 15)
    "evals": [("study", pa.string()), ("trial_id", pa.string()), ("step", pa.int64()), ("epoch", pa.float64()),
              ("eval_seconds", pa.float64()), ("images_per_second", pa.float64()), ("sample_grid", pa.string())]
             + [(k, pa.float64()) for k in METRIC_KEYS + REAL_DATA_KEYS] + [("ema_init_share", pa.float64())],
}


def arrow_type(values: Iterable[Any]) -> pa.DataType:
    """One Arrow type for a column's values across all trials (None allowed anywhere)."""
    vals = [v for v in values if v is not None]
    if vals and all(isinstance(v, bool) for v in vals):
        return pa.bool_()
    if vals and all(isinstance(v, int) and not isinstance(v, bool) for v in vals):
        return pa.int64()
    if vals and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vals):
        return pa.float64()
    return pa.string()


def param_types(columns: dict[str, list]) -> dict[str, str]:
    """{column: [values across trials]} -> {column: arrow type name} (JSON-serialisable)."""
    return {k: str(arrow_type(v)) for k, v in columns.items()}


_TYPES = {"bool": pa.bool_(), "int64": pa.int64(), "double": pa.float64(), "string": pa.string()}


def schema(kind: str, params: dict[str, str]) -> pa.Schema:
    """The fixed schema of a kind: base columns + the given param columns {name: arrow type name}."""
    return pa.schema(_BASE[kind] + [(k, _TYPES[t]) for k, t in params.items()])


def _coerce(v, t: pa.DataType):
    if v is None:
        return None
    if t == pa.string() and not isinstance(v, str):
        return str(v)
    if t == pa.float64():
        return float(v)
    return v


def write_atomic_table(path: Path, table: pa.Table) -> None:
    with atomic_write(path) as fh:
        pq.write_table(table, fh)


def write_atomic_frame(path: Path, frame: pd.DataFrame) -> None:
    """A whole analysis table (decomposition, generalization) as one Parquet file, replaced atomically."""
    with atomic_write(path) as fh:
        frame.to_parquet(fh, index=False)


class RecordWriter:
    """Writes one trial's rows. `params` are the columns every row carries ({name: value})."""

    def __init__(self, study_dir: str | os.PathLike, study: str, trial_id: str, params: dict[str, Any],
                 types: dict[str, str], trial_params: dict[str, Any] | None = None,
                 trial_types: dict[str, str] | None = None):
        self.dir, self.study, self.trial_id = Path(study_dir), study, trial_id
        self.params, self.types = params, types
        self.trial_params = trial_params if trial_params is not None else params
        self.trial_types = trial_types if trial_types is not None else types

    def _table(self, kind: str, rows: list[dict], params: dict, types: dict) -> pa.Table:
        sch = schema(kind, types)
        full = [{"study": self.study, "trial_id": self.trial_id, **params, **r} for r in rows]
        cols = {f.name: [_coerce(r.get(f.name), f.type) for r in full] for f in sch}
        return pa.Table.from_pydict(cols, schema=sch)

    def write_part(self, kind: str, rows: list[dict], step: int) -> Path | None:
        if not rows:
            return None
        path = trial_part_file(self.dir, kind, self.trial_id, step)
        write_atomic_table(path, self._table(kind, rows, self.params, self.types))
        return path

    def write_trial(self, **row) -> Path:
        path = trial_part_file(self.dir, "trials", self.trial_id)
        write_atomic_table(path, self._table("trials", [row], self.trial_params, self.trial_types))
        return path

    def drop_parts_after(self, step: int) -> list[Path]:
        """Delete this trial's parts of intervals ending after `step` (and stray temp files)."""
        removed = []
        for kind in INTERVAL_KINDS:
            later = [f for s, f in trial_parts(self.dir, kind, self.trial_id).items() if s > step]
            temps = [f for f in trial_part_temp_files(self.dir, kind, self.trial_id) if f.name.endswith(TEMP_SUFFIX)]
            for f in later + temps:
                f.unlink(missing_ok=True)
                removed.append(f)
        return removed


def read_table(study_dir: str | os.PathLike, kind: str) -> pd.DataFrame:
    """The kind's rows as a DataFrame (empty if nothing was written yet). Dot- and
    underscore-files (temp files, pyarrow's _metadata) are not parts."""
    folder = kind_dir(study_dir, kind)
    if not has_parquet(folder):
        return pd.DataFrame()
    return pd.read_parquet(folder)


def time_split(study_dir: str | os.PathLike, trial_id: str, wall_seconds: float | None) -> dict[str, float | None]:
    """{eval_seconds, train_seconds} of a trial: the sum of its evaluations' eval_seconds (one row per
    evaluation: a restarted interval's parts were replaced, not added) and wall_seconds minus that."""
    parts = list(trial_parts(study_dir, "evals", trial_id).values())
    if not parts:
        return {"eval_seconds": None, "train_seconds": wall_seconds}
    evals = sum(float(pq.read_table(p, columns=["eval_seconds"]).column(0).to_pandas().sum()) for p in parts)
    return {"eval_seconds": evals, "train_seconds": None if wall_seconds is None else float(wall_seconds) - evals}


def latest_per_trial(df: pd.DataFrame, order: str = "step") -> pd.DataFrame:
    """The last row of each trial by `order` (ties: the row written last), one row per trial."""
    if df.empty:
        return df
    return df.sort_values(order, kind="stable").groupby("trial_id").tail(1)
