"""Data: the seeded 48,000 / 12,000 MNIST split (real MNIST), scaling, subsets, epoch sharding, CIFAR-10."""
from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from diffusion_core import (DATA_ROOT_ENV, DataConfig, DatasetNotFoundError, epoch_batches, from_unit_range,
                            load_cifar10, load_mnist, load_splits, cifar10_splits, subset_indices,
                            to_unit_range)
from diffusion_core import mnist_splits as make_mnist_splits  # (the fixture is named mnist_splits)
from diffusion_core.data import split_indices, steps_per_epoch


# ------------------------------------------------------------------------- MNIST split
def test_split_sizes_disjoint_and_complete(mnist_splits):
    tr, va = mnist_splits.train, mnist_splits.val
    assert len(tr) == 48_000 and len(va) == 12_000
    assert tr.shape == (1, 28, 28) and va.shape == (1, 28, 28)
    assert tr.images.dtype == torch.uint8
    full = load_mnist(train=True)
    assert len(full) == 60_000
    itr, iva = split_indices(60_000, 48_000, seed=0)
    assert len(set(itr.tolist()) & set(iva.tolist())) == 0
    assert sorted(itr.tolist() + iva.tolist()) == list(range(60_000))
    # validation is not shuffled: ascending original order
    assert torch.equal(iva, iva.sort().values)
    # the split's images really are those rows of MNIST
    assert torch.equal(tr.images, full.images[itr]) and torch.equal(va.images, full.images[iva])
    assert torch.equal(va.labels, full.labels[iva])
    # all ten digits in both parts, roughly balanced
    for labels in (tr.labels, va.labels):
        frac = torch.bincount(labels, minlength=10).double() / len(labels)
        assert frac.min() > 0.08 and frac.max() < 0.12


def test_split_is_deterministic_per_seed():
    a_tr, a_va = split_indices(60_000, 48_000, seed=0)
    b_tr, b_va = split_indices(60_000, 48_000, seed=0)
    c_tr, c_va = split_indices(60_000, 48_000, seed=1)
    assert torch.equal(a_tr, b_tr) and torch.equal(a_va, b_va)
    assert not torch.equal(a_va, c_va)


def test_pixel_scaling_real_mnist(mnist_splits):
    x = mnist_splits.val.batch(torch.arange(2000))
    assert x.dtype == torch.float32 and x.shape == (2000, 1, 28, 28)
    assert float(x.min()) == -1.0 and float(x.max()) == 1.0
    # MNIST is mostly black background: the median pixel is -1
    assert float(x.median()) == -1.0
    # exact affine map 0 -> -1, 255 -> 1, and its inverse
    u = torch.arange(256, dtype=torch.uint8)
    torch.testing.assert_close(to_unit_range(u), torch.linspace(-1, 1, 256), rtol=0, atol=1e-6)
    assert torch.equal(from_unit_range(to_unit_range(u)), u)
    assert torch.equal(from_unit_range(torch.tensor([-3.0, 3.0])), torch.tensor([0, 255], dtype=torch.uint8))


def test_load_splits_with_subset_and_val_size(data_root):
    s = load_splits(DataConfig(root=str(data_root), subset_size=1000, subset_index=2, data_seed=5, val_size=300))
    assert len(s.train) == 1000 and len(s.val) == 300
    full = make_mnist_splits(data_root)
    idx = subset_indices(48_000, 1000, 2, "disjoint", 5)
    assert torch.equal(s.train.images, full.train.images[idx])
    assert torch.equal(s.val.images, full.val.images[:300])


def test_image_size_pads_with_background(data_root):
    s = make_mnist_splits(data_root, image_size=32)
    assert s.val.shape == (1, 32, 32)
    x = s.val.batch(torch.arange(100))
    assert float(x[..., :2, :].max()) == -1.0 and float(x[..., :, -2:].max()) == -1.0


# ------------------------------------------------------------------------- subsets
def test_disjoint_subsets():
    subs = [subset_indices(48_000, 5_000, k, "disjoint", seed=3) for k in range(9)]
    for k, s in enumerate(subs):
        assert len(s) == 5_000 and len(set(s.tolist())) == 5_000
        assert int(s.min()) >= 0 and int(s.max()) < 48_000
        for j in range(k):
            assert not set(s.tolist()) & set(subs[j].tolist())
    # same (size, index, seed) -> the same set; another seed -> another set
    assert torch.equal(subs[4], subset_indices(48_000, 5_000, 4, "disjoint", seed=3))
    assert not torch.equal(subs[4], subset_indices(48_000, 5_000, 4, "disjoint", seed=4))


def test_bootstrap_subsets_have_repeats_and_are_seeded():
    b = subset_indices(48_000, 48_000, 0, "bootstrap", seed=0)
    assert len(b) == 48_000
    n_unique = len(set(b.tolist()))
    # E[unique] = n (1 - (1 - 1/n)^n) ~ 0.632 n
    assert abs(n_unique / 48_000 - (1 - np.exp(-1))) < 0.01
    assert torch.equal(b, subset_indices(48_000, 48_000, 0, "bootstrap", seed=0))
    assert not torch.equal(b, subset_indices(48_000, 48_000, 1, "bootstrap", seed=0))


def test_subset_larger_than_split_message():
    with pytest.raises(ValueError) as e:
        subset_indices(48_000, 50_000)
    msg = str(e.value)
    assert "size=50000" in msg and "1..48000" in msg
    with pytest.raises(ValueError) as e:
        subset_indices(48_000, 10_000, index=4, mode="disjoint")
    assert "index=4" in str(e.value) and "0..3" in str(e.value) and "bootstrap" in str(e.value)
    with pytest.raises(ValueError, match="'jackknife'.*disjoint, bootstrap"):
        subset_indices(48_000, 100, mode="jackknife")


def test_subset_larger_than_split_via_config(data_root):
    with pytest.raises(ValueError, match=r"size=60000.*1\.\.48000"):
        load_splits(DataConfig(root=str(data_root), subset_size=60_000))


def test_missing_mnist_folder_message(tmp_path, monkeypatch):
    monkeypatch.delenv(DATA_ROOT_ENV, raising=False)
    root = tmp_path / "nowhere"
    with pytest.raises(DatasetNotFoundError) as e:
        load_mnist(root)
    msg = str(e.value)
    assert str((root / "MNIST" / "raw").resolve()) in msg             # the path searched
    assert "train-images-idx3-ubyte" in msg                            # what was missing
    assert "Fix" in msg and DATA_ROOT_ENV in msg and "download=True" in msg  # how to fix it
    assert isinstance(e.value, FileNotFoundError)
    # and through the env variable
    monkeypatch.setenv(DATA_ROOT_ENV, str(root))
    with pytest.raises(DatasetNotFoundError, match="nowhere"):
        make_mnist_splits()


# ------------------------------------------------------------------------- epochs
@pytest.mark.parametrize("n, world", [(1000, 1), (1000, 4), (1003, 4), (997, 3)])
def test_epoch_batches_shard_equally_and_cover(n, world):
    batch = 12
    shards = [epoch_batches(n, batch, epoch=2, seed=7, rank=r, world_size=world, drop_last=False)
              for r in range(world)]
    lens = {len(s) for s in shards}
    assert len(lens) == 1                                  # every rank takes the same number of steps
    per_rank = [torch.cat(s) for s in shards]
    assert len({len(p) for p in per_rank}) == 1            # equal-size shards
    assert all(len(b) == batch // world for s in shards for b in s[:-1])
    covered = torch.cat(per_rank)
    assert set(covered.tolist()) == set(range(n))          # the whole permutation is covered
    assert len(covered) == n + (-n) % world                # padding only to a multiple of world size
    # the union over ranks, interleaved, is the seeded permutation itself
    g = torch.Generator().manual_seed(7 * 100_003 + 2)
    perm = torch.randperm(n, generator=g)
    padded = torch.cat([perm, perm[: (-n) % world]])
    for r in range(world):
        assert torch.equal(per_rank[r], padded[r::world])
    # drop_last: only full local batches; the step count is steps_per_epoch
    full = epoch_batches(n, batch, epoch=2, seed=7, rank=0, world_size=world)
    assert all(len(b) == batch // world for b in full)
    assert len(full) == steps_per_epoch(n, batch, world)


def test_epoch_batches_reshuffle_per_epoch_and_seed():
    e0 = torch.cat(epoch_batches(480, 16, epoch=0, seed=0))
    e0b = torch.cat(epoch_batches(480, 16, epoch=0, seed=0))
    e1 = torch.cat(epoch_batches(480, 16, epoch=1, seed=0))
    s1 = torch.cat(epoch_batches(480, 16, epoch=0, seed=1))
    assert torch.equal(e0, e0b)
    assert not torch.equal(e0, e1) and not torch.equal(e0, s1)
    assert sorted(e0.tolist()) == sorted(e1.tolist()) == list(range(480))
    assert steps_per_epoch(48_000, 16) == 3_000  # the thesis's updates per epoch
    with pytest.raises(ValueError, match="batch_size=10.*3"):
        epoch_batches(100, 10, 0, 0, world_size=3)


# ------------------------------------------------------------------------- CIFAR-10
def _fake_cifar(root, n_per_batch=6):
    """A tiny cifar-10-batches-py folder in torchvision's layout with a known pixel pattern.

    Row layout of 'data' (as published): 1024 red, then 1024 green, then 1024 blue values,
    each a 32x32 image in row-major order. Pixel (c, h, w) of image i has value
    (i * 7 + c * 50 + h * 3 + w) % 256.
    """
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    c, h, w = np.meshgrid(np.arange(3), np.arange(32), np.arange(32), indexing="ij")
    counter = 0
    for name in [f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]:
        rows, labels = [], []
        for _ in range(n_per_batch):
            img = ((counter * 7 + c * 50 + h * 3 + w) % 256).astype(np.uint8)
            rows.append(img.reshape(-1))  # C-major then row-major == the published layout
            labels.append(counter % 10)
            counter += 1
        with open(folder / name, "wb") as fh:
            pickle.dump({"data": np.stack(rows), "labels": labels, "batch_label": name}, fh)
    return c, h, w


def test_cifar10_fake_folder(tmp_path):
    c, h, w = _fake_cifar(tmp_path)
    train = load_cifar10(tmp_path, train=True, verify_checksums=False)
    test = load_cifar10(tmp_path, train=False, verify_checksums=False)
    assert train.images.shape == (30, 3, 32, 32) and test.images.shape == (6, 3, 32, 32)
    assert train.images.dtype == torch.uint8
    for i in (0, 1, 17, 29):
        expect = torch.from_numpy(((i * 7 + c * 50 + h * 3 + w) % 256).astype(np.uint8))
        assert torch.equal(train.images[i], expect)
    # spot-check the orientation explicitly: channel 1 (green), row 2, column 5 of image 0
    assert int(train.images[0, 1, 2, 5]) == 50 + 6 + 5
    assert train.labels.tolist() == [i % 10 for i in range(30)]
    assert int(test.images[0, 0, 0, 0]) == (30 * 7) % 256 and test.labels.tolist() == [i % 10 for i in range(30, 36)]

    s = cifar10_splits(tmp_path, n_val=10, split_seed=0, with_test=True, verify_checksums=False)
    assert len(s.train) == 20 and len(s.val) == 10 and len(s.test) == 6
    assert s.val.shape == (3, 32, 32)
    # disjoint and complete, validation in original order (pixel (0,0,0) of image i is 7 i: an id)
    tr_first = {int(x) for x in s.train.images[:, 0, 0, 0]}
    va_first = [int(x) for x in s.val.images[:, 0, 0, 0]]
    assert not tr_first & set(va_first) and len(tr_first | set(va_first)) == 30
    assert va_first == sorted(va_first)  # value i*7 increases with i (i*7 < 256 for i < 30)
    x = s.val.batch()
    assert x.shape == (10, 3, 32, 32) and float(x.min()) >= -1 and float(x.max()) <= 1

    with pytest.raises(ValueError, match="n_val=30.*1..29"):
        cifar10_splits(tmp_path, n_val=30, verify_checksums=False)


def test_missing_cifar_folder_message(tmp_path):
    with pytest.raises(DatasetNotFoundError) as e:
        load_cifar10(tmp_path / "empty")
    msg = str(e.value)
    assert str((tmp_path / "empty" / "cifar-10-batches-py").resolve()) in msg and "Fix" in msg
