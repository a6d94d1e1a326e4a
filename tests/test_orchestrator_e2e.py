"""End to end: `studyctl launch --local` on real MNIST, a real MLflow SQLite store, real Parquet.

One study, run once per session (conftest.e2e_run; the fault and analysis tests reuse it):
four healthy trials (base width {8, 12} x seed {0, 1}) and a fifth whose learning rate makes
the loss overflow. On its way the launcher is killed and `studyctl resume --local` finishes it
(tests/e2e_scenario.py, test_orchestrator_faults.py). The healthy trials must leave complete
records (every Parquet table with its columns and exact row counts, MLflow parent + child runs
with metrics, resume states, EMA snapshots, sample grids); the diverged one must end FAILED with
its reason while the others go on, and the command that finished the sweep (`resume`, which ends
exactly as `launch` does) must exit 1 naming it. The same records under Ray (DDP, Ray Train's
checkpoints) are checked in tests/test_orchestrator_cluster.py.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from diffusion_core.config import METRIC_KEYS
from diffusion_core.residuals import default_t_grid
from records.snapshots import load_snapshot

try:  # tests/ may or may not be a package
    from .e2e_scenario import WORLD
    from .orchestrator_helpers import NAN_LR, expected_steps, studyctl
except ImportError:
    from e2e_scenario import WORLD
    from orchestrator_helpers import NAN_LR, expected_steps, studyctl

pytestmark = pytest.mark.slow



@pytest.fixture(scope="module")
def launched(e2e_study):
    return e2e_study


def _trials(out):
    return pd.read_parquet(out / "trials").set_index("trial_id").sort_index()


def test_launch_exit_code_and_failed_trial_named(launched):
    study, out, r = launched
    trials = _trials(out)
    failed = trials.index[trials["status"] == "FAILED"].tolist()
    assert r.returncode == 1, r.stdout[-4000:]
    assert len(failed) == 1 and failed[0] in r.stdout.split("FAILED:")[-1], r.stdout[-3000:]


def test_trials_table(launched):
    study, out, r = launched
    trials = _trials(out)
    assert len(trials) == 5
    assert sorted(trials["status"]) == ["COMPLETED"] * 4 + ["FAILED"]
    for col in ("study", "status", "error", "parameters", "wall_seconds", "model.base_width", "training.lr",
                "diffusion.T", "data.subset_size", "mlflow_run_id"):
        assert col in trials.columns, col
    ok = trials[trials["status"] == "COMPLETED"]
    assert ok["error"].isna().all() and (ok["wall_seconds"] > 0).all() and (ok["parameters"] > 1000).all()
    assert sorted(ok["model.base_width"]) == [8, 8, 12, 12] and sorted(ok["training.seed"]) == [0, 0, 1, 1]
    bad = trials[trials["status"] == "FAILED"].iloc[0]
    assert bad["training.lr"] == NAN_LR
    assert "DivergedError" in bad["error"] and ("nan" in bad["error"] or "inf" in bad["error"])


def test_parquet_tables_columns_and_row_counts(launched):
    study, out, r = launched
    trials = _trials(out)
    ok = trials.index[trials["status"] == "COMPLETED"]
    tr, ev = study["training"], study["evaluation"]
    logged, ends, evals = expected_steps(study["data"]["subset_size"], tr["batch_size"], WORLD, tr["epochs"],
                                         tr["log_every_first"], tr["log_every"], tr["eval_every"], tr["eval_start"])
    n_t = len(default_t_grid(study["diffusion"]["T"], ev["t_grid"]))
    swept = ["model.base_width", "training.lr", "training.seed"]
    tables = {k: pd.read_parquet(out / k) for k in ("train_steps", "epochs", "residuals", "evals")}
    for kind, df in tables.items():
        for col in ["study", "trial_id", "step"] + swept:
            assert col in df.columns, (kind, col)
        assert (df["study"] == "e2e").all()
    for tid in ok:
        steps = tables["train_steps"].query("trial_id == @tid")
        assert steps["step"].tolist() == logged  # every step for the first N, then every N: no gaps, no dups
        assert steps["loss"].notna().all()
        # training.val_loss_first: a validation minibatch loss beside the first N steps' losses, none after
        early = steps["step"] <= tr["val_loss_first"]
        assert early.sum() == tr["val_loss_first"] and (steps.loc[early, "val_batch_loss"] > 0).all()
        assert steps.loc[~early, "val_batch_loss"].isna().all()
        ep = tables["epochs"].query("trial_id == @tid").sort_values("epoch")
        assert ep["epoch"].tolist() == list(range(1, tr["epochs"] + 1)) and ep["step"].tolist() == ends
        assert ep[["train_loss", "val_loss", "val_loss_raw", "train_loss_eval", "ema_init_share"]].notna().all().all()
        assert (ep["val_loss_raw"] != ep["val_loss"]).all()   # the raw and the EMA weights differ
        res = tables["residuals"].query("trial_id == @tid")
        assert len(res) == len(evals) * n_t * 2
        assert set(res["weights"]) == {"ema", "raw"} and sorted(res["step"].unique()) == evals
        assert not res.duplicated(["step", "t", "weights"]).any()
        assert (res["residual"] > 0).all()
        e = tables["evals"].query("trial_id == @tid").sort_values("step")
        assert e["step"].tolist() == evals
        assert np.allclose(e["ema_init_share"], tr["ema_decay"] ** e["step"], rtol=1e-9)   # no warm-up: decay^k
        for k in METRIC_KEYS:
            assert k in e.columns, k
        assert e[["fid", "fid_mean_term", "fid_cov_term", "inception_score", "h_y", "precision"]].notna().all().all()
        assert ((e["fid_mean_term"] + e["fid_cov_term"] - e["fid"]).abs() < 1e-6 * e["fid"].abs().max()).all()
        for rel in e["sample_grid"]:
            assert (out / rel).exists() and (out / rel).with_suffix(".npy").exists()
    # the diverged trial: its rows up to the divergence are kept, nothing past it
    bad = trials.index[trials["status"] == "FAILED"][0]
    assert len(tables["evals"].query("trial_id == @bad")) == 0


def test_resume_states_and_ema_snapshots(launched):
    import torch

    study, out, r = launched
    trials = _trials(out)
    for tid in trials.index[trials["status"] == "COMPLETED"]:
        state = torch.load(out / "trial_files" / tid / "resume.pt", weights_only=True)  # the last evaluation's
        assert {"model", "ema", "optimizer", "step", "generator", "cpu_rng"} <= set(state)
        assert not (out / "ray").exists()  # --local: no Ray checkpoints
        emas = sorted((out / "trial_files" / tid / "ema").glob("step_*.pt"))
        assert len(emas) == len(pd.read_parquet(out / "evals").query("trial_id == @tid"))
        snap = load_snapshot(emas[-1])    # the model rebuilt from the snapshot's own core configs
        assert snap.step == state["step"] and snap.model.base_width == trials.loc[tid, "model.base_width"]
        assert all(torch.equal(v, state["ema"]["module"][k]) for k, v in snap.net("ema").state_dict().items())


def test_mlflow_parent_and_children(launched):
    from mlflow.tracking import MlflowClient

    study, out, r = launched
    c = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    exp = c.get_experiment_by_name("e2e")
    runs = c.search_runs([exp.experiment_id])
    parents = [x for x in runs if x.data.tags.get("studyctl.role") == "study"]
    children = [x for x in runs if x.data.tags.get("studyctl.role") == "trial"]
    assert len(parents) == 1 and len(children) == 5
    assert all(x.data.tags["mlflow.parentRunId"] == parents[0].info.run_id for x in children)
    trials = _trials(out)
    tr = study["training"]
    logged = expected_steps(study["data"]["subset_size"], tr["batch_size"], WORLD, tr["epochs"],
                            tr["log_every_first"], tr["log_every"], tr["eval_every"], tr["eval_start"])[0]
    for x in children:
        tid = x.data.tags["studyctl.trial_id"]
        assert x.data.params["model.base_width"] == str(trials.loc[tid, "model.base_width"])
        if trials.loc[tid, "status"] == "COMPLETED":
            assert x.info.status == "FINISHED"
            for k in ("loss", "val_batch_loss", "train_loss", "compare/val_loss", "val_loss_raw", "train_loss_eval",
                      "ema_init_share", "eval_seconds"):
                assert k in x.data.metrics, k
            hist = c.get_metric_history(x.info.run_id, "loss")
            assert sorted(m.step for m in hist) == logged  # every logged step once: none missing, none duplicated
            evals = [m.step for m in c.get_metric_history(x.info.run_id, "eval_seconds")]
            assert len(evals) == len(set(evals))  # evaluations are logged with the checkpoint: once each
            arts = [a.path for a in c.list_artifacts(x.info.run_id, "samples")]
            assert any(a.endswith(".png") for a in arts)
        else:
            assert x.info.status == "FAILED" and "DivergedError" in x.data.tags["error"]
    assert parents[0].info.status == "FAILED"  # the study had a failed trial


def test_status_command(launched):
    study, out, r = launched
    s = studyctl("status", out, timeout=120)
    assert s.returncode == 0, s.stdout
    trials = _trials(out)
    for tid, row in trials.iterrows():
        assert tid in s.stdout
    assert "COMPLETED" in s.stdout and "FAILED" in s.stdout and "100%" in s.stdout
