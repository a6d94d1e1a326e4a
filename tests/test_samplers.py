"""DDPM / DDIM samplers: seeded reproducibility, intermediate frames, DDIM maths, bad input.

(The 1/sqrt(alpha_t) factor of the ancestral step is tested in test_schedules.py; the
samplers' output distribution with the optimal predictor in test_gaussian.py.)
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from diffusion_core import DDIMSampler, DDPMSampler, NoiseSchedule, UNet, UNetConfig, make_sampler


@pytest.fixture(scope="module")
def tiny_unet():
    torch.manual_seed(0)
    return UNet(UNetConfig(base_width=8, channel_mult=(1, 2), blocks_per_level=1)).eval()


@pytest.fixture(scope="module")
def sched20():
    return NoiseSchedule.make("linear", 20)


@pytest.mark.parametrize("kind", ["ddpm", "ddpm_tilde", "ddim", "ddim_eta1"])
def test_sampler_seeded_and_reproducible(tiny_unet, sched20, kind):
    sampler = {"ddpm": DDPMSampler(sched20, "beta"), "ddpm_tilde": DDPMSampler(sched20, "beta_tilde"),
               "ddim": DDIMSampler(sched20, steps=5), "ddim_eta1": DDIMSampler(sched20, steps=5, eta=1.0)}[kind]
    shape = (3, 1, 28, 28)
    a = sampler.sample(tiny_unet, shape, generator=torch.Generator().manual_seed(42))
    b = sampler.sample(tiny_unet, shape, generator=torch.Generator().manual_seed(42))
    c = sampler.sample(tiny_unet, shape, generator=torch.Generator().manual_seed(43))
    assert a.shape == shape and torch.isfinite(a).all()
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    # the global RNG plays no part
    torch.manual_seed(1)
    d = sampler.sample(tiny_unet, shape, generator=torch.Generator().manual_seed(42))
    assert torch.equal(a, d)
    # the same starting noise x_T: deterministic DDIM gives the same output whatever the generator
    x_T = torch.randn(shape, generator=torch.Generator().manual_seed(5))
    e = sampler.sample(tiny_unet, shape, x_T=x_T, generator=torch.Generator().manual_seed(1))
    f = sampler.sample(tiny_unet, shape, x_T=x_T, generator=torch.Generator().manual_seed(2))
    assert torch.equal(e, f) == (kind == "ddim")


def test_n_frames_returns_intermediate_frames(tiny_unet, sched20):
    shape = (2, 1, 28, 28)
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    plain = DDPMSampler(sched20).sample(tiny_unet, shape, generator=g())
    x, frames = DDPMSampler(sched20).sample(tiny_unet, shape, generator=g(), n_frames=5)
    assert torch.equal(x, plain)                     # asking for frames does not change the result
    ts = [t for t, _ in frames]
    assert ts[0] == 20 and ts[-1] == 0 and len(frames) == 6
    assert ts == sorted(ts, reverse=True)
    assert all(f.shape == shape for _, f in frames)
    assert torch.equal(frames[0][1], torch.randn(shape, generator=g()))   # first frame = x_T
    assert torch.equal(frames[-1][1], x)                                   # last frame = output
    assert not torch.equal(frames[1][1], frames[2][1])

    x2, frames2 = DDIMSampler(sched20, steps=10).sample(tiny_unet, shape, generator=g(), n_frames=3)
    assert [t for t, _ in frames2][0] == 20 and frames2[-1][0] == 0 and len(frames2) == 4
    assert torch.equal(frames2[-1][1], x2)


def test_ddim_timesteps():
    s = NoiseSchedule.make("linear", 1000)
    ts = DDIMSampler(s, steps=50).timesteps
    assert len(ts) == 50 and int(ts[0]) == 1000 and int(ts[-1]) == 1
    assert torch.all(ts[:-1] > ts[1:])
    assert DDIMSampler(s, steps=1000).timesteps.tolist() == list(range(1000, 0, -1))


def test_ddim_eta1_full_steps_is_ddpm_beta_tilde():
    """Song et al.: eta = 1 with every timestep is the ancestral sampler with sigma^2 = beta_tilde."""
    s = NoiseSchedule.make("linear", 1000)
    ddim, ddpm = DDIMSampler(s, steps=1000, eta=1.0), DDPMSampler(s, "beta_tilde")
    g = torch.Generator().manual_seed(0)
    x, eps, z = (torch.randn(4, 5, generator=g, dtype=torch.float64) for _ in range(3))
    for t in (2, 10, 400, 1000):
        torch.testing.assert_close(ddim.step(eps, t, t - 1, x, z), ddpm.step(eps, t, x, z), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(ddim.step(eps, 1, 0, x, None), ddpm.step(eps, 1, x, None), rtol=1e-9, atol=1e-9)


def test_ddim_eta0_step_formula():
    """x_s = sqrt(abar_s) x0_hat + sqrt(1 - abar_s) eps (Song et al. eq. 12, eta = 0), computed here in numpy."""
    s = NoiseSchedule.make("cosine", 1000)
    ab = np.concatenate([[1.0], np.cumprod(1 - s.betas[1:].numpy())])
    g = torch.Generator().manual_seed(0)
    x, eps = (torch.randn(3, 4, generator=g, dtype=torch.float64) for _ in range(2))
    for t, t_prev in ((1000, 980), (500, 480), (21, 1), (1, 0)):
        x0 = (x.numpy() - math.sqrt(1 - ab[t]) * eps.numpy()) / math.sqrt(ab[t])
        expect = math.sqrt(ab[t_prev]) * x0 + math.sqrt(1 - ab[t_prev]) * eps.numpy()
        got = DDIMSampler(s, 50).step(eps, t, t_prev, x, None).numpy()
        np.testing.assert_allclose(got, expect, rtol=1e-9, atol=1e-12)


def test_sampler_bad_input_messages():
    s = NoiseSchedule.make("linear", 100)
    with pytest.raises(ValueError, match=r"steps=0.*1\.\.T=100"):
        DDIMSampler(s, steps=0)
    with pytest.raises(ValueError, match=r"steps=101.*1\.\.T=100"):
        DDIMSampler(s, steps=101)
    with pytest.raises(ValueError, match=r"eta=-0\.5.*>= 0"):
        DDIMSampler(s, eta=-0.5)
    with pytest.raises(ValueError, match="'sigma'.*beta, beta_tilde"):
        DDPMSampler(s, reverse_variance="sigma")
    with pytest.raises(ValueError, match="'euler'.*ddpm, ddim"):
        make_sampler(s, "euler")
    assert isinstance(make_sampler(s, "ddim", steps=10), DDIMSampler)
    assert make_sampler(s, "ddim", steps=10).steps == 10
    assert make_sampler(s, "ddpm", reverse_variance="beta_tilde").reverse_variance == "beta_tilde"
