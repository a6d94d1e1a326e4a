"""Shared fixtures: real MNIST (found as `studyctl` finds it), two CPU threads, session-scoped splits,
the shared study (--local) and the one Ray cluster of a test run."""
from __future__ import annotations

import os
from pathlib import Path

# Two threads on a 2-core machine that other processes share: OpenMP's default spin-waiting
# then costs 10-100x on small ops. Must be set before torch (and its OpenMP runtime) loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402

# Real MNIST in torchvision's layout (<root>/MNIST/raw), by the one rule of the CLI and the core
# (diffusion_core.data.resolve_data_root): $STUDYCTL_DATA_ROOT, else ./data. Pinned as an absolute path,
# so tests that change folder and the processes they start (Ray workers, `studyctl`) read the same one.
from diffusion_core.config import DATA_ROOT_ENV, resolve_data_root

os.environ[DATA_ROOT_ENV] = str(resolve_data_root().resolve())

torch.set_num_threads(2)


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


@pytest.fixture(scope="session")
def ray_cluster():
    """The test run's one Ray cluster: two nodes of one CPU each (ray.cluster_utils), started once
    and joined by every Ray test's `studyctl launch --address` (a local Ray per launch cost each
    test its own start-up). One CPU a node: a trial's two DDP workers must use both nodes."""
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


def pytest_collection_modifyitems(config, items):
    """The modules with a test on the Ray cluster run last, together: the cluster then starts
    once for them and is not left idle on the shared CPU while the other tests run. Whole modules
    move, in their order, so no module-scoped fixture is set up twice."""
    def module(item):
        return getattr(item, "module", None)

    ray_modules = {module(item) for item in items if "ray_cluster" in getattr(item, "fixturenames", ())}
    items.sort(key=lambda item: module(item) in ray_modules)  # stable: each part keeps its order
