"""Wall time of a whole `--local` study: K trials stacked (`resources.stack: K`) vs one by one.

The same study (the tiny test U-Net, --trials seeds, real MNIST, one evaluation at the end,
records and MLflow as in any launch) is launched with resources.stack 1 and K, alternating,
--rounds times each, every launch into a fresh folder; it prints each launch's wall time
(launch() to its return: setup, training, evaluation, records) and the ratio of medians.

    PYTHONPATH=. STUDYCTL_DATA_ROOT=../shared/data .venv/bin/python benchmarks/bench_stacked_local.py \
        --trials 4 --steps 128 --rounds 1
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from orchestrator_helpers import tiny_study  # noqa: E402

from orchestrator.plan import build_plan  # noqa: E402
from orchestrator.spec import parse_study  # noqa: E402
from orchestrator.sweep import launch  # noqa: E402


def plan(data_root: str, trials: int, steps: int, stack: int):
    s = tiny_study(data_root, name=f"bench-stack{stack}", data={"subset_size": 16 * steps, "val_size": 128},
                   training={"epochs": 1, "log_every_first": 10, "log_every": 10, "eval_every": steps,
                             "eval_start": steps},
                   evaluation={"n_samples": 16, "grid_images": 16, "metrics": False},
                   resources={"workers_per_trial": 1, "stack": stack}, sweep={"seeds": list(range(trials))},
                   analysis={"figures": False})
    return build_plan(parse_study(s))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data-root", default=None)
    ap.add_argument("--trials", type=int, default=4)
    ap.add_argument("--steps", type=int, default=128, help="training steps per trial (one epoch of batch 16)")
    ap.add_argument("--rounds", type=int, default=1)
    a = ap.parse_args()
    from diffusion_core.data import resolve_data_root

    root = str(resolve_data_root(a.data_root))
    times: dict[int, list[float]] = {1: [], a.trials: []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(a.rounds):
            for k in ([1, a.trials] if r % 2 == 0 else [a.trials, 1]):
                t0 = time.perf_counter()
                code = launch(plan(root, a.trials, a.steps, k), Path(tmp) / f"r{r}-k{k}", local=True,
                              echo=lambda s: None)
                times[k].append(time.perf_counter() - t0)
                print(f"round {r}: stack {k}: {times[k][-1]:.1f} s (exit {code})", flush=True)
    one, many = statistics.median(times[1]), statistics.median(times[a.trials])
    print(f"{a.trials} trials x {a.steps} steps: stack 1 {one:.1f} s, stack {a.trials} {many:.1f} s, "
          f"stack 1 / stack {a.trials} = {one / many:.2f}x")


if __name__ == "__main__":
    main()
