"""One whole evaluation (issue 11's "10k DDPM-1000 samples + metrics <= 20 s"): time by part, by batch size.

`Evaluator.evaluate` of the thesis U-Net (`UNetConfig()`, initial weights: sampling costs the same
whatever they are) exactly as a trial's hooks call it: Residual(t) of the EMA and raw weights, then
--n-samples samples from the fixed starting noise, then the metrics (FID, IS, precision/recall,
memorization against the training split). For each --batch-sizes value the first evaluation
(compile and CUDA-graph capture, the metrics' classifier and reference statistics) is timed apart
from the next --rounds ones; each of those is split into sampling (the `Evaluator.sample` call inside
it) and the rest (residuals + metrics).

    python benchmarks/bench_evaluation.py --device cuda --n-samples 10000 --batch-sizes 2500 5000 10000 --bf16 --compile
    .venv/bin/python benchmarks/bench_evaluation.py --device cpu --n-samples 32 --batch-sizes 16 32 --sampler ddim --steps 2
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402

import torch  # noqa: E402

from bench_stacked import synced_time as _now  # noqa: E402
from bench_train_step import device_name  # noqa: E402
from diffusion_core.config import EvalConfig
from diffusion_core.evaluation import Evaluator


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--n-samples", type=int, default=10_000)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[2500, 5000, 10_000])
    ap.add_argument("--sampler", default="ddpm", choices=("ddpm", "ddim"))
    ap.add_argument("--steps", type=int, default=None, help="DDIM steps")
    ap.add_argument("--bf16", action="store_true", help="sample under bf16 autocast (EvalConfig.precision)")
    ap.add_argument("--compile", action="store_true", help="EvalConfig.compile: inductor + CUDA graphs on a GPU")
    ap.add_argument("--residual-images", type=int, default=EvalConfig.residual_images,
                    help="validation images of Residual(t) (default: EvalConfig's, as a trial uses)")
    ap.add_argument("--rounds", type=int, default=1, help="timed evaluations after the first, per batch size")
    ap.add_argument("--data-root", default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    from diffusion_core import NoiseSchedule, UNet, UNetConfig, mnist_splits

    device = torch.device(args.device)
    splits = mnist_splits(args.data_root)
    schedule = NoiseSchedule.make("linear", 1000)
    torch.manual_seed(0)
    ema, raw = (UNet(UNetConfig()).to(device).eval() for _ in range(2))
    name = device_name(device)
    print(f"device {device} ({name}), torch {torch.__version__}; {args.n_samples} samples, {args.sampler}"
          f"{'-' + str(args.steps) if args.steps else ''}, {'bf16' if args.bf16 else 'fp32'}"
          f"{', compile' if args.compile else ''}", flush=True)
    print(f"{'batch':>6} {'first s':>8} {'evaluate s':>11} {'sample s':>9} {'rest s':>7} {'samples/s':>10}  metrics")
    rows = []
    for batch in args.batch_sizes:
        cfg = EvalConfig(n_samples=args.n_samples, batch_size=batch, sampler=args.sampler, steps=args.steps,
                         precision="bf16" if args.bf16 else "fp32", compile=args.compile,
                         residual_images=args.residual_images)
        try:
            ev = Evaluator(schedule, splits.val, cfg, train_images=splits.train, device=device, data_root=args.data_root)
            t0 = _now(device)
            ev.evaluate(ema, raw)
            first = _now(device) - t0
            print(f"{batch:>6} {first:>8.1f}  (the first evaluation; timed ones follow)", flush=True)
            totals, samples = [], []
            sample = ev.sample

            def timed_sample(model):  # the sampling inside evaluate(), timed on its own
                t = _now(device)
                out = sample(model)
                samples.append(_now(device) - t)
                return out

            ev.sample = timed_sample
            for _ in range(args.rounds):
                t0 = _now(device)
                res = ev.evaluate(ema, raw)
                totals.append(_now(device) - t0)
        except Exception as e:  # e.g. out of memory at the largest batch: report it, try the next
            print(f"{batch:>6} FAILED {type(e).__name__}: {str(e)[:200]}", flush=True)
            continue
        total, sample = statistics.median(totals), statistics.median(samples)
        fid = res.metrics.get("fid")
        print(f"{batch:>6} {first:>8.1f} {total:>11.2f} {sample:>9.2f} {total - sample:>7.2f} "
              f"{args.n_samples / sample:>10.1f}  {'FID %.1f' % fid if fid is not None else 'none'}", flush=True)
        rows.append(dict(batch=batch, first_s=first, evaluate_s=total, sample_s=sample, metrics=sorted(res.metrics)))
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps({**vars(args), "device_name": name, "rows": rows}) + "\n")


if __name__ == "__main__":
    main()
