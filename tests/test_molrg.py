"""The mixture of low-rank Gaussians (diffusion_core/molrg.py): its exact optimal denoiser and densities
against dense-covariance computations (numpy/scipy) on a small d, a Monte-Carlo check of E[eps | x_t]
that a broken copy (one responsibility wrong) fails, the fit to real MNIST, and the data set built on it."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import multivariate_normal

from diffusion_core.config import DataConfig
from diffusion_core.data import load_splits, molrg_of
from diffusion_core.estimators.gaussian import GaussianToy
from diffusion_core.molrg import MoLRG, random_bases
from diffusion_core.diffusion.schedules import NoiseSchedule

SCHED = NoiseSchedule.make("linear", 1000)


def small_mixture(d=6, r=2, c=3, floor=0.05, seed=0, mean_scale=1.5) -> MoLRG:
    g = torch.Generator().manual_seed(seed)
    bases = torch.stack([torch.linalg.qr(torch.randn(d, r, generator=g, dtype=torch.float64))[0] for _ in range(c)])
    w = torch.rand(c, generator=g, dtype=torch.float64) + 0.5
    return MoLRG(w / w.sum(), torch.randn(c, d, generator=g, dtype=torch.float64) * mean_scale, bases,
                 torch.rand(c, r, generator=g, dtype=torch.float64) * 2 + 0.2, floor)


def dense_optimal_eps(m: MoLRG, x_t: np.ndarray, t: int) -> np.ndarray:
    """E[eps | x_t] from full covariances with numpy/scipy: responsibilities from multivariate_normal.logpdf,
    per-component E[eps | x_t, c] = sqrt(s) C_c^{-1} (x_t - sqrt(a) mu_c)."""
    a = float(SCHED.alpha_bar[t]); s = 1 - a
    logits, cond = [], []
    for c in range(m.n_components):
        u, lam, mu = m.bases[c].numpy(), m.variances[c].numpy(), m.means[c].numpy()
        cov = a * (u @ np.diag(lam) @ u.T + m.floor * np.eye(m.d)) + s * np.eye(m.d)
        logits.append(np.log(m.weights[c].item()) + multivariate_normal(np.sqrt(a) * mu, cov).logpdf(x_t))
        cond.append(np.sqrt(s) * np.linalg.solve(cov, (x_t - np.sqrt(a) * mu).T).T)
    logits = np.stack(logits, 1)
    w = np.exp(logits - logits.max(1, keepdims=True)); w /= w.sum(1, keepdims=True)
    return np.einsum("nc,cnd->nd", w, np.stack(cond))


def forward(m: MoLRG, n: int, t: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x0, _ = MoLRG.sample(m, n, g, dtype=torch.float64)    # (GaussianToy.sample returns x_0 alone)
    eps = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    tt = torch.full((n,), t, dtype=torch.long)
    return SCHED.q_sample(x0, tt, eps), eps


@pytest.mark.parametrize("t", [1, 30, 200, 600, 999])
def test_optimal_eps_equals_dense_covariance_computation(t):
    m = small_mixture()
    x_t, _ = forward(m, 200, t)
    np.testing.assert_allclose(m.optimal_eps(x_t, t, SCHED).numpy(), dense_optimal_eps(m, x_t.numpy(), t),
                               rtol=1e-9, atol=1e-11)


def test_log_prob_equals_scipy():
    m = small_mixture(d=5, r=3, c=4)
    x0, _ = m.sample(100, torch.Generator().manual_seed(3), dtype=torch.float64)
    dens = np.zeros(100)
    for c in range(m.n_components):
        u, lam = m.bases[c].numpy(), m.variances[c].numpy()
        cov = u @ np.diag(lam) @ u.T + m.floor * np.eye(m.d)
        dens += m.weights[c].item() * multivariate_normal(m.means[c].numpy(), cov).pdf(x0.numpy())
    np.testing.assert_allclose(m.log_prob(x0).numpy(), np.log(dens), rtol=1e-10)


def test_moments_equal_monte_carlo():
    m = small_mixture()
    x, comp = m.sample(200_000, torch.Generator().manual_seed(5), dtype=torch.float64)
    np.testing.assert_allclose(x.mean(0).numpy(), m.mean().numpy(), atol=0.02)
    np.testing.assert_allclose(np.cov(x.numpy().T), m.covariance().numpy(), atol=0.05)
    np.testing.assert_allclose(torch.bincount(comp, minlength=3).double().numpy() / 200_000, m.weights.numpy(),
                               atol=0.005)


def _orthogonality_z(m: MoLRG, predictor, t: int, n: int = 60_000) -> float:
    """E[(eps - f(x_t)) . h(x_t)] = 0 for every h iff f = E[eps | x_t]. With one test function per component,
    h_c = w_c(x_t) C_c^{-1} (x_t - sqrt(a) mu_c), return the largest |z| of the Monte-Carlo means."""
    x_t, eps = forward(m, n, t, seed=11)
    resid = eps - predictor(x_t)
    a, s = m._ab(t, n, SCHED)
    logits, solves = m._per_component(x_t, a, s, True)
    w = torch.softmax(logits, 1)
    zs = []
    for c in range(m.n_components):
        v = (resid * w[:, c:c + 1] * solves[c]).sum(1)
        zs.append(abs(float(v.mean())) / (float(v.std()) / math.sqrt(n)))
    return max(zs)


class _OneResponsibilityWrong(MoLRG):
    """A broken copy of f*: component 0's responsibility is halved before renormalising."""

    def optimal_eps(self, x_t, t, schedule, chunk=2048):
        xf = x_t.double()
        a, s = self._ab(t, xf.shape[0], schedule)
        logits, solves = self._per_component(xf, a, s, True)
        logits[:, 0] -= math.log(2.0)
        return s.sqrt() * torch.einsum("nc,cnd->nd", torch.softmax(logits, 1), solves)


@pytest.mark.parametrize("mean_scale, t", [(0.6, 100), (1.0, 300)])   # components that overlap at t
def test_monte_carlo_conditional_mean_holds_for_f_star_and_fails_for_a_broken_copy(mean_scale, t):
    m = small_mixture(c=3, floor=0.3, mean_scale=mean_scale)
    broken = _OneResponsibilityWrong(m.weights, m.means, m.bases, m.variances, m.floor)
    assert _orthogonality_z(m, lambda x: m.optimal_eps(x, t, SCHED), t) < 4.0
    assert _orthogonality_z(m, lambda x: broken.optimal_eps(x, t, SCHED), t) > 6.0
    # and the exact f* has the smaller error of the two
    x_t, eps = forward(m, 20_000, t, seed=12)
    err = (eps - m.optimal_eps(x_t, t, SCHED)).pow(2).mean()
    assert err < (eps - broken.optimal_eps(x_t, t, SCHED)).pow(2).mean()


def test_gaussian_toy_is_the_one_component_case():
    toy = GaussianToy.random(5, seed=2)
    assert isinstance(toy, MoLRG) and toy.n_components == 1 and toy.rank == 5 and toy.floor == 0
    x_t, _ = forward(toy, 50, 300)
    np.testing.assert_allclose(toy.optimal_eps(x_t, 300, SCHED).numpy(), dense_optimal_eps(toy, x_t.numpy(), 300),
                               rtol=1e-9, atol=1e-12)
    # the Gaussian-linear denoiser of a data set: the Gaussian of its empirical moments
    data = toy.sample(4000, torch.Generator().manual_seed(0), dtype=torch.float64)
    fitted = MoLRG.of_data(data)
    np.testing.assert_allclose(fitted.covariance().numpy(), np.cov(data.numpy().T), atol=1e-10)


def test_subspace_distance_and_component_of():
    m = small_mixture(floor=1e-4)
    x0, comp = m.sample(500, torch.Generator().manual_seed(9), dtype=torch.float64)
    assert float(m.subspace_distance(x0).mean()) == pytest.approx(1e-4 * (6 - 2) / 6, rel=0.15)
    assert float((m.component_of(x0) == comp).double().mean()) > 0.97
    far = x0 + 3.0
    assert float(m.subspace_distance(far).mean()) > 10 * float(m.subspace_distance(x0).mean())


def test_random_bases_are_orthonormal_zero_mean_equal_weights():
    m = random_bases(rank=4, floor=1e-2, components=3, seed=1)
    assert torch.allclose(m.weights, torch.full((3,), 1 / 3, dtype=torch.float64))
    assert m.means.abs().max() == 0
    assert torch.equal(m.bases, random_bases(4, 1e-2, 3, seed=1).bases)


def test_fit_to_mnist_and_the_data_set(data_root, mnist_splits):
    from diffusion_core.metrics import resolve_cache_dir
    from diffusion_core.molrg import molrg_key

    cfg = DataConfig(dataset="molrg", root=str(data_root), molrg_rank=16)
    m = molrg_of(cfg)
    assert (resolve_cache_dir() / "molrg" / f"{molrg_key(16, 1e-3, 'mnist', 10, 0)}.npz").exists(), "cached"
    assert m.n_components == 10 and m.rank == 16 and m.image_shape == (1, 28, 28)
    train = mnist_splits.train
    freq = torch.bincount(train.labels, minlength=10).double() / len(train)
    assert torch.allclose(m.weights, freq)
    x3 = train.batch(train.labels == 3, dtype=torch.float64).flatten(1)
    assert torch.allclose(m.means[3], x3.mean(0))
    explained = m.variances.sum(1) / torch.stack([train.batch(train.labels == c, dtype=torch.float64).flatten(1)
                                                  .var(0).sum() for c in range(10)])
    assert 0.55 < float(explained.min()) and float(explained.max()) < 0.85   # r = 16: 60-82% per digit
    splits = load_splits(DataConfig(dataset="molrg", root=str(data_root), subset_size=64, subset_index=1))
    again = load_splits(DataConfig(dataset="molrg", root=str(data_root), subset_size=64, subset_index=1))
    assert splits.train.images.dtype == torch.float32 and len(splits.train) == 64 and len(splits.val) == 12_000
    assert torch.equal(splits.train.images, again.train.images)       # deterministic from its seed
    assert torch.equal(splits.train.batch(), splits.train.images)      # float draws: not rescaled
    outside = ((splits.val.images < -1) | (splits.val.images > 1)).double().mean()
    assert 0.2 < float(outside) < 0.5                                  # unbounded: never clip x0 on molrg


@pytest.mark.parametrize("kw, field", [({"dataset": "mnist", "molrg_rank": 8}, "molrg_rank"),
                                       ({"dataset": "molrg", "molrg_rank": 0}, "molrg_rank"),
                                       ({"dataset": "molrg", "molrg_floor": 0.0}, "molrg_floor"),
                                       ({"dataset": "molrg", "molrg_basis": "pca"}, "molrg_basis"),
                                       ({"dataset": "molrg", "molrg_components": 11}, "molrg_components"),
                                       ({"dataset": "molrg", "image_size": 32}, "image_size")])
def test_bad_molrg_values_are_refused_naming_the_field(kw, field):
    with pytest.raises(ValueError, match=rf"DataConfig\.{field}=.*allowed"):
        DataConfig(**kw)
