"""Datasets: MNIST (the thesis's), CIFAR-10, and `molrg`, a mixture of low-rank Gaussians fitted to
MNIST whose optimal denoiser is exact (molrg.py).

Images are held as one uint8 tensor (N, C, H, W) — MNIST's 60,000 training images are
47 MB that way — and scaled to [-1, 1] per batch, on whatever device the tensor lives.
`molrg` draws are held as float32 and used as they are: Gaussian data is not bounded to [-1, 1].
Keeping the whole set resident (on the GPU, when there is one) replaces a DataLoader:
an epoch is a seeded permutation of indices, sharded by rank for DDP exactly as
torch's DistributedSampler does (pad to a multiple of world size, take every
world_size-th index).
"""
from __future__ import annotations

import os
import pickle
from dataclasses import dataclass

import numpy as np
import torch

from .cache import resolve_cache_dir
from .config import (CIFAR10_VAL, DATA_ROOT_ENV, MNIST_TRAIN, MOLRG_TEST, SPLIT_SIZES, SUBSET_MODES, DataConfig,
                     resolve_data_root)


class DatasetNotFoundError(FileNotFoundError):
    pass


@dataclass
class ImageSet:
    """uint8 images (N, C, H, W) and integer labels, plus a name for error messages."""
    images: torch.Tensor
    labels: torch.Tensor
    name: str = ""

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])

    def to(self, device: torch.device | str) -> "ImageSet":
        return ImageSet(self.images.to(device), self.labels.to(device), self.name)

    def subset(self, indices: torch.Tensor, name: str | None = None) -> "ImageSet":
        idx = indices.to(self.images.device)
        return ImageSet(self.images[idx], self.labels[idx], name or self.name)

    def batch(self, indices: torch.Tensor | slice | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """uint8 images scaled to [-1, 1] (thesis 2.5.3); float images (molrg draws) as they are."""
        x = self.images if indices is None else self.images[indices]
        return x.to(dtype) if x.is_floating_point() else to_unit_range(x, dtype)


def to_unit_range(images_uint8: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[0, 255] -> [-1, 1]."""
    return images_uint8.to(dtype) / 127.5 - 1.0


def from_unit_range(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> uint8 [0, 255] (clamped: -1 and below black, 1 and above white), for grids and metrics."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def _pad_to(images: torch.Tensor, size: int | None) -> torch.Tensor:
    if size is None or size == images.shape[-1]:
        return images
    h = images.shape[-1]
    if size < h:
        raise ValueError(f"image_size={size} is smaller than the dataset's {h}; allowed: >= {h} (zero-padded)")
    lo = (size - h) // 2
    hi = size - h - lo
    return torch.nn.functional.pad(images, (lo, hi, lo, hi))  # 0 = background black = -1 after scaling


# --------------------------------------------------------------------------- MNIST
def load_mnist(root: str | os.PathLike | None = None, train: bool = True, download: bool = False) -> ImageSet:
    """MNIST through torchvision (layout <root>/MNIST/raw/*-idx?-ubyte)."""
    from torchvision.datasets import MNIST

    base = resolve_data_root(root)
    raw = base / "MNIST" / "raw"
    needed = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte"] if train else \
        ["t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]
    missing = [f for f in needed if not (raw / f).exists() and not (raw / (f + ".gz")).exists()]
    if missing and not download:
        raise DatasetNotFoundError(
            f"MNIST not found: looked for {', '.join(missing)} in {raw.resolve()} "
            f"(data root {str(base)!r}, from the argument, ${DATA_ROOT_ENV}, or ./data). "
            f"Fix: point the data root at the folder that contains MNIST/raw "
            f"(e.g. export {DATA_ROOT_ENV}=../shared/data, or data.root in the study file), "
            f"or allow torchvision to download it (download=True, needs internet).")
    ds = MNIST(root=str(base), train=train, download=download)
    return ImageSet(ds.data.unsqueeze(1).contiguous(), ds.targets.clone(), "mnist-train" if train else "mnist-test")


@dataclass
class Splits:
    train: ImageSet
    val: ImageSet
    test: ImageSet | None = None
    train_indices: torch.Tensor | None = None   # positions in the training split of the subset `train` holds


def split_indices(n: int, n_train: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded random split of range(n) into (train, val); val keeps ascending order (not shuffled)."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[:n_train], perm[n_train:].sort().values


def mnist_splits(root: str | os.PathLike | None = None, *, split_seed: int = 0, image_size: int | None = None,
                 with_test: bool = False, download: bool = False) -> Splits:
    """The thesis's 48,000 / 12,000 train/validation split of MNIST's 60,000 training images."""
    full = load_mnist(root, train=True, download=download)
    full.images = _pad_to(full.images, image_size)
    tr, va = split_indices(len(full), MNIST_TRAIN, split_seed)
    test = None
    if with_test:
        test = load_mnist(root, train=False, download=download)
        test.images = _pad_to(test.images, image_size)
    return Splits(full.subset(tr, "mnist-train"), full.subset(va, "mnist-val"), test)


# ------------------------------------------------------------------------ CIFAR-10
def load_cifar10(root: str | os.PathLike | None = None, train: bool = True, download: bool = False,
                 verify_checksums: bool = True) -> ImageSet:
    """CIFAR-10 through torchvision (layout <root>/cifar-10-batches-py/).

    verify_checksums=False accepts a folder in the same layout whose files are not the
    published ones (a small hand-made set in tests, a re-packed copy on a cluster).
    """
    from torchvision.datasets import CIFAR10

    base = resolve_data_root(root)
    folder = base / CIFAR10.base_folder
    if not folder.exists() and not download:
        raise DatasetNotFoundError(
            f"CIFAR-10 not found: looked for {folder.resolve()} (data root {str(base)!r}). Fix: point the "
            f"data root at the folder containing cifar-10-batches-py (${DATA_ROOT_ENV} or data.root), "
            f"or allow torchvision to download it (download=True, needs internet).")
    if verify_checksums:
        ds = CIFAR10(root=str(base), train=train, download=download)
        data, targets = ds.data, ds.targets
    else:  # same parsing as torchvision, without its md5 check
        files = [f for f, _ in (CIFAR10.train_list if train else CIFAR10.test_list)]
        data, targets = [], []
        for f in files:
            with open(folder / f, "rb") as fh:
                entry = pickle.load(fh, encoding="latin1")
            data.append(entry["data"])
            targets.extend(entry.get("labels", entry.get("fine_labels", [])))
        data = np.vstack(data).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    images = torch.from_numpy(np.ascontiguousarray(np.asarray(data).transpose(0, 3, 1, 2)))
    return ImageSet(images, torch.as_tensor(targets, dtype=torch.long), "cifar10-train" if train else "cifar10-test")


def cifar10_splits(root=None, *, split_seed: int = 0, n_val: int = CIFAR10_VAL, with_test: bool = False,
                   download: bool = False, verify_checksums: bool = True) -> Splits:
    full = load_cifar10(root, True, download, verify_checksums)
    if not 0 < n_val < len(full):
        raise ValueError(f"n_val={n_val} must lie in 1..{len(full) - 1} for {len(full)} CIFAR-10 training images")
    tr, va = split_indices(len(full), len(full) - n_val, split_seed)
    test = load_cifar10(root, False, download, verify_checksums) if with_test else None
    return Splits(full.subset(tr, "cifar10-train"), full.subset(va, "cifar10-val"), test)


# ------------------------------------------------------------------------- subsets
def subset_indices(n_total: int, size: int, index: int = 0, mode: str = "disjoint", seed: int = 0) -> torch.Tensor:
    """Indices of training subset `index` of `size` images.

    disjoint:  subsets 0, 1, ... are consecutive blocks of one seeded permutation, so they
               never overlap and subset k is the same set in every trial that names it.
    bootstrap: `size` indices drawn with replacement, seeded by (seed, index).
    """
    if mode not in SUBSET_MODES:
        raise ValueError(f"unknown subset mode {mode!r}; allowed: {', '.join(SUBSET_MODES)}")
    if not isinstance(size, int) or size < 1 or size > n_total:
        raise ValueError(f"training subset size={size!r} must lie in 1..{n_total} (the size of the split)")
    if index < 0:
        raise ValueError(f"subset index={index!r} must be >= 0")
    if mode == "disjoint":
        if (index + 1) * size > n_total:
            raise ValueError(
                f"disjoint subset index={index} of size {size} needs {(index + 1) * size} images but the split "
                f"has {n_total}; allowed index: 0..{n_total // size - 1} (or use mode 'bootstrap')")
        perm = torch.randperm(n_total, generator=torch.Generator().manual_seed(seed))
        return perm[index * size:(index + 1) * size].sort().values
    g = torch.Generator().manual_seed(seed * 1_000_003 + index)
    return torch.randint(0, n_total, (size,), generator=g)


def molrg_of(cfg: DataConfig):
    """The mixture a molrg DataConfig names (molrg.MoLRG). Fitted to the seeded 48,000-image MNIST training
    split (basis mnist; needs MNIST under the data root) or drawn from split_seed (basis random); cached as an
    .npz in $STUDYCTL_CACHE_DIR/molrg/ so every trial of a study uses the same parameters bit for bit."""
    from .molrg import MoLRG, fit_mnist, molrg_key, random_bases

    key = molrg_key(cfg.molrg_rank, cfg.molrg_floor, cfg.molrg_basis, cfg.molrg_components, cfg.split_seed)
    path = resolve_cache_dir() / "molrg" / f"{key}.npz"
    if path.exists():
        return MoLRG.load(path)
    if cfg.molrg_basis == "random":
        m = random_bases(cfg.molrg_rank, cfg.molrg_floor, cfg.molrg_components, cfg.split_seed)
    else:
        train = mnist_splits(cfg.root, split_seed=cfg.split_seed).train
        m = fit_mnist(train.batch(dtype=torch.float64), train.labels, cfg.molrg_rank, cfg.molrg_floor,
                      cfg.molrg_components)
    m.save(path)
    return m


def molrg_splits(cfg: DataConfig, with_test: bool = False) -> Splits:
    """48,000 training and 12,000 validation draws of the mixture (and 10,000 test draws), each split from its
    own seeded stream: independent of each other, deterministic from (the mixture, split_seed)."""
    m = molrg_of(cfg)

    def draw(n: int, stream: int, name: str) -> ImageSet:
        x, comp = m.sample(n, torch.Generator().manual_seed(cfg.split_seed * 1_000_003 + stream))
        return ImageSet(x, comp, name)

    n_train, n_val = SPLIT_SIZES["molrg"]
    return Splits(draw(n_train, 1, "molrg-train"), draw(n_val, 2, "molrg-val"),
                  draw(MOLRG_TEST, 3, "molrg-test") if with_test else None)


def load_splits(cfg: DataConfig, with_test: bool = False) -> Splits:
    """Train (possibly a subset) and validation splits for a DataConfig."""
    if cfg.dataset == "molrg":
        splits = molrg_splits(cfg, with_test)
    elif cfg.dataset == "mnist":
        splits = mnist_splits(cfg.root, split_seed=cfg.split_seed, image_size=cfg.image_size, with_test=with_test)
    else:
        splits = cifar10_splits(cfg.root, split_seed=cfg.split_seed, with_test=with_test)
        splits.train.images = _pad_to(splits.train.images, cfg.image_size)
        splits.val.images = _pad_to(splits.val.images, cfg.image_size)
    if cfg.subset_size is not None:
        idx = subset_indices(len(splits.train), cfg.subset_size, cfg.subset_index, cfg.subset_mode, cfg.data_seed)
        splits.train = splits.train.subset(idx, f"{splits.train.name}[{cfg.subset_mode}:{cfg.subset_index}:{cfg.subset_size}]")
        splits.train_indices = idx
    if cfg.val_size is not None:
        if not 1 <= cfg.val_size <= len(splits.val):
            raise ValueError(f"val_size={cfg.val_size} must lie in 1..{len(splits.val)}")
        splits.val = splits.val.subset(torch.arange(cfg.val_size))
    return splits


# ------------------------------------------------------------------------ batching
def epoch_batches(n: int, batch_size: int, epoch: int, seed: int, *, rank: int = 0, world_size: int = 1,
                  drop_last: bool = True, device: torch.device | str = "cpu") -> list[torch.Tensor]:
    """Index batches of one epoch, reshuffled per epoch from (seed, epoch).

    `batch_size` is the global batch; each of `world_size` ranks gets batch_size // world_size
    indices per step from its shard (perm[rank::world_size], as DistributedSampler), so every
    rank takes the same number of steps.
    """
    if batch_size % world_size:
        raise ValueError(f"batch_size={batch_size} must be divisible by the number of workers {world_size}")
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    perm = torch.randperm(n, generator=g)
    if n % world_size:  # pad like DistributedSampler so shards are equal
        perm = torch.cat([perm, perm[: world_size - n % world_size]])
    shard = perm[rank::world_size].to(device)
    local = batch_size // world_size
    n_batches = len(shard) // local if drop_last else -(-len(shard) // local)
    return [shard[i * local:(i + 1) * local] for i in range(n_batches)]


def steps_per_epoch(n: int, batch_size: int, world_size: int = 1) -> int:
    """Optimizer steps per epoch of epoch_batches (thesis: 48,000 / 16 = 3,000)."""
    return (-(-n // world_size)) // (batch_size // world_size)
