"""Where everything of a study lives, relative to its folder (`--output`, default runs/<name>):

    study.yaml                                  the validated study, written by the launch
    trials/ train_steps/ epochs/ residuals/ evals/   Parquet records of the trials (parquet.py)
    decomposition/ distance_to_memorization/    Parquet tables of `studyctl decompose`
    reference_distances/ sample_quality/        (the last on molrg studies only)
    ground_truth/molrg-*.npz                    the exact distribution of a molrg study (ground_truth.py)
    trial_files/<trial_id>/
        summary.json                            live status of the trial (step, wall time)
        workers/rank<r>.json                    host and pid of each DDP worker
        ema/step_<step>.pt                      EMA (+ raw) weights and core configs (snapshots.py)
        samples/step_<step>.png|.npy            the sample grid of each evaluation
        train_indices.npy                       the training subset, by index

Trial files are kept out of the Parquet folders so `pandas.read_parquet(<study>/<kind>)`
reads Parquet only.
"""
from __future__ import annotations

import os
from pathlib import Path

import yaml

STUDY_FILE = "study.yaml"
TRIAL_KINDS = ("trials", "train_steps", "epochs", "residuals", "evals")   # written by the trials
INTERVAL_KINDS = TRIAL_KINDS[1:]          # one part file per trial and evaluation interval
# written by `studyctl decompose`
ANALYSIS_KINDS = ("decomposition", "distance_to_memorization", "reference_distances", "sample_quality")
KINDS = TRIAL_KINDS + ANALYSIS_KINDS


def study_file(study_dir: str | os.PathLike) -> Path:
    return Path(study_dir) / STUDY_FILE


def read_study_file(study_dir: str | os.PathLike) -> dict | None:
    """The study.yaml the launch wrote (a dict), or None if the folder has none."""
    f = study_file(study_dir)
    return (yaml.safe_load(f.read_text()) or {}) if f.exists() else None


def kind_dir(study_dir: str | os.PathLike, kind: str) -> Path:
    if kind not in KINDS:
        raise ValueError(f"unknown record kind {kind!r}: allowed: {', '.join(KINDS)}")
    return Path(study_dir) / kind


def trial_files(study_dir: str | os.PathLike, trial_id: str) -> Path:
    """The trial's files that are not Parquet (see the module docstring)."""
    return Path(study_dir) / "trial_files" / trial_id


def summary_file(study_dir: str | os.PathLike, trial_id: str) -> Path:
    return trial_files(study_dir, trial_id) / "summary.json"


def worker_file(study_dir: str | os.PathLike, trial_id: str, rank: int) -> Path:
    return trial_files(study_dir, trial_id) / "workers" / f"rank{rank}.json"


def train_indices_file(study_dir: str | os.PathLike, trial_id: str) -> Path:
    return trial_files(study_dir, trial_id) / "train_indices.npy"


def samples_dir(study_dir: str | os.PathLike, trial_id: str) -> Path:
    return trial_files(study_dir, trial_id) / "samples"


def ray_train_dir(study_dir: str | os.PathLike) -> Path:
    """Where Ray Train keeps its runs (one per trial or stacked group) and their checkpoints."""
    return Path(study_dir) / "ray" / "train"


def eval_samples_file(study_dir: str | os.PathLike, trial_id: str, step: int) -> Path:
    """Every sample of one evaluation (uint8 (n_samples, C, H, W)), kept when evaluation.keep_samples."""
    return samples_dir(study_dir, trial_id) / f"all_step_{step:09d}.npy"


def snapshot_file(study_dir: str | os.PathLike, trial_id: str, step: int) -> Path:
    return trial_files(study_dir, trial_id) / "ema" / f"step_{step:09d}.pt"


def snapshot_files(study_dir: str | os.PathLike, trial_id: str) -> dict[int, Path]:
    """step -> EMA snapshot of one trial (every evaluation keeps one), in step order."""
    folder = trial_files(study_dir, trial_id) / "ema"
    files = folder.glob("step_*.pt") if folder.is_dir() else []
    return dict(sorted((int(p.stem.split("_")[-1]), p) for p in files))


def ground_truth_file(study_dir: str | os.PathLike, key: str) -> Path:
    """The parameters of one molrg mixture the study's trials draw from (diffusion_core.molrg.molrg_key)."""
    return Path(study_dir) / "ground_truth" / f"{key}.npz"
