"""Under Ray: DDP across the two nodes of a cluster, a real `mlflow server`, a killed worker and a
killed driver, then `studyctl resume`.

One trial (the session's Ray cluster, conftest.ray_cluster: two nodes of one CPU each) shows what
only Ray can, each a Ray start-up less than a study of its own:

1. `studyctl launch --address <cluster>`: its two DDP workers (gloo) land on different nodes and
   the study logs to an `mlflow server` on 127.0.0.1 instead of the default SQLite file;
2. once the trial has its first checkpoint, its rank-1 worker is SIGKILLed: Ray Train restarts
   the worker group from that checkpoint (resources.max_failures 1);
3. once the restarted group has written a checkpoint, the launcher (the Tune driver) is SIGKILLed;
   the cluster lives on and ends the driver's actors;
4. `studyctl resume DIR --address <cluster>` finishes the trial from Ray Train's last checkpoint,
   in the same MLflow child run.

The records must be those of an undisturbed run: every logged step and evaluation once, in the
Parquet tables and in MLflow. The same commands without Ray: tests/test_orchestrator_faults.py.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import sys

import pandas as pd
import pytest

from diffusion_core.data import steps_per_epoch
from orchestrator.cli import MLFLOW_JOBS_ENV

try:
    from .orchestrator_helpers import (checkpoint_steps, env, expected_steps, kill_group, running_server, start,
                                       studyctl, tiny_study, wait_for, write_study)
except ImportError:
    from orchestrator_helpers import (checkpoint_steps, env, expected_steps, kill_group, running_server, start,
                                      studyctl, tiny_study, wait_for, write_study)

pytestmark = pytest.mark.slow

WORLD = 2
EPOCHS = 3  # 48 steps, evaluations (= checkpoints) at 10, 20, 30, 40, 48: room for two kills before the end


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mlflow_server")
    port = _free_port()
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
           "--backend-store-uri", f"sqlite:///{tmp / 'server.db'}", "--artifacts-destination", str(tmp / "art"),
           "--workers", "1"]
    url = f"http://127.0.0.1:{port}"
    # without MLflow 3's job runner (8 processes the test never uses, ~40 s of CPU): as `studyctl ui` starts it
    with running_server(cmd, url + "/health", tmp / "server.log", env_vars={**env(), MLFLOW_JOBS_ENV: "false"}):
        yield url


@pytest.fixture(scope="module")
def launched(tmp_path_factory, data_root, mlflow_server, ray_cluster):
    tmp = tmp_path_factory.mktemp("cluster")
    study = tiny_study(data_root, name="cluster", training={"epochs": EPOCHS}, evaluation={"metrics": False},
                       tracking={"uri": mlflow_server, "experiment": "cluster-test"},
                       resources={"workers_per_trial": WORLD, "cpus_per_worker": 1, "placement_strategy": "SPREAD",
                                  "max_failures": 1})
    study["analysis"] = {"figures": False}
    f = write_study(tmp / "cluster.yaml", study)
    out = tmp / "out"
    obs = {"study": study, "out": out}
    p = start("launch", f, "--output", out, "--address", ray_cluster.address, log=tmp / "launch.log")
    try:
        tid = wait_for(lambda: next(iter(_statuses(out)), None), 120, "the PENDING row", p)
        obs["tid"] = tid
        # 2. the rank-1 worker, once the trial has a checkpoint
        first = wait_for(lambda: checkpoint_steps(out, tid), 300, "the first checkpoint", p, poll=0.1)[0]
        rank1 = json.loads((out / "trial_files" / tid / "workers" / "rank1.json").read_text())
        obs["killed_worker_pid"], obs["first_checkpoint"] = rank1["pid"], first
        os.kill(rank1["pid"], signal.SIGKILL)
        # 3. the driver, once the restarted group has checkpointed past the first checkpoint
        later = wait_for(lambda: [s for s in checkpoint_steps(out, tid) if s > first], 300,
                         "a checkpoint of the restarted worker group", p, poll=0.1)
        kill_group(p)
        obs["driver_killed_after"] = later[-1]
        obs["launch_log"] = (tmp / "launch.log").read_text()
        trials = pd.read_parquet(out / "trials").set_index("trial_id")
        obs["status_after_kill"], obs["run_id"] = trials.loc[tid, "status"], trials.loc[tid, "mlflow_run_id"]
        obs["restarts_after_kill"] = trials.loc[tid, "restarts"]
    finally:
        kill_group(p)
    # 4. resume on the same cluster
    obs["resume"] = studyctl("resume", out, "--address", ray_cluster.address, timeout=400)
    return obs


def _statuses(out):
    from orchestrator.status import statuses

    return statuses(out)


def test_a_killed_worker_group_restarts_from_its_checkpoint(launched):
    out, tid = launched["out"], launched["tid"]
    assert launched["status_after_kill"] == "RUNNING", launched["launch_log"][-4000:]
    assert launched["restarts_after_kill"] == 1  # the group restarted once before the driver was killed
    rank1 = json.loads((out / "trial_files" / tid / "workers" / "rank1.json").read_text())
    assert rank1["pid"] != launched["killed_worker_pid"]


def test_resume_after_a_killed_driver_finishes_the_trial(launched):
    out, tid, r = launched["out"], launched["tid"], launched["resume"]
    study = launched["study"]
    total = steps_per_epoch(study["data"]["subset_size"], study["training"]["batch_size"], WORLD) * EPOCHS
    assert r.returncode == 0, r.stdout[-4000:]
    assert "0 already finished, 1 to run" in r.stdout
    assert launched["driver_killed_after"] < total  # the driver died mid-trial
    trial = pd.read_parquet(out / "trials").set_index("trial_id").loc[tid]
    assert trial["status"] == "COMPLETED" and trial["step"] == total
    assert trial["restarts"] == 2  # the worker group's restart, then the resume from Ray Train's checkpoint
    tr = study["training"]
    logged, ends, evals = expected_steps(study["data"]["subset_size"], tr["batch_size"], WORLD, tr["epochs"],
                                         tr["log_every_first"], tr["log_every"], tr["eval_every"], tr["eval_start"])
    assert pd.read_parquet(out / "train_steps")["step"].tolist() == logged  # each exactly once, in order
    assert sorted(pd.read_parquet(out / "epochs")["step"]) == ends
    assert sorted(pd.read_parquet(out / "evals")["step"]) == evals
    res = pd.read_parquet(out / "residuals")
    assert not res.duplicated(["step", "t", "weights"]).any() and sorted(res["step"].unique()) == evals


def test_workers_on_different_nodes(launched, ray_cluster):
    out, tid = launched["out"], launched["tid"]
    workers = [json.loads(p.read_text()) for p in sorted((out / "trial_files" / tid / "workers").glob("*.json"))]
    assert [w["rank"] for w in workers] == [0, 1] and {w["world_size"] for w in workers} == {WORLD}
    nodes = {w["node_id"] for w in workers}
    assert len(nodes) == 2, workers
    assert nodes <= {n.node_id for n in ray_cluster.list_all_nodes()}


def test_ray_checkpoint_holds_both_ranks_and_the_snapshot_its_ema(launched):
    import torch

    from records.snapshots import load_snapshot

    out, tid = launched["out"], launched["tid"]
    last = sorted((out / "ray" / "train" / tid).glob("checkpoint_step_*"))[-1]
    state = torch.load(last / "state.pt", weights_only=True)
    assert {"model", "ema", "optimizer", "step", "generator", "cpu_rng"} <= set(state)
    assert (last / "rng_rank0.pt").exists() and (last / "rng_rank1.pt").exists()  # merged from both ranks
    snap = load_snapshot(sorted((out / "trial_files" / tid / "ema").glob("step_*.pt"))[-1])
    assert snap.step == state["step"]
    assert all(torch.equal(v, state["ema"]["module"][k]) for k, v in snap.net("ema").state_dict().items())


def test_real_mlflow_server_holds_one_continued_child_run(launched, mlflow_server):
    from mlflow.tracking import MlflowClient

    out, study = launched["out"], launched["study"]
    assert not (out / "mlflow.db").exists()  # the server, not the default store, got the records
    c = MlflowClient(tracking_uri=mlflow_server)
    exp = c.get_experiment_by_name("cluster-test")
    runs = c.search_runs([exp.experiment_id])
    children = [x for x in runs if x.data.tags.get("studyctl.role") == "trial"]
    parents = [x for x in runs if x.data.tags.get("studyctl.role") == "study"]
    assert len(runs) == 2 and len(children) == 1 and parents[0].info.status == "FINISHED"
    child = children[0]
    assert child.info.run_id == launched["run_id"] and child.info.status == "FINISHED"  # continued, not a new run
    tr = study["training"]
    logged, _, evals = expected_steps(study["data"]["subset_size"], tr["batch_size"], WORLD, tr["epochs"],
                                      tr["log_every_first"], tr["log_every"], tr["eval_every"], tr["eval_start"])
    # every point once, across two restarts: what MLflow held past a restored step is not logged again
    assert sorted(m.step for m in c.get_metric_history(child.info.run_id, "loss")) == logged
    assert sorted(m.step for m in c.get_metric_history(child.info.run_id, "eval_seconds")) == evals
    assert "compare/val_loss" in child.data.metrics
    arts = [a.path for a in c.list_artifacts(child.info.run_id, "samples")]
    assert arts and all(a.endswith(".png") for a in arts)  # uploaded through the server's artifact proxy
