"""Where everything of a study lives, relative to its folder (`--output`, default runs/<name>).
Every path of a study folder is built here and nowhere else (tests/test_records.py scans the
other modules for path literals):

    study.yaml                                  the validated study, written by the launch
    trials/ train_steps/ epochs/ residuals/ evals/   Parquet records of the trials (parquet.py)
    decomposition/ distance_to_memorization/    Parquet tables of `studyctl decompose`
    reference_distances/ sample_quality/        (the last on molrg studies only), one <kind>.parquet each
    ground_truth/molrg-*.npz                    the exact distribution of a molrg study (ground_truth.py)
    generalization/                             `studyctl generalization`
        generalization.parquet                  same-noise similarity, memorization per pair and step
        distance_to_memorization.parquet        distance to the empirical optimal denoiser
        samples/<pair>_step_<step>.npz          the same-noise samples and nearest training images drawn
    figures/<name>.png|.pdf, figures/index.html every figure and the report (analysis/report.py)
    mlflow.db, mlartifacts/                     the study's MLflow store (a local sqlite store)
    ray/train/<run>/checkpoint_step_<step>/     Ray Train's runs and checkpoints (Ray only)
        state.pt, rng_rank<r>.pt, config.json   a trial's resume state, each rank's RNG, its config
        <trial_id>.pt, group.json               a stacked group's: each member's state and the manifest
    ray/tune/                                   Ray Tune's experiment state (Ray only)
    trial_files/<trial_id>/
        summary.json                            live status of the trial (step, wall time)
        workers/rank<r>.json                    host and pid of each DDP worker
        ema/step_<step>.pt                      EMA (+ raw) weights and core configs (snapshots.py)
        samples/step_<step>.png|.npy            the sample grid of each evaluation
        samples/all_step_<step>.npy             every sample of an evaluation (evaluation.keep_samples)
        samples/progressive.npz                 progressive-generation frames of the final model
        train_indices.npy                       the training subset, by index
        resume.pt                               the resume state of a --local run
        ray_checkpoint.json                     a stacked member's pointer to its state in ray/train

Trial files are kept out of the Parquet folders so `pandas.read_parquet(<study>/<kind>)`
reads Parquet only.
"""
from __future__ import annotations

import os
import re
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


def analysis_table(study_dir: str | os.PathLike, kind: str) -> Path:
    """The one Parquet file of an analysis kind (written whole by `studyctl decompose`)."""
    if kind not in ANALYSIS_KINDS:
        raise ValueError(f"unknown analysis kind {kind!r}: allowed: {', '.join(ANALYSIS_KINDS)}")
    return kind_dir(study_dir, kind) / f"{kind}.parquet"


def trial_part_file(study_dir: str | os.PathLike, kind: str, trial_id: str, step: int | None = None) -> Path:
    """One trial's Parquet part: the `trials` row (step None) or one evaluation interval of a kind."""
    if step is None:
        return kind_dir(study_dir, kind) / f"{trial_id}.parquet"
    return kind_dir(study_dir, kind) / f"{trial_id}--s{step:09d}.parquet"


def trial_parts(study_dir: str | os.PathLike, kind: str, trial_id: str) -> dict[int, Path]:
    """step -> the interval part of one trial in a kind ending at that step, in step order."""
    folder = kind_dir(study_dir, kind)
    pattern = re.compile(rf"^{re.escape(trial_id)}--s(\d+)\.parquet$")
    found = (pattern.match(f.name) for f in folder.iterdir()) if folder.is_dir() else ()
    return dict(sorted((int(m.group(1)), folder / m.group(0)) for m in found if m))


def trial_part_temp_files(study_dir: str | os.PathLike, kind: str, trial_id: str) -> list[Path]:
    """Temporary files an interrupted write of the trial's parts left (records.atomic names them .<name>...)."""
    folder = kind_dir(study_dir, kind)
    return sorted(folder.glob(f".{trial_id}--s*")) if folder.is_dir() else []


def has_parquet(folder: str | os.PathLike) -> bool:
    """The folder holds a Parquet file (not a hidden or temporary one)."""
    folder = Path(folder)
    return folder.is_dir() and any(not f.name.startswith((".", "_")) for f in folder.glob("*.parquet"))


# ------------------------------------------------------------------------------ study-level folders
FIGURES, MLFLOW_DB, MLFLOW_ARTIFACTS, RAY, TRIAL_FILES = "figures", "mlflow.db", "mlartifacts", "ray", "trial_files"
GENERALIZATION, GROUND_TRUTH = "generalization", "ground_truth"


def figures_dir(study_dir: str | os.PathLike) -> Path:
    return Path(study_dir) / FIGURES


def report_file(figures: str | os.PathLike) -> Path:
    """The HTML report in a figures folder (the study's, or another one written with --out)."""
    return Path(figures) / "index.html"


def mlflow_db(study_dir: str | os.PathLike) -> Path:
    """The study's own sqlite MLflow store (the default tracking uri)."""
    return Path(study_dir) / MLFLOW_DB


def mlflow_artifacts(study_dir: str | os.PathLike) -> Path:
    return Path(study_dir) / MLFLOW_ARTIFACTS


def ray_tune_dir(study_dir: str | os.PathLike) -> Path:
    """Ray Tune's storage path: its experiment state, one folder per launch."""
    return Path(study_dir) / RAY / "tune"


def generalization_dir(study_dir: str | os.PathLike) -> Path:
    return Path(study_dir) / GENERALIZATION


def generalization_table(study_dir: str | os.PathLike) -> Path:
    return generalization_dir(study_dir) / "generalization.parquet"


def memorization_distance_table(study_dir: str | os.PathLike) -> Path:
    return generalization_dir(study_dir) / "distance_to_memorization.parquet"


def generalization_samples_file(study_dir: str | os.PathLike, pair_slug: str, step: int) -> Path:
    return generalization_dir(study_dir) / generalization_samples_name(pair_slug, step)


def generalization_samples_name(pair_slug: str, step: int) -> str:
    """The samples file of a pair and step relative to generalization/ (the table's samples_file column)."""
    return f"samples/{pair_slug}_step_{step:09d}.npz"


# ------------------------------------------------------------------------------ trial files
def trial_files(study_dir: str | os.PathLike, trial_id: str) -> Path:
    """The trial's files that are not Parquet (see the module docstring)."""
    return Path(study_dir) / TRIAL_FILES / trial_id


def summary_file(study_dir: str | os.PathLike, trial_id: str) -> Path:
    return trial_files(study_dir, trial_id) / "summary.json"


def worker_file(study_dir: str | os.PathLike, trial_id: str, rank: int) -> Path:
    return trial_files(study_dir, trial_id) / "workers" / f"rank{rank}.json"


def train_indices_file(study_dir: str | os.PathLike, trial_id: str) -> Path:
    return trial_files(study_dir, trial_id) / "train_indices.npy"


def samples_dir(study_dir: str | os.PathLike, trial_id: str) -> Path:
    return trial_files(study_dir, trial_id) / "samples"


def sample_grid_file(study_dir: str | os.PathLike, trial_id: str, step: int) -> Path:
    """The sample grid of one evaluation (PNG; the .npy of the same stem holds its uint8 pixels)."""
    return samples_dir(study_dir, trial_id) / f"step_{step:09d}.png"


def progressive_file(study_dir: str | os.PathLike, trial_id: str) -> Path:
    """The progressive-generation frames of the trial's final model (evaluation.progressive_t)."""
    return samples_dir(study_dir, trial_id) / "progressive.npz"


def resume_file(study_dir: str | os.PathLike, trial_id: str) -> Path:
    """The full resume state of a trial run without Ray (--local), replaced at each evaluation."""
    return trial_files(study_dir, trial_id) / "resume.pt"


def ray_checkpoint_pointer(study_dir: str | os.PathLike, trial_id: str) -> Path:
    """A stacked member's pointer to its state in the newest group checkpoint under ray/train."""
    return trial_files(study_dir, trial_id) / "ray_checkpoint.json"


def ray_train_dir(study_dir: str | os.PathLike) -> Path:
    """Where Ray Train keeps its runs (one per trial or stacked group) and their checkpoints."""
    return Path(study_dir) / RAY / "train"


# ------------------------------------------------------------------------------ inside a Ray checkpoint
def checkpoint_name(step: int) -> str:
    """The folder of one checkpoint in a Ray Train run (one per evaluation step)."""
    return f"checkpoint_step_{step:09d}"


def checkpoint_state_file(checkpoint: str | os.PathLike) -> Path:
    """A trial's resume state (TrainState.state_dict) in a checkpoint folder (rank 0 writes it)."""
    return Path(checkpoint) / "state.pt"


def checkpoint_rng_file(checkpoint: str | os.PathLike, rank: int) -> Path:
    """One DDP rank's RNG streams (each rank continues its own training noise)."""
    return Path(checkpoint) / f"rng_rank{rank}.pt"


def checkpoint_config_file(checkpoint: str | os.PathLike) -> Path:
    return Path(checkpoint) / "config.json"


def group_manifest_file(checkpoint: str | os.PathLike) -> Path:
    """A stacked group's checkpoint: which members it holds, at which step."""
    return Path(checkpoint) / "group.json"


def group_member_state_file(checkpoint: str | os.PathLike, trial_id: str) -> Path:
    return Path(checkpoint) / f"{trial_id}.pt"


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
    return Path(study_dir) / GROUND_TRUTH / f"{key}.npz"
