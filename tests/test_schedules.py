"""Noise schedules and the closed-form Gaussian maths of the forward process / posterior.

Every expected value here is computed independently in float64 with numpy/math from the
definitions (thesis eqs. 20, 30, 31, 38, 70, 99; Nichol & Dhariwal 2021 for cosine), not
by calling diffusion_core's own formulas, and a few are hard-coded, as diffusers pins its
scheduler tests.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from diffusion_core import SCHEDULES, DDPMSampler, NoiseSchedule, ScheduleConfig, make_betas


def np_linear_betas(T, b0=1e-4, b1=0.02):
    return np.array([b0 + (b1 - b0) * i / (T - 1) for i in range(T)], dtype=np.float64)


def np_alpha_bar(betas):
    """alpha_bar_t = prod_{i<=t} (1 - beta_i), with a plain Python loop (no cumprod)."""
    out, acc = [1.0], 1.0
    for b in betas:
        acc *= 1.0 - float(b)
        out.append(acc)
    return np.array(out)  # index 0 = clean data


# ------------------------------------------------------------------------------- tables
@pytest.mark.parametrize("name", SCHEDULES)
@pytest.mark.parametrize("T", [2, 10, 1000, 4000])
def test_alpha_bar_is_cumulative_product(name, T):
    s = NoiseSchedule.make(name, T)
    betas = s.betas[1:].numpy()
    assert s.T == T and len(s.betas) == T + 1 and len(s.alpha_bar) == T + 1
    assert s.betas[0] == 0 and s.alpha_bar[0] == 1
    np.testing.assert_allclose(s.alphas.numpy(), 1 - s.betas.numpy(), rtol=0, atol=0)
    np.testing.assert_allclose(s.alpha_bar.numpy(), np_alpha_bar(betas), rtol=1e-12, atol=1e-300)
    np.testing.assert_allclose(s.alpha_bar_prev[1:].numpy(), s.alpha_bar[:-1].numpy(), rtol=0)
    assert s.alpha_bar.dtype == torch.float64


@pytest.mark.parametrize("T", [2, 10, 1000, 4000])
def test_linear_schedule_endpoints_and_spacing(T):
    b = make_betas("linear", T).numpy()
    assert b.dtype == np.float64 and b.shape == (T,)
    assert b[0] == pytest.approx(1e-4, rel=1e-12)
    assert b[-1] == pytest.approx(0.02, rel=1e-12)
    np.testing.assert_allclose(b, np_linear_betas(T), rtol=1e-12)
    np.testing.assert_allclose(np.diff(b), (0.02 - 1e-4) / (T - 1), rtol=1e-8)


def test_linear_T1000_alpha_bar_known_values():
    """Pinned values for the thesis schedule (linear 1e-4..0.02, T = 1000)."""
    s = NoiseSchedule.make("linear", 1000)
    ref = np_alpha_bar(np_linear_betas(1000))
    for t in (1, 2, 10, 100, 500, 1000):
        assert float(s.alpha_bar[t]) == pytest.approx(ref[t], rel=1e-12)
    # hard-coded, ~7 significant digits
    assert float(s.alpha_bar[1]) == pytest.approx(0.9999, rel=1e-12)
    assert float(s.alpha_bar[2]) == pytest.approx(0.9997800921, rel=1e-9)
    assert float(s.alpha_bar[100]) == pytest.approx(0.8970181457, rel=1e-8)
    assert float(s.alpha_bar[500]) == pytest.approx(0.07858724288, rel=1e-8)
    assert float(s.alpha_bar[1000]) == pytest.approx(4.035829765e-05, rel=1e-8)
    # what those numbers mean: x_1000 carries sqrt(4e-5) ~ 0.6% of the signal
    assert math.sqrt(float(s.alpha_bar[1000])) < 0.0065


@pytest.mark.parametrize("T", [10, 1000, 4000])
def test_cosine_schedule_closed_form_and_clip(T):
    s_ = 0.008
    f = lambda t: math.cos((t / T + s_) / (1 + s_) * math.pi / 2) ** 2  # noqa: E731
    ab_closed = np.array([f(t) / f(0) for t in range(T + 1)])
    raw_betas = 1 - ab_closed[1:] / ab_closed[:-1]
    clipped = raw_betas > 0.999
    sched = NoiseSchedule.make("cosine", T)
    b = sched.betas[1:].numpy()
    assert b.max() <= 0.999 and b.min() > 0
    np.testing.assert_allclose(b, np.minimum(raw_betas, 0.999), rtol=1e-9)
    # the last beta is the one the clip acts on (alpha_bar_T of the closed form is ~1e-33)
    assert clipped[-1] and b[-1] == pytest.approx(0.999, abs=1e-15)
    assert clipped.sum() == 1
    # wherever no clip has acted yet, alpha_bar follows cos^2 exactly
    upto = np.argmax(clipped)  # first clipped index (0-based beta index -> t = upto + 1)
    np.testing.assert_allclose(sched.alpha_bar[: upto + 1].numpy(), ab_closed[: upto + 1], rtol=1e-9)
    # after the clip: alpha_bar_T = alpha_bar_{T-1} * (1 - 0.999)
    assert float(sched.alpha_bar[T]) == pytest.approx(ab_closed[T - 1] * 1e-3, rel=1e-9)
    if T == 1000:
        assert float(sched.alpha_bar[1]) == pytest.approx(0.9999587158, rel=1e-8)
        assert float(sched.alpha_bar[500]) == pytest.approx(0.4938435904, rel=1e-8)


@pytest.mark.parametrize("name", ["quadratic", "sigmoid"])
@pytest.mark.parametrize("T", [2, 10, 1000, 4000])
def test_quadratic_sigmoid_monotone_and_in_range(name, T):
    b = make_betas(name, T).numpy()
    assert b.shape == (T,)
    assert np.all(b > 0) and np.all(b < 1)
    assert np.all(np.diff(b) > 0)
    assert np.all(b >= 1e-4 - 1e-15) and np.all(b <= 0.02 + 1e-15)
    if name == "quadratic":  # sqrt(beta) evenly spaced, endpoints exact
        assert b[0] == pytest.approx(1e-4) and b[-1] == pytest.approx(0.02)
        np.testing.assert_allclose(np.diff(np.sqrt(b)), (math.sqrt(0.02) - 0.01) / (T - 1), rtol=1e-6)
    else:
        x = np.linspace(-6, 6, T)
        np.testing.assert_allclose(b, 1e-4 + (0.02 - 1e-4) / (1 + np.exp(-x)), rtol=1e-12)
    ab = NoiseSchedule.make(name, T).alpha_bar.numpy()
    assert np.all(np.diff(ab) < 0) and 0 < ab[-1] < 1


# ------------------------------------------------------------------------- bad input
def test_unknown_schedule_name_message():
    with pytest.raises(ValueError) as e:
        make_betas("exponential", 1000)
    msg = str(e.value)
    assert "'exponential'" in msg
    for allowed in SCHEDULES:
        assert allowed in msg
    with pytest.raises(ValueError, match="exponential"):
        NoiseSchedule.from_config(ScheduleConfig(name="exponential"))


@pytest.mark.parametrize("T", [1, 0, -5])
def test_T_below_two_message(T):
    with pytest.raises(ValueError) as e:
        NoiseSchedule.make("linear", T)
    msg = str(e.value)
    assert f"got {T}" in msg and ">= 2" in msg


def test_timesteps_out_of_range_message():
    s = NoiseSchedule.make("linear", 10)
    with pytest.raises(ValueError, match=r"1\.\.10.*0\.\.11"):
        s.check_t(torch.tensor([0, 5, 11]))


def test_sample_timesteps_cover_1_to_T():
    s = NoiseSchedule.make("linear", 10)
    t = s.sample_timesteps(20_000, generator=torch.Generator().manual_seed(0))
    assert int(t.min()) == 1 and int(t.max()) == 10
    counts = torch.bincount(t, minlength=11)[1:].double()
    # uniform: each count ~ Binomial(20000, 0.1), sd = 42.4; 5 sd
    assert (counts - 2000).abs().max() < 5 * math.sqrt(20_000 * 0.1 * 0.9)


# ------------------------------------------------------------------------- q_sample
def test_q_sample_mean_and_variance_empirical():
    """x_t | x_0 ~ N(sqrt(abar_t) x_0, (1 - abar_t) I): check with n draws, tolerance 5 standard errors."""
    s = NoiseSchedule.make("linear", 1000)
    ref = np_alpha_bar(np_linear_betas(1000))
    g = torch.Generator().manual_seed(0)
    n = 200_000
    x0 = torch.tensor([0.7, -1.0, 0.0], dtype=torch.float64)
    for t in (1, 50, 500, 1000):
        eps = torch.randn(n, 3, generator=g, dtype=torch.float64)
        xt = s.q_sample(x0.expand(n, 3), torch.full((n,), t), eps)
        var = 1 - ref[t]
        mean_se = math.sqrt(var / n)
        var_se = var * math.sqrt(2 / (n - 1))
        np.testing.assert_allclose(xt.mean(0).numpy(), math.sqrt(ref[t]) * x0.numpy(), atol=5 * mean_se)
        np.testing.assert_allclose(xt.var(0).numpy(), var, atol=5 * var_se)
    # exact algebra with a fixed eps, float32 input keeps float32
    eps = torch.randn(4, 3, generator=g)
    t = torch.tensor([1, 10, 500, 1000])
    xt = s.q_sample(x0.float().expand(4, 3), t, eps)
    assert xt.dtype == torch.float32
    expect = np.sqrt(ref[t.numpy()])[:, None] * x0.numpy() + np.sqrt(1 - ref[t.numpy()])[:, None] * eps.numpy()
    np.testing.assert_allclose(xt.numpy(), expect, rtol=1e-5, atol=1e-6)
    # predict_x0 inverts q_sample
    np.testing.assert_allclose(s.predict_x0(xt.double(), t, eps.double()).numpy(),
                               x0.expand(4, 3).numpy(), atol=1e-4)


# ------------------------------------------------------------------------- posterior
def bayes_posterior(x0, xt, t, ab, betas):
    """q(x_{t-1} | x_t, x_0) by the product of two Gaussians in x_{t-1} (thesis eq. 38).

    prior  q(x_{t-1} | x_0)     = N(sqrt(abar_{t-1}) x_0, 1 - abar_{t-1})
    lik.   q(x_t | x_{t-1})     = N(x_t; sqrt(alpha_t) x_{t-1}, beta_t)
                                = N(x_{t-1}; x_t / sqrt(alpha_t), beta_t / alpha_t)  (up to a constant)
    N(m1, s1) N(m2, s2) ~ N((m1 s2 + m2 s1) / (s1 + s2), s1 s2 / (s1 + s2))
    """
    alpha = 1.0 - betas[t - 1]
    m1, s1 = math.sqrt(ab[t - 1]) * x0, 1.0 - ab[t - 1]
    m2, s2 = xt / math.sqrt(alpha), betas[t - 1] / alpha
    if s1 == 0.0:  # t = 1: x_0 is known exactly
        return x0, 0.0
    return (m1 * s2 + m2 * s1) / (s1 + s2), s1 * s2 / (s1 + s2)


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_posterior_matches_bayes_rule(name):
    T = 1000
    s = NoiseSchedule.make(name, T)
    betas = s.betas[1:].numpy().copy()  # the schedule's betas are tested above; the maths below is ours
    ab = np_alpha_bar(betas)
    rng = np.random.default_rng(0)
    x0 = rng.standard_normal(5)
    xt = rng.standard_normal(5)
    for t in (1, 2, 3, 10, 100, 500, 999, 1000):
        m, v = bayes_posterior(x0, xt, t, ab, betas)
        got_m = s.posterior_mean(torch.from_numpy(x0)[None], torch.from_numpy(xt)[None], torch.tensor([t]))[0]
        np.testing.assert_allclose(got_m.numpy(), m, rtol=1e-9, atol=1e-12)
        assert float(s.posterior_variance(t)) == pytest.approx(v, rel=1e-9, abs=1e-15)
        assert float(s.reverse_variance(t, "beta_tilde")) == pytest.approx(v, rel=1e-9, abs=1e-15)
        assert float(s.reverse_variance(t, "beta")) == betas[t - 1]
    with pytest.raises(ValueError, match="'sigma'.*beta, beta_tilde"):
        s.reverse_variance(5, "sigma")


def test_posterior_mean_not_eq45_misprint():
    """eq. (45) prints 1 - abar_{t-1} in the denominator; eq. (39) has 1 - abar_t."""
    s = NoiseSchedule.make("linear", 1000)
    betas = s.betas[1:].numpy().copy()
    ab = np_alpha_bar(betas)
    x0, xt = np.array([0.3, -0.8]), np.array([1.1, 0.4])
    for t in (2, 10, 100, 500):
        a, abm = 1 - betas[t - 1], ab[t - 1]
        misprint = (math.sqrt(a) * (1 - abm) * xt + math.sqrt(abm) * (1 - a) * x0) / (1 - abm)
        got = s.posterior_mean(torch.from_numpy(x0)[None], torch.from_numpy(xt)[None], torch.tensor([t]))[0].numpy()
        correct, _ = bayes_posterior(x0, xt, t, ab, betas)
        np.testing.assert_allclose(got, correct, rtol=1e-9)
        # the two denominators differ by beta_t-ish amounts: relative 2x at t = 2, ~1e-3 at t = 500
        assert np.abs(got - misprint).max() > 1e-5
        assert np.abs(got - misprint).max() > 1e3 * np.abs(got - correct).max()


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_ddpm_step_uses_recip_sqrt_alpha_not_alpha_bar(name):
    """DDPMSampler.step with zero noise = posterior mean of q(x_{t-1} | x_t, x0_hat).

    x0_hat = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t); the correct eps-form factor is
    1/sqrt(alpha_t) (eqs. 47, 53). Algorithm 2 of the thesis prints 1/sqrt(abar_t): that
    formula must not match.
    """
    T = 1000
    s = NoiseSchedule.make(name, T)
    betas = s.betas[1:].numpy().copy()
    ab = np_alpha_bar(betas)
    rng = np.random.default_rng(1)
    xt = rng.standard_normal((3, 4))
    eps = rng.standard_normal((3, 4))
    for sampler in (DDPMSampler(s, "beta"), DDPMSampler(s, "beta_tilde")):
        for t in (2, 5, 50, 300, 700, 1000):
            got = sampler.step(torch.from_numpy(eps), t, torch.from_numpy(xt), noise=None).numpy()
            x0_hat = (xt - math.sqrt(1 - ab[t]) * eps) / math.sqrt(ab[t])
            expect, _ = bayes_posterior(x0_hat, xt, t, ab, betas)
            np.testing.assert_allclose(got, expect, rtol=1e-8, atol=1e-10)
            misprint = (xt - betas[t - 1] / math.sqrt(1 - ab[t]) * eps) / math.sqrt(ab[t])
            # at t = 2 the two factors differ by 1/sqrt(alpha_1) ~ 1 + 5e-5; later by orders of magnitude
            assert np.abs(got - misprint).max() > 1e-6
            assert np.abs(got - misprint).max() > 1e3 * np.abs(got - expect).max()
    # with noise: mean + sigma_t z, sigma_t^2 = beta_t; none at t = 1
    z = torch.from_numpy(rng.standard_normal((3, 4)))
    samp = DDPMSampler(s, "beta")
    base = samp.step(torch.from_numpy(eps), 300, torch.from_numpy(xt), None)
    noisy = samp.step(torch.from_numpy(eps), 300, torch.from_numpy(xt), z)
    np.testing.assert_allclose((noisy - base).numpy(), math.sqrt(betas[299]) * z.numpy(), rtol=1e-10)
    assert torch.equal(samp.step(torch.from_numpy(eps), 1, torch.from_numpy(xt), z),
                       samp.step(torch.from_numpy(eps), 1, torch.from_numpy(xt), None))


@pytest.mark.parametrize("rv", ["beta", "beta_tilde"])
def test_elbo_weight_eq70(rv):
    """w_t = (1 - alpha_t)^2 / (2 sigma_t^2 alpha_t (1 - abar_t)) (eq. 70)."""
    s = NoiseSchedule.make("linear", 1000)
    betas = np_linear_betas(1000)
    ab = np_alpha_bar(betas)
    ts = np.array([1, 2, 10, 100, 500, 1000])
    w = s.elbo_weight(torch.from_numpy(ts), rv).numpy()
    for t, wt in zip(ts, w):
        alpha = 1 - betas[t - 1]
        if rv == "beta":
            sigma2 = betas[t - 1]
        else:  # beta_tilde_t = (1 - abar_{t-1}) / (1 - abar_t) beta_t; 0 at t = 1 -> documented fallback beta_1
            sigma2 = (1 - ab[t - 1]) / (1 - ab[t]) * betas[t - 1] if t > 1 else betas[0]
        expect = (1 - alpha) ** 2 / (2 * sigma2 * alpha * (1 - ab[t]))
        assert wt == pytest.approx(expect, rel=1e-9)
    if rv == "beta":  # with sigma^2 = beta: w_t = beta_t / (2 alpha_t (1 - abar_t)); w_1 = 1/(2 alpha_1) = 0.50005
        assert w[0] == pytest.approx(0.5 / 0.9999, rel=1e-12)
        assert w[-1] == pytest.approx(0.02 / (2 * 0.98 * (1 - 4.035829765e-05)), rel=1e-8)
    assert np.all(np.isfinite(w)) and np.all(w > 0)


def test_device_tables_are_copied_once_per_device():
    """q_sample on an accelerator must not re-copy the float64 tables at every training step
    (a blocking host-to-device copy). The meta device stands in for a GPU here."""
    s = NoiseSchedule.make("linear", 1000)
    x0 = torch.empty(4, 1, 28, 28, device="meta")
    t = torch.tensor([1, 10, 500, 1000], device="meta")
    for _ in range(3):
        out = s.q_sample(x0, t, torch.empty_like(x0))
    assert out.device.type == "meta" and out.shape == x0.shape
    assert set(s._device_tables) == {("sqrt_alpha_bar", "meta"), ("sqrt_one_minus_alpha_bar", "meta")}
    first = s._device_tables[("sqrt_alpha_bar", "meta")]
    s.q_sample(x0, t, torch.empty_like(x0))
    assert s._device_tables[("sqrt_alpha_bar", "meta")] is first
    # the CPU path reads the master tables (no cache) and keeps the pinned values
    x = torch.ones(2, 1, 1, 1, dtype=torch.float64)
    got = s.q_sample(x, torch.tensor([1, 500]), torch.zeros_like(x)).flatten()
    assert torch.allclose(got, s.alpha_bar[[1, 500]].sqrt()) and len(s._device_tables) == 2
