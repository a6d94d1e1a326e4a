"""K trials in one process, stacked (diffusion_core.training.stacked) vs the same K trials one after another.

Each "trial" is what a sweep runs: `diffusion_core.training.train` (the U-Net at --width, batch --batch,
dropout 0.1, real MNIST) with seed k. The sequential peer calls `train()` K times; the stacked
path calls `train_stacked()` once with the K members (backend grouped: grouped convolutions in
NCHW, no vmap; backend vmap: torch.func.vmap over functional_call). Per run the clock
runs from the --warmup-th step to the last (setup, data loading and the first steps excluded);
throughput = images trained / seconds. Rounds alternate between the contenders so a busy
neighbour hits them alike; the table gives the median of the rounds.

    .venv/bin/python benchmarks/bench_stacked.py --k 8 --width 8 --batch 16 --steps 30 --rounds 3
    python benchmarks/bench_stacked.py --device cuda --k 8 --width 32 --batch 16 --steps 500   # a GPU
    .venv/bin/python benchmarks/bench_stacked.py --k 8 --threads 2 --backends grouped --processes 2   # all cores: threads vs processes

Needs only torch (and diffusion_core).
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP; see bench_train_step.py

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402


def synced_time(device: torch.device) -> float:
    """perf_counter once the device has finished what it was given."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


class Clock:
    """Hooks: stamp the first logged loss once training has reached the warmup step, and the last
    one (syncing the device first). With deferred sync a loss reaches its hook later than its step,
    so the clock counts the steps training has reached (ctx.state.step). Not on_end: train()
    computes its end-of-training validation losses (EMA, raw and train-eval, 3 x 256 images) before
    it, the stacked path only the EMA one, which biased the ratio toward stacking at short runs."""

    def __init__(self, warmup: int, device: torch.device):
        self.warmup, self.device, self.t_warm, self.t_end = warmup, device, None, None
        self.step_warm = self.step_end = None

    def _now(self) -> float:
        return synced_time(self.device)

    def on_step(self, ctx, loss):
        if self.t_warm is None and ctx.state.step >= self.warmup:
            self.t_warm, self.step_warm = self._now(), ctx.state.step
        if self.t_warm is not None:
            self.t_end, self.step_end = self._now(), ctx.state.step

    def steps_per_s(self) -> float:
        return (self.step_end - self.step_warm) / (self.t_end - self.t_warm)


def configs(args, seed: int):
    from diffusion_core import TrainConfig, UNetConfig

    model = UNetConfig(base_width=args.width, dropout=args.dropout,
                       **({"channel_mult": tuple(args.channel_mult)} if args.channel_mult else {}),
                       **({"blocks_per_level": args.blocks, "bottleneck_blocks": args.blocks} if args.blocks else {}))
    training = TrainConfig(epochs=10 ** 6, batch_size=args.batch, max_steps=args.warmup + args.steps, seed=seed,
                           log_every_first=0, log_every=args.warmup, eval_start=10 ** 9, eval_every=10 ** 9,
                           val_every=10 ** 9)
    return model, training


def run_sequential(args, splits, device, k: int) -> float:
    from diffusion_core import train

    images = seconds = 0.0
    for seed in range(k):
        model, training = configs(args, seed)
        clock = Clock(args.warmup, device)
        train(model=model, training=training, splits=splits, device=device, hooks=clock)
        images += (clock.step_end - clock.step_warm) * args.batch
        seconds += clock.t_end - clock.t_warm
    return images / seconds


def run_stacked(args, splits, device, k: int, backend: str, channels_last: bool = False) -> float:
    from diffusion_core.capabilities import Member
    from diffusion_core.training.stacked import train_stacked

    clock = Clock(args.warmup, device)
    members = []
    for seed in range(k):
        model, training = configs(args, seed)
        members.append(Member(training, model, splits=splits, hooks=clock if seed == 0 else None))
    train_stacked(members, device=device, backend=backend, deferred_sync=args.deferred_sync,
                  channels_last=channels_last)
    return k * args.batch * clock.steps_per_s()


def load_splits(args):
    from diffusion_core import mnist_splits
    from diffusion_core.data import Splits

    full = mnist_splits(args.data_root)
    return Splits(full.train.subset(torch.arange(args.subset)), full.val.subset(torch.arange(256)))


def _one_process(kind: str, args, k: int) -> float:
    """In a fresh process with 1 thread: k trials one after another, or one stacked group of k."""
    torch.set_num_threads(1)
    splits, device = load_splits(args), torch.device(args.device)
    return run_sequential(args, splits, device, k) if kind == "sequential" else \
        run_stacked(args, splits, device, k, args.backends[0])


def run_processes(args, kind: str) -> float:
    """The K trials split over --processes processes side by side (1 thread each; what a sweep of
    1-CPU trials, or of 1-CPU stacked groups, does): the sum of their img/s."""
    import multiprocessing as mp

    with mp.get_context("spawn").Pool(args.processes) as pool:
        return sum(pool.starmap(_one_process, [(kind, args, args.k // args.processes)] * args.processes))


def print_scaling(args, img_s: dict[int, float], sequential_img_s: float) -> None:
    """Least-squares ms/step = a + b*K over the stacked sizes: a is the per-step cost stacking shares
    (Python, launches, the host), b what each member adds (its compute); as K grows the gain over
    sequential trials tends to (ms per sequential trial-step) / b, whatever the code around it does."""
    ks = sorted(img_s)
    ms = [1e3 * k * args.batch / img_s[k] for k in ks]
    kbar, mbar = statistics.mean(ks), statistics.mean(ms)
    b = sum((k - kbar) * (m - mbar) for k, m in zip(ks, ms)) / sum((k - kbar) ** 2 for k in ks)
    a = mbar - b * kbar
    seq_ms = 1e3 * args.batch / sequential_img_s
    print("stacked ms/step by K: " + "  ".join(f"K={k}: {m:.1f}" for k, m in zip(ks, ms)))
    print(f"fit ms/step = {a:.1f} + {b:.1f} * K; a sequential trial-step takes {seq_ms:.1f} ms, so stacking "
          f"can gain at most {seq_ms / b:.2f}x over sequential trials as K grows")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--k", type=int, default=8, help="trials (members of the stacked group)")
    ap.add_argument("--width", type=int, default=8, help="U-Net base width")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--dropout", type=float, default=0.1)
    ap.add_argument("--channel-mult", type=int, nargs="+", default=None,
                    help="U-Net channel multipliers (default: UNetConfig's); generalization_quick: 1 2 2")
    ap.add_argument("--blocks", type=int, default=None,
                    help="residual blocks per level and in the bottleneck (default: UNetConfig's)")
    ap.add_argument("--steps", type=int, default=30, help="timed steps per trial")
    ap.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--backends", nargs="+", default=["grouped", "vmap"], choices=("grouped", "vmap"))
    ap.add_argument("--grouped-nhwc", action="store_true", help="also the grouped backend in channels_last memory")
    ap.add_argument("--deferred-sync", action="store_true", help="stacked: fetch losses once per log interval")
    ap.add_argument("--scaling", type=int, nargs="+", default=None, metavar="K",
                    help="also stacked groups of these sizes, and the fit ms/step = a + b*K over all stacked K: "
                         "b is what one more member costs, so (sequential ms per trial-step) / b bounds the ratio")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--processes", type=int, default=None, metavar="P",
                    help="also the K trials as P processes side by side, 1 thread each: P x K/P sequential "
                         "trials, and P stacked groups of K/P (the peers that use all cores without threads)")
    ap.add_argument("--subset", type=int, default=4096, help="training images (real MNIST)")
    ap.add_argument("--data-root", default=None)
    ap.add_argument("--json", default=None, help="also append the results as one JSON line to this file")
    args = ap.parse_args()
    if args.processes and args.k % args.processes:
        ap.error(f"--processes {args.processes} must divide --k {args.k} (each process takes K/P trials)")
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    splits = load_splits(args)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {os.cpu_count()} cores"
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"device {device} ({name}), torch {torch.__version__}, {args.threads} thread(s); U-Net width "
          f"{args.width}, batch {args.batch}, dropout {args.dropout}, K={args.k}, {args.steps} timed steps; "
          f"load average at start {load:.1f}")
    contenders = {f"{args.k} trials sequential (train())": lambda: run_sequential(args, splits, device, args.k)}
    for b in args.backends:
        contenders[f"stacked K={args.k} ({b})"] = lambda b=b: run_stacked(args, splits, device, args.k, b)
    if args.grouped_nhwc:
        contenders[f"stacked K={args.k} (grouped, NHWC)"] = lambda: run_stacked(args, splits, device, args.k,
                                                                                 "grouped", True)
    if args.processes:
        p = args.processes
        contenders[f"{p} processes x {args.k // p} sequential"] = lambda: run_processes(args, "sequential")
        contenders[f"{p} processes x stacked K={args.k // p}"] = lambda: run_processes(args, "stacked")
    contenders[f"stacked K=1 ({args.backends[0]})"] = lambda: run_stacked(args, splits, device, 1, args.backends[0])
    sizes = {1: f"stacked K=1 ({args.backends[0]})", args.k: f"stacked K={args.k} ({args.backends[0]})"}
    for k in args.scaling or []:
        sizes.setdefault(k, f"stacked K={k} ({args.backends[0]})")
        contenders.setdefault(sizes[k], lambda k=k: run_stacked(args, splits, device, k, args.backends[0]))
    rates: dict[str, list[float]] = {c: [] for c in contenders}
    for r in range(args.rounds):
        for label, fn in contenders.items():
            rates[label].append(fn())
        print(f"round {r + 1}: " + "  ".join(f"{v[-1]:.1f}" for v in rates.values()), flush=True)
    base = statistics.median(rates[next(iter(contenders))])
    print(f"{'contender':<40} {'img/s (median)':>15} {'x sequential':>13}  rounds")
    for label, v in rates.items():
        m = statistics.median(v)
        print(f"{label:<40} {m:>15.1f} {m / base:>13.2f}  {' '.join(f'{x:.1f}' for x in v)}")
    if args.scaling:
        print_scaling(args, {k: statistics.median(rates[label]) for k, label in sizes.items()}, base)
    print(f"load average at end {os.getloadavg()[0]:.1f}")
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps({**vars(args), "device_name": name, "rates": rates}) + "\n")


if __name__ == "__main__":
    main()
