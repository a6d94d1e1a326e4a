"""`decompose` on a molrg study: the exact split, the reference distances, sample quality, figures.

The study folder is made here, not trained (seconds, not minutes): real molrg data (a small
random-basis mixture saved with the study, as a launch saves it), real U-Nets at two snapshots
per trial (random weights, one per seed), real Parquet records and snapshots. What is checked is
exact: the identity per point, the noise against an independent computation of f*, and the two
tables against each other: for every ensemble, the mean over its models of ||f_k - f*||^2 from
`reference_distances` equals bias2 + variance from `decomposition` (an algebraic identity).
An MNIST study of the same shape gets no bias2 / noise columns and no sample quality.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from analysis import sample_quality as SQ
from analysis.decompose import decompose, heldout_points
from analysis.figures_ground_truth import ground_truth_figures
from analysis.references import x_t_at
from analysis.sample_quality import coverage_kl
from analysis.tables import load_study
from diffusion_core.config import DataConfig, EvalConfig, ScheduleConfig, UNetConfig
from diffusion_core.diffusion.schedules import NoiseSchedule
from diffusion_core.model.unet import UNet
from records.ground_truth import load_molrg, save_molrg
from records.layout import snapshot_file
from records.snapshots import save_snapshot

TS = (10, 100, 500)
SIZES, SEEDS, STEPS = (64, 128), (0, 1, 2), (10, 20)
MOLRG = dict(dataset="molrg", molrg_rank=4, molrg_floor=1e-3, molrg_basis="random", molrg_components=3)


def _make_study(root: Path, data_kw: dict) -> Path:
    """Trials width 8 x N in SIZES x seeds, COMPLETED, each with an EMA + raw snapshot at STEPS."""
    study = root / "study"
    model = UNetConfig(base_width=8, channel_mult=(1, 2), blocks_per_level=1, bottleneck_blocks=1, dropout=0.0)
    evaluation = EvalConfig(t_grid=TS, residual_images=24, seed=0, sampler="ddim", steps=5)
    trials, epochs = [], []
    for n in SIZES:
        for seed in SEEDS:
            tid = f"t-n{n}-s{seed}"
            data = DataConfig(**data_kw, subset_size=n)
            save_molrg(study, data) if data.dataset == "molrg" else None
            torch.manual_seed(1000 * n + seed)
            net = UNet(model)
            for step in STEPS:
                with torch.no_grad():
                    for p in net.parameters():
                        p.mul_(0.9)
                state = {k: v.clone() for k, v in net.state_dict().items()}
                save_snapshot(snapshot_file(study, tid, step), step=step, ema=state, raw=state, config={}, data=data,
                              model=model, schedule=ScheduleConfig(), evaluation=evaluation)
            swept = {"data.subset_size": n, "training.seed": seed}
            trials.append({"study": "gt", "trial_id": tid, "status": "COMPLETED", **swept})
            epochs.append({"study": "gt", "trial_id": tid, "epoch": 0, "step": STEPS[-1], **swept})
    for kind, rows in (("trials", trials), ("epochs", epochs)):
        (study / kind).mkdir(parents=True, exist_ok=True)
        pd.DataFrame(rows).to_parquet(study / kind / "part.parquet", index=False)
    return study


@pytest.fixture(scope="module")
def molrg_study(tmp_path_factory):
    study = _make_study(tmp_path_factory.mktemp("molrg"), MOLRG)
    SQ.DEFAULT_REFERENCE = 200          # classifier features of 200 held-out draws: enough for a test
    table = decompose(study, n_points=24, n_boot=200, progress=False, device="cpu", quality_samples=24)
    return study, table


def test_decomposition_splits_bias2_noise_and_the_identity_is_exact(molrg_study):
    study, dec = molrg_study
    for col in ("noise", "bias2", "variance", "cross", "bias2_plus_noise"):
        assert {col, f"{col}_lo", f"{col}_hi"} <= set(dec.columns)
    assert len(dec) == len(SIZES) * len(STEPS) * 2 * len(TS)      # groups x snapshots x weights x t
    assert (dec["identity_residual"] < 1e-9).all()
    total = dec["noise"] + dec["bias2"] + dec["variance"] + dec["cross"]
    assert np.allclose(dec["residual"], total, atol=1e-9, rtol=0)
    assert np.allclose(dec["bias2_plus_noise"], dec["noise"] + dec["bias2"] + dec["cross"], atol=1e-9, rtol=0)
    assert (dec["interval"] == "points+models").all()             # K = 3 seeds: the jackknife exists


def test_noise_is_that_of_the_true_optimal_denoiser(molrg_study):
    """The noise column, recomputed from the saved mixture at the same held-out points."""
    study, dec = molrg_study
    data = DataConfig(**MOLRG, subset_size=SIZES[0])
    truth, schedule = load_molrg(study, data), NoiseSchedule.from_config(ScheduleConfig())
    x0, eps = heldout_points(data, 24, 0)
    for t in TS:
        f_star = truth.optimal_eps(x_t_at(x0, eps, t, schedule), t, schedule)
        want = float((eps.double() - f_star).flatten(1).pow(2).mean(1).mean())
        assert np.allclose(dec.loc[dec["t"] == t, "noise"], want, rtol=1e-12, atol=0)


def test_reference_distances_agree_with_the_decomposition(molrg_study):
    """mean_k ||f_k - f*||^2 (reference_distances, per model) = bias2 + variance (decomposition), exactly."""
    study, dec = molrg_study
    ref = pd.read_parquet(study / "reference_distances")
    assert len(ref) == len(SIZES) * len(SEEDS) * len(STEPS) * 2 * len(TS)
    assert ref[["distance_memorizing", "distance_gaussian_linear", "distance_optimal"]].notna().all().all()
    per_group = ref.groupby(["group_id", "step", "weights", "t"])["distance_optimal"].mean()
    joined = dec.set_index(["group_id", "step", "weights", "t"])
    assert np.allclose(per_group.loc[joined.index], joined["bias2"] + joined["variance"], rtol=1e-9, atol=1e-12)
    assert set(ref["train_size"]) == set(SIZES)
    assert (ref["distance_optimal_lo"] < ref["distance_optimal"]).all()


def test_sample_quality_rows_and_the_held_out_floor(molrg_study):
    study, _ = molrg_study
    sq = pd.read_parquet(study / "sample_quality")
    models, floor = sq[sq["source"] == "model"], sq[sq["source"] == "heldout_mixture"]
    assert len(models) == len(SIZES) * len(SEEDS) and (models["step"] == STEPS[-1]).all()
    assert len(floor) == 1 and (sq["n_samples"] == 24).all()
    cover = sq[[f"coverage_c{k}" for k in range(3)]].sum(axis=1)
    assert np.allclose(cover, 1.0)
    # a draw of the mixture sits at sigma_0^2 (d - r) / d from its component's subspace, on average
    f = floor.iloc[0]
    assert f["subspace_distance_lo"] < 1e-3 * (784 - 4) / 784 < f["subspace_distance_hi"]
    # random-weight U-Nets are far worse than the mixture's own draws on every exact measure
    assert (models["log_density"] < f["log_density_lo"]).all()
    assert (models["pixel_fd"] > f["pixel_fd"]).all()
    assert (models["clip_x0"] == "none").all() and (models["eta"] == 0).all()


def test_the_figures_draw_from_these_tables(molrg_study, tmp_path):
    from analysis.style import save

    study, _ = molrg_study
    figs = ground_truth_figures(load_study(study))
    assert all(f is not None for f in figs.values()), figs
    for name, fig in figs.items():
        assert save(fig, tmp_path / name).stat().st_size > 10_000


@pytest.mark.parametrize("n", [5, 40])
def test_pixel_frechet_equals_the_dense_frechet_distance(n):
    """The n x n route (n <= d) and the d x d one (n > d) give frechet_distance's numbers."""
    from diffusion_core.metrics import frechet_distance

    rng = np.random.default_rng(n)
    d = 12
    b = rng.normal(size=(d, d))
    sigma, mu = b @ b.T / d + 0.1 * np.eye(d), rng.normal(size=d)
    x = rng.normal(size=(n, d)) @ b.T * 0.7 + 0.3
    want = frechet_distance(x.mean(0), np.cov(x, rowvar=False), mu, sigma)
    got = SQ.pixel_frechet(x, mu, sigma)
    # rtol 1e-7: the dense route takes square roots of the rank-deficient cov(x)'s round-off eigenvalues
    assert np.allclose(got, want, rtol=1e-7, atol=0)
    assert not np.allclose(SQ.pixel_frechet(x + 0.01, mu, sigma), want, rtol=1e-7, atol=0)


def test_coverage_kl_known_values():
    w = np.array([0.5, 0.25, 0.25])
    assert coverage_kl(np.array([0, 0, 1, 2]), w) == pytest.approx(0.0, abs=1e-15)
    assert coverage_kl(np.zeros(10, dtype=int), w) == pytest.approx(np.log(2.0), rel=1e-12)
    assert coverage_kl(np.array([1, 2]), w) == pytest.approx(np.log(0.5 / 0.25), rel=1e-12)


def test_mnist_study_keeps_bias2_and_noise_together(tmp_path):
    """Off molrg nothing is split, no sample quality is written, and asking for it is an error."""
    study = _make_study(tmp_path, dict(dataset="mnist"))
    with pytest.raises(ValueError, match="quality_samples"):
        decompose(study, n_points=16, t_grid=[100], steps="final", n_boot=50, progress=False, device="cpu",
                  references=False, quality_samples=16)
    dec = decompose(study, n_points=16, t_grid=[100], steps="final", n_boot=50, progress=False, device="cpu")
    assert "bias2_plus_noise" in dec and not {"bias2", "noise", "cross", "identity_residual"} & set(dec.columns)
    assert not (study / "sample_quality").exists()
    ref = pd.read_parquet(study / "reference_distances")
    assert ref["distance_optimal"].isna().all() and ref["distance_memorizing"].notna().all()
    assert ground_truth_figures(load_study(study))["ground_truth_tradeoff"] is None


def test_heldout_points_keep_the_molrg_fields():
    a = DataConfig(**MOLRG, subset_size=64)
    b = dataclasses.replace(a, molrg_rank=5)
    assert not torch.equal(heldout_points(a, 4, 0)[0], heldout_points(b, 4, 0)[0])


def test_quality_samples_start_from_the_evaluators_noise():
    """The sample-quality draws start from the Evaluator's fixed x_T (same seed, same stream position)."""
    from types import SimpleNamespace

    from diffusion_core.data import ImageSet
    from diffusion_core.evaluation import Evaluator

    cfg = EvalConfig(seed=3, residual_images=24, n_samples=20, grid_images=16)
    val = ImageSet(torch.zeros(40, 1, 28, 28), torch.zeros(40, dtype=torch.long))
    ev = Evaluator(NoiseSchedule.from_config(ScheduleConfig()), val, cfg)
    snap = SimpleNamespace(model=UNetConfig(), evaluation=cfg, data=DataConfig(**MOLRG, val_size=40))
    assert torch.equal(SQ.starting_noise(snap, 20, 3), ev.x_T)
    assert not torch.equal(SQ.starting_noise(snap, 20, 4), ev.x_T)
