"""The thesis figures drawn from the shipped records (results/thesis/) say what issue 24 asked:
log axes where the values span decades, the EMA-lag shading ending at the exact crossing, the real
data's point, bound and interval drawn, a colour bar where colour is a quantity."""
from __future__ import annotations

import math
from pathlib import Path

import matplotlib.pyplot as plt
import pytest

from analysis import figures as F
from analysis import style as S
from analysis.tables import load_study

THESIS = Path(__file__).resolve().parents[1] / "results" / "thesis"


@pytest.fixture(scope="module")
def thesis():
    study = load_study(THESIS)
    return study, study.trial_ids()[0]


def _shade_end(ax) -> float:
    """The right edge of the EMA-lag shading (the one axvspan)."""
    spans = [p for p in ax.patches if p.get_label().startswith("EMA holds")]
    assert len(spans) == 1
    return float(spans[0].get_x() + spans[0].get_width())


@pytest.mark.parametrize("name", ["fig26a_loss_per_epoch", "fig29a_log_is_vs_epoch", "fig30a_fid_vs_epoch",
                                  "fig30b_fid_decomposition"])
def test_ema_lag_shading_ends_at_the_exact_crossing(thesis, name):
    study, trial = thesis
    with S.styled():
        fig = F.TRIAL_FIGURES[name](study, trial)
    # 0.9999^k = 0.05 at k = 29,956: epoch 29,956 / 3,000, not halfway between two evaluations
    assert _shade_end(fig.axes[0]) == pytest.approx(29_956 / 3_000, abs=1e-9)
    plt.close(fig)


def test_fid_figures_are_log_with_the_floor_interval_and_a_shared_x_range(thesis):
    study, trial = thesis
    with S.styled():
        a, b = F.fig30a_fid_vs_epoch(study, trial), F.fig30b_fid_decomposition(study, trial)
    ev = study.evals
    for fig, cols in ((a, ["fid"]), (b, ["fid_mean_term", "fid_cov_term"])):
        ax = fig.axes[0]
        assert ax.get_yscale() == "log"
        band = [p for p in ax.patches if not p.get_label().startswith("EMA holds")]
        assert len(band) == 1
        span = (band[0].get_y(), band[0].get_y() + band[0].get_height())
        assert span == pytest.approx((ev["real_fid_lo"].iloc[0], ev["real_fid_hi"].iloc[0]))
        lo, hi = ax.get_ylim()
        assert lo < ev[cols].min().min() and hi > ev[cols].max().max()          # nothing clipped
    assert a.axes[0].get_xlim() == b.axes[0].get_xlim()
    assert "(no interval recorded)" in a.axes[0].get_legend_handles_labels()[1][0]    # the run kept no samples
    plt.close(a)
    plt.close(b)


def test_entropy_plane_marks_the_real_point_and_the_ln10_bound(thesis):
    study, trial = thesis
    with S.styled():
        fig = F.fig29b_entropy_plane(study, trial)
    ev = study.evals
    for ax in fig.axes[:2]:
        star = [ln for ln in ax.get_lines() if ln.get_marker() == "*"]
        assert len(star) == 1
        assert star[0].get_xydata()[0] == pytest.approx([ev["real_h_y"].iloc[0], ev["real_h_y_given_x"].iloc[0]])
        bound = [ln for ln in ax.get_lines() if ln.get_linestyle() == "--"]
        assert bound and bound[0].get_xdata()[0] == pytest.approx(math.log(10))
    plt.close(fig)


def test_residual_curves_have_a_colour_bar_of_epochs(thesis):
    study, trial = thesis
    with S.styled():
        fig = F.fig27_residual_vs_t(study, trial)
    bars = [ax for ax in fig.axes if ax.get_label() == "<colorbar>"]
    assert len(bars) == 1 and "epoch" in bars[0].get_ylabel()
    plt.close(fig)


def test_first_1000_iterations_draw_the_validation_curve_beside_the_training_loss():
    """results/thesis_first_1000/: the thesis configuration's first 1,000 steps with
    training.val_loss_first 1000 (CPU). Fig. 26b draws both per-iteration curves, as the thesis does,
    and their fluctuations are of one size (the thesis's reading: the noise comes from the sampled t
    and eps, not from the data)."""
    import numpy as np

    study = load_study(THESIS.parent / "thesis_first_1000")
    trial = study.trial_ids()[0]
    steps = study.trial_rows(study.train_steps, trial).sort_values("step")
    assert steps["step"].tolist() == list(range(1, 1001)) and steps["val_batch_loss"].notna().all()
    with S.styled():
        fig = F.fig26b_first_1000_iterations(study, trial)
    train_line, val_line = fig.axes[0].lines[:2]
    assert np.array_equal(val_line.get_xdata(), steps["step"]) and np.allclose(val_line.get_ydata(), steps["val_batch_loss"])
    assert "validation loss per iteration" in val_line.get_label()
    plt.close(fig)
    late = steps[steps["step"] > 500]
    spread = [np.log10(late[c]).std(ddof=1) for c in ("loss", "val_batch_loss")]
    assert spread == pytest.approx([0.159, 0.159], abs=0.0015)  # README: the same spread, 0.16 decades
