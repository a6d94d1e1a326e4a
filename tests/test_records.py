"""records/: atomic writes, EMA snapshots that rebuild their model, the latest row per trial,
and the direction of the package dependencies. Fast (no training, no MNIST)."""
from __future__ import annotations

import ast
import os
from pathlib import Path

import pandas as pd
import pytest
import torch

from diffusion_core.config import DataConfig, EvalConfig, ScheduleConfig, UNetConfig
from diffusion_core.model.unet import UNet
from records.atomic import atomic_write
from records.parquet import latest_per_trial
from records.snapshots import load_snapshot, save_snapshot

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------ atomic writes
def test_atomic_write_gives_old_or_new_content_and_leaves_no_temp_file(tmp_path):
    target = tmp_path / "table.parquet"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic_write(target) as fh:
            fh.write(b"new, half")
            assert target.read_bytes() == b"old"          # a reader meanwhile sees the old file
            raise RuntimeError("writer died mid-way")
    assert target.read_bytes() == b"old" and sorted(os.listdir(tmp_path)) == ["table.parquet"]

    with atomic_write(target) as fh:
        fh.write(b"new")
    assert target.read_bytes() == b"new" and sorted(os.listdir(tmp_path)) == ["table.parquet"]

    fresh = tmp_path / "sub" / "fresh.json"                # a new file in a new folder: none, or whole
    with pytest.raises(KeyboardInterrupt):
        with atomic_write(fresh) as fh:
            fh.write(b"{")
            raise KeyboardInterrupt
    assert os.listdir(tmp_path / "sub") == []


def test_atomic_write_keeps_the_umask_permissions(tmp_path):
    """Not mkstemp's 0600: a shared study folder and the shipped weights stay readable."""
    before = os.umask(0o027)
    try:
        with atomic_write(tmp_path / "f") as fh:
            fh.write(b"x")
    finally:
        os.umask(before)
    assert (tmp_path / "f").stat().st_mode & 0o777 == 0o640


# ------------------------------------------------------------------------------ snapshots
TINY = dict(in_channels=1, image_size=28, base_width=4, channel_mult=(1, 2), blocks_per_level=1,
            bottleneck_blocks=1, dropout=0.0)


def _outputs(net: UNet) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 1, 28, 28, generator=g)
    with torch.no_grad():
        return net(x, torch.tensor([3, 40]), torch.tensor([1, 7]))


def test_snapshot_rebuilds_the_model_from_its_core_configs(tmp_path):
    model = UNetConfig(**TINY, class_conditional=True, learn_sigma=True)
    net = UNet(model).eval()
    configs = dict(data=DataConfig(subset_size=256, subset_index=1), model=model,
                   schedule=ScheduleConfig(name="cosine", T=50), evaluation=EvalConfig(seed=7, t_grid=(1, 5)))
    save_snapshot(tmp_path / "step_000000010.pt", step=10, ema=net.state_dict(), raw=net.state_dict(),
                  config={"model": {"base_width": 4}}, **configs)
    snap = load_snapshot(tmp_path / "step_000000010.pt")
    assert (snap.step, snap.data, snap.model, snap.schedule, snap.evaluation) == (10, *configs.values())
    assert sorted(snap.weights) == ["ema", "raw"] and snap.config == {"model": {"base_width": 4}}
    assert torch.equal(_outputs(snap.net("ema")), _outputs(net))


def test_snapshot_without_core_configs_maps_its_study_config(tmp_path):
    """Snapshots written before they held core configs: the study sections are mapped as the
    orchestrator did, including the learned variance (2 output channels) and class conditioning."""
    net = UNet(UNetConfig(**TINY, class_conditional=True, learn_sigma=True)).eval()
    study_config = {
        "data": {"dataset": "mnist", "root": None, "split_seed": 0, "subset_size": 256, "subset_index": 1,
                 "subset_mode": "disjoint", "data_seed": 0, "image_size": None, "val_size": None},
        "model": {"base_width": 4, "channel_mult": [1, 2], "blocks_per_level": 1, "bottleneck_blocks": 1,
                  "dropout": 0.0, "attention": False, "attention_heads": 1, "class_conditional": True},
        "diffusion": {"schedule": "cosine", "T": 50, "beta_start": 1e-4, "beta_end": 0.02,
                      "reverse_variance": "learned", "loss": "hybrid"},
        "evaluation": {"every": 100, "seed": 7, "t_grid": [1, 5], "n_samples": 16, "progressive_t": [10, 0]},
    }
    torch.save({"step": 10, "ema": net.state_dict(), "config": study_config}, tmp_path / "old.pt")
    snap = load_snapshot(tmp_path / "old.pt")
    assert snap.model == UNetConfig(**TINY, attention=False, attention_heads=1, class_conditional=True,
                                    learn_sigma=True)
    assert snap.schedule == ScheduleConfig(name="cosine", T=50)
    assert (snap.evaluation.seed, snap.evaluation.t_grid, snap.evaluation.progressive_t) == (7, (1, 5), (10, 0))
    assert snap.data == DataConfig(subset_size=256, subset_index=1) and list(snap.weights) == ["ema"]
    assert torch.equal(_outputs(snap.net("ema")), _outputs(net))


# ------------------------------------------------------------------------------ tables
def test_latest_per_trial_takes_each_trials_last_row_by_the_given_order():
    df = pd.DataFrame({"trial_id": ["a", "b", "a", "b", "a"], "step": [30, 5, 10, 50, 20],
                       "epoch": [1.0, 9.0, 3.0, 2.0, 2.0], "loss": [0.3, 0.5, 0.1, 0.2, 0.9]})
    by_step = latest_per_trial(df).set_index("trial_id")["loss"].to_dict()
    by_epoch = latest_per_trial(df, "epoch").set_index("trial_id")["loss"].to_dict()
    assert by_step == {"a": 0.3, "b": 0.2} and by_epoch == {"a": 0.1, "b": 0.5}


# ------------------------------------------------------------------------------ layering
# CLI (orchestrator/cli.py) -> orchestrator, analysis -> records -> diffusion_core. The CLI may
# import both sides; nothing below it imports upward or sideways.
FORBIDDEN = {
    "diffusion_core": {"records", "orchestrator", "analysis", "ray", "mlflow"},
    "records": {"orchestrator", "analysis", "ray", "mlflow"},
    "analysis": {"orchestrator", "ray", "mlflow"},
    "orchestrator": {"analysis"},
}
ALLOWED = {"orchestrator/cli.py", "orchestrator/cli_analysis.py"}    # the command line sits on top of both


def _imported_packages(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):   # lazy imports inside functions count too
        if isinstance(node, ast.Import):
            out |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.add(node.module.split(".")[0])
    return out


def test_dependencies_point_one_way():
    broken = []
    for package, forbidden in FORBIDDEN.items():
        files = sorted((REPO / package).rglob("*.py"))
        assert files, package
        for f in files:
            rel = f.relative_to(REPO).as_posix()
            if rel not in ALLOWED and (bad := _imported_packages(f) & forbidden):
                broken.append(f"{rel} imports {', '.join(sorted(bad))}")
    assert not broken, "imports against the layering:\n" + "\n".join(broken)


PACKAGES = ("diffusion_core", "records", "analysis", "orchestrator")


def _module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imported_modules(path: Path, root: Path, known: set[str]) -> set[str]:
    """The project modules `path` imports, at module level or inside functions (a lazy import still
    ties the two); imports under `if TYPE_CHECKING:` are annotations only and do not count."""
    tree = ast.parse(path.read_text())
    typing_only = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
                   and getattr(node.test, "id", getattr(node.test, "attr", None)) == "TYPE_CHECKING"
                   for n in ast.walk(node)}
    package = _module_name(path, root).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    out = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[:len(package) - node.level + 1] + ([base] if base else []))
            names = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        out |= {n for n in names if n in known}
    return out


def import_cycles(files: list[Path], root: Path = REPO) -> list[list[str]]:
    """Every strongly connected set of more than one module in the import graph of `files` (Tarjan)."""
    names = {f: _module_name(f, root) for f in files}
    known = set(names.values())
    graph = {names[f]: _imported_modules(f, root, known) - {names[f]} for f in files}
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return cycles


def test_no_import_cycles(tmp_path):
    files = [f for p in PACKAGES for f in sorted((REPO / p).rglob("*.py"))]
    assert not import_cycles(files), f"import cycles: {import_cycles(files)}"
    # the check finds one: a lazy import inside a function closes a cycle as well
    pkg = tmp_path / "analysis"
    pkg.mkdir()
    (pkg / "a.py").write_text("from .b import g\n\ndef f():\n    return g()\n")
    (pkg / "b.py").write_text("def g():\n    from .a import f\n    return f\n")
    (pkg / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .a import f\n")
    assert import_cycles(sorted(pkg.glob("*.py")), tmp_path) == [["analysis.a", "analysis.b"]]


MAX_MODULE_LINES = 400  # one concern per file (issue 23): a module past this is two concerns


def test_no_module_over_400_lines():
    long = {f.relative_to(REPO).as_posix(): n for p in PACKAGES for f in sorted((REPO / p).rglob("*.py"))
            if (n := len(f.read_text().splitlines())) > MAX_MODULE_LINES}
    assert not long, f"modules over {MAX_MODULE_LINES} lines: {long}"


# Every path of a study folder is built by records/layout.py. Outside it, a path joined with a string
# literal (`out / "mlflow.db"`, `d / f"{tid}.pt"`) or a literal naming a study file is a second place
# that knows the layout. These joins are not into a study folder:
PATH_LITERALS_ALLOWED = {
    ("orchestrator/__init__.py", "studies"),                # the packaged studies, beside the code
    ("analysis/thesis_claims.py", "studies"), ("analysis/thesis_claims.py", "thesis.yaml"),
    ("orchestrator/spec.py", "MNIST"), ("orchestrator/spec.py", "raw"),   # the data root's layout (torchvision's)
    ("orchestrator/spec.py", "cifar-10-batches-py"),
}
STUDY_FILE_SUFFIXES = (".parquet", ".pt", ".npz", ".npy", ".json", ".db", ".html", ".png")


def path_literals(source: str) -> list[str]:
    """The string literals `source` joins onto a path with `/`, and literals that name a study file."""
    found, joined = [], set()
    for node in ast.walk(ast.parse(source)):   # (a BinOp is visited before the literal on its right)
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):
            right = node.right
            if isinstance(right, ast.Constant) and isinstance(right.value, str):
                found.append(right.value)
                joined.add(id(right))
            elif isinstance(right, ast.JoinedStr):
                found.append(ast.unparse(right))
        elif (isinstance(node, ast.Constant) and id(node) not in joined and isinstance(node.value, str) and not node.value.startswith(".")
              and " " not in node.value and node.value.endswith(STUDY_FILE_SUFFIXES)):
            found.append(node.value)
    return found


def test_path_literals_are_found():
    """The scan below can fail: it sees each way a study path gets built outside layout.py."""
    assert path_literals('d / "mlflow.db"') == ["mlflow.db"]
    assert path_literals('tmp / f"{tid}.pt"') == ["f'{tid}.pt'"]
    assert path_literals('NAME = "ray_checkpoint.json"') == ["ray_checkpoint.json"]
    assert path_literals('p.with_suffix(".png"); x = a / b') == []


def test_every_study_path_is_built_in_layout():
    offenders = []
    for package in ("orchestrator", "analysis", "records"):
        for f in sorted((REPO / package).rglob("*.py")):
            rel = f.relative_to(REPO).as_posix()
            if rel == "records/layout.py":
                continue
            offenders += [f"{rel}: {lit!r}" for lit in path_literals(f.read_text())
                          if (rel, lit) not in PATH_LITERALS_ALLOWED]
    assert not offenders, "study paths built outside records/layout.py:\n" + "\n".join(offenders)


def test_time_split_sums_each_evaluation_once(tmp_path):
    """A trial's eval_seconds is the sum over its evaluations; a restarted interval's part is replaced,
    not added (RecordWriter drops the parts after the checkpoint and writes them again)."""
    from records.parquet import RecordWriter, time_split

    w = RecordWriter(tmp_path, "s", "t000-x", {}, {})
    for step, secs in ((2, 1.5), (4, 2.0), (6, 4.0)):
        w.write_part("evals", [{"step": step, "epoch": step / 2, "eval_seconds": secs}], step)
    w.drop_parts_after(4)                                               # restart from step 4 ...
    w.write_part("evals", [{"step": 6, "epoch": 3.0, "eval_seconds": 3.0}], 6)   # ... step 6 evaluated again
    RecordWriter(tmp_path, "s", "t001-y", {}, {}).write_part("evals", [{"step": 2, "eval_seconds": 99.0}], 2)
    assert time_split(tmp_path, "t000-x", 10.0) == {"eval_seconds": 6.5, "train_seconds": 3.5}
    assert time_split(tmp_path, "t002-z", 10.0) == {"eval_seconds": None, "train_seconds": 10.0}
    w.write_trial(status="COMPLETED", wall_seconds=10.0, **time_split(tmp_path, "t000-x", 10.0))
    row = pd.read_parquet(tmp_path / "trials").iloc[0]
    assert (row["eval_seconds"], row["train_seconds"]) == (6.5, 3.5)
