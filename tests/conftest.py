"""Shared fixtures: real MNIST (found as `studyctl` finds it), two CPU threads, session-scoped splits,
the shared study (--local) and a Ray cluster per Ray test module."""
from __future__ import annotations

import os
import re
from pathlib import Path

# Two threads on a 2-core machine that other processes share: OpenMP's default spin-waiting
# then costs 10-100x on small ops. Must be set before torch (and its OpenMP runtime) loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# Under pytest-xdist the workers share the cores: one torch thread each with 2-3 workers on 2 cores
# (measured with two workers: the whole suite 654 s so, 690 s with two threads each). The same for
# the processes the tests start (`studyctl launch --local`, the Ray cluster's workers), through the
# environment they inherit.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
_THREADS = max(1, min(2, (os.cpu_count() or 2) // _WORKERS))
if _WORKERS > 1:
    os.environ.setdefault("OMP_NUM_THREADS", str(_THREADS))

import pytest  # noqa: E402
import torch  # noqa: E402

# Real MNIST in torchvision's layout (<root>/MNIST/raw), by the one rule of the CLI and the core
# (diffusion_core.data.resolve_data_root): $STUDYCTL_DATA_ROOT, else ./data. Pinned as an absolute path,
# so tests that change folder and the processes they start (Ray workers, `studyctl`) read the same one.
from diffusion_core.config import DATA_ROOT_ENV, resolve_data_root

os.environ[DATA_ROOT_ENV] = str(resolve_data_root().resolve())

torch.set_num_threads(_THREADS)


@pytest.fixture(scope="session")
def data_root() -> Path:
    root = Path(os.environ[DATA_ROOT_ENV])
    if not (root / "MNIST" / "raw").exists():
        pytest.fail(f"real MNIST is required but {root / 'MNIST' / 'raw'} does not exist; "
                    f"export {DATA_ROOT_ENV} as the folder that contains MNIST/raw (default: ./data)")
    return root


@pytest.fixture(scope="session")
def mnist_splits(data_root):
    """The thesis's seeded 48,000 / 12,000 split of real MNIST (split_seed=0). Treat as read-only."""
    from diffusion_core import mnist_splits as _mnist_splits
    return _mnist_splits(data_root, split_seed=0)


@pytest.fixture(scope="session")
def e2e_run(tmp_path_factory, data_root):
    """One real study, run once per session (tests/e2e_scenario.py): `studyctl launch --local` on
    real MNIST with a SQLite MLflow store, the launcher SIGKILLed mid-study, then `studyctl resume
    --local`. Used by the orchestrator and the analysis tests. Returns what was observed (a dict:
    study, out, a, b, resume, ...)."""
    import e2e_scenario

    return e2e_scenario.run(tmp_path_factory.mktemp("e2e"), data_root)


@pytest.fixture(scope="session")
def e2e_study(e2e_run):
    """(study dict, output folder, CompletedProcess of the `resume` that finished the study)."""
    return e2e_run["study"], e2e_run["out"], e2e_run["resume"]


@pytest.fixture(scope="module")
def ray_cluster():
    """A Ray module's own Ray cluster: two nodes of one CPU each (ray.cluster_utils), joined by its
    tests' `studyctl launch --address` (a local Ray per launch cost each test its own start-up), shut
    down with the module. One CPU a node: a trial's two DDP workers must use both nodes. Not shared
    across modules: each starts from a clean cluster (no actors, placement groups or detached
    PlacementGroupCleaners of another module's killed trials), and a finished module's cluster does
    not idle on until its xdist worker ends."""
    from ray.cluster_utils import Cluster

    from orchestrator.ray_runner import PREEMPTION_WATCHER_ENV

    # Set before the nodes start, so their worker processes inherit it: one machine is never
    # preempted (as orchestrator.ray_runner.init_ray does for a local Ray).
    os.environ.setdefault(PREEMPTION_WATCHER_ENV, "0")

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        yield cluster
    finally:
        cluster.shutdown()


# The session fixture that costs minutes and that several test modules share: under pytest-xdist
# (pyproject's addopts) every module that uses it runs on the same worker, so it is built once per
# test run; other modules are spread file by file. The Ray modules are not grouped: a cluster
# starts in ~15 s, and the three modules (~100-180 s each) on one worker were the suite's critical
# path (measured with -n 3: 515 s of a 590 s run); each starts its own (ray_cluster).
SHARED_FIXTURES = ("e2e_run", "e2e_study")
_SHARED_SCOPE = {"e2e_run": "e2e_run", "e2e_study": "e2e_run"}
# Modules run on the shared study's worker, after it, though they do not read it. The stacked group
# under Ray: in every order that put it on a worker with another Ray module (5 runs), a Ray module
# after the first one on that worker stalled under load, ~60 s at each of its first actors' start (ASHA
# 216-245 s instead of ~100 s, the slow-start test 195-244 s instead of ~110 s; once ASHA's trials
# were cancelled and the suite failed; cause not found). Here (6 runs and earlier CI) it never stalled:
# each worker runs one Ray cluster module, and the slow-start test's own Ray comes before ASHA's.
_SCOPE_OF_MODULE = {"tests/test_ray_stacked.py": "e2e_run"}
# Longest first, so the long ones start at once, on different workers, and the short modules fill
# in at the end (measured under -n 3: the cluster's faults ~140-190 s, the shared study and its
# analysis ~180 s, the stacked group under Ray ~100-130 s, the slow worker-group start ~110 s of mostly
# waiting, ASHA ~100 s, then modules of 20-85 s).
_FIRST = ("tests/test_orchestrator_cluster.py", "e2e_run", "tests/test_worker_group_start.py",
          "tests/test_orchestrator_asha.py", "tests/test_orchestrator_local.py",
          "tests/test_variance_guidance.py", "tests/test_generalization.py", "tests/test_interrupt_resume.py",
          "tests/test_stacked_local.py", "tests/test_fast_path.py", "tests/test_metrics.py",
          "tests/test_ground_truth_analysis.py")


def _shared_scope(path: Path) -> str | None:
    """The shared session fixture a test module uses, read off its source (a module's tests may reach
    it through a module fixture, so the test's own fixture names are not enough)."""
    if f"tests/{path.name}" in _SCOPE_OF_MODULE:
        return _SCOPE_OF_MODULE[f"tests/{path.name}"]
    text = path.read_text() if path.suffix == ".py" and path.exists() else ""
    # the name as a word: test_ray_stacked's own `_e2e_study()` once chained it (190 s) to the shared study
    return next((_SHARED_SCOPE[name] for name in SHARED_FIXTURES if re.search(rf"\b{name}\b", text)), None)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """pytest-xdist's scope scheduling with one scope per shared session fixture (see SHARED_FIXTURES),
    else per module, in collection order (pytest_collection_modifyitems puts the long ones first).
    xdist's own `--dist loadgroup` marks do not group tests under pytest 9.2."""
    from xdist.scheduler import LoadScopeScheduling

    root = config.rootpath

    class SharedFixtureScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::", 1)[0]
            return _shared_scope(root / module) or module

    config.option.loadscopereorder = False  # keep the collection order: longest first
    return SharedFixtureScheduling(config, log)


def pytest_collection_modifyitems(config, items):
    """Modules that share a costly session fixture run together, the longest first (see _FIRST):
    the fixture is then built once per worker that needs it, and the long items start at once.
    Whole modules move, in their order, so no module-scoped fixture is set up twice."""
    root = config.rootpath
    scope_of: dict[Path, str] = {}

    def rank(item) -> int:
        path = Path(str(item.path))
        if path not in scope_of:
            rel = path.relative_to(root).as_posix() if path.is_relative_to(root) else str(path)
            scope_of[path] = _shared_scope(path) or rel
        scope = scope_of[path]
        return _FIRST.index(scope) if scope in _FIRST else len(_FIRST)

    items.sort(key=rank)  # stable: each part keeps its order
