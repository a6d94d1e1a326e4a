"""The session's one shared study, with the fault every launch must survive (conftest.e2e_run).

It runs `--local`: the same `launch`/`resume` commands, trial driver, TrialHooks, Parquet records
and MLflow runs as a Ray launch, without Ray's ~100 s of process start-up per trial on a 2-core
CPU. What only Ray shows (DDP across workers and nodes, a killed worker, a killed driver on a
cluster, ASHA, a stacked group) is in the Ray tests, on the session's one Ray cluster
(conftest.ray_cluster; tests/test_orchestrator_cluster.py and friends).

1. `studyctl launch --local` of five trials (base width {8, 12} x seed {0, 1}, and a fifth whose
   learning rate makes the loss overflow), one after another in the launcher's process.
2. Once one trial (A) has finished and another (B) is running with a resume state written (and
   is far from its end), SIGKILL the launcher's whole process group.
3. `studyctl resume DIR --local` finishes the study: A is not rerun, B continues from its resume
   state in the same MLflow child run, the diverged trial ends FAILED and resume exits 1 naming it.
   Its analysis (the study file's: decompose on 32 points, then the figures) runs as a launch's does.

The records must then be exactly those of an undisturbed run (tests/test_orchestrator_e2e.py,
tests/test_orchestrator_faults.py).
"""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from orchestrator_helpers import NAN_LR, kill_group, start, studyctl, tiny_study, wait_for, write_study

WORLD = 1  # --local: one process per trial


def study(data_root) -> dict:
    return tiny_study(data_root, name="e2e",
                      sweep={"grid": {"model.base_width": [8, 12], "training.seed": [0, 1]},
                             "arms": [{"training.lr": [NAN_LR]}]},
                      resources={"workers_per_trial": WORLD, "cpus_per_worker": 1},
                      training={"val_loss_first": 10},  # Fig. 26b's validation minibatch at steps 1-10
                      # the launch's own analysis decomposes (then draws every figure once, the
                      # decomposition's included): tests/test_analysis.py reads both
                      analysis={"decompose": True, "decompose_points": 32})


def record_parts(out: Path, tid: str) -> dict[str, int]:
    """A trial's Parquet parts and their modification times (a rerun would rewrite them)."""
    return {str(p.relative_to(out)): p.stat().st_mtime_ns
            for kind in ("train_steps", "epochs", "residuals", "evals") for p in (out / kind).glob(f"{tid}--*")}


def _statuses(out: Path) -> dict[str, str]:
    from orchestrator.status import statuses

    return statuses(out)


def _summary_step(out: Path, tid: str) -> int | None:
    try:
        return json.loads((out / "trial_files" / tid / "summary.json").read_text())["step"]
    except (OSError, ValueError, KeyError):
        return None


def run(tmp: Path, data_root) -> dict:
    """Launch --local, kill the launcher mid-trial, resume --local; returns what was seen along the way."""
    s = study(data_root)
    f = write_study(tmp / "e2e.yaml", s)
    out = tmp / "out"
    obs = {"study": s, "out": out, "world": WORLD}
    p = start("launch", f, "--local", "--output", out, log=tmp / "launch.log")
    try:
        wait_for(lambda: len(_statuses(out)) == 5, 120, "PENDING rows", p)

        def a_done_and_b_resumable():
            # resume.pt first (a stat); the trials table only then (~30 ms of CPU a read)
            files = out / "trial_files"
            with_state = [d.name for d in files.iterdir() if (d / "resume.pt").exists()] if files.exists() else []
            if len(with_state) < 2:
                return None
            st = _statuses(out)
            done = [t for t in with_state if st.get(t) == "COMPLETED"]
            running = [t for t in with_state if st.get(t) == "RUNNING"]
            return (done[0], running[0]) if done and running else None

        a, b = wait_for(a_done_and_b_resumable, 300, "one trial completed and the next with a resume state", p,
                        poll=0.05)
        kill_group(p)
        obs["a"], obs["b"] = a, b
        obs["launch_log"] = (tmp / "launch.log").read_text()
        trials = pd.read_parquet(out / "trials").set_index("trial_id")
        obs["status_after_kill"] = trials["status"].to_dict()
        obs["b_step_at_kill"] = _summary_step(out, b)
        obs["b_run_id"] = trials.loc[b, "mlflow_run_id"]
        obs["a_parts"] = record_parts(out, a)
        obs["a_row"] = trials.loc[a].to_dict()
    finally:
        kill_group(p)
    # 3. resume
    obs["resume"] = studyctl("resume", out, "--local", timeout=600)
    return obs
