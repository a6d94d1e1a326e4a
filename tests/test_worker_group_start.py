"""Load must not fail, or restart, a trial: a worker group that waits long for its resources.

On a loaded machine a trial's Ray Train worker group can wait longer than Ray Train's default
start timeout (60 s) for its placement group; the controller then tears the group down and
starts it again. `fit_trainer` gives the start its own, larger timeout
(ray_runner.WORKER_GROUP_START_TIMEOUT_S). Here the start is made slow on purpose: every CPU of
the local Ray is held by another actor until the trial's worker group has waited HOLD_S > 60 s.
The trial must then start on its first placement group, finish, and count no restart.
"""
from __future__ import annotations

import json
import threading
import time

import pytest

try:
    from .orchestrator_helpers import tiny_study
except ImportError:
    from orchestrator_helpers import tiny_study

pytestmark = pytest.mark.slow

HOLD_S = 65.0  # longer than Ray Train's own default start timeout (60 s), which would restart the group


def _cpu_placement_groups() -> dict[str, str]:
    """{id: state} of the placement groups that ask for CPUs: a trial's worker groups (a Tune
    trial's own group asks for memory only: its driver takes no CPU)."""
    import ray.util

    return {pid: pg["state"] for pid, pg in ray.util.placement_group_table().items()
            if any(b.get("CPU", 0) > 0 for b in pg["bundles"].values())}


def test_a_slow_worker_group_start_neither_fails_nor_restarts_the_trial(tmp_path, data_root, monkeypatch):
    import ray

    from orchestrator import ray_runner, sweep
    from orchestrator.plan import build_plan
    from orchestrator.spec import StudySpec
    from orchestrator.status import statuses

    monkeypatch.delenv(ray_runner.WORKER_GROUP_START_TIMEOUT_ENV, raising=False)  # the default under test
    study = tiny_study(data_root, name="slowstart", training={"epochs": 1},
                       evaluation={"metrics": False}, resources={"workers_per_trial": 1, "cpus_per_worker": 1},
                       tracking={"enabled": False}, analysis={"figures": False, "decompose": False})
    plan = build_plan(StudySpec.model_validate(study))
    out = tmp_path / "out"
    ray.init(address="local", num_cpus=2, include_dashboard=False)  # launch joins it (and shuts it down at the end)
    try:
        @ray.remote(num_cpus=2)
        class Hog:  # every CPU, as other work on a loaded machine would hold them
            def ready(self):
                return True

        hog = Hog.remote()
        ray.get(hog.ready.remote())
        seen: dict[str, str] = {}
        waited = {}

        def hold_then_release():
            t0 = None
            while t0 is None or time.time() - t0 < HOLD_S:
                pgs = _cpu_placement_groups()
                seen.update(pgs)
                if t0 is None and pgs:
                    t0 = time.time()  # the worker group asked for its resources
                time.sleep(0.5)
            waited["s"] = time.time() - t0
            ray.kill(hog)

        watcher = threading.Thread(target=hold_then_release, daemon=True)
        watcher.start()
        code = sweep.launch(plan, out, echo=lambda _: None)
        watcher.join(timeout=5)
    finally:
        if ray.is_initialized():
            ray.shutdown()
    tid = plan.trials[0].trial_id
    assert waited.get("s", 0) >= HOLD_S, waited
    assert len(seen) == 1, f"the worker group was started {len(seen)} times: {seen}"
    assert code == 0 and statuses(out)[tid] == "COMPLETED"
    summary = json.loads((out / "trial_files" / tid / "summary.json").read_text())
    assert summary["restarts"] == 0 and summary["step"] == summary["total_steps"]
