"""One sentence per figure, for the report's index.html: the thesis's figures (26-30), the
study-level overlays and the decomposition figures here; the figures of the other papers' axes,
of the generalization study and of the ground truth beside their figures (figures_axes.py,
figures_generalization.py, figures_ground_truth.py). `caption` finds a figure's sentence in all of them."""
from __future__ import annotations

from .figures_axes import CAPTIONS as AXES
from .figures_generalization import CAPTIONS as GENERALIZATION
from .figures_ground_truth import CAPTIONS as GROUND_TRUTH

CAPTIONS = {
    "fig26a_loss_per_epoch": "Loss per epoch. The thesis's two curves: training loss (running mean over the epoch's "
                             "iterations, raw weights with dropout on) and validation loss (EMA weights, eval mode, "
                             "fixed t and noise). Beside them, like for like: the raw weights in eval mode on a fixed "
                             "training batch and on the validation draws. Shaded: epochs where the EMA still holds "
                             "more than 5% of the initial weights, where its loss measures that lag, not "
                             "generalization.",
    "fig26b_first_1000_iterations": "Training loss of every iteration of the first 1,000, log-log: how fast the "
                                    "noise predictor leaves the trivial solution. The thesis's second curve, where "
                                    "the run recorded it (training.val_loss_first): at each iteration the loss of one "
                                    "validation minibatch of the same size, fresh t and noise, the same weights "
                                    "(raw, before the update; eval mode, so without dropout). Else the per-epoch "
                                    "validation loss where one falls in the range.",
    "fig27_residual_vs_t": "Residual(t) = E||eps - eps_theta(x_t, t)||^2 / d on a fixed validation batch, per "
                           "evaluation (colour: its epoch, EMA weights): where along the diffusion the prediction "
                           "error sits.",
    "fig28_samples_by_epoch": "Samples from the same starting noise at chosen epochs: how fidelity and diversity "
                              "develop in image space. Grey scale: model output -1 black, +1 white (outputs outside "
                              "[-1, 1] were clipped to it when stored as uint8).",
    "fig29a_log_is_vs_epoch": "log Inception Score (MNIST classifier) per evaluation, with its 95% interval where "
                              "recorded (half-sampling of the samples), else the std over splits of one draw; the "
                              "bound is log 10, and the IS of real test images at the same sample count (n in the "
                              "legend, with its 95% interval) is the attainable ceiling.",
    "fig29b_entropy_plane": "Trajectory in the (H(Y), H(Y|X)) plane, coloured by epoch: diversity to the right, "
                            "confidence (fidelity) downwards; the star is real test images at the same sample count, "
                            "the dashed line H(Y) = ln 10 the bound (all ten classes equally often). Right: the late "
                            "evaluations, enlarged.",
    "fig30a_fid_vs_epoch": "FID in the MNIST classifier's feature space per evaluation, against the validation "
                           "split, log scale, with its 95% interval where recorded (half-sampling of the samples); "
                           "the floor is the FID of real test images at the same sample count (n in the legend), "
                           "band: its 95% interval.",
    "fig30b_fid_decomposition": "FID split into the mean term ||mu_r - mu_g||^2 and the covariance term "
                                "Tr(S_r + S_g - 2 (S_r S_g)^1/2): which moment of the feature distribution is still "
                                "wrong. Log scale, same epochs as Fig. 30a; dotted: the real-data FID floor.",
    "study_val_loss_by": "Validation loss (EMA weights, fixed draws), one curve per value of the swept field and "
                         "one panel per combination of the other swept fields: mean over seeds +- 95% t-interval "
                         "(n seeds in the legend). Training-set sizes are compared at equal optimizer steps.",
    "study_fid_by": "FID per evaluation, one curve per value of the swept field, one panel per combination of the "
                    "other swept fields: mean over seeds +- 95% t-interval (n in the legend); dotted: real test "
                    "images at the same sample count.",
    "study_residual_by": "Residual(t) at the last evaluation every seed of a curve reached, against the log-SNR "
                         "lambda_t = log(alpha_bar_t / (1 - alpha_bar_t)) so schedules compare at equal noise level: "
                         "mean over seeds +- 95% t-interval, one panel per combination of the other swept fields.",
    "study_fid_bias_variance_vs_capacity": "Final FID against the U-Net's base width, one curve per combination "
                                           "of the other swept fields (mean over seeds +- 95% t-interval, n in "
                                           "the legend), with the real-data floor at the same sample count; right "
                                           "axis: the decomposition's bias² + noise and variance (EMA, final "
                                           "evaluation, 95% intervals).",
    "study_pr_memorization_vs_size": "Precision, recall and memorized fraction against the training-set size at "
                                     "equal optimizer steps, one curve per combination of the other swept fields "
                                     "(mean over seeds +- 95% t-interval); dotted: real test images at the same "
                                     "sample count.",
    "decomposition_stacked": "Held-out error of each ensemble (trials differing only in seed and/or training "
                             "subset), final evaluation, EMA weights: residual = bias² + noise (not separable: the "
                             "optimal denoiser is unknown) + variance (unbiased, K−1), stacked; bottom: the variance "
                             "alone (data / optimization parts where subsets are crossed with seeds). Bands: 95% "
                             "intervals (bootstrap over points; + jackknife over models when K ≥ 3).",
    "decomposition_vs_capacity": "bias² + noise (top) and variance (bottom) against base width at three noise "
                                 "levels, one line per setting of the other swept fields, final evaluation, EMA; "
                                 "error bars: 95% intervals.",
    "decomposition_vs_step": "bias² + noise (top) and variance (bottom) of each ensemble at every evaluation "
                             "snapshot, EMA weights solid, raw weights dashed, at three noise levels; bands: 95% "
                             "intervals.",
    "distance_to_memorization": "On training points of one subset D, models trained on D (seeds only), final "
                                "evaluation: training residual, the minimum training loss ‖ε − f*_D‖² of the exact "
                                "empirical optimal denoiser of D, and the distance to it ‖f − f*_D‖² (Kadkhodaie et "
                                "al. 2024; Gu et al. 2023) — not bias²; EMA solid, raw dashed; bands: 95% intervals.",
}

_EVERY_CAPTION = {**CAPTIONS, **AXES, **GENERALIZATION, **GROUND_TRUTH}  # looked up in this order


def caption(name: str) -> str:
    """The caption of figure `name` (a trial's figures are named `<trial>/<figure>`; a figure may carry a
    suffix after its key, e.g. `study_val_loss_by_base_width`), or "" for a figure without one."""
    base = name.split("/")[-1]
    for key, text in _EVERY_CAPTION.items():
        if base.startswith(key):
            return text
    return ""
