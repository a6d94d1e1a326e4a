"""Sweep overhead: seconds from a Ray Tune trial's start to its first training step.

Runs the real sweep (orchestrator.sweep.launch: Tune trial -> MLflow child run -> Ray Train
TorchTrainer with N DDP workers -> diffusion_core.training.train) on a study of a few tiny trials and
time-stamps each hop of every trial:

    tune_start    Tune starts the trial (a Tune Callback in this process, on_trial_start)
    driver        the trial's driver function runs (orchestrator.ray_runner.run_trial calls drive_trial())
    worker        the rank-0 Ray Train worker process enters train_worker (its rank0.json)
    train_start   diffusion_core.training.train() is set up: data loaded, model built, DDP wrapped (hooks.on_start)
    first_step    the first optimizer step has finished (hooks.on_step at step 1)

The stamps inside Ray processes come from a `worker_process_setup_hook` that wraps the
orchestrator's hooks in every Ray worker process; nothing in orchestrator/ is changed.
Reported: per trial the seconds of each hop, and the median time-to-first-step; plus the
seconds of a plain `diffusion_core.training.train` first step in this process for scale.

    .venv/bin/python benchmarks/bench_sweep_overhead.py --trials 3 --workers 2
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see tests/conftest.py: spinning OMP threads on a shared CPU
STAMPS_ENV = "STUDYCTL_BENCH_STAMPS"


def _stamp(event: str, trial_id: str, **extra) -> None:
    path = os.environ.get(STAMPS_ENV)
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"event": event, "trial_id": trial_id, "t": time.time(), "pid": os.getpid(),
                                **extra}) + "\n")


def setup_hook() -> None:
    """Runs in every Ray worker process before it executes anything: wrap the orchestrator's hooks."""
    import orchestrator.ray_runner as ray_runner
    import orchestrator.worker as worker

    drive_trial = ray_runner.drive_trial

    def drive_trial_stamped(study, trial, fit):
        _stamp("driver", trial.trial_id, pid_role="driver")
        return drive_trial(study, trial, fit)
    ray_runner.drive_trial = drive_trial_stamped

    on_start, on_step = worker.TrialHooks.on_start, worker.TrialHooks.on_step

    def on_start_stamped(self, ctx):
        _stamp("train_start", self.trial_id)
        on_start(self, ctx)

    def on_step_stamped(self, ctx, loss):
        if not getattr(self, "_stamped_first", False):
            self._stamped_first = True
            _stamp("first_step", self.trial_id, step=ctx.step)
        on_step(self, ctx, loss)
    worker.TrialHooks.on_start, worker.TrialHooks.on_step = on_start_stamped, on_step_stamped


def tiny_study(data_root: str, trials: int, workers: int, steps: int) -> dict:
    widths = [8, 12, 16, 20, 24, 28, 32, 40][:trials]
    return {
        "name": "sweep_overhead",
        "data": {"root": data_root, "subset_size": 512, "val_size": 128},
        "model": {"base_width": 8, "channel_mult": [1, 2], "blocks_per_level": 1, "bottleneck_blocks": 1},
        "diffusion": {"T": 200},
        "training": {"epochs": 1, "batch_size": 16, "eval_every": steps, "eval_start": steps,
                     "lr": 1e-3, "ema_decay": 0.9, "log_every_first": 10, "log_every": 5},
        "evaluation": {"n_samples": 16, "grid_images": 16, "sampler": "ddim",
                       "steps": 2, "t_grid": 4, "residual_images": 16, "is_splits": 1, "metrics": False},
        "sweep": {"grid": {"model.base_width": widths}},
        "resources": {"workers_per_trial": workers, "cpus_per_worker": 1, "max_concurrent_trials": 1},
    }


def plain_first_step(data_root: str) -> float:
    """Seconds of train() up to and including the first step, in this process (no Ray): the floor."""
    import torch

    from diffusion_core import DataConfig, TrainConfig, UNetConfig, train

    class Stop(Exception):
        pass

    class Hook:
        def on_step(self, ctx, loss):
            raise Stop

    t0 = time.time()
    try:
        train(data=DataConfig(root=data_root, subset_size=512, val_size=128),
              model=UNetConfig(base_width=8, channel_mult=(1, 2), blocks_per_level=1, bottleneck_blocks=1),
              training=TrainConfig(epochs=1, batch_size=16, max_steps=2), hooks=Hook(), device="cpu")
    except Stop:
        pass
    del torch
    return time.time() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--workers", type=int, default=2, help="DDP workers per trial (1 CPU each)")
    ap.add_argument("--steps", type=int, default=10, help="training steps per trial")
    ap.add_argument("--data-root", default=os.environ.get("STUDYCTL_DATA_ROOT", "../shared/data"))
    ap.add_argument("--keep", default=None, help="study output folder to keep (default: a temp folder)")
    args = ap.parse_args()

    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    import ray
    from ray import tune

    from orchestrator import sweep
    from orchestrator.plan import build_plan
    from orchestrator.spec import parse_study
    from records.layout import worker_file

    data_root = str(Path(args.data_root).resolve())
    out = Path(args.keep or tempfile.mkdtemp(prefix="sweep-overhead-"))
    stamps = out / "stamps.jsonl"
    out.mkdir(parents=True, exist_ok=True)
    stamps.unlink(missing_ok=True)
    os.environ[STAMPS_ENV] = str(stamps)

    study = tiny_study(data_root, args.trials, args.workers, args.steps)
    study["training"]["epochs"] = 1
    study["training"]["max_steps"] = args.steps
    plan = build_plan(parse_study(study, "<bench_sweep_overhead>"))

    class StartStamp(tune.Callback):
        def on_trial_start(self, iteration, trials, trial, **info):
            _stamp("tune_start", trial.trial_id, name=str(trial))

    real_run_config = tune.RunConfig

    class RunConfigWithStamps(real_run_config):
        def __init__(self, *a, **kw):
            kw["callbacks"] = list(kw.get("callbacks") or []) + [StartStamp()]
            super().__init__(*a, **kw)
    tune.RunConfig = RunConfigWithStamps  # launch() builds its RunConfig through ray.tune

    t_init = time.time()
    ray.init(num_cpus=os.cpu_count() or 2, include_dashboard=False, log_to_driver=False,
             runtime_env={"worker_process_setup_hook": setup_hook,
                          "env_vars": {STAMPS_ENV: str(stamps), "OMP_WAIT_POLICY": "PASSIVE"}})
    ray_init_s = time.time() - t_init
    t_launch = time.time()
    try:
        code = sweep.launch(plan, out, echo=lambda s: None)
    finally:
        ray.shutdown()
        tune.RunConfig = real_run_config
    launch_s = time.time() - t_launch

    events = [json.loads(line) for line in stamps.read_text().splitlines()]
    tune_starts = sorted((e for e in events if e["event"] == "tune_start"), key=lambda e: e["t"])
    drivers = sorted((e for e in events if e["event"] == "driver"), key=lambda e: e["t"])
    by_trial: dict[str, dict[str, float]] = {}
    for e in events:
        if e["event"] in ("train_start", "first_step"):
            by_trial.setdefault(e["trial_id"], {}).setdefault(e["event"], e["t"])
    rows = []
    # Trials run one at a time (max_concurrent_trials 1): the k-th Tune start, driver and worker belong together.
    order = sorted(by_trial, key=lambda k: by_trial[k].get("train_start", 0))
    for k, tid in enumerate(order):
        ev = by_trial[tid]
        rank0 = worker_file(out, tid, 0)
        row = {"trial": tid, "tune_start": tune_starts[k]["t"] if k < len(tune_starts) else None,
               "driver": drivers[k]["t"] if k < len(drivers) else None,
               "worker": rank0.stat().st_mtime if rank0.exists() else None,
               "train_start": ev.get("train_start"), "first_step": ev.get("first_step")}
        rows.append(row)

    import torch
    plain = plain_first_step(data_root)
    print(f"torch {torch.__version__}, ray {ray.__version__}, {os.cpu_count()} CPUs, "
          f"{args.trials} trials x {args.workers} DDP workers (gloo), {args.steps} steps each, one trial at a time")
    print(f"ray.init {ray_init_s:.1f} s; launch() total {launch_s:.1f} s (exit code {code})")
    hops = [("tune_start", "driver"), ("driver", "worker"), ("worker", "train_start"), ("train_start", "first_step")]
    print(f"{'trial':<28} " + " ".join(f"{a + '->' + b:>22}" for a, b in hops) + f" {'TOTAL to 1st step':>18}")
    totals = []
    for r in rows:
        cells = []
        for a, b in hops:
            cells.append(f"{r[b] - r[a]:>22.2f}" if r[a] and r[b] else f"{'-':>22}")
        total = r["first_step"] - r["tune_start"] if r["first_step"] and r["tune_start"] else None
        if total is not None:
            totals.append(total)
        print(f"{r['trial']:<28} " + " ".join(cells) + f" {total if total is not None else float('nan'):>18.2f}")
    if totals:
        print(f"median seconds from Tune trial start to first training step: {statistics.median(totals):.2f} "
              f"(min {min(totals):.2f}, max {max(totals):.2f})")
    print(f"for scale: plain diffusion_core.training.train() in-process, start to first step done: {plain:.2f} s")
    if not args.keep:
        import shutil
        shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
