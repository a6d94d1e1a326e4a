"""The memorization -> generalization study (issue 10): disjoint subsets, the per-sample
measurements on cases with a known answer, and `studyctl launch --local` of a tiny real
study through the Parquet table, MLflow and the figures."""
from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest
import torch

from diffusion_core.config import DataConfig, ScheduleConfig, UNetConfig
from diffusion_core.data import load_splits, subset_indices
from diffusion_core.estimators.decomposition import empirical_optimal_eps
from diffusion_core.estimators.generalization import (distance_to_memorization, mean_interval, nearest_in_subsets,
                                           same_noise_similarity)
from diffusion_core.diffusion.samplers import DDIMSampler
from diffusion_core.diffusion.schedules import NoiseSchedule
from diffusion_core.model.unet import UNet

try:
    from .orchestrator_helpers import studyctl, tiny_study, write_study
except ImportError:
    from orchestrator_helpers import studyctl, tiny_study, write_study


def test_disjoint_subsets_are_disjoint_and_stable(data_root, mnist_splits):
    a = subset_indices(48_000, 1024, 0, "disjoint", seed=0)
    b = subset_indices(48_000, 1024, 1, "disjoint", seed=0)
    assert len(set(a.tolist())) == len(set(b.tolist())) == 1024
    assert not set(a.tolist()) & set(b.tolist())
    assert torch.equal(a, subset_indices(48_000, 1024, 0, "disjoint", seed=0))       # stable across calls
    # The 16-image subsets are the first blocks of the same permutation: stable in N too.
    small = subset_indices(48_000, 16, 1, "disjoint", seed=0)
    assert not set(small.tolist()) & set(subset_indices(48_000, 16, 0, "disjoint", seed=0).tolist())
    # load_splits records which images of the split each subset holds.
    sa = load_splits(DataConfig(root=str(data_root), subset_size=64, subset_index=0, val_size=8))
    sb = load_splits(DataConfig(root=str(data_root), subset_size=64, subset_index=1, val_size=8))
    assert torch.equal(sa.train.images, mnist_splits.train.images[sa.train_indices])
    assert not set(sa.train_indices.tolist()) & set(sb.train_indices.tolist())


@pytest.fixture(scope="module")
def small_sets(mnist_splits):
    """Two disjoint 16-image subsets and a schedule."""
    own = mnist_splits.train.batch(torch.arange(0, 16))
    other = mnist_splits.train.batch(torch.arange(16, 32))
    return own, other, NoiseSchedule.from_config(ScheduleConfig(T=1000))


def test_a_model_returning_its_nearest_training_image_is_memorized(small_sets):
    own, other, _ = small_sets
    # The "model": noise z -> the training image nearest to z (a deterministic memorizing map).
    z = torch.randn((40, *own.shape[1:]), generator=torch.Generator().manual_seed(0))
    samples = own[torch.cdist(z.flatten(1), own.flatten(1)).argmin(1)]
    st = nearest_in_subsets(samples, own, other)
    assert st.memorized.mean() == 1.0
    assert np.allclose(st.d1_own, 0, atol=0.05) and np.allclose(st.cosine_own, 1, atol=1e-5)
    assert st.memorized_other.mean() == 0.0                      # the unseen subset is not "memorized"
    assert (st.own_over_other < 0.01).all()
    # Real held-out digits are not copies of the training set.
    assert nearest_in_subsets(other, own, own[:8]).memorized.mean() < 0.2


def test_the_empirical_optimum_is_at_distance_zero(small_sets):
    own, _, schedule = small_sets
    eps = torch.randn(own.shape, generator=torch.Generator().manual_seed(1))
    f_star = lambda x, t: empirical_optimal_eps(x, int(t[0]), schedule, own)  # noqa: E731
    res = distance_to_memorization(f_star, schedule, own, own, eps, [5, 100, 700])
    assert max(res.distance) < 1e-10
    assert np.allclose(res.model_error, res.optimum_error)
    # Predicting 0: distance = E||f*_D||^2/d and the error is exactly the mean of eps^2.
    zero = distance_to_memorization(lambda x, t: torch.zeros_like(x), schedule, own, own[:8], eps[:8], [100])
    assert zero.model_error[0] == pytest.approx(float(eps[:8].double().pow(2).mean()), rel=1e-12)
    assert zero.distance[0] > 0.1


def test_two_copies_of_one_model_agree_from_the_same_noise():
    cfg = UNetConfig(base_width=8, channel_mult=(1, 2), blocks_per_level=1, bottleneck_blocks=1)
    net, copy = UNet(cfg).eval(), UNet(cfg).eval()
    copy.load_state_dict(net.state_dict())
    sampler = DDIMSampler(NoiseSchedule.from_config(ScheduleConfig(T=100)), steps=5)
    z = torch.randn((6, 1, 28, 28), generator=torch.Generator().manual_seed(0))
    cos, mse = same_noise_similarity(sampler.sample(net, z.shape, x_T=z).clamp(-1, 1),
                                     sampler.sample(copy, z.shape, x_T=z).clamp(-1, 1))
    assert np.allclose(cos, 1.0, atol=1e-6) and np.allclose(mse, 0.0, atol=1e-10)
    # Known answers: complementary half-lit images are perfectly anti-correlated (MSE 4); a blank
    # against a half-lit image shares no structure (cosine 0, MSE 2).
    blank, half = -torch.ones(1, 1, 2, 2), torch.tensor([[[[1.0, -1.0], [1.0, -1.0]]]])
    cos, mse = same_noise_similarity(half, torch.tensor([[[[-1.0, 1.0], [-1.0, 1.0]]]]))
    assert cos[0] == pytest.approx(-1.0) and mse[0] == pytest.approx(4.0)
    assert same_noise_similarity(blank, half) == (pytest.approx([0.0]), pytest.approx([2.0]))


def test_identical_samples_score_one_blanks_included():
    """Two models that both draw a blank agree: cosine 1 (the cosine of raw [0, 1] intensities gave
    0 there: two zero vectors). Any identical pair scores 1; a brightness offset does not change it."""
    blank = torch.zeros(3, 1, 28, 28, dtype=torch.uint8)                 # all background, as uint8
    cos, mse = same_noise_similarity(blank, blank.clone())
    assert np.allclose(cos, 1.0) and np.allclose(mse, 0.0)
    assert same_noise_similarity(-torch.ones(1, 1, 4, 4), -torch.ones(1, 1, 4, 4))[0][0] == pytest.approx(1.0)
    digit = torch.rand((2, 1, 28, 28), generator=torch.Generator().manual_seed(0)) * 2 - 1
    assert np.allclose(same_noise_similarity(digit, digit.clone())[0], 1.0)
    assert np.allclose(same_noise_similarity(digit, 0.5 * digit - 0.2)[0], 1.0)   # offset and scale: still 1
    assert np.allclose(same_noise_similarity(blank[:2], digit)[0], 0.0)


def test_mean_interval_covers_the_mean():
    v = np.random.default_rng(0).normal(3.0, 1.0, 400)
    m, lo, hi = mean_interval(v)
    assert m == pytest.approx(v.mean()) and lo < m < hi
    assert hi - lo == pytest.approx(2 * 1.96 / np.sqrt(400), rel=0.25)      # ~ +-1.96 s/sqrt(n)
    assert mean_interval(np.ones(10)) == (1.0, 1.0, 1.0)


def test_quick_real_study_writes_the_table_and_draws_figures_from_it(tmp_path, data_root):
    study = tiny_study(data_root, name="gen",
                       data={"subset_size": 16, "subset_mode": "disjoint", "val_size": 32},
                       training={"epochs": 1000, "max_steps": 20, "batch_size": 16, "eval_every": 10, "eval_start": 10},
                       evaluation={"n_samples": 12, "grid_images": 4, "metrics": False, "clip_x0": 1.0,
                                   "keep_samples": True},
                       sweep={"grid": {"data.subset_index": [0, 1]}},
                       resources={"workers_per_trial": 1, "cpus_per_worker": 1, "stack": 2},
                       analysis={"figures": True, "generalization": True})
    out = tmp_path / "out"
    r = studyctl("launch", write_study(tmp_path / "gen.yaml", study), "--local", "--output", out, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:]
    table = pd.read_parquet(out / "generalization" / "generalization.parquet")
    trials = pd.read_parquet(out / "trials")
    assert sorted(table["member"].unique()) == ["a", "b", "heldout"]
    models = table[table["member"] != "heldout"]
    assert sorted(models["step"].unique()) == [10, 20] and (models["n_samples"] == 12).all()
    assert models["same_noise_cosine"].between(-1, 1).all() and (models["memorized_fraction"].between(0, 1)).all()
    # The trials kept their evaluation samples (DDIM eta 0, x0 clipped at 1, as the analysis samples):
    # the analysis read them, and sampling the snapshots again gives the same samples and numbers.
    assert models["samples_reused"].all()
    kept = np.load(out / "trial_files" / models["trial"].iloc[0] / "samples" / "all_step_000000010.npy")
    assert kept.shape == (12, 1, 28, 28) and kept.dtype == np.uint8
    from analysis.generalization import generalization

    shutil.copytree(out / "generalization", tmp_path / "reused")
    again, _ = generalization(out, reuse_samples=False, progress=False)
    assert not again.loc[again["member"] != "heldout", "samples_reused"].any()
    cols = ["same_noise_cosine", "same_noise_mse", "memorized_fraction", "d1_own_median", "nn_cosine_own"]
    pd.testing.assert_frame_equal(again[cols], table[cols], rtol=1e-4)
    for f in sorted((tmp_path / "reused" / "samples").glob("*.npz")):
        before, after = np.load(f), np.load(out / "generalization" / "samples" / f.name)
        assert np.abs(before["a"].astype(int) - after["a"].astype(int)).max() <= 1, f.name
    opt = pd.read_parquet(out / "generalization" / "distance_to_memorization.parquet")
    assert len(opt) == 2 * 2 * 5 and (opt["distance_to_memorization"] > 0).all()   # t in 5..200 of T = 200
    # The subsets are recorded by index and really disjoint.
    idx = [np.load(out / "trial_files" / t / "train_indices.npy") for t in sorted(trials["trial_id"])]
    assert len(idx[0]) == len(idx[1]) == 16 and not set(idx[0]) & set(idx[1])
    # Logged to the study's MLflow run.
    import mlflow

    runs = mlflow.MlflowClient(f"sqlite:///{out}/mlflow.db").search_runs(
        [mlflow.MlflowClient(f"sqlite:///{out}/mlflow.db").get_experiment_by_name("gen").experiment_id],
        "tags.`studyctl.role` = 'study'")
    assert any(k.endswith("same_noise_cosine") for k in runs[0].data.metrics)
    # Figures from the Parquet table and the saved arrays alone: no model snapshots needed.
    for t in trials["trial_id"]:
        shutil.rmtree(out / "trial_files" / t / "ema")
    shutil.rmtree(out / "figures")
    r = studyctl("figures", out, "--no-mlflow", timeout=120)
    assert r.returncode == 0, r.stdout[-3000:]
    for name in ("generalization_samples_grid", "generalization_vs_step", "generalization_distance_to_memorization"):
        assert (out / "figures" / f"{name}.png").exists(), name


def test_pairs_differ_only_in_the_subset_index():
    from analysis.generalization import find_pairs

    trials = pd.DataFrame({"trial_id": ["a0", "a1", "b0", "b1", "c1", "d0"],
                           "status": ["COMPLETED"] * 5 + ["FAILED"],
                           "data.subset_index": [0, 1, 0, 1, 1, 0],
                           "data.subset_size": [16, 16, 16, 16, 64, 64],
                           "training.seed": [0, 0, 1, 1, 0, 0]})
    pairs = {(p["trial_a"], p["trial_b"]) for p in find_pairs(trials)}
    assert pairs == {("a0", "a1"), ("b0", "b1")}        # c1's partner d0 failed; seeds never mix
    assert ("d0", "c1") in {(p["trial_a"], p["trial_b"]) for p in find_pairs(trials, ("COMPLETED", "FAILED"))}


def test_kept_samples_are_read_only_when_they_are_what_the_analysis_would_draw(tmp_path):
    from analysis.generalization import kept_samples
    from diffusion_core.config import EvalConfig
    from records.layout import eval_samples_file

    f = eval_samples_file(tmp_path, "t000", 10)
    f.parent.mkdir(parents=True)
    np.save(f, np.arange(12 * 784, dtype=np.uint8).reshape(12, 1, 28, 28))
    kept = EvalConfig(n_samples=12, sampler="ddim", eta=0.0, clip_x0=1.0, keep_samples=True)
    assert kept_samples(tmp_path, "t000", 10, kept, 8, 1.0).shape == (8, 1, 28, 28)
    for ev, n, clip, step in [(kept, 8, None, 10),                                   # other clipping
                              (kept, 16, 1.0, 10),                                   # too few kept
                              (kept, 8, 1.0, 20),                                    # no file for that step
                              (EvalConfig(n_samples=12, sampler="ddpm", clip_x0=1.0, keep_samples=True), 8, 1.0, 10),
                              (EvalConfig(n_samples=12, sampler="ddim", eta=0.5, clip_x0=1.0, keep_samples=True), 8, 1.0, 10),
                              (EvalConfig(n_samples=12, sampler="ddim", clip_x0=1.0), 8, 1.0, 10)]:  # not kept
        assert kept_samples(tmp_path, "t000", step, ev, n, clip) is None, (ev, n, clip, step)
