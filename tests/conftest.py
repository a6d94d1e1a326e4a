"""Shared fixtures: real MNIST from ../shared/data, two CPU threads, session-scoped splits."""
from __future__ import annotations

import os
from pathlib import Path

# Two threads on a 2-core machine that other processes share: OpenMP's default spin-waiting
# then costs 10-100x on small ops. Must be set before torch (and its OpenMP runtime) loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402

# Real MNIST in torchvision's layout (<root>/MNIST/raw). An explicit environment wins.
_SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
os.environ.setdefault("STUDYCTL_DATA_ROOT", str(_SHARED_DATA if _SHARED_DATA.exists() else "/work/shared/data"))

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def data_root() -> Path:
    root = Path(os.environ["STUDYCTL_DATA_ROOT"])
    if not (root / "MNIST" / "raw").exists():
        pytest.fail(f"real MNIST is required but {root / 'MNIST' / 'raw'} does not exist; "
                    f"set STUDYCTL_DATA_ROOT to the folder that contains MNIST/raw")
    return root


@pytest.fixture(scope="session")
def mnist_splits(data_root):
    """The thesis's seeded 48,000 / 12,000 split of real MNIST (split_seed=0). Treat as read-only."""
    from diffusion_core import mnist_splits as _mnist_splits
    return _mnist_splits(data_root, split_seed=0)
