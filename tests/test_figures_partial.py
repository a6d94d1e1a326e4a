"""Figures of a study still running, figure layout (nothing clipped, legends off the data) and
the sample-grid display mapping. One real tiny `--local` trial (real MNIST, real Parquet, no
MLflow), trained once for the module."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

try:
    from .orchestrator_helpers import tiny_study
except ImportError:
    from orchestrator_helpers import tiny_study


@pytest.fixture(scope="module")
def study_dir(tmp_path_factory, data_root):
    from orchestrator.plan import build_plan
    from orchestrator.spec import parse_study
    from orchestrator.sweep import launch

    study = tiny_study(data_root, name="partial", training={"epochs": 1, "eval_every": 8, "eval_start": 8},
                       evaluation={"metrics": False})
    study["tracking"] = {"enabled": False}
    study["analysis"] = {"figures": False}
    out = tmp_path_factory.mktemp("partial") / "out"
    assert launch(build_plan(parse_study(study)), out, local=True, echo=lambda s: None) == 0
    return out


def _as_running(study_dir, tmp_path):
    """A copy of the study whose trial is RUNNING again (as `resume` leaves it while it trains)
    plus a second trial still PENDING: the rows `drive_trial` / `prepare` write, error null."""
    from records.parquet import RecordWriter, read_table

    d = tmp_path / "running"
    shutil.copytree(study_dir, d)
    row = read_table(d, "trials").iloc[0]
    RecordWriter(d, "partial", row["trial_id"], {}, {}).write_trial(status="RUNNING", step=8, total_steps=16,
                                                                   updated_at=0.0)
    RecordWriter(d, "partial", "t999-pending", {}, {}).write_trial(status="PENDING", updated_at=0.0)
    return d, row["trial_id"]


def test_figures_of_a_study_with_a_running_trial(study_dir, tmp_path):
    from typer.testing import CliRunner

    from orchestrator.cli import app

    d, tid = _as_running(study_dir, tmp_path)
    # the study file asks for PNG + PDF (the default); --formats png overrides it
    r = CliRunner().invoke(app, ["figures", str(d), "--no-mlflow", "--formats", "png"])
    assert r.exit_code == 0, r.output + repr(r.exception)
    assert "figures (PNG) and the report" in r.output and not list((d / "figures").rglob("*.pdf"))
    assert f"missing/incomplete trial {tid}: RUNNING\n" in r.output
    assert "t999-pending: PENDING\n" in r.output
    html = (d / "figures" / "index.html").read_text()
    assert "nan" not in html.lower().replace("nanoseconds", "")
    assert (d / "figures" / tid / "fig27_residual_vs_t.png").exists()


@pytest.mark.parametrize("formats,needle", [("pdf", "includes png"), ("png,jpg", "'png,jpg'"), ("png,png", "distinct")])
def test_figures_refuse_formats_they_cannot_write_before_drawing(study_dir, tmp_path, formats, needle):
    from typer.testing import CliRunner

    from orchestrator.cli import app

    d, _ = _as_running(study_dir, tmp_path)
    r = CliRunner().invoke(app, ["figures", str(d), "--no-mlflow", "--formats", formats])
    assert r.exit_code == 2 and "option '--formats'" in r.output and needle in r.output, r.output
    assert not (d / "figures").exists()


# ---------------------------------------------------------------------------- layout
def _drawn_texts(fig):
    """Every text matplotlib draws: titles, axis labels, legend texts, and the tick labels of
    ticks inside the view (a tick locator also makes labels outside it, which are not drawn)."""
    texts = list(fig.texts)
    for ax in fig.axes:
        texts += [ax.title, ax._left_title, ax._right_title, ax.xaxis.label, ax.yaxis.label]
        if ax.get_legend() is not None:
            texts += [*ax.get_legend().get_texts(), ax.get_legend().get_title()]
        for axis in (ax.xaxis, ax.yaxis):
            lo, hi = sorted(axis.get_view_interval())
            for ticks, locs in ((axis.get_major_ticks(), axis.get_majorticklocs()),
                                (axis.get_minor_ticks(), axis.get_minorticklocs())):
                texts += [tick.label1 for tick, loc in zip(ticks, locs) if lo <= loc <= hi]
    return [t for t in texts if t.get_visible() and t.get_text().strip()]


@pytest.mark.parametrize("name", ["fig26b_first_1000_iterations", "fig27_residual_vs_t", "fig28_samples_by_epoch"])
def test_saved_figure_keeps_every_text_and_legends_off_the_data(study_dir, tmp_path, name):
    """Saved at STYLE's dpi with a tight box: every label, title and legend lies inside the
    saved canvas, and no plotted point lies under a legend."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from PIL import Image

    from analysis import figures as F
    from analysis import style as S
    from analysis.tables import load_study

    study = load_study(study_dir)
    tid = study.trial_ids()[0]
    with S.styled():
        fig = F.TRIAL_FIGURES[name](study, tid)
    png = S.save(fig, tmp_path / name)  # closes the figure; its artists stay measurable
    dpi = S.STYLE["savefig.dpi"]
    fig.set_dpi(dpi)
    renderer = FigureCanvasAgg(fig).get_renderer()
    tight = fig.get_tightbbox(renderer)  # inches
    pad = 0.1  # matplotlib's savefig.pad_inches
    width, height = Image.open(png).size
    assert abs(width - (tight.width + 2 * pad) * dpi) <= 2 and abs(height - (tight.height + 2 * pad) * dpi) <= 2
    # The saved canvas in display pixels of the figure (origin: the tight box's corner less the pad).
    x0, y0 = (tight.x0 - pad) * dpi, (tight.y0 - pad) * dpi
    for t in _drawn_texts(fig):
        e = t.get_window_extent(renderer)
        assert x0 - 1 <= e.x0 and e.x1 <= x0 + width + 1 and y0 - 1 <= e.y0 and e.y1 <= y0 + height + 1, \
            f"{name}: text {t.get_text()!r} at {e} is outside the saved {width}x{height} canvas"
    for ax in fig.axes:
        legend = ax.get_legend()
        if legend is None:
            continue
        box = legend.get_window_extent(renderer)
        for line in ax.get_lines():
            pts = ax.transData.transform(np.column_stack([line.get_xdata(), line.get_ydata()]))
            inside = (pts[:, 0] > box.x0) & (pts[:, 0] < box.x1) & (pts[:, 1] > box.y0) & (pts[:, 1] < box.y1)
            assert not inside.any(), f"{name}: the legend covers points of {line.get_label()!r}"
    if name == "fig26b_first_1000_iterations":  # the run is 16 steps: the title says so
        assert fig.axes[0].get_title().startswith("First 15 iterations")


# -------------------------------------------------------------------------- display
def test_sample_grid_display_reproduces_real_digits(study_dir, mnist_splits, tmp_path):
    """Real validation digits through the grids' own path ([-1, 1] -> uint8 -> PNG -> Fig. 28's
    array) come back pixel for pixel: a saturated early grid is the model's, not the display's."""
    from analysis.tables import load_grid
    from diffusion_core.data import from_unit_range, to_unit_range
    from diffusion_core.evaluation import grid_image
    from orchestrator.worker import save_png

    digits = mnist_splits.val.images[:16]  # uint8 (16, 1, 28, 28)
    x = to_unit_range(digits)
    assert x.min() == -1 and x.max() == 1
    grid = grid_image(from_unit_range(x))
    save_png(tmp_path / "real.png", grid)
    shown = load_grid(tmp_path / "real.png", tmp_path)
    np.testing.assert_array_equal(np.round(shown * 255).astype(np.uint8), grid[..., 0].numpy())
    # Out-of-range network outputs clip to black/white instead of wrapping around.
    assert from_unit_range(torch.tensor([-3.0, -1.0, 0.0, 1.0, 3.0])).tolist() == [0, 0, 128, 255, 255]


def test_early_sample_grids_name_their_ema_initial_share(study_dir):
    """tiny_study: ema_decay 0.9; evaluations at steps 8 and 16: 0.9^8 = 43%, 0.9^16 = 19%."""
    from analysis import figures as F
    from analysis.tables import load_study

    study = load_study(study_dir)
    fig = F.fig28_samples_by_epoch(study, study.trial_ids()[0])
    titles = [ax.get_title() for ax in fig.axes if ax.get_label() != "<colorbar>"]
    assert titles == ["epoch 0.5\nEMA weights: 43% initial", "epoch 1.0\nEMA weights: 19% initial"]
    bar = next(ax for ax in fig.axes if ax.get_label() == "<colorbar>")     # the value -> grey mapping
    assert "−1 black" in bar.get_xlabel() and "clipped" in bar.get_xlabel()
