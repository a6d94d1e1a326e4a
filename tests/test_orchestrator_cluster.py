"""Scale: a two-node Ray cluster (ray.cluster_utils.Cluster) and a real `mlflow server`.

One launch covers both (each costs a Ray start and a worker-group start): `studyctl launch
--address <cluster>` joins a local two-node cluster of one CPU per node, so the trial's
two DDP workers must land on different nodes (gloo across "nodes"), and the study logs to
an `mlflow server` on 127.0.0.1 instead of the default SQLite file.
"""
from __future__ import annotations

import json
import socket
import sys

import pandas as pd
import pytest

try:
    from .orchestrator_helpers import env, running_server, studyctl, tiny_study, write_study
except ImportError:
    from orchestrator_helpers import env, running_server, studyctl, tiny_study, write_study

pytestmark = pytest.mark.slow


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
    with running_server(cmd, url + "/health", tmp / "server.log", env_vars=env()):
        yield url


@pytest.fixture(scope="module")
def two_nodes():
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        yield cluster
    finally:
        cluster.shutdown()


@pytest.fixture(scope="module")
def launched(tmp_path_factory, data_root, mlflow_server, two_nodes):
    tmp = tmp_path_factory.mktemp("cluster")
    study = tiny_study(data_root, name="cluster",
                       training={"epochs": 1},
                       tracking={"uri": mlflow_server, "experiment": "cluster-test"},
                       resources={"workers_per_trial": 2, "cpus_per_worker": 1, "placement_strategy": "SPREAD"})
    f = write_study(tmp / "cluster.yaml", study)
    out = tmp / "out"
    r = studyctl("launch", f, "--output", out, "--address", two_nodes.address, timeout=300)
    return study, out, r


def test_workers_on_different_nodes(launched, two_nodes):
    study, out, r = launched
    assert r.returncode == 0, r.stdout[-4000:]
    trials = pd.read_parquet(out / "trials")
    assert trials["status"].tolist() == ["COMPLETED"]
    tid = trials["trial_id"][0]
    workers = [json.loads(p.read_text()) for p in sorted((out / "trial_files" / tid / "workers").glob("*.json"))]
    assert [w["rank"] for w in workers] == [0, 1]
    nodes = {w["node_id"] for w in workers}
    assert len(nodes) == 2, workers
    assert nodes <= {n.node_id for n in two_nodes.list_all_nodes()}
    assert len(pd.read_parquet(out / "evals")) >= 1


def test_real_mlflow_server_holds_the_runs(launched, mlflow_server):
    from mlflow.tracking import MlflowClient

    study, out, r = launched
    assert r.returncode == 0, r.stdout[-4000:]
    assert not (out / "mlflow.db").exists()  # the server, not the default store, got the records
    c = MlflowClient(tracking_uri=mlflow_server)
    exp = c.get_experiment_by_name("cluster-test")
    runs = c.search_runs([exp.experiment_id])
    children = [x for x in runs if x.data.tags.get("studyctl.role") == "trial"]
    assert len(runs) == 2 and len(children) == 1
    child = children[0]
    assert child.info.status == "FINISHED" and "compare/val_loss" in child.data.metrics
    assert len(c.get_metric_history(child.info.run_id, "loss")) > 5
    arts = [a.path for a in c.list_artifacts(child.info.run_id, "samples")]
    assert arts and all(a.endswith(".png") for a in arts)  # uploaded through the server's artifact proxy
