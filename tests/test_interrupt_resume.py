"""A `--local` launch interrupted (Ctrl-C) right after an evaluation's checkpoint, then resumed:
the interruption is recorded (trial INTERRUPTED, MLflow runs KILLED, the resume hint printed),
and the resumed run logs exactly the losses of an uninterrupted one, step for step — the
evaluations (whose metrics build a classifier) do not touch the training's RNG streams.
Real MNIST, real Parquet, real MLflow (SQLite), in this process."""
from __future__ import annotations

import json
import subprocess

import pandas as pd
import pytest
import torch

try:
    from .orchestrator_helpers import tiny_study
except ImportError:
    from orchestrator_helpers import tiny_study

INTERRUPT_AT = 8  # the first evaluation (of three: steps 8, 16, 24)


def _study(data_root, tracking: bool):
    from orchestrator.plan import build_plan
    from orchestrator.spec import parse_study

    s = tiny_study(data_root, name="resume", data={"subset_size": 128, "val_size": 128},
                   training={"epochs": 3, "log_every_first": 1000, "eval_every": 8, "eval_start": 8},  # every step's loss
                   evaluation={"n_samples": 16, "grid_images": 16, "metrics": True})
    s["model"]["dropout"] = 0.3  # dropout draws from the global RNG: the stream that must not move
    s["tracking"] = {"enabled": tracking}
    s["analysis"] = {"figures": False}
    return build_plan(parse_study(s))


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data_root):
    from orchestrator import worker
    from orchestrator.sweep import launch

    tmp = tmp_path_factory.mktemp("resume")
    whole, cut = tmp / "whole", tmp / "cut"
    assert launch(_study(data_root, False), whole, local=True, echo=lambda s: None) == 0

    original = worker.LocalTrialHooks.on_eval_all_ranks

    def then_ctrl_c(self, ctx):
        original(self, ctx)
        if ctx.step == INTERRUPT_AT:
            raise KeyboardInterrupt

    said: list[str] = []
    mp = pytest.MonkeyPatch()
    mp.setattr(worker.LocalTrialHooks, "on_eval_all_ranks", then_ctrl_c)
    try:
        code = launch(_study(data_root, True), cut, local=True, echo=said.append)
    finally:
        mp.undo()
    interrupted = pd.read_parquet(cut / "trials").iloc[0].to_dict()
    from mlflow.tracking import MlflowClient

    c = MlflowClient(tracking_uri=f"sqlite:///{cut / 'mlflow.db'}")
    child = c.get_run(interrupted["mlflow_run_id"])
    run_states = (child.info.status, c.get_run(child.data.tags["mlflow.parentRunId"]).info.status)
    resumed = launch(_study(data_root, True), cut, local=True, echo=lambda s: None)
    images = [a.path for a in c.list_artifacts(child.info.run_id, "images")]
    return {"whole": whole, "cut": cut, "code": code, "said": said, "interrupted": interrupted,
            "run_states": run_states, "resumed": resumed, "images": images}


def test_interrupt_is_recorded_and_says_how_to_continue(runs):
    assert runs["code"] == 130
    assert f"interrupted — `studyctl resume {runs['cut']} --local` continues" in runs["said"]
    row = runs["interrupted"]
    assert row["status"] == "INTERRUPTED" and row["wall_seconds"] > 0
    assert runs["run_states"] == ("KILLED", "KILLED")


def test_resume_across_an_evaluation_logs_the_uninterrupted_losses(runs):
    assert runs["resumed"] == 0
    whole = pd.read_parquet(runs["whole"] / "train_steps").sort_values("step")
    cut = pd.read_parquet(runs["cut"] / "train_steps").sort_values("step")
    assert list(cut["step"]) == list(range(1, 25)) == list(whole["step"])
    assert cut["loss"].tolist() == whole["loss"].tolist()  # bit for bit, every step
    trial = pd.read_parquet(runs["cut"] / "trials").iloc[0]
    assert trial["status"] == "COMPLETED" and trial["restarts"] == 1
    assert trial["wall_seconds"] > runs["interrupted"]["wall_seconds"]  # the time before the stop is kept
    # each evaluation's sample grid is an MLflow image (the run page's image chart), once per step
    for step in (8, 16, 24):
        assert sum(p.startswith(f"images/sample_grid+step+{step}+") and p.endswith(".png")
                   for p in runs["images"]) == 1, \
            runs["images"]


def test_evaluation_leaves_the_global_rng_alone(data_root, mnist_splits):
    """The first evaluation builds the metrics classifier (random init, then the shipped weights):
    the global RNG state, which drives dropout in training, is the same before and after."""
    from diffusion_core.config import EvalConfig, ScheduleConfig, UNetConfig
    from diffusion_core.evaluation import Evaluator
    from diffusion_core.diffusion.schedules import NoiseSchedule
    from diffusion_core.model.unet import UNet

    net = UNet(UNetConfig(base_width=8, channel_mult=(1, 2), blocks_per_level=1, bottleneck_blocks=1))
    val = mnist_splits.val.subset(torch.arange(64))
    ev = Evaluator(NoiseSchedule.from_config(ScheduleConfig(T=50)), val,
                   EvalConfig(n_samples=8, grid_images=8, sampler="ddim", steps=2, t_grid=3, residual_images=8,
                              is_splits=1, metrics=True), data_root=data_root)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    res = ev.evaluate(net, net)
    assert "fid" in res.metrics  # the classifier was built and used
    assert torch.equal(torch.get_rng_state(), before)


def test_status_shows_a_killed_trial_as_interrupted_without_nan(runs, tmp_path):
    """A RUNNING row whose worker process is gone (the launch was SIGKILLed) reads INTERRUPTED;
    no NaN error column, integer total_steps."""
    import shutil
    import socket

    from typer.testing import CliRunner

    from orchestrator.cli import app
    from records.parquet import RecordWriter

    d = tmp_path / "killed"
    shutil.copytree(runs["cut"], d, ignore=shutil.ignore_patterns("mlflow.db", "mlartifacts"))
    tid = runs["interrupted"]["trial_id"]
    dead = subprocess.Popen(["true"])
    dead.wait()
    (d / "trial_files" / tid / "workers" / "rank0.json").write_text(
        json.dumps({"rank": 0, "pid": dead.pid, "host": socket.gethostname()}))
    RecordWriter(d, "resume", tid, {}, {}).write_trial(status="RUNNING", step=8, total_steps=24, updated_at=0.0)
    out = CliRunner().invoke(app, ["status", str(d)]).output
    line = next(x for x in out.splitlines() if x.startswith(tid))
    assert "INTERRUPTED" in line and "RUNNING" not in line, out
    assert "NaN" not in out and " 24 " in line and "24.0" not in line, out
