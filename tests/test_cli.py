"""The `studyctl` command line: help, validate, dry runs, bad files, folders that are not studies.

In-process through typer's CliRunner (no Ray is started by anything here).
"""
from __future__ import annotations

import pytest
import yaml
from typer.testing import CliRunner

from orchestrator.cli import app

runner = CliRunner()


def _tiny(data_root, **over):
    d = {"name": "cli", "data": {"root": str(data_root), "subset_size": 256, "val_size": 128},
         "model": {"base_width": 8, "channel_mult": [1, 2], "blocks_per_level": 1},
         "training": {"epochs": 1}, "evaluation": {"sampler": "ddim", "steps": 5, "residual_images": 64},
         "sweep": {"grid": {"model.base_width": [8, 16]}, "seeds": [0, 1]}}
    d.update(over)
    return d


def test_help_explains_every_command():
    r = runner.invoke(app, ["--help"])
    assert r.exit_code == 0
    for cmd in ("version", "validate", "launch", "resume", "status", "ui"):
        assert cmd in r.output
    r = runner.invoke(app, ["launch", "--help"])
    assert r.exit_code == 0 and "--address" in r.output and "--dry-run" in r.output and "--output" in r.output
    assert "runs/<name>" in r.output       # not eaten as markup


@pytest.mark.parametrize("command", ["validate", "launch", "resume", "figures", "generalization"])
def test_help_shows_no_value_after_a_flag(command):
    r = runner.invoke(app, [command, "--help"], env={"COLUMNS": "200"})
    assert r.exit_code == 0
    assert "<bool>" not in r.output, r.output


def test_validate_help_lists_every_packaged_study():
    from orchestrator.study_file import PACKAGED_STUDIES

    r = runner.invoke(app, ["validate", "--help"], env={"COLUMNS": "400"})
    names = sorted(f.stem for f in PACKAGED_STUDIES.glob("*.yaml"))
    assert len(names) >= 7
    assert f"({', '.join(names)})" in " ".join(r.output.split()), r.output


def test_version_prints_the_installed_versions():
    import importlib.metadata as md
    import re
    from pathlib import Path

    import torch

    r = runner.invoke(app, ["version"])
    assert r.exit_code == 0
    printed = dict(line.split() for line in r.output.strip().splitlines())
    assert set(printed) == {"studyctl", "torch", "torchvision", "ray", "mlflow"}
    pyproject = (Path(__file__).parents[1] / "pyproject.toml").read_text()
    assert printed["studyctl"] == re.search(r'^version = "(.+)"', pyproject, re.M).group(1)
    assert printed["torch"].split("+")[0] == torch.__version__.split("+")[0]   # local tags (+cu130) may differ
    assert all(printed[name] == md.version(name) for name in ("torchvision", "ray", "mlflow"))


def test_validate_prints_trial_table_and_count(tmp_path, data_root):
    f = tmp_path / "s.yaml"
    f.write_text(yaml.safe_dump(_tiny(data_root)))
    r = runner.invoke(app, ["validate", str(f)])
    assert r.exit_code == 0, r.output
    assert "4 trial(s)" in r.output and "model.base_width" in r.output and "training.seed" in r.output
    assert r.output.count("t00") == 4


def test_validate_packaged_study_by_bare_name_from_any_folder(tmp_path, monkeypatch, data_root):
    monkeypatch.chdir(tmp_path)
    r = runner.invoke(app, ["validate", "bias_variance.yaml"])
    assert r.exit_code == 0, r.output
    assert "42 trial(s)" in r.output and "3 duplicate trial(s) dropped" in r.output
    r = runner.invoke(app, ["validate", "quickstart"])
    assert r.exit_code == 0, r.output


def test_validate_bad_file_exits_2_naming_field_value_allowed(tmp_path, data_root):
    f = tmp_path / "bad.yaml"
    f.write_text(yaml.safe_dump(_tiny(data_root, diffusion={"schedule": "cosinus"})))
    r = runner.invoke(app, ["validate", str(f)])
    assert r.exit_code == 2
    assert "diffusion.schedule" in r.output and "cosinus" in r.output and "'cosine'" in r.output


def test_set_overrides_fields_and_is_validated_like_the_file(tmp_path, data_root):
    f = tmp_path / "s.yaml"
    f.write_text(yaml.safe_dump(_tiny(data_root)))
    r = runner.invoke(app, ["validate", str(f), "--set", "sweep.seeds=[0, 1, 2]", "--set", "training.epochs=3"])
    assert r.exit_code == 0 and "6 trial(s)" in r.output, r.output
    out = tmp_path / "out"
    r = runner.invoke(app, ["launch", str(f), "--output", str(out), "--dry-run", "--set", "evaluation.precision=bf16",
                            "--set", "evaluation.compile=true", "--local"])
    assert r.exit_code == 0 and "this process (--local)" in r.output, r.output
    r = runner.invoke(app, ["validate", str(f), "--set", "evaluation.precision=fp16"])
    assert r.exit_code == 2 and "evaluation.precision" in r.output and "fp16" in r.output and "'bf16'" in r.output
    r = runner.invoke(app, ["validate", str(f), "--set", "training.epochs"])
    assert r.exit_code == 2 and "FIELD=VALUE" in r.output


def test_validate_missing_file_exits_2(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = runner.invoke(app, ["validate", "no_such_study.yaml"])
    assert r.exit_code == 2 and "not found" in r.output and "quickstart" in r.output


def test_launch_dry_run_starts_nothing(tmp_path, data_root):
    f = tmp_path / "s.yaml"
    f.write_text(yaml.safe_dump(_tiny(data_root)))
    out = tmp_path / "out"
    r = runner.invoke(app, ["launch", str(f), "--output", str(out), "--dry-run"])
    assert r.exit_code == 0, r.output
    assert "dry run" in r.output and "4 trial(s)" in r.output
    assert not out.exists()


def test_launch_bad_file_exits_2(tmp_path, data_root):
    f = tmp_path / "s.yaml"
    f.write_text(yaml.safe_dump(_tiny(data_root, model={"base_width": -1})))
    r = runner.invoke(app, ["launch", str(f), "--output", str(tmp_path / "out")])
    assert r.exit_code == 2 and "model.base_width" in r.output


def test_status_resume_ui_refuse_a_folder_that_is_not_a_study(tmp_path):
    for cmd in ("status", "resume", "ui"):
        r = runner.invoke(app, [cmd, str(tmp_path)])
        assert r.exit_code == 2 and "not a study folder" in r.output, (cmd, r.output)


@pytest.mark.slow
def test_ui_serves_the_study_store(tmp_path, data_root):
    """`studyctl ui DIR` starts the MLflow UI on 127.0.0.1 against DIR/mlflow.db (then we stop it):
    its REST API answers with the study's own experiment and run."""
    try:
        from .orchestrator_helpers import group_commands, running_server
    except ImportError:
        from orchestrator_helpers import group_commands, running_server
    import json
    import socket
    import sys
    import urllib.request

    from orchestrator import tracking

    study = tmp_path / "study"
    study.mkdir()
    (study / "study.yaml").write_text(yaml.safe_dump(_tiny(data_root)))
    uri = tracking.default_uri(study)
    exp_id = tracking.ensure_experiment(uri, "cli", study)
    run_id = tracking.ensure_parent_run(uri, exp_id, "cli", study)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "orchestrator.cli", "ui", str(study), "--port", str(port)]
    api = f"http://127.0.0.1:{port}/api/2.0/mlflow"
    # One MLflow worker process; its start (importing MLflow) took over 90 s on a loaded 2-core machine.
    with running_server(cmd, f"http://127.0.0.1:{port}/health", tmp_path / "ui.log", timeout=300) as server:
        # one server process, no MLflow job runner (cli.MLFLOW_JOBS_ENV)
        assert not [c for c in group_commands(server.pid) if "jobs" in c or "huey" in c], group_commands(server.pid)
        with urllib.request.urlopen(f"{api}/experiments/get-by-name?experiment_name=cli", timeout=30) as r:
            assert json.load(r)["experiment"]["experiment_id"] == exp_id
        with urllib.request.urlopen(f"{api}/runs/get?run_id={run_id}", timeout=30) as r:
            assert json.load(r)["run"]["info"]["experiment_id"] == exp_id


def test_ui_on_a_busy_port_fails_naming_the_port(tmp_path, data_root):
    """A port another server listens on: exit 1 naming the port and a free one; MLflow is not started."""
    import socket

    study = tmp_path / "study"
    study.mkdir()
    (study / "study.yaml").write_text(yaml.safe_dump(_tiny(data_root)))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = runner.invoke(app, ["ui", str(study), "--port", str(port)])
    assert r.exit_code == 1, r.output
    assert f"port {port} on 127.0.0.1 is already in use" in r.output and "--port " in r.output
    assert "http://" not in r.output and not (study / "mlflow.db").exists()


def test_ui_prints_the_experiment_in_model_training_view(tmp_path, data_root, monkeypatch):
    """MLflow 3's UI opens in GenAI mode whatever the experiment tag says: the printed address
    asks for model training, the chart view, the trials only (not the parent run) and a flat,
    name-sorted list (trials not collapsed); the server runs one worker process."""
    import os
    import socket

    from orchestrator import tracking

    study = tmp_path / "study"
    study.mkdir()
    (study / "study.yaml").write_text(yaml.safe_dump(_tiny(data_root)))
    uri = tracking.default_uri(study)
    exp_id = tracking.ensure_experiment(uri, "cli", study)
    assert tracking.client(uri).get_experiment(exp_id).tags["mlflow.experimentKind"] == "custom_model_development"
    execs = []
    monkeypatch.setattr(os, "execv", lambda exe, cmd: execs.append(cmd))
    with socket.socket() as s:  # a port free now (ui checks it again before MLflow would bind it)
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    r = runner.invoke(app, ["ui", str(study), "--port", str(port)])
    assert r.exit_code == 0 and execs and execs[0][execs[0].index("--port") + 1] == str(port), r.output
    assert (f"http://127.0.0.1:{port}/#/experiments/{exp_id}/runs?workflowType=machine_learning"
            f"&compareRunsMode=CHART&searchFilter=tags.%60studyctl.role%60+%3D+%27trial%27"
            f"&orderByKey=tags.%60mlflow.runName%60&orderByAsc=true") in r.output
    assert execs[0][execs[0].index("--workers") + 1] == "1"


def test_the_sweep_is_expanded_once_per_command(tmp_path, data_root, monkeypatch):
    """`validate`, and a --local `launch` through every trial's driver, each expand the 42-trial
    bias_variance sweep exactly once (training stubbed: this counts planning, not training)."""
    from orchestrator import plan, sweep, worker

    expansions, trained = [], []
    expand = plan.sweep_points
    monkeypatch.setattr(plan, "sweep_points", lambda *a: expansions.append(1) or expand(*a))
    r = runner.invoke(app, ["validate", "bias_variance"])
    assert r.exit_code == 0 and "42 trial(s)" in r.output, r.output
    assert len(expansions) == 1
    monkeypatch.setattr(worker, "local_worker", lambda task, device, progress: trained.append(task.trial))
    monkeypatch.setattr(sweep, "warm_metric_cache", lambda plan, echo: None)
    expansions.clear()
    r = runner.invoke(app, ["launch", "bias_variance", "--local", "--no-tracking", "--output", str(tmp_path / "bv"),
                            "--set", "resources.gpus_per_worker=0", "--set", "analysis.figures=false",
                            "--set", "analysis.decompose=false"])
    assert r.exit_code == 0, r.output
    assert len(expansions) == 1 and len(trained) == 42
    assert trained[0].diffusion.reverse_variance == "beta_tilde"   # typed configs reached the worker


def test_launch_analysis_says_what_runs_skips_what_is_done_and_stops_on_ctrl_c(tmp_path, data_root, monkeypatch):
    """After the trials: each analysis step is named and timed, inside the wall time; a relaunch of the
    finished study redoes nothing that is newer than its records; Ctrl-C stops it with a message and
    exit 130. (Training and the analysis are stubbed: this checks the launch's handling of them.)"""
    import os
    import types

    import pandas as pd

    import analysis.decompose
    import analysis.report
    from orchestrator import sweep, worker

    monkeypatch.setattr(worker, "local_worker", lambda task, device, progress: None)
    monkeypatch.setattr(sweep, "warm_metric_cache", lambda plan, echo: None)
    calls = []

    def decompose(out, n_points, **kw):
        calls.append("decompose")
        for kind in ("decomposition", "distance_to_memorization"):
            (out / kind).mkdir(exist_ok=True)
            pd.DataFrame({"group_id": ["g"]}).to_parquet(out / kind / f"{kind}.parquet")
        return pd.DataFrame({"group_id": ["g"]})

    def make_figures(d, formats):
        calls.append("figures")
        assert list(formats) == ["png", "pdf"]  # the study file's default
        (d / "figures").mkdir(exist_ok=True)
        (d / "figures" / "index.html").write_text("report")
        return types.SimpleNamespace(written=[]), d / "figures" / "index.html", []

    monkeypatch.setattr(analysis.decompose, "decompose", decompose)
    monkeypatch.setattr(analysis.report, "make_figures", make_figures)
    f, out = tmp_path / "s.yaml", tmp_path / "out"
    f.write_text(yaml.safe_dump(_tiny(data_root, analysis={"decompose": True})))
    launch = ["launch", str(f), "--local", "--no-tracking", "--output", str(out)]

    r = runner.invoke(app, launch)
    assert r.exit_code == 0, r.output
    assert calls == ["decompose", "figures"]
    assert "analysis 1/2: decompose: bias² + noise and variance" in r.output and "analysis 2/2: figures" in r.output
    assert "analysis 1/2: decompose: done in" in r.output
    last = r.output.strip().splitlines()[-1]
    assert last.startswith("wall time ") and "(trials " in last and ", analysis " in last, r.output

    r = runner.invoke(app, launch)                       # finished: nothing to train, nothing to redo
    assert r.exit_code == 0 and calls == ["decompose", "figures"], r.output
    assert "analysis 1/2: decompose: up to date" in r.output and "analysis 2/2: figures: up to date" in r.output

    old = (out / "trials").stat().st_mtime - 60          # records newer than the decomposition: redo it
    for kind in ("decomposition", "distance_to_memorization"):
        os.utime(out / kind / f"{kind}.parquet", (old, old))
    r = runner.invoke(app, launch)
    assert r.exit_code == 0 and calls == ["decompose", "figures"] * 2, r.output

    def interrupted(out, n_points, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(analysis.decompose, "decompose", interrupted)
    os.utime(out / "decomposition" / "decomposition.parquet", (old, old))
    r = runner.invoke(app, launch)
    assert r.exit_code == 130, r.output
    assert f"interrupted during the analysis (decompose); the trials' records are complete: `studyctl decompose " \
           f"{out}` runs it again" in " ".join(r.output.split()), r.output
    assert "wall time" in r.output and calls == ["decompose", "figures"] * 2


def test_decompose_command_passes_its_options_and_redraws_the_figures(tmp_path, monkeypatch):
    """`studyctl decompose DIR` hands --points, --t-grid, --eval-seed and --steps to
    analysis.decompose.decompose, then redraws the figures; a bad --t-grid is refused naming the
    option. (The decomposition itself runs on the shared study's records: tests/test_analysis.py.)"""
    import types

    import pandas as pd

    import analysis.decompose
    import analysis.report

    seen, calls = {}, []

    def decompose(directory, **kw):
        seen.update(kw, directory=directory)
        calls.append("decompose")
        return pd.DataFrame({"group_id": ["g", "g", "h"]})

    def make_figures(d, formats):
        calls.append("figures")
        return types.SimpleNamespace(written=[]), tmp_path / "index.html", []

    monkeypatch.setattr(analysis.decompose, "decompose", decompose)
    monkeypatch.setattr(analysis.report, "make_figures", make_figures)
    r = runner.invoke(app, ["decompose", str(tmp_path), "--points", "32", "--t-grid", "1,10,100", "--eval-seed", "5",
                            "--steps", "final", "--no-references"])
    assert r.exit_code == 0, r.output
    assert calls == ["decompose", "figures"] and "decomposition: 2 group(s), 3 rows" in r.output
    assert (seen["n_points"], seen["t_grid"], seen["eval_seed"], seen["steps"], seen["references"]) == \
        (32, [1, 10, 100], 5, "final", False)
    r = runner.invoke(app, ["decompose", str(tmp_path), "--t-grid", "8"])
    assert r.exit_code == 0 and seen["t_grid"] == 8 and seen["n_points"] == 256, r.output
    r = runner.invoke(app, ["decompose", str(tmp_path), "--t-grid", "ten"])
    assert r.exit_code == 2 and "option '--t-grid': bad value 'ten'" in r.output and calls.count("decompose") == 2


@pytest.mark.parametrize("study", ["quickstart", "ground_truth_quick"])
def test_validate_imports_no_torch_ray_or_mlflow(study, data_root):
    """Checking a study file is a question about values: `validate` (here a stacked molrg study too) must
    answer without importing torch, torchvision, Ray or MLflow (diffusion_core.config holds the configs)."""
    import json
    import os
    import subprocess
    import sys

    code = ("import json, sys\nfrom typer.testing import CliRunner\nfrom orchestrator.cli import app\n"
            f"r = CliRunner().invoke(app, ['validate', {study!r}])\n"
            "heavy = sorted(m for m in ('torch', 'torchvision', 'ray', 'mlflow') if m in sys.modules)\n"
            "print(json.dumps({'exit': r.exit_code, 'output': r.output, 'heavy': heavy}))\n")
    env = {**os.environ, "STUDYCTL_DATA_ROOT": str(data_root)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["exit"] == 0, result["output"]
    assert "is valid" in result["output"]
    assert result["heavy"] == [], f"validate imported {result['heavy']}"
