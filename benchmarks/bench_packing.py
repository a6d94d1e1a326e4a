"""Trial packing: aggregate training throughput of k trials sharing one device vs one alone.

A small trial (the thesis U-Net at batch 16) leaves a GPU mostly idle; Ray packs several on
one GPU with a fractional `resources.gpus_per_worker` (e.g. 0.25 for four). This measures
what that buys, with what a packed trial really runs: k processes, each calling
`diffusion_core.training.train` (the thesis configuration unless overridden) on real MNIST on the
same device, started together behind a barrier. Per process the clock runs from its
`--warmup`-th step (cuDNN autotuning, allocator, compilation are behind it) to its last;
aggregate images/s = sum of the timed images / (last finish - first timed start).

    .venv/bin/python benchmarks/bench_packing.py --packs 1 2 --steps 60          # this CPU
    python benchmarks/bench_packing.py --device cuda --packs 1 2 4 --steps 1500  # a GPU

Needs only torch (and diffusion_core), so it runs on the GPU machine as is.
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP; see bench_train_step.py

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402


class _Clock:
    """train() hooks: wait at the barrier once set up, stamp the warmup step and the last step."""

    def __init__(self, barrier, warmup: int, device: torch.device):
        self.barrier, self.warmup, self.device = barrier, warmup, device
        self.t_warm = self.t_end = None

    def _now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.time()

    def on_start(self, ctx):
        self.barrier.wait()

    def on_step(self, ctx, loss):  # called at logged steps: every `warmup` steps (below)
        if ctx.step == self.warmup:
            self.t_warm = self._now()
        if ctx.step == ctx.total_steps:
            self.t_end = self._now()


def _one_trial(rank: int, args, barrier, results) -> None:
    from diffusion_core import DataConfig, TrainConfig, UNetConfig, train

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    # The loss is fetched (a device sync) only at logged steps: every `warmup` steps here, a
    # real trial's `log_every` is 100.
    training = TrainConfig(epochs=10 ** 6, batch_size=args.batch, max_steps=args.warmup + args.steps, seed=rank,
                           log_every_first=0, log_every=args.warmup, eval_start=10 ** 9, eval_every=10 ** 9,
                           val_every=10 ** 9, precision=args.precision, channels_last=args.channels_last)
    clock = _Clock(barrier, args.warmup, device)
    train(data=DataConfig(root=args.data_root, subset_size=args.subset), model=UNetConfig(base_width=args.width),
          training=training, hooks=clock, device=device)
    results.put({"rank": rank, "t_warm": clock.t_warm, "t_end": clock.t_end, "images": args.steps * args.batch})


def run_pack(k: int, args) -> dict:
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(k), ctx.Queue()
    procs = [ctx.Process(target=_one_trial, args=(r, args, barrier, results)) for r in range(k)]
    for p in procs:
        p.start()
    rows = [results.get(timeout=3600) for _ in range(k)]
    for p in procs:
        p.join()
    span = max(r["t_end"] for r in rows) - min(r["t_warm"] for r in rows)
    per_trial = [r["images"] / (r["t_end"] - r["t_warm"]) for r in rows]
    return {"k": k, "aggregate_img_s": sum(r["images"] for r in rows) / span, "per_trial_img_s": per_trial}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--packs", type=int, nargs="+", default=[1, 2, 4], help="trials per device to compare")
    ap.add_argument("--steps", type=int, default=100, help="timed steps per trial")
    ap.add_argument("--warmup", type=int, default=20, help="untimed steps first (also the logging interval)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--width", type=int, default=32, help="U-Net base width (thesis: 32)")
    ap.add_argument("--subset", type=int, default=4096, help="training images per trial (real MNIST)")
    ap.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    ap.add_argument("--channels-last", action="store_true")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per trial process")
    ap.add_argument("--data-root", default=None, help="folder holding MNIST/raw (default $STUDYCTL_DATA_ROOT)")
    ap.add_argument("--json", default=None, help="also append the results as JSON lines to this file")
    args = ap.parse_args()
    args.steps = -(-args.steps // args.warmup) * args.warmup  # a multiple of the logging interval
    dev = torch.device(args.device)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU, {os.cpu_count()} cores"
    print(f"device {args.device} ({name}), torch {torch.__version__}; per trial: U-Net width {args.width}, "
          f"batch {args.batch}, {args.precision}, {args.threads} thread(s), {args.steps} timed steps")
    print(f"{'trials':>6} {'aggregate img/s':>16} {'x one trial':>12} {'per-trial img/s':>20}")
    base = None
    for k in args.packs:
        r = run_pack(k, args)
        base = r["aggregate_img_s"] if k == 1 else base
        ratio = f"{r['aggregate_img_s'] / base:.2f}" if base else "-"
        print(f"{k:>6} {r['aggregate_img_s']:>16.1f} {ratio:>12} "
              f"{' '.join(f'{x:.1f}' for x in r['per_trial_img_s']):>20}")
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps({**vars(args), **r, "device_name": name}) + "\n")


if __name__ == "__main__":
    main()
