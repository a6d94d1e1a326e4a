"""Wall time of a whole `--local` study, its trials laid out as stacked groups and processes.

The same study (--trials seeds, real MNIST, one evaluation at the end, records and MLflow as in
any launch) is launched once per layout `SxP`: `resources.stack: S` (trials per stacked group)
and `resources.max_concurrent_trials: P` (groups side by side in P processes, 1 CPU thread each;
P = 1: one after another in this process, torch's default threads). Layouts alternate within a
round, each launch into a fresh folder; it prints each launch's wall time (launch() to its
return: setup, training, evaluation, records) and each layout's median against the first's.

    PYTHONPATH=. STUDYCTL_DATA_ROOT=../shared/data .venv/bin/python benchmarks/bench_stacked_local.py \\
        --trials 4 --steps 128 --rounds 1 --layouts 1x1 4x1
    # the issue's CPU case: 8 width-8 full-depth U-Nets (dropout 0.1) on the 2-core box
    PYTHONPATH=. STUDYCTL_DATA_ROOT=../shared/data .venv/bin/python benchmarks/bench_stacked_local.py \\
        --trials 8 --steps 128 --rounds 2 --full-unet --layouts 1x1 1x2 4x2 8x1
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


def plan(data_root: str, trials: int, steps: int, stack: int, processes: int, full_unet: bool):
    model = {"base_width": 8, "channel_mult": [1, 2, 4], "blocks_per_level": 2, "bottleneck_blocks": 2,
             "dropout": 0.1} if full_unet else {}
    s = tiny_study(data_root, name=f"bench-{stack}x{processes}", data={"subset_size": 16 * steps, "val_size": 128},
                   model=model,
                   training={"epochs": 1, "log_every_first": 10, "log_every": 10, "eval_every": steps,
                             "eval_start": steps},
                   evaluation={"n_samples": 16, "grid_images": 16, "metrics": False},
                   resources={"workers_per_trial": 1, "cpus_per_worker": 1, "stack": stack,
                              "max_concurrent_trials": processes},
                   sweep={"seeds": list(range(trials))}, analysis={"figures": False})
    return build_plan(parse_study(s))


def layout(text: str) -> tuple[int, int]:
    try:
        s, p = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"layout {text!r}: write SxP, e.g. 4x2 (stack 4, 2 processes)")
    return s, p


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-root", default=None)
    ap.add_argument("--trials", type=int, default=4)
    ap.add_argument("--steps", type=int, default=128, help="training steps per trial (one epoch of batch 16)")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--layouts", type=layout, nargs="+", default=[(1, 1), (4, 1)], metavar="SxP",
                    help="stack S trials per group, P groups side by side; the first is the reference")
    ap.add_argument("--full-unet", action="store_true",
                    help="the U-Net of issue 11's CPU target (width 8, (1, 2, 4), 2 blocks, dropout 0.1) "
                         "instead of the tiny test U-Net")
    a = ap.parse_args()
    from diffusion_core.config import resolve_data_root

    root = str(resolve_data_root(a.data_root))
    times: dict[tuple[int, int], list[float]] = {lp: [] for lp in a.layouts}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(a.rounds):
            for s, p in (a.layouts if r % 2 == 0 else a.layouts[::-1]):
                t0 = time.perf_counter()
                code = launch(plan(root, a.trials, a.steps, s, p, a.full_unet), Path(tmp) / f"r{r}-{s}x{p}",
                              local=True, echo=lambda _: None)
                times[(s, p)].append(time.perf_counter() - t0)
                print(f"round {r}: stack {s} x {p} process(es): {times[(s, p)][-1]:.1f} s (exit {code})", flush=True)
    ref = statistics.median(times[a.layouts[0]])
    print(f"{a.trials} trials x {a.steps} steps ({'width-8 full U-Net' if a.full_unet else 'tiny U-Net'}):")
    for (s, p), v in times.items():
        m = statistics.median(v)
        print(f"  stack {s} x {p} process(es): {m:6.1f} s  {ref / m:5.2f}x the first  "
              f"({' '.join(f'{x:.1f}' for x in v)})")


if __name__ == "__main__":
    main()
