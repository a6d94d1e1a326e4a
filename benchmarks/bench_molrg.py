"""The cost of the exact optimal denoiser f* of the MoLRG (diffusion_core/molrg.py) per 1,000 points,
beside its peers in the same run: the memorizing denoiser f*_D of a training set (exact, O(N d) per
point) and the width-8 U-Net the study trains (one forward pass).

    STUDYCTL_DATA_ROOT=../shared/data python benchmarks/bench_molrg.py [--points 1000] [--threads 2]

Prints the median of --repeats timings per 1,000 points at a few t, and the cost of drawing the
48,000 + 12,000 training/validation split from the mixture (what every trial pays once).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from diffusion_core.config import DataConfig, UNetConfig
from diffusion_core.data import molrg_of, molrg_splits
from diffusion_core.estimators.decomposition import empirical_optimal_eps  # noqa: E402
from diffusion_core.diffusion.schedules import NoiseSchedule  # noqa: E402
from diffusion_core.model.unet import UNet


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--points", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rank", type=int, default=16)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = DataConfig(dataset="molrg", molrg_rank=args.rank)
    m = molrg_of(cfg)
    sched = NoiseSchedule.make("linear", 1000)
    g = torch.Generator().manual_seed(0)
    x0, _ = m.sample(args.points, g)
    eps = torch.randn(x0.shape, generator=g)
    train_1k, _ = m.sample(1024, g)
    train_48k, _ = m.sample(48_000, g)
    net = UNet(UNetConfig(base_width=8, channel_mult=(1, 2, 2), blocks_per_level=1, bottleneck_blocks=1,
                          dropout=0.0)).eval()
    scale = 1000 / args.points
    print(f"MoLRG r={args.rank}, C={m.n_components}, d={m.d}; {args.points} points; {args.threads} thread(s); "
          f"median of {args.repeats}; seconds per 1,000 points")
    print(f"{'t':>5} {'f* (MoLRG)':>12} {'f*_D N=1024':>12} {'f*_D N=48k':>12} {'U-Net w8':>10}")
    for t in (10, 100, 500):
        x_t = sched.q_sample(x0, torch.full((args.points,), t), eps)
        a = timed(lambda: m.optimal_eps(x_t, t, sched), args.repeats) * scale
        b = timed(lambda: empirical_optimal_eps(x_t.double(), t, sched, train_1k.double()), args.repeats) * scale
        c = timed(lambda: empirical_optimal_eps(x_t.double(), t, sched, train_48k.double()), 1) * scale
        with torch.no_grad():
            d = timed(lambda: net(x_t, torch.full((args.points,), t)), args.repeats) * scale
        print(f"{t:>5} {a:>12.3f} {b:>12.3f} {c:>12.3f} {d:>10.3f}")
    print(f"drawing the 48,000 + 12,000 split: {timed(lambda: molrg_splits(cfg), 1):.2f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
