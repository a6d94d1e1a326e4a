"""ASHA early stopping on a real sweep: a hopeless trial is stopped at its first rung and
recorded as STOPPED (not FAILED), the good one runs to the end, and `launch` exits 0."""
from __future__ import annotations

import pandas as pd
import pytest

try:
    from .orchestrator_helpers import studyctl, tiny_study, write_study
except ImportError:
    from orchestrator_helpers import studyctl, tiny_study, write_study

pytestmark = pytest.mark.slow


def test_asha_stops_the_hopeless_trial(tmp_path, data_root):
    # One trial at a time (max_concurrent_trials 1), so the good trial (lr 1e-3) sets the rung
    # before the hopeless one (lr 1e-7: its validation loss stays at the untrained ~1.0) reaches it.
    study = tiny_study(data_root, name="asha",
                       sweep={"grid": {"training.lr": [1e-3, 1e-7]},
                              "asha": {"metric": "val_loss", "mode": "min", "grace_period": 1,
                                       "reduction_factor": 2, "max_t": 4}},
                       evaluation={"metrics": False},
                       resources={"workers_per_trial": 1, "cpus_per_worker": 1, "max_concurrent_trials": 1})
    study["analysis"] = {"figures": False}
    out = tmp_path / "out"
    r = studyctl("launch", write_study(tmp_path / "asha.yaml", study), "--output", out, timeout=400)
    trials = pd.read_parquet(out / "trials").set_index("training.lr")
    assert r.returncode == 0, r.stdout[-4000:]
    assert trials.loc[1e-3, "status"] == "COMPLETED"
    assert trials.loc[1e-7, "status"] == "STOPPED", r.stdout[-4000:]
    assert "ASHA" in trials.loc[1e-7, "error"]
    stopped_evals = pd.read_parquet(out / "evals").query("`training.lr` == 1e-7")
    assert len(stopped_evals) < len(pd.read_parquet(out / "evals").query("`training.lr` == 1e-3"))
    from mlflow.tracking import MlflowClient

    c = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    for lr, state in ((1e-3, "FINISHED"), (1e-7, "KILLED")):
        assert c.get_run(trials.loc[lr, "mlflow_run_id"]).info.status == state
