"""Pieces of the orchestrator without Ray: Parquet part files, the evaluation helper, status.

Fast (a tiny U-Net on a handful of MNIST images); the real runs are in
test_orchestrator_e2e.py / _faults.py / _cluster.py.
"""
from __future__ import annotations


import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch

from diffusion_core.config import METRIC_KEYS, REAL_DATA_KEYS, EvalConfig, UNetConfig
from diffusion_core.data import ImageSet
from diffusion_core.evaluation import Evaluator, grid_image
from diffusion_core.diffusion.schedules import NoiseSchedule
from diffusion_core.model.unet import UNet
from records.parquet import RecordWriter, param_types, read_table


# ------------------------------------------------------------------------------ records
def _writer(tmp_path, tid="t000-abc", width=8):
    types = param_types({"model.base_width": [8, 16], "data.subset_size": [None, 1000]})
    return RecordWriter(tmp_path, "s", tid, {"model.base_width": width, "data.subset_size": None}, types)


def test_part_files_unify_and_carry_study_trial_and_swept_columns(tmp_path):
    a, b = _writer(tmp_path, "t000-a", 8), _writer(tmp_path, "t001-b", 16)
    a.write_part("train_steps", [{"step": 1, "epoch": 0.1, "loss": 1.0}], 1)
    b.write_part("train_steps", [{"step": 1, "epoch": 0.1, "loss": 0.5}, {"step": 2, "epoch": 0.2, "loss": 0.4}], 2)
    b.write_part("evals", [{"step": 2, "epoch": 0.2, "eval_seconds": 1.0, "fid": 3.0}], 2)
    df = pd.read_parquet(tmp_path / "train_steps")
    assert len(df) == 3 and set(df["trial_id"]) == {"t000-a", "t001-b"} and (df["study"] == "s").all()
    assert sorted(df["model.base_width"].unique()) == [8, 16]
    ev = pd.read_parquet(tmp_path / "evals")
    assert set(METRIC_KEYS) <= set(ev.columns) and ev["fid"].iloc[0] == 3.0 and pd.isna(ev["recall"].iloc[0])


def test_writes_are_atomic_and_temp_files_are_invisible(tmp_path, monkeypatch):
    w = _writer(tmp_path)
    w.write_part("train_steps", [{"step": 1, "epoch": 0.1, "loss": 1.0}], 1)
    # a torn temp file (a process killed mid-write) must not break readers
    (tmp_path / "train_steps" / ".tmp-999-t000-abc--s000000002.parquet").write_bytes(b"PAR1 torn")
    assert len(pd.read_parquet(tmp_path / "train_steps")) == 1

    def boom(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(pq, "write_table", boom)
    with pytest.raises(OSError):
        w.write_part("train_steps", [{"step": 2, "epoch": 0.2, "loss": 1.0}], 2)
    assert len(read_table(tmp_path, "train_steps")) == 1


def test_drop_parts_after_restored_step(tmp_path):
    w, other = _writer(tmp_path, "t000-a"), _writer(tmp_path, "t001-b")
    for step in (10, 20, 30):
        w.write_part("train_steps", [{"step": step, "epoch": 0.0, "loss": 1.0}], step)
        w.write_part("evals", [{"step": step, "epoch": 0.0}], step)
    other.write_part("train_steps", [{"step": 30, "epoch": 0.0, "loss": 1.0}], 30)
    removed = w.drop_parts_after(20)
    assert len(removed) == 2
    df = pd.read_parquet(tmp_path / "train_steps")
    assert sorted(df.query("trial_id == 't000-a'")["step"]) == [10, 20]
    assert df.query("trial_id == 't001-b'")["step"].tolist() == [30]  # other trials untouched
    w.drop_parts_after(0)
    assert read_table(tmp_path, "evals").empty


def test_trial_row_is_rewritten_not_appended(tmp_path):
    w = _writer(tmp_path)
    w.write_trial(status="PENDING")
    w.write_trial(status="COMPLETED", wall_seconds=3.5, parameters=1234)
    df = pd.read_parquet(tmp_path / "trials")
    assert df["status"].tolist() == ["COMPLETED"] and df["parameters"].tolist() == [1234]


# ---------------------------------------------------------------------------- evaluation
@pytest.fixture(scope="module")
def tiny_eval(mnist_splits):
    val = ImageSet(mnist_splits.val.images[:64], mnist_splits.val.labels[:64], "val")
    schedule = NoiseSchedule.make("linear", T=50)
    torch.manual_seed(0)
    net = UNet(UNetConfig(base_width=8, channel_mult=(1, 2), blocks_per_level=1, bottleneck_blocks=1)).eval()
    cfg = EvalConfig(n_samples=8, grid_images=4, sampler="ddim", steps=3, t_grid=5, residual_images=16,
                     seed=7, metrics=False)
    return val, schedule, net, cfg


def test_evaluator_is_deterministic_in_the_eval_seed(tiny_eval):
    val, schedule, net, cfg = tiny_eval
    r1 = Evaluator(schedule, val, cfg).evaluate(net, net)
    r2 = Evaluator(schedule, val, cfg).evaluate(net, net)
    assert r1.t_grid == r2.t_grid and len(r1.t_grid) >= 3
    assert r1.residuals == r2.residuals and set(r1.residuals) == {"ema", "raw"}
    assert torch.equal(r1.grid, r2.grid) and r1.grid.dtype == torch.uint8 and r1.grid.shape == (4, 1, 28, 28)
    r3 = Evaluator(schedule, val, EvalConfig(**{**cfg.__dict__, "seed": 8})).evaluate(net)
    assert not torch.equal(r1.grid, r3.grid) and set(r3.residuals) == {"ema"}
    img = grid_image(r1.grid)
    assert img.shape == (2 * 30 + 2, 2 * 30 + 2, 1)


def test_evaluation_records_the_metrics(tiny_eval, data_root):
    from diffusion_core.metrics import WEIGHTS_PATH

    assert WEIGHTS_PATH.exists(), (f"the MNIST classifier weights {WEIGHTS_PATH} ship with the package but are "
                                   f"missing: restore them from git")
    val, schedule, net, cfg = tiny_eval
    cfg = EvalConfig(**{**cfg.__dict__, "metrics": True, "n_samples": 16, "is_splits": 2})
    ev = Evaluator(schedule, val, cfg, train_images=val, data_root=str(data_root))
    r = ev.evaluate(net)
    assert set(METRIC_KEYS) <= set(r.metrics) and r.metrics["fid"] > 0
    # the same metrics of 16 real test images: what a perfect generator scores at this sample count
    assert set(REAL_DATA_KEYS) <= set(r.metrics) and r.metrics["real_n_samples"] == 16
    assert 0 < r.metrics["real_fid"] < r.metrics["fid"] and r.metrics["real_inception_score"] > 1
    assert r.metrics["real_memorized_fraction"] == 0.0    # test images are not in the (validation) "training" set


def test_status_shows_each_trials_swept_values(tmp_path, data_root):
    """`studyctl status` names each trial by what the sweep gave it, not by its hash alone."""
    from typer.testing import CliRunner

    from orchestrator import sweep
    from orchestrator.cli import app
    from orchestrator.plan import build_plan
    from orchestrator.spec import parse_study

    try:
        from .orchestrator_helpers import tiny_study
    except ImportError:
        from orchestrator_helpers import tiny_study
    study = tiny_study(data_root, name="named", tracking={"enabled": False}, evaluation={"metrics": False},
                       sweep={"grid": {"model.base_width": [8, 16], "diffusion.schedule": ["linear", "cosine"]},
                              "seeds": [0, 3]})
    plan = build_plan(parse_study(study))
    sweep.prepare(plan, tmp_path / "out", echo=lambda _: None)
    out = CliRunner().invoke(app, ["status", str(tmp_path / "out")], env={"COLUMNS": "200"}).output
    header, *lines = out.strip().splitlines()
    assert header.split()[:4] == ["trial_id", "base_width", "schedule", "seed"], out
    assert "model.channel_mult" not in header and "lr" not in header.split()   # not swept: not shown
    for t in plan.trials:
        line = next(x for x in lines if x.startswith(t.trial_id)).split()
        assert line[1:5] == [str(t.model.base_width), t.diffusion.schedule, str(t.training.seed), "PENDING"], out


def test_a_study_folder_from_before_a_new_field_is_still_its_study(tmp_path, data_root):
    """A field added to the schema after a folder was written takes its default: relaunching or resuming
    that folder is the same study, while a changed value is still refused."""
    import yaml

    from orchestrator import sweep
    from orchestrator.driver import SetupError
    from orchestrator.plan import build_plan
    from orchestrator.spec import parse_study
    from records.layout import study_file

    try:
        from .orchestrator_helpers import tiny_study
    except ImportError:
        from orchestrator_helpers import tiny_study
    study = tiny_study(data_root, name="older", tracking={"enabled": False}, evaluation={"metrics": False})
    plan, out = build_plan(parse_study(study)), tmp_path / "out"
    sweep.prepare(plan, out, echo=lambda _: None)
    written = yaml.safe_load(study_file(out).read_text())
    del written["evaluation"]["progressive_rows"]      # as if the folder predated this field
    study_file(out).write_text(yaml.safe_dump(written, sort_keys=False))
    sweep.prepare(plan, out, echo=lambda _: None)       # the same study
    written["evaluation"]["n_samples"] += 1
    study_file(out).write_text(yaml.safe_dump(written, sort_keys=False))
    with pytest.raises(SetupError, match="already holds a different study"):
        sweep.prepare(plan, out, echo=lambda _: None)
