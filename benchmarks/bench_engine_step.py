"""Steps/s of `train()` and a stacked K = 2 group of a tiny U-Net on one CPU thread, for the code tree given
(default: this checkout): the training loop's own cost, where the model is small enough that the loop shows.
Compare two trees in one session, alternating (BENCHMARKS.md, "One training engine"):

    git worktree add /tmp/old <rev>
    for i in 1 2 3; do for d in /tmp/old .; do python benchmarks/bench_engine_step.py --tree $d; done; done
"""
from __future__ import annotations

import argparse
import os
import sys
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tree", default=".", help="the code tree to import diffusion_core from")
    ap.add_argument("--steps", type=int, default=400)
    args = ap.parse_args()
    sys.path.insert(0, os.path.abspath(args.tree))
    import torch

    from diffusion_core import TrainConfig, UNetConfig, train
    from diffusion_core.capabilities import Member
    from diffusion_core.config import DataConfig
    from diffusion_core.data import Splits, load_splits
    try:
        from diffusion_core.training.stacked import train_stacked
    except ImportError:  # a tree before diffusion_core was grouped
        from diffusion_core.stacked import train_stacked

    torch.set_num_threads(1)
    full = load_splits(DataConfig())
    splits = Splits(full.train.subset(torch.arange(256)), full.val.subset(torch.arange(32)))
    net = UNetConfig(base_width=4, channel_mult=(1,), blocks_per_level=1, bottleneck_blocks=1, dropout=0.0)
    cfg = TrainConfig(epochs=1000, batch_size=4, max_steps=args.steps, seed=0, log_every_first=1000,
                      eval_start=10 ** 9, val_every=10 ** 6)
    t0 = time.perf_counter()
    train(model=net, training=cfg, splits=splits, device="cpu")
    alone = time.perf_counter() - t0
    t0 = time.perf_counter()
    train_stacked([Member(cfg, net, splits=splits, name=f"m{i}") for i in range(2)], device="cpu")
    stacked = time.perf_counter() - t0
    print(f"{args.tree}: train() {args.steps / alone:.0f} steps/s, stacked K=2 {args.steps / stacked:.0f} steps/s")


if __name__ == "__main__":
    main()
