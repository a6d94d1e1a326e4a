"""The session's one real Ray study, with both faults a study must survive (conftest.e2e_run).

Each trial under Ray starts ~7 processes (Tune driver, Train controller, its helper actors, the
DDP workers; each imports Ray, most import torch): ~70 CPU-seconds before it trains. On the
2-core CI box a separate study per scenario cost minutes, so the faults happen in this study:

1. `studyctl launch` of five trials (base width {8, 12} x seed {0, 1}, DDP with 2 workers, and a
   fifth whose learning rate makes the loss overflow), two trials at a time on a local Ray.
2. Once trial A (the first) has written its first checkpoint, SIGKILL its rank-1 worker: Ray
   Train restarts the worker group from that checkpoint (max_failures 1).
3. Once A has finished and another trial B is running with its first checkpoint (and only that
   one: B is far from its end), SIGKILL the launcher's whole process group (the launcher and the
   local Ray it started).
4. `studyctl resume DIR` finishes the study: A is not rerun, B continues from its checkpoint in
   the same MLflow child run, the diverged trial ends FAILED and resume exits 1 naming it.

The records must then be exactly those of an undisturbed run (tests/test_orchestrator_e2e.py).
"""
from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pandas as pd

from orchestrator_helpers import NAN_LR, kill_group, start, studyctl, tiny_study, wait_for, write_study


def study(data_root) -> dict:
    return tiny_study(data_root, name="e2e",
                      sweep={"grid": {"model.base_width": [8, 12], "training.seed": [0, 1]},
                             "arms": [{"training.lr": [NAN_LR]}]},
                      resources={"workers_per_trial": 2, "cpus_per_worker": 0.5, "max_failures": 1})


def checkpoint_steps(out: Path, tid: str) -> list[int]:
    """The steps of the checkpoints Ray Train has registered (in its snapshot), not ones still being uploaded."""
    from records.layout import ray_train_dir

    try:
        snap = json.loads((ray_train_dir(out) / tid / "checkpoint_manager_snapshot.json").read_text())
    except (OSError, ValueError):
        return []
    return sorted(int(c["checkpoint_dir_name"].rsplit("_", 1)[1]) for c in snap["checkpoint_results"])


def record_parts(out: Path, tid: str) -> dict[str, int]:
    """A trial's Parquet parts and their modification times (a rerun would rewrite them)."""
    return {str(p.relative_to(out)): p.stat().st_mtime_ns
            for kind in ("train_steps", "epochs", "residuals", "evals") for p in (out / kind).glob(f"{tid}--*")}


def _statuses(out: Path) -> dict[str, str]:
    from orchestrator.status import statuses

    return statuses(out)


def run(tmp: Path, data_root) -> dict:
    """Launch, kill a worker, kill the launcher, resume; returns what was seen along the way."""
    s = study(data_root)
    f = write_study(tmp / "e2e.yaml", s)
    out = tmp / "out"
    first_eval = s["training"]["eval_start"]
    obs = {"study": s, "out": out}
    p = start("launch", f, "--output", out, log=tmp / "launch.log")
    try:
        wait_for(lambda: len(_statuses(out)) == 5, 120, "PENDING rows", p)
        ids = sorted(_statuses(out))
        a = obs["a"] = ids[0]
        # 2. kill trial A's rank-1 worker after its first checkpoint
        wait_for(lambda: checkpoint_steps(out, a), 300, f"first checkpoint of {a}", p, poll=0.1)
        rank1 = json.loads((out / "trial_files" / a / "workers" / "rank1.json").read_text())
        obs["killed_worker_pid"] = rank1["pid"]
        os.kill(rank1["pid"], signal.SIGKILL)

        # 3. kill the launcher (and its local Ray) once A is done and B holds its first checkpoint only
        def running_b():
            # the checkpoint snapshots first: reading the trials table costs ~30 ms of CPU, too much at 10 Hz
            # for two cores the trials need
            firsts = [t for t in ids if t != a and checkpoint_steps(out, t) == [first_eval]]
            if not firsts:
                return None
            st = _statuses(out)
            if st.get(a) in ("FAILED", "STOPPED"):  # its worker group did not come back: fail now, not at the timeout
                raise AssertionError(f"{a} ended {st[a]} after its rank-1 worker was killed:\n"
                                     f"{(tmp / 'launch.log').read_text()[-4000:]}")
            if st.get(a) != "COMPLETED":
                return None
            return next((t for t in firsts if st.get(t) == "RUNNING"), None)

        b = obs["b"] = wait_for(running_b, 480, f"{a} completed and another trial at its first checkpoint", p, poll=0.1)
        kill_group(p)
        obs["launch_log"] = (tmp / "launch.log").read_text()
        trials = pd.read_parquet(out / "trials").set_index("trial_id")
        obs["status_after_kill"] = trials["status"].to_dict()
        obs["b_run_id"] = trials.loc[b, "mlflow_run_id"]
        obs["a_parts"] = record_parts(out, a)
        obs["a_row"] = trials.loc[a].to_dict()
    finally:
        kill_group(p)
    # 4. resume
    obs["resume"] = studyctl("resume", out, timeout=600)
    return obs
