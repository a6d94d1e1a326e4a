"""Learned reverse variance (iDDPM), the hybrid loss, and classifier-free guidance: the maths pinned.

Each check is against an independent computation (torch.distributions, scipy's normal CDF,
the posterior written out from alpha_bar), so a sign, a swapped bound or a missing
stop-gradient fails here.
"""
from __future__ import annotations

import math

import pytest
import torch
from scipy.stats import norm

from diffusion_core.config import UNetConfig
from diffusion_core.diffusion.guidance import GuidedModel, balanced_labels
from diffusion_core.diffusion.losses import diffusion_loss, per_example_mse
from diffusion_core.diffusion.samplers import DDPMSampler
from diffusion_core.diffusion.schedules import NoiseSchedule
from diffusion_core.model.unet import UNet
from diffusion_core.diffusion.variance import (HYBRID_LAMBDA, discretized_gaussian_log_likelihood, interpolation,
                                     learned_log_variance, normal_kl, vlb_terms)

TINY = dict(base_width=8, channel_mult=(1, 2), blocks_per_level=1, bottleneck_blocks=1, dropout=0.0)


def test_interpolation_endpoints_are_beta_tilde_and_beta():
    s = NoiseSchedule.make("linear", T=1000)
    t = torch.tensor([2, 10, 500, 1000])
    like = torch.zeros(4, 1, 2, 2, dtype=torch.float64)
    v0 = interpolation(torch.full_like(like, -1.0))       # v = 0
    v1 = interpolation(torch.full_like(like, 1.0))        # v = 1
    torch.testing.assert_close(learned_log_variance(s, t, v0).exp()[:, 0, 0, 0], s.beta_tilde[t], rtol=1e-12, atol=0)
    torch.testing.assert_close(learned_log_variance(s, t, v1).exp()[:, 0, 0, 0], s.betas[t], rtol=1e-12, atol=0)
    # v = 1/2 is the geometric mean of the two bounds; pinned at t = 10 of the linear schedule
    mid = learned_log_variance(s, torch.tensor([10]), torch.full((1, 1), 0.5, dtype=torch.float64)).exp().item()
    assert mid == pytest.approx(math.sqrt(s.betas[10].item() * s.beta_tilde[10].item()), rel=1e-12)
    assert mid == pytest.approx(2.5791e-4, rel=1e-4)   # beta_10 = 2.7928e-4, beta_tilde_10 = 2.3818e-4
    # beta_tilde_1 = 0: the lower bound is clipped to beta_tilde_2 at t = 1 (iDDPM)
    lo1 = learned_log_variance(s, torch.tensor([1]), torch.zeros(1, 1, dtype=torch.float64)).exp().item()
    assert lo1 == pytest.approx(s.beta_tilde[2].item(), rel=1e-12)


def test_normal_kl_matches_closed_form_of_torch_distributions():
    g = torch.Generator().manual_seed(0)
    m1, m2 = torch.randn(50, generator=g, dtype=torch.float64), torch.randn(50, generator=g, dtype=torch.float64)
    lv1, lv2 = torch.randn(50, generator=g, dtype=torch.float64), torch.randn(50, generator=g, dtype=torch.float64)
    ref = torch.distributions.kl_divergence(torch.distributions.Normal(m1, (0.5 * lv1).exp()),
                                            torch.distributions.Normal(m2, (0.5 * lv2).exp()))
    torch.testing.assert_close(normal_kl(m1, lv1, m2, lv2), ref, rtol=1e-10, atol=1e-12)
    assert normal_kl(m1, lv1, m1, lv1).abs().max() < 1e-12


def test_discretized_gaussian_decoder_against_scipy():
    x0 = torch.tensor([-1.0, -1 + 2 / 255 * 40, 0.0039215686 * 3, 1 - 2 / 255, 1.0], dtype=torch.float64)
    mean = torch.tensor([-0.9, -0.6, 0.05, 0.95, 0.7], dtype=torch.float64)
    log_var = torch.tensor([-6.0, -4.0, -8.0, -5.0, -3.0], dtype=torch.float64)
    got = discretized_gaussian_log_likelihood(x0, mean, log_var)
    sd, h = (0.5 * log_var).exp().numpy(), 1 / 255
    x, m = x0.numpy(), mean.numpy()
    ref = [math.log(norm.cdf(x[0] + h, m[0], sd[0]))]
    for i in (1, 2, 3):
        ref.append(math.log(norm.cdf(x[i] + h, m[i], sd[i]) - norm.cdf(x[i] - h, m[i], sd[i])))
    ref.append(math.log(1 - norm.cdf(x[4] - h, m[4], sd[4])))
    torch.testing.assert_close(got, torch.tensor(ref, dtype=torch.float64), rtol=1e-8, atol=1e-10)


def test_vlb_terms_against_a_direct_computation():
    """L_{t-1} for t >= 2: KL(q(x_{t-1}|x_t,x_0) || p) written out from alpha_bar; t = 1: the decoder NLL."""
    s = NoiseSchedule.make("cosine", T=50)
    g = torch.Generator().manual_seed(1)
    x0 = (torch.randint(0, 256, (4, 1, 3, 3), generator=g).double() / 127.5 - 1)
    eps = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    eps_pred = eps + 0.3 * torch.randn(x0.shape, generator=g, dtype=torch.float64)
    v_out = torch.rand(x0.shape, generator=g, dtype=torch.float64) * 2 - 1
    t = torch.tensor([1, 2, 17, 50])
    x_t = s.q_sample(x0, t, eps)
    got = vlb_terms(s, x0, x_t, t, eps_pred, interpolation(v_out))
    ab, b = s.alpha_bar, s.betas
    for i, ti in enumerate(t.tolist()):
        a_t, a_p, beta = ab[ti].item(), ab[ti - 1].item(), b[ti].item()
        v = (v_out[i] + 1) / 2
        mean_p = (x_t[i] - beta / math.sqrt(1 - a_t) * eps_pred[i]) / math.sqrt(1 - beta)
        if ti == 1:
            tilde2 = (1 - ab[1].item()) / (1 - ab[2].item()) * b[2].item()
            var_p = torch.exp(v * math.log(beta) + (1 - v) * math.log(tilde2))
            sd = var_p.sqrt().numpy()
            xi, mi = x0[i].numpy(), mean_p.numpy()
            p = norm.cdf(xi + 1 / 255, mi, sd) - norm.cdf(xi - 1 / 255, mi, sd)
            p = torch.tensor(p).where(x0[i] > -0.999, torch.tensor(norm.cdf(xi + 1 / 255, mi, sd)))
            p = p.where(x0[i] < 0.999, torch.tensor(1 - norm.cdf(xi - 1 / 255, mi, sd)))
            ref = -p.log().mean().item() / math.log(2)
        else:
            tilde = (1 - a_p) / (1 - a_t) * beta
            mean_q = math.sqrt(a_p) * beta / (1 - a_t) * x0[i] + math.sqrt(1 - beta) * (1 - a_p) / (1 - a_t) * x_t[i]
            var_p = torch.exp(v * math.log(beta) + (1 - v) * math.log(tilde))
            kl = torch.distributions.kl_divergence(torch.distributions.Normal(mean_q, math.sqrt(tilde)),
                                                   torch.distributions.Normal(mean_p, var_p.sqrt()))
            ref = kl.mean().item() / math.log(2)
        assert got[i].item() == pytest.approx(ref, rel=1e-7), f"t={ti}"


def test_hybrid_loss_stops_the_gradient_of_the_vlb_into_the_mean():
    """d L_hybrid / d eps_pred must equal d L_simple / d eps_pred (iDDPM 3.1); the variance gets L_vlb's."""
    s = NoiseSchedule.make("linear", T=100)
    g = torch.Generator().manual_seed(2)
    x0 = torch.rand(3, 1, 4, 4, generator=g) * 2 - 1
    t = torch.tensor([1, 40, 100])
    eps = torch.randn(x0.shape, generator=g)
    eps_out = torch.nn.Parameter(torch.randn(x0.shape, generator=g))
    var_out = torch.nn.Parameter(torch.zeros(x0.shape))

    def model(x_t, tt, return_variance=False):
        return (eps_out * 1.0, var_out * 1.0) if return_variance else eps_out * 1.0

    hybrid = diffusion_loss(model, s, x0, kind="hybrid", t=t, eps=eps)
    hybrid.backward()
    grad_hybrid = eps_out.grad.clone()
    assert var_out.grad.abs().sum() > 0                          # the variance is trained by L_vlb
    eps_out.grad = None
    per_example_mse(eps, eps_out).mean().backward()
    torch.testing.assert_close(grad_hybrid, eps_out.grad, rtol=0, atol=0)
    # and the value: L_simple + lambda T L_vlb, pinned against the pieces
    with torch.no_grad():
        x_t = s.q_sample(x0, t, eps)
        vlb = vlb_terms(s, x0, x_t, t, eps_out, interpolation(var_out)).float().mean()
        assert hybrid.item() == pytest.approx(per_example_mse(eps, eps_out).mean().item()
                                              + HYBRID_LAMBDA * 100 * vlb.item(), rel=1e-6)


def test_learned_variance_sampler_reproduces_the_fixed_variance_samplers():
    """A model whose variance output means v = 0 (v = 1) samples exactly like sigma^2 = beta_tilde (beta)."""
    s = NoiseSchedule.make("linear", T=30)

    def eps_model(value):
        def f(x, t):
            return 0.1 * x, torch.full_like(x, value)
        return f

    for value, fixed in ((-1.0, "beta_tilde"), (1.0, "beta")):
        a = DDPMSampler(s, "learned").sample(eps_model(value), (2, 1, 4, 4), generator=torch.Generator().manual_seed(3))
        b = DDPMSampler(s, fixed).sample(lambda x, t: 0.1 * x, (2, 1, 4, 4), generator=torch.Generator().manual_seed(3))
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_unet_options_keep_the_thesis_model_and_add_outputs():
    torch.manual_seed(0)
    plain = UNet(UNetConfig(**TINY))
    torch.manual_seed(0)
    cond = UNet(UNetConfig(**TINY, class_conditional=True, learn_sigma=True))
    # the shared weights are initialised identically (the new modules are built last / only widen conv_out)
    assert torch.equal(plain.conv_in.weight, cond.conv_in.weight)
    x, t = torch.randn(4, 1, 28, 28), torch.tensor([1, 5, 50, 999])
    eps, var = cond(x, t, y=torch.tensor([0, 1, 2, 3]), return_variance=True)
    assert eps.shape == x.shape and var.shape == x.shape
    assert plain(x, t, return_variance=True)[1] is None
    assert sum(p.numel() for p in UNet(UNetConfig()).parameters()) == 2_003_553


def test_classifier_free_guidance_combines_the_two_branches():
    torch.manual_seed(0)
    net = UNet(UNetConfig(**TINY, class_conditional=True)).eval()
    with torch.no_grad():  # a non-trivial label embedding, so labels matter
        net.label_emb.weight.normal_(0, 1)
    x, t = torch.randn(10, 1, 28, 28), torch.full((10,), 300)
    y = balanced_labels(10, 10)
    assert y.tolist() == list(range(10))
    with torch.no_grad():
        eps_c = net(x, t, y=y)
        eps_u = net(x, t)                                         # no label = the null label
        assert net.null_label == 10
        torch.testing.assert_close(eps_u, net(x, t, y=torch.full((10,), 10)))
        assert not torch.allclose(eps_u, eps_c, atol=1e-4)
        for scale in (0.0, 1.0, 3.0):
            got = GuidedModel(net, y, scale)(x, t)
            torch.testing.assert_close(got, eps_u + scale * (eps_c - eps_u), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="guidance scale"):
        GuidedModel(net, y, -0.5)


# ------------------------------------------------------------------ the study axes, end to end (--local)
def test_a_conditional_learned_variance_study_records_its_axes(tmp_path, data_root):
    """A tiny --local study with a class-conditional, learned-variance model: the new columns, the saved
    progressive frames and the figures, from real MNIST through the real CLI."""
    import numpy as np
    import pandas as pd

    try:
        from .orchestrator_helpers import studyctl, tiny_study, write_study
    except ImportError:
        from orchestrator_helpers import studyctl, tiny_study, write_study

    study = tiny_study(data_root, name="axes", model={"class_conditional": True},
                       diffusion={"T": 50, "reverse_variance": "learned", "loss": "hybrid"},
                       training={"epochs": 1, "eval_every": 16, "eval_start": 16},
                       evaluation={"sampler": "ddpm", "n_samples": 40, "t_grid": 4,
                                   "progressive_t": [50, 25, 0], "progressive_rows": 3},
                       sweep={"grid": {"evaluation.guidance_scale": [0.0, 2.0]}},
                       resources={"workers_per_trial": 1})
    f, out = write_study(tmp_path / "axes.yaml", study), tmp_path / "out"
    r = studyctl("launch", f, "--local", "--no-tracking", "--output", out, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:]
    evals = pd.read_parquet(out / "evals")
    assert evals["conditional_accuracy"].between(0, 1).all() and evals["fid_class_mean"].notna().all()
    res = pd.read_parquet(out / "residuals")
    assert res["variance_interpolation"].between(0, 1).all()
    trial = evals["trial_id"].iloc[0]
    with np.load(out / "trial_files" / trial / "samples" / "progressive.npz") as z:
        assert z["t"].tolist() == [50, 25, 0] and z["frames"].shape == (3, 3, 1, 28, 28)
    figs = {p.name for p in (out / "figures").rglob("*.png")}
    assert {"fig_variance_interpolation.png", "fig_progressive_generation.png",
            "study_guidance_tradeoff.png"} <= figs, figs


@pytest.mark.parametrize("fields,needle", [
    ({"evaluation": {"guidance_scale": -1.0}}, "evaluation.guidance_scale"),
    ({"training": {"label_dropout": 1.0}}, "training.label_dropout"),
    ({"training": {"label_dropout": -0.1}}, "training.label_dropout"),
    ({"diffusion": {"reverse_variance": "learned"}}, "diffusion.reverse_variance"),
    ({"diffusion": {"loss": "hybrid"}}, "diffusion.reverse_variance"),
    ({"diffusion": {"reverse_variance": "sigma"}}, "diffusion.reverse_variance"),
    ({"model": {"class_conditional": "yes"}}, "model.class_conditional"),
])
def test_validate_rejects_bad_axis_values_naming_the_field(data_root, fields, needle):
    from orchestrator.spec import StudyError, parse_study
    try:
        from .orchestrator_helpers import tiny_study
    except ImportError:
        from orchestrator_helpers import tiny_study
    with pytest.raises(StudyError, match=needle.replace(".", r"\.")):
        parse_study(tiny_study(data_root, **fields))


def test_validate_notes_a_learned_variance_that_ddim_does_not_use(tmp_path, data_root):
    from typer.testing import CliRunner

    from orchestrator.cli import app
    try:
        from .orchestrator_helpers import tiny_study, write_study
    except ImportError:
        from orchestrator_helpers import tiny_study, write_study
    study = tiny_study(data_root, diffusion={"reverse_variance": "learned", "loss": "hybrid"})
    r = CliRunner().invoke(app, ["validate", str(write_study(tmp_path / "ddim.yaml", study))])   # in this process
    assert r.exit_code == 0 and "unused for sampling" in r.output, r.output[-2000:]
