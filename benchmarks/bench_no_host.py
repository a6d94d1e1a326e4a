"""Training steps/s of one thesis trial with the host in and out of the loop, and K stacked trials.

Contenders, all `diffusion_core.training.train` / `train_stacked` on real MNIST at --batch (16: the thesis):
  eager            the default loop (CPU-drawn noise, a loss fetch at each logged step)
  eager+nosync     device_noise + deferred_sync (no host sync inside a logging interval)
  graph            the above + cuda_graph (forward + backward + capturable fused Adam, one CUDA graph)
  graph+bf16       graph with bf16 autocast (its per-op casting costs the host nothing once captured)
  graph+compile    graph replaying inductor's fused kernels (torch.compile, default mode): fewer launches
  graph+compile+bf16   both (named with --only; the default runs eager, eager+nosync and graph)
  stacked K        train_stacked, K members (seeds 0..K-1), deferred sync; img/s counts all members
  stacked K graph  the same with cuda_graph=True (the stacked step's device part one CUDA graph; CUDA only)
Every trial logs every step for its first --log-first steps (the thesis's log_every_first) and then
every 100th (or every --warmup-th, if fewer), as a real trial does. Then a check that each graph contender run replays its eager step: with dropout 0 and the same
device noise, the per-step losses over --check-steps steps of the same configuration with and without
cuda_graph (graph vs eager+nosync, graph+compile vs the compiled step, ...); and (with --k) of the
K stacked members, eager vs graph.

    python benchmarks/bench_no_host.py --device cuda --steps 2000          # a GPU (what run_gpu.sh graph runs)
    .venv/bin/python benchmarks/bench_no_host.py --device cpu --steps 20 --width 8 --k 2   # plumbing on a CPU
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json  # noqa: E402

import torch  # noqa: E402
from bench_stacked import Clock  # noqa: E402


_NO_HOST = dict(device_noise=True, deferred_sync=True)
VARIANTS = {"eager": {}, "eager+nosync": _NO_HOST,
            "graph": {**_NO_HOST, "cuda_graph": True},   # run in this order: the likeliest lever first
            "graph+compile": {**_NO_HOST, "cuda_graph": True, "compile": True},
            "graph+compile+bf16": {**_NO_HOST, "cuda_graph": True, "compile": True, "precision": "bf16"},
            "graph+bf16": {**_NO_HOST, "cuda_graph": True, "precision": "bf16"}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--width", type=int, default=32)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=2000, help="timed steps")
    ap.add_argument("--warmup", type=int, default=100, help="untimed steps first (graph capture is behind it)")
    ap.add_argument("--log-first", type=int, default=1000, help="log every step for the first N steps")
    ap.add_argument("--k", type=int, default=8, help="members of the stacked contender (0: skip it)")
    ap.add_argument("--check-steps", type=int, default=50, help="graph-vs-eager loss check (0: skip it)")
    ap.add_argument("--only", nargs="+", default=["eager", "eager+nosync", "graph"], choices=list(VARIANTS),
                    help="run these single-trial contenders (default: eager eager+nosync graph; the stacked one is --k)")
    ap.add_argument("--data-root", default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    from diffusion_core import TrainConfig, UNetConfig, mnist_splits, train
    from diffusion_core.capabilities import Member
    from diffusion_core.data import Splits
    from diffusion_core.training.stacked import train_stacked

    device = torch.device(args.device)
    full = mnist_splits(args.data_root)
    splits = Splits(full.train.subset(torch.arange(8192)), full.val.subset(torch.arange(256)))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {os.cpu_count()} cores"
    print(f"device {device} ({name}), torch {torch.__version__}; U-Net width {args.width}, batch {args.batch}, "
          f"{args.steps} timed steps after {args.warmup}")

    def tc(seed=0, **kw):
        total = args.warmup + args.steps
        return TrainConfig(epochs=10 ** 6, batch_size=args.batch, max_steps=total, seed=seed,
                           log_every_first=args.log_first, log_every=min(100, args.warmup), eval_start=10 ** 9, eval_every=10 ** 9,
                           val_every=10 ** 9, **kw)

    model = UNetConfig(base_width=args.width)
    variants = {k: v for k, v in VARIANTS.items() if k in args.only and (device.type == "cuda" or not v.get("cuda_graph"))}
    rows = {}
    for label, kw in variants.items():
        clock = Clock(args.warmup, device)
        try:
            train(model=model, training=tc(**kw), splits=splits, device=device, hooks=clock)
            rows[label] = clock.steps_per_s()
        except Exception as e:  # report and go on: one broken contender must not hide the others
            print(f"{label}: FAILED {type(e).__name__}: {e}")
        print(f"{label:<16} {rows.get(label, float('nan')):>9.1f} steps/s  "
              f"{rows.get(label, float('nan')) * args.batch:>9.0f} img/s", flush=True)
    if args.k:
        stacked = {f"stacked K={args.k}": {}}
        if device.type == "cuda":  # the stacked step's device part as one CUDA graph (a CPU has none)
            stacked[f"stacked K={args.k} graph"] = dict(cuda_graph=True)
        for label, kw in stacked.items():
            clock = Clock(args.warmup, device)
            members = [Member(tc(seed=s), model, splits=splits, hooks=clock if s == 0 else None)
                       for s in range(args.k)]
            try:
                train_stacked(members, device=device, deferred_sync=True, **kw)
                rows[label] = r = clock.steps_per_s()
                print(f"{label:<16} {r:>9.1f} steps/s  {r * args.batch * args.k:>9.0f} img/s "
                      + (f"(all members; x{r * args.k / rows['eager']:.2f} the eager trial's img/s)" if "eager" in rows
                         else "(all members)"), flush=True)
            except Exception as e:
                print(f"{label}: FAILED {type(e).__name__}: {e}")
    # Does each graph replay its eager step? Dropout 0: the masks' streams differ between the two.
    quiet = UNetConfig(base_width=args.width, dropout=0.0)
    check = dict(max_steps=args.check_steps, log_every_first=10 ** 6)
    for label, kw in variants.items():
        if not (kw.get("cuda_graph") and args.check_steps and label in rows):
            continue
        losses = []
        try:
            for graphed in (False, True):
                r = train(model=quiet, training=TrainConfig(**{**tc(**kw).__dict__, **check, "cuda_graph": graphed}),
                          splits=splits, device=device)
                losses.append(torch.tensor([v for _, v in r.train_losses]))
        except Exception as e:
            print(f"{label} check: FAILED {type(e).__name__}: {e}")
            continue
        rel = ((losses[0] - losses[1]).abs() / losses[0]).max().item()
        print(f"{label} vs the same step eager, dropout 0, {args.check_steps} steps: "
              f"max relative loss difference {rel:.2e}", flush=True)
        rows[f"{label}_check_max_rel"] = rel
    # The same for the stacked step: per member, per step (dropout 0: the mask offsets differ).
    if device.type == "cuda" and args.check_steps and args.k:
        def stacked_losses(**kw) -> torch.Tensor:
            ms = [Member(TrainConfig(**{**tc(seed=s).__dict__, **check}), quiet, splits=splits)
                  for s in range(args.k)]
            return torch.tensor([[v for _, v in r.result.train_losses]
                                 for r in train_stacked(ms, device=device, deferred_sync=True, **kw)])
        try:
            la, lb = stacked_losses(), stacked_losses(cuda_graph=True)
            rel = ((la - lb).abs() / la).max().item()
            print(f"stacked graph vs stacked eager, dropout 0, K={args.k}, {args.check_steps} steps: "
                  f"max relative loss difference {rel:.2e}")
            rows["stacked_graph_check_max_rel"] = rel
        except Exception as e:
            print(f"stacked graph check: FAILED {type(e).__name__}: {e}")
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps({**vars(args), "device_name": name, "steps_per_s": rows}) + "\n")


if __name__ == "__main__":
    main()
