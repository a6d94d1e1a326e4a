"""The exact data distribution of a molrg study, saved with its records.

`launch` writes each mixture its trials draw from (diffusion_core.molrg) into the study folder, so
analysis rebuilds the exact distribution, and its optimal denoiser, from the study folder alone: no
MNIST, no cache, no refit on another machine (an SVD's signs or last bits may differ there).
"""
from __future__ import annotations

import os
from pathlib import Path

from diffusion_core.config import DataConfig
from diffusion_core.data import molrg_of
from diffusion_core.molrg import MoLRG, molrg_key

from .layout import ground_truth_file


def _key(data: DataConfig) -> str:
    return molrg_key(data.molrg_rank, data.molrg_floor, data.molrg_basis, data.molrg_components, data.split_seed)


def save_molrg(study_dir: str | os.PathLike, data: DataConfig) -> Path | None:
    """Write the mixture of a molrg DataConfig into the study folder (once); None for other data sets."""
    if data.dataset != "molrg":
        return None
    path = ground_truth_file(study_dir, _key(data))
    if not path.exists():
        molrg_of(data).save(path)
    return path


def load_molrg(study_dir: str | os.PathLike, data: DataConfig) -> MoLRG:
    """The exact mixture a molrg trial of this study drew its data from."""
    if data.dataset != "molrg":
        raise ValueError(f"data.dataset is {data.dataset!r}: only molrg studies have an exact distribution")
    path = ground_truth_file(study_dir, _key(data))
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: the launch of a molrg study writes it; relaunch or "
                                f"`studyctl resume {study_dir}` to write it again")
    return MoLRG.load(path)
