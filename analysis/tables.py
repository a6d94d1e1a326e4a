"""Reading a study's Parquet records (and nothing else) for the figures.

A half-finished study is normal here: any table may be missing or partial. Every
loader returns a (possibly empty) DataFrame with the columns the figures use.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from records.layout import KINDS
from records.parquet import latest_per_trial, read_table


@dataclass
class Study:
    dir: Path
    trials: pd.DataFrame
    train_steps: pd.DataFrame
    epochs: pd.DataFrame
    residuals: pd.DataFrame
    evals: pd.DataFrame
    decomposition: pd.DataFrame
    distance_to_memorization: pd.DataFrame = field(default_factory=pd.DataFrame)
    reference_distances: pd.DataFrame = field(default_factory=pd.DataFrame)
    sample_quality: pd.DataFrame = field(default_factory=pd.DataFrame)
    swept: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        if len(self.trials) and "study" in self.trials:
            return str(self.trials["study"].iloc[0])
        return self.dir.name

    def trial_ids(self) -> list[str]:
        ids = set(self.trials.get("trial_id", pd.Series(dtype=str)))
        for df in (self.train_steps, self.epochs, self.residuals, self.evals):
            if "trial_id" in df:
                ids |= set(df["trial_id"])
        return sorted(ids)

    def status(self, trial_id: str) -> str:
        if "trial_id" not in self.trials:
            return "UNKNOWN"
        row = self.trials[self.trials["trial_id"] == trial_id]
        return str(row["status"].iloc[0]) if len(row) else "UNKNOWN"

    def trial_rows(self, df: pd.DataFrame, trial_id: str) -> pd.DataFrame:
        """The rows of one trial in one of this study's tables (none if the table is empty)."""
        return df[df["trial_id"] == trial_id] if "trial_id" in df else df.iloc[0:0]

    def param(self, trial_id: str, col: str):
        row = self.trials[self.trials["trial_id"] == trial_id]
        return row[col].iloc[0] if len(row) and col in row else None


def load_study(study_dir: str | os.PathLike) -> Study:
    d = Path(study_dir)
    if not d.is_dir():
        raise FileNotFoundError(f"study folder {d.resolve()} does not exist; pass the folder a launch wrote "
                                f"(default runs/<study name>)")
    tables = {k: read_table(d, k) for k in KINDS}
    if all(t.empty for t in tables.values()):
        raise FileNotFoundError(f"no Parquet records under {d.resolve()} (looked for {', '.join(KINDS)}/); "
                                f"run `studyctl launch` first or check the folder")
    # Row tables carry exactly the study's swept fields (dotted names) besides their own columns.
    swept: list[str] = []
    for kind in ("train_steps", "epochs", "residuals", "evals"):
        swept += [c for c in tables[kind].columns if "." in c and c not in swept]
    return Study(d, swept=swept, **tables)


def final_evals(study: Study) -> pd.DataFrame:
    """The last evaluation of every trial joined with its swept fields."""
    if study.evals.empty:
        return pd.DataFrame()
    last = latest_per_trial(study.evals)
    cols = ["trial_id"] + [c for c in study.swept if c in study.trials]
    if len(study.trials):
        last = last.drop(columns=[c for c in cols[1:] if c in last], errors="ignore").merge(
            study.trials[cols], on="trial_id", how="left")
    return last.reset_index(drop=True)


def load_grid(path: str | os.PathLike, study_dir: Path) -> np.ndarray | None:
    """A saved sample grid as an (H, W) or (H, W, 3) float array in [0, 1], or None."""
    if path is None or (isinstance(path, float) and np.isnan(path)):
        return None
    p = Path(path)
    if not p.is_absolute():
        p = study_dir / p
    if not p.exists():
        return None
    if p.suffix in (".npy", ".npz"):
        arr = np.load(p)
        arr = arr[arr.files[0]] if hasattr(arr, "files") else arr
        arr = np.asarray(arr, dtype=np.float32)
        if arr.max() > 1.0:
            arr = arr / 255.0
        if arr.ndim == 3 and arr.shape[0] in (1, 3):
            arr = arr.transpose(1, 2, 0)
        return arr.squeeze()
    import matplotlib.image as mpimg

    img = mpimg.imread(p)
    return img[..., 0] if img.ndim == 3 and np.allclose(img[..., 0], img[..., 1]) else img
