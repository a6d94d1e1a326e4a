"""The bias^2 / variance / noise decomposition: exact identity, and the Gaussian case where
the optimal denoiser (hence the noise floor) is known in closed form."""
from __future__ import annotations

import pytest
import torch

from diffusion_core import GaussianToy, NoiseSchedule
from diffusion_core.decomposition import empirical_noise_floor, empirical_optimal_eps, ensemble_terms


@pytest.fixture(scope="module")
def toy_setup():
    schedule = NoiseSchedule.make("linear", 1000)
    toy = GaussianToy.random(3, seed=3)
    g = torch.Generator().manual_seed(0)
    train = toy.sample(20_000, g, dtype=torch.float64)
    x0 = toy.sample(4_000, g, dtype=torch.float64)
    eps = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    return schedule, toy, train, x0, eps


def test_identity_residual_equals_bias2_noise_plus_variance_exactly():
    g = torch.Generator().manual_seed(1)
    eps = torch.randn(64, 1, 28, 28, generator=g)
    preds = eps[None] + 0.3 * torch.randn(5, 64, 1, 28, 28, generator=g) + 0.1  # K = 5 biased, noisy models
    terms = ensemble_terms(eps, preds)
    assert torch.allclose(terms.residual, terms.bias2_plus_noise + terms.variance, atol=1e-6, rtol=0)
    # and the parts are what they should be: variance ~ 0.09 (K-1)/K, bias^2 ~ 0.01 + 0.09/K
    assert terms.variance.mean().item() == pytest.approx(0.09 * 4 / 5, rel=0.03)
    assert terms.bias2_plus_noise.mean().item() == pytest.approx(0.01 + 0.09 / 5, rel=0.05)


def test_identity_rejects_a_single_model():
    with pytest.raises(ValueError, match="K >= 2"):
        ensemble_terms(torch.zeros(3, 2), torch.zeros(1, 3, 2))


@pytest.mark.parametrize("t", [50, 200, 600, 1000])
def test_empirical_noise_floor_equals_closed_form_on_gaussian(toy_setup, t):
    """With 20,000 training points in 3-d the empirical optimal denoiser is the Gaussian one,
    so its error must match floor(t) = (1/d) sum a l / (a l + 1 - a). Tolerance: 5 standard
    errors of the 4,000-point mean, plus 1.5% for the finite training set's kernel smoothing."""
    schedule, toy, train, x0, eps = toy_setup
    per_point = empirical_noise_floor(x0, eps, t, schedule, train, chunk=5_000)
    closed = float(toy.noise_floor(t, schedule))
    se = float(per_point.std()) / len(per_point) ** 0.5
    assert abs(float(per_point.mean()) - closed) < 5 * se + 0.015 * closed


def test_empirical_denoiser_is_chunk_invariant(toy_setup):
    schedule, toy, train, x0, eps = toy_setup
    tt = torch.full((256,), 300)
    x_t = schedule.q_sample(x0[:256], tt, eps[:256])
    a = empirical_optimal_eps(x_t, 300, schedule, train, chunk=20_000)
    b = empirical_optimal_eps(x_t, 300, schedule, train, chunk=777)
    assert torch.allclose(a, b, atol=1e-10)


def test_bias2_is_zero_for_an_ensemble_around_the_optimal_predictor(toy_setup):
    """K models = the optimal predictor + independent zero-mean errors: bias^2 = (bias^2 + noise) - floor
    must vanish up to the ensemble-mean error sigma^2/K, never be clearly negative, and the
    variance must be sigma^2 (K-1)/K."""
    schedule, toy, train, x0, eps = toy_setup
    t, sigma, K = 200, 0.1, 8
    tt = torch.full((len(x0),), t)
    opt = toy.optimal_eps(schedule.q_sample(x0, tt, eps), tt, schedule)
    g = torch.Generator().manual_seed(5)
    preds = opt[None] + sigma * torch.randn(K, *opt.shape, generator=g, dtype=torch.float64)
    terms = ensemble_terms(eps, preds)
    floor = float(toy.noise_floor(t, schedule))
    se = float(terms.bias2_plus_noise.std()) / len(x0) ** 0.5
    bias2 = float(terms.bias2_plus_noise.mean()) - floor
    assert bias2 > -5 * se
    assert bias2 == pytest.approx(sigma ** 2 / K, abs=5 * se)
    assert float(terms.variance.mean()) == pytest.approx(sigma ** 2 * (K - 1) / K, rel=0.03)
