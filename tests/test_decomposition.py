"""The bias-variance decomposition: exact identities, unbiasedness by simulation, and the
Gaussian case where the optimal denoiser (hence noise and bias^2) is known in closed form."""
from __future__ import annotations

import pytest
import torch

from diffusion_core import GaussianToy, NoiseSchedule
from diffusion_core.estimators.decomposition import (empirical_noise_floor, empirical_optimal_eps, ensemble_terms,
                                          memorization_terms, summarize, two_level_terms)
from diffusion_core.estimators.intervals import bootstrap_se, jackknife_se


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
    # and the parts are what they estimate: variance 0.09 (unbiased), bias^2 + noise = 0.1^2 (here noise = 0)
    assert terms.variance.mean().item() == pytest.approx(0.09, rel=0.03)
    assert terms.bias2_plus_noise.mean().item() == pytest.approx(0.01, abs=0.002)


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


# ----------------------------------------------------------------------------------------------
# Known answers on the Gaussian toy, where f* = E[eps | x_t] and the noise are exact.
def _toy_eps_and_optimal(toy_setup, t):
    schedule, toy, _, x0, eps = toy_setup
    tt = torch.full((len(x0),), t)
    return schedule, toy, eps, toy.optimal_eps(schedule.q_sample(x0, tt, eps), tt, schedule)


@pytest.mark.parametrize("t", [1, 100, 300])
@pytest.mark.parametrize("k", [2, 3])
def test_copies_of_the_optimal_denoiser_have_zero_bias2(toy_setup, t, k):
    """K exact copies of f* (the issue's case: the old estimator reported 0.987 at t = 1), and K
    copies of f* + independent zero-mean errors: bias^2 = (bias^2 + noise) - exact noise ~ 0
    within 5 standard errors; the old ||eps - f^||^2 carried + sigma^2 / K on top."""
    schedule, toy, eps, opt = _toy_eps_and_optimal(toy_setup, t)
    noise = float(toy.noise_floor(t, schedule))
    sigma = 0.3
    noisy = opt[None] + sigma * torch.randn(k, *opt.shape, generator=torch.Generator().manual_seed(t + k),
                                            dtype=torch.float64)
    for preds in (opt[None].expand(k, *opt.shape), noisy):
        terms = ensemble_terms(eps, preds)
        se = float(terms.bias2_plus_noise.std()) / len(eps) ** 0.5
        assert float(terms.bias2_plus_noise.mean()) - noise == pytest.approx(0.0, abs=5 * se)
    # Paired with each point's own ||eps - f*||^2 (mean: the noise) the Monte-Carlo error is small
    # enough to tell 0 from the old estimator's sigma^2 / K.
    own = (eps - opt).pow(2).mean(1)
    paired = ensemble_terms(eps, noisy).bias2_plus_noise - own
    old = (eps - noisy.mean(0)).pow(2).mean(1) - own
    se = float(paired.std()) / len(eps) ** 0.5
    assert float(paired.mean()) == pytest.approx(0.0, abs=5 * se)
    assert float(old.mean()) == pytest.approx(sigma ** 2 / k, abs=5 * se) and sigma ** 2 / k > 8 * se


@pytest.mark.parametrize("t", [50, 300])
def test_shrunk_optimal_denoiser_has_its_known_bias2(toy_setup, t):
    """f = c f*: bias^2 = (1 - c)^2 (1 - a) tr(C^-1) / d with C = a S + (1 - a) I, variance 0."""
    schedule, toy, eps, opt = _toy_eps_and_optimal(toy_setup, t)
    c, a = 0.3, float(schedule.alpha_bar[t])
    cmat = a * toy.cov + (1 - a) * torch.eye(toy.d, dtype=torch.float64)
    known = (1 - c) ** 2 * (1 - a) * float(torch.linalg.inv(cmat).trace()) / toy.d
    terms = ensemble_terms(eps, (c * opt)[None].expand(2, *opt.shape))
    bias2 = terms.bias2_plus_noise - (eps - opt).pow(2).mean(1)    # per point; its mean estimates bias^2
    se = float(bias2.std()) / len(eps) ** 0.5
    assert float(bias2.mean()) == pytest.approx(known, abs=5 * se) and known > 10 * se
    assert float(terms.variance.abs().max()) == 0.0


# ----------------------------------------------------------------------------------------------
# Unbiasedness by simulation: many independent ensembles around a fixed mean predictor.
def _simulated_variance(k: int, reps: int = 4000, n: int = 8, d: int = 16):
    """(new, old) variance estimates of `reps` independent ensembles of K models f_k = m + sigma z_k
    (sigma differing per dimension; the true variance is mean(sigma^2)). The ensembles are batched
    as reps x n points: every estimator is per point."""
    g = torch.Generator().manual_seed(10 + k)
    sigma = torch.linspace(0.2, 1.0, d, dtype=torch.float64)
    eps = torch.randn(n, d, generator=g, dtype=torch.float64).repeat(reps, 1)
    preds = 0.5 * eps[None] + sigma * torch.randn(k, reps * n, d, generator=g, dtype=torch.float64)
    new = ensemble_terms(eps, preds).variance.reshape(reps, n).mean(1)
    old = (preds - preds.mean(0)).pow(2).mean((0, 2)).reshape(reps, n).mean(1)   # the former /K estimator
    return new, old, float(sigma.pow(2).mean())


@pytest.mark.parametrize("k", [2, 3])
def test_variance_estimator_is_unbiased_and_the_old_one_is_not(k):
    new, old, truth = _simulated_variance(k)
    se = float(new.std()) / len(new) ** 0.5
    assert float(new.mean()) == pytest.approx(truth, abs=5 * se)
    assert abs(float(old.mean()) - truth) > 5 * se                   # (K-1)/K of the truth
    assert float(old.mean()) == pytest.approx(truth * (k - 1) / k, abs=5 * se)


def test_two_level_estimators_are_unbiased_and_the_identity_exact():
    """f_js = m + sqrt(V_data) u_j + sqrt(V_opt) z_js, J = 3 subsets x S = 2 seeds: E V^_data = V_data,
    E V^_opt = V_opt, E BN^ = ||eps - m||^2; the identity holds for every draw; V^_data is not clipped."""
    j, s, n, d, reps = 3, 2, 6, 8, 3000
    v_data, v_opt = 0.04, 0.25
    g = torch.Generator().manual_seed(7)
    eps = torch.randn(n, d, generator=g, dtype=torch.float64).repeat(reps, 1)   # reps ensembles x n points
    m = 0.8 * eps + 0.1
    u = torch.randn(j, 1, reps * n, d, generator=g, dtype=torch.float64)
    z = torch.randn(j, s, reps * n, d, generator=g, dtype=torch.float64)
    tl = two_level_terms(eps, m + v_data ** 0.5 * u + v_opt ** 0.5 * z)
    assert torch.allclose(tl.residual, tl.bias2_plus_noise + tl.variance_data + tl.variance_opt, atol=1e-12, rtol=0)
    draws = torch.stack([tl.variance_data, tl.variance_opt, tl.bias2_plus_noise], 1).reshape(reps, n, 3).mean(1)
    se = draws.std(0) / reps ** 0.5
    truth = torch.tensor([v_data, v_opt, float((eps[:n] - m[:n]).pow(2).mean())], dtype=torch.float64)
    assert ((draws.mean(0) - truth).abs() < 5 * se).all(), (draws.mean(0), truth, se)
    assert float(draws[:, 0].min()) < 0           # V^_data can be negative and is reported as such


def test_summarize_gives_intervals_from_points_and_models():
    g = torch.Generator().manual_seed(3)
    eps = torch.randn(200, 10, generator=g, dtype=torch.float64)
    preds = eps[None] + 0.5 * torch.randn(4, 200, 10, generator=g, dtype=torch.float64)
    out = summarize(lambda p: ensemble_terms(eps, p), preds, n_boot=300)
    assert out["interval"] == "points+models"
    for name in ("residual", "bias2_plus_noise", "variance"):
        assert out[f"{name}_lo"] < out[name] < out[f"{name}_hi"]
    assert out["residual"] == pytest.approx(out["bias2_plus_noise"] + out["variance"], abs=1e-12)
    assert out["variance_lo"] < 0.25 < out["variance_hi"]
    # half-width = 1.96 sqrt(se_points^2 + se_models^2), recomputed from its two parts
    se_pts = float(bootstrap_se(ensemble_terms(eps, preds).variance[None], 300)[0])
    loo = torch.stack([ensemble_terms(eps, preds[[i for i in range(4) if i != k]]).variance.mean() for k in range(4)])
    se_jack = float(jackknife_se(loo))
    assert se_jack > se_pts / 3
    half = 1.959964 * (se_pts ** 2 + se_jack ** 2) ** 0.5
    assert (out["variance_hi"] - out["variance_lo"]) / 2 == pytest.approx(half, rel=1e-6)
    # K = 2: a leave-one-out set has no variance, so the interval covers the points only
    assert summarize(lambda p: ensemble_terms(eps, p), preds[:2], n_boot=100)["interval"] == "points"


def test_jackknife_and_bootstrap_standard_errors_match_their_closed_forms():
    x = torch.randn(1, 400, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert float(bootstrap_se(x, 4000)[0]) == pytest.approx(float(x.std()) / 20, rel=0.05)
    # jackknife of a mean: the leave-one-out means give exactly std / sqrt(K)
    k = x.shape[1]
    loo = (x.sum() - x) / (k - 1)
    assert float(jackknife_se(loo)[0]) == pytest.approx(float(x.std()) / k ** 0.5, rel=1e-9)


# ----------------------------------------------------------------------------------------------
def test_distance_to_memorization_against_the_exact_empirical_denoiser():
    """On training points of a finite set D: f*_D itself is at distance 0 and its training loss is
    the minimum; f*_D + delta_k is at distance mean_k ||delta_k||^2 = ensemble part + variance."""
    schedule = NoiseSchedule.make("linear", 1000)
    g = torch.Generator().manual_seed(4)
    train = torch.randn(40, 5, generator=g, dtype=torch.float64)
    x0, eps, t = train[:32], torch.randn(32, 5, generator=g, dtype=torch.float64), 200
    x_t = schedule.q_sample(x0, torch.full((32,), t), eps)
    opt = empirical_optimal_eps(x_t, t, schedule, train)
    exact = memorization_terms(eps, opt[None].expand(2, *opt.shape), opt)
    assert float(exact.distance_to_memorization.abs().max()) == 0.0
    assert torch.equal(exact.train_residual, exact.min_train_loss)
    delta = 0.2 * torch.randn(3, *opt.shape, generator=g, dtype=torch.float64)
    m = memorization_terms(eps, opt[None] + delta, opt)
    assert torch.allclose(m.distance_to_memorization, delta.pow(2).mean((0, 2)), atol=1e-12)
    assert torch.allclose(m.distance_to_memorization, m.ensemble_distance_to_memorization + m.variance,
                          atol=1e-12)
    single = memorization_terms(eps, (opt + delta[0])[None], opt)
    assert torch.isnan(single.variance).all() and torch.equal(single.ensemble_distance_to_memorization,
                                                              single.distance_to_memorization)
