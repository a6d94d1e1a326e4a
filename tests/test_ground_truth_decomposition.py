"""The full decomposition where f* is exact: noise, bias^2, variance and the cross term.

Known answers on the Gaussian toy (f* = E[eps | x_t] in closed form): the identity
residual = noise + bias2 + variance + cross holds to round-off for every point; K copies
of f* have bias^2 = variance = 0; f = c f* has bias^2 = (1 - c)^2 (1 - a) tr(C^-1) / d;
the cross term averages to 0 within its interval; a wrong f* is caught."""
from __future__ import annotations

import pytest
import torch

from diffusion_core import GaussianToy, NoiseSchedule
from diffusion_core.estimators.decomposition import ensemble_terms, summarize, two_level_terms


@pytest.fixture(scope="module")
def toy():
    schedule = NoiseSchedule.make("linear", 1000)
    toy = GaussianToy.random(6, seed=5)
    g = torch.Generator().manual_seed(1)
    x0 = toy.sample(4_000, g, dtype=torch.float64)
    eps = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    return schedule, toy, x0, eps


def _at(toy_fixture, t):
    schedule, toy, x0, eps = toy_fixture
    tt = torch.full((len(x0),), t)
    x_t = schedule.q_sample(x0, tt, eps)
    return x_t, eps, toy.optimal_eps(x_t, tt, schedule)


def _known_bias2(schedule, toy, t, c):
    a = float(schedule.alpha_bar[t])
    cmat = a * toy.cov + (1 - a) * torch.eye(toy.d, dtype=torch.float64)
    return (1 - c) ** 2 * (1 - a) * float(torch.linalg.inv(cmat).trace()) / toy.d


def test_identity_is_exact_per_point_one_and_two_levels():
    """Arbitrary predictions and an arbitrary 'f*': the identity is algebra, so it holds to 1e-9 on
    every point (float32 inputs too: the estimators work in float64)."""
    g = torch.Generator().manual_seed(2)
    eps = torch.randn(300, 1, 8, 8, generator=g)
    optimal = 0.7 * eps + 0.3 * torch.randn(eps.shape, generator=g)
    one = ensemble_terms(eps, eps[None] + torch.randn(4, *eps.shape, generator=g) + 0.2, optimal)
    two = two_level_terms(eps, eps[None, None] + torch.randn(3, 2, *eps.shape, generator=g) - 0.1, optimal)
    for terms in (one, two):
        assert float(terms.identity_gap().abs().max()) < 1e-9
        assert torch.allclose(terms.bias2_plus_noise, terms.noise + terms.bias2 + terms.cross, atol=1e-9, rtol=0)
        assert terms.noise.dtype == torch.float64 and terms.noise.shape == (300,)
    assert torch.allclose(two.variance, two.variance_data + two.variance_opt, atol=1e-12, rtol=0)


def test_without_the_optimal_denoiser_nothing_is_split():
    eps = torch.randn(10, 4)
    terms = ensemble_terms(eps, eps[None].repeat(2, 1, 1))
    assert terms.noise is None and terms.bias2 is None and terms.cross is None and terms.identity_gap() is None
    assert "bias2" not in summarize(lambda p: ensemble_terms(eps, p), eps[None].repeat(3, 1, 1), n_boot=10)


def test_optimal_of_the_wrong_shape_is_refused():
    eps = torch.randn(10, 4)
    with pytest.raises(ValueError, match="optimal"):
        ensemble_terms(eps, eps[None].repeat(2, 1, 1), eps[:5])


@pytest.mark.parametrize("t", [1, 100, 500])
def test_copies_of_the_optimal_denoiser_have_zero_bias2_and_variance(toy, t):
    schedule, gauss, _, _ = toy
    x_t, eps, opt = _at(toy, t)
    exact = ensemble_terms(eps, opt[None].expand(3, *opt.shape), opt)
    assert float(exact.bias2.abs().max()) < 1e-15 and float(exact.variance.abs().max()) < 1e-15   # round-off
    assert float(exact.noise.mean()) == pytest.approx(float(gauss.noise_floor(t, schedule)), rel=0.05)
    # copies plus independent zero-mean errors: bias^2 ~ 0, variance ~ sigma^2, both within their intervals
    sigma = 0.2
    noisy = opt[None] + sigma * torch.randn(4, *opt.shape, generator=torch.Generator().manual_seed(t),
                                            dtype=torch.float64)
    est = summarize(lambda p: ensemble_terms(eps, p, opt), noisy, n_boot=400)
    assert est["bias2_lo"] < 0.0 < est["bias2_hi"]
    assert est["variance_lo"] < sigma ** 2 < est["variance_hi"]
    assert est["cross_lo"] < 0.0 < est["cross_hi"]


def test_two_level_copies_of_the_optimal_denoiser_have_zero_bias2(toy):
    _, _, _, _ = toy
    x_t, eps, opt = _at(toy, 200)
    g = torch.Generator().manual_seed(9)
    preds = opt[None, None] + 0.2 * torch.randn(3, 1, *opt.shape, generator=g, dtype=torch.float64) \
        + 0.3 * torch.randn(3, 2, *opt.shape, generator=g, dtype=torch.float64)
    est = summarize(lambda p: two_level_terms(eps, p, opt), preds, n_boot=400)
    assert est["bias2_lo"] < 0.0 < est["bias2_hi"]
    assert est["variance_opt_lo"] < 0.09 < est["variance_opt_hi"]
    assert est["residual"] == pytest.approx(est["noise"] + est["bias2"] + est["variance"] + est["cross"],
                                            abs=1e-12)


@pytest.mark.parametrize("t", [50, 300])
def test_shrunk_optimal_denoiser_has_its_known_bias2(toy, t):
    """f = c f* from K = 2 identical models: bias^2 = (1 - c)^2 (1 - a) tr(C^-1) / d, variance 0; the
    interval (points only, at K = 2) covers the known value and excludes 0; the cross term covers 0."""
    schedule, gauss, _, _ = toy
    x_t, eps, opt = _at(toy, t)
    c = 0.4
    known = _known_bias2(schedule, gauss, t, c)
    est = summarize(lambda p: ensemble_terms(eps, p, opt), (c * opt)[None].expand(2, *opt.shape), n_boot=1000)
    assert est["interval"] == "points"
    assert est["bias2_lo"] < known < est["bias2_hi"] and est["bias2_lo"] > 0
    assert est["variance"] == 0.0
    assert est["cross_lo"] < 0.0 < est["cross_hi"]


def test_cross_term_averages_to_zero_over_many_draws(toy):
    """E[cross] = 0 because E[eps - f* | x_t] = 0: over 4,000 points its interval covers 0, while a
    model that sees eps itself (not a function of x_t) gets a cross term far from 0."""
    x_t, eps, opt = _at(toy, 100)
    fair = torch.stack([0.5 * opt, 0.8 * opt + 0.1 * x_t])
    est = summarize(lambda p: ensemble_terms(eps, p, opt), fair, n_boot=1000)
    assert est["cross_lo"] < 0.0 < est["cross_hi"]
    cheat = torch.stack([0.5 * opt + 0.5 * eps, opt + 0.3 * eps])
    est = summarize(lambda p: ensemble_terms(eps, p, opt), cheat, n_boot=1000)
    assert est["cross_hi"] < 0.0


def test_a_wrong_optimal_denoiser_is_caught(toy):
    """Copies of the true f* scored against a broken f* (the mean shifted by 0.3 in one coordinate):
    bias^2 is then clearly > 0 and the identity still holds -- the split is only as good as f*."""
    schedule, gauss, x0, eps = toy
    broken = GaussianToy(gauss.mean + torch.nn.functional.one_hot(torch.tensor(0), gauss.d) * 0.3, gauss.cov)
    x_t, eps, opt = _at(toy, 100)
    wrong = broken.optimal_eps(x_t, torch.full((len(x_t),), 100), schedule)
    est = summarize(lambda p: ensemble_terms(eps, p, wrong), opt[None].expand(3, *opt.shape), n_boot=400)
    assert est["bias2_lo"] > 0
    right = summarize(lambda p: ensemble_terms(eps, p, opt), opt[None].expand(3, *opt.shape), n_boot=400)
    assert abs(right["bias2"]) < 1e-15
