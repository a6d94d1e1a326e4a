"""A stacked group's evaluations: K members sampled one after another vs in one batched pass.

What train_stacked does at an evaluation step of K members (diffusion_core/diffusion/stacked_sampling.py):
today each member's hooks call `Evaluator.evaluate(ema, raw)`, which samples on its own; batched,
`sample_members` draws all K members' samples in one pass through the stacked EMA network (each
sampler step one grouped forward over K x batch images) and each evaluation is handed its own.
Two timings per contender, rounds alternating so a busy neighbour hits both alike (median shown):
- sampling: K x `Evaluator.sample(ema_k)` vs one `sample_members` (building the stacked network included);
- evaluations (--evaluations): K x `evaluate(ema_k, raw_k)` vs `sample_members` + K x `evaluate(..., samples=drawn_k)`
  (residual curves of EMA and raw weights, metrics: what an evaluation records).
Defaults: the generalization_quick.yaml model and evaluation (width 16, channel_mult 1 2 2, one block
per level, no dropout; 128 samples DDIM-20, metrics with is_splits 2, 6 residual t's on 32 images).
The K models are freshly initialised (seeds 0..K-1; raw weights seeds 100+k): the cost of a forward
does not depend on the weights. Also prints how many uint8 pixels the two contenders' samples differ in. --forward-images adds batched
sampling contenders with other caps on the images per stacked forward (the CPU default: 128).

    .venv/bin/python benchmarks/bench_stacked_sampling.py --k 8 --threads 1 --rounds 3
    python benchmarks/bench_stacked_sampling.py --device cuda --k 8 --n-samples 1000   # a GPU
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP; see bench_train_step.py

import argparse  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--k", type=int, default=8, help="members of the stacked group")
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--channel-mult", type=int, nargs="+", default=[1, 2, 2])
    ap.add_argument("--blocks", type=int, default=1, help="blocks per level")
    ap.add_argument("--n-samples", type=int, default=128)
    ap.add_argument("--sampler", default="ddim", choices=("ddim", "ddpm"))
    ap.add_argument("--steps", type=int, default=20, help="DDIM steps")
    ap.add_argument("--batch-size", type=int, default=256, help="EvalConfig.batch_size (per member)")
    ap.add_argument("--forward-images", type=int, nargs="*", default=[],
                    help="also time the batched sampling with at most this many images per stacked forward "
                         "(stacked_sampling.sample_stacked's forward_images; 0: all K x batch)")
    ap.add_argument("--evaluations", action="store_true",
                    help="also time whole evaluations (residuals, metrics; the first ones build each evaluator's "
                         "classifier and reference statistics: minutes on a CPU)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--data-root", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from diffusion_core import NoiseSchedule, UNetConfig, mnist_splits
    from diffusion_core.config import EvalConfig
    from diffusion_core.data import Splits
    from diffusion_core.evaluation import Evaluator
    from diffusion_core.diffusion.stacked_sampling import sample_members, stacked_eps_of_models
    from diffusion_core.training.train import build_model

    device = torch.device(args.device)
    full = mnist_splits(args.data_root)
    splits = Splits(full.train.subset(torch.arange(1024)), full.val.subset(torch.arange(256)))
    model = UNetConfig(base_width=args.width, channel_mult=tuple(args.channel_mult), blocks_per_level=args.blocks,
                       bottleneck_blocks=1, dropout=0.0)
    ema = [build_model(model, k, device).eval() for k in range(args.k)]
    raw = [build_model(model, 100 + k, device) for k in range(args.k)]
    cfg = EvalConfig(n_samples=args.n_samples, grid_images=64, sampler=args.sampler, steps=args.steps,
                     is_splits=2, t_grid=6, residual_images=32, batch_size=args.batch_size)
    schedule = NoiseSchedule.make("linear", 1000)

    def evaluators() -> list[Evaluator]:  # one per member, kept across rounds as a trial's hooks keep theirs
        return [Evaluator(schedule, splits.val, cfg, train_images=splits.train, device=device, data_root=args.data_root)
                for _ in ema]

    seq_ev, bat_ev = evaluators(), evaluators()
    out: dict[str, list] = {}

    def timed(label, fn):
        sync(device)
        t0 = time.perf_counter()
        out[label] = fn()
        sync(device)
        return time.perf_counter() - t0

    contenders = {
        "sampling, one after another": lambda: [ev.sample(m) for ev, m in zip(seq_ev, ema)],
        "sampling, one batched pass": lambda: [d.images for d in sample_members(bat_ev, ema,
                                                                                 stacked_eps_of_models(ema))],
        **{f"sampling, batched, {n or 'all'} img/forward": lambda n=n: [
            d.images for d in sample_members(bat_ev, ema, stacked_eps_of_models(ema), n or 10 ** 9)]
           for n in args.forward_images},
        "evaluations, one after another": lambda: [ev.evaluate(e, r) for ev, e, r in zip(seq_ev, ema, raw)],
        "evaluations, one batched pass": lambda: [
            ev.evaluate(e, r, samples=d) for ev, e, r, d in
            zip(bat_ev, ema, raw, sample_members(bat_ev, ema, stacked_eps_of_models(ema)))],
    }
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {os.cpu_count()} cores"
    print(f"device {device} ({name}), torch {torch.__version__}, {args.threads} thread(s); U-Net width {args.width}, "
          f"channel_mult {args.channel_mult}, {args.blocks} block(s)/level; K={args.k} members x {args.n_samples} "
          f"samples {args.sampler.upper()}{'-' + str(args.steps) if args.sampler == 'ddim' else ''}, batch "
          f"{args.batch_size}/member; load average at start {os.getloadavg()[0]:.1f}", flush=True)
    if not args.evaluations:
        del contenders["evaluations, one after another"], contenders["evaluations, one batched pass"]
    for label in [c for c in contenders if c.startswith("evaluations")]:
        print(f"warm-up (classifier, reference statistics, real-data metrics): {label}: "
              f"{timed(label, contenders[label]):.1f} s", flush=True)
    seconds: dict[str, list[float]] = {c: [] for c in contenders}
    for r in range(args.rounds):
        for label, fn in contenders.items():
            seconds[label].append(timed(label, fn))
        print(f"round {r + 1}: " + "  ".join(f"{v[-1]:.2f}" for v in seconds.values()), flush=True)
    print(f"{'contender':<34} {'s (median)':>10} {'x faster':>9}  rounds")
    for label, v in seconds.items():
        base = statistics.median(seconds[("sampling" if label.startswith("sampling") else "evaluations")
                                         + ", one after another"])
        print(f"{label:<34} {statistics.median(v):>10.2f} {base / statistics.median(v):>9.2f}  "
              f"{' '.join(f'{x:.2f}' for x in v)}")
    a, b = out["sampling, one after another"], out["sampling, one batched pass"]
    apart = torch.stack([(x.int() - y.int()).abs() for x, y in zip(a, b)])
    print(f"batched vs one after another: {int((apart > 0).sum())} of {apart.numel()} uint8 pixels differ, "
          f"by at most {int(apart.max())}")
    print(f"load average at end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
