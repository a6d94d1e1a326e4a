"""Time diffusion_core.metrics.evaluate_samples on 10,000 images, stage by stage.

    STUDYCTL_DATA_ROOT=../shared/data python benchmarks/bench_metrics.py [--n 10000] [--threads 2]

The 'generated' samples are real MNIST test images (uint8); the reference is the
validation split (12,000 images, statistics cached on disk: the first run also times
computing them); memorization searches the 48,000-image training split. Also prints the
real-vs-real FID floor (10,000 training-split images vs the 10,000 test images).
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from diffusion_core.config import METRIC_KEYS
from diffusion_core.data import mnist_splits  # noqa: E402
from diffusion_core.metrics import evaluate_samples, load_classifier, real_vs_real_fid, reference_statistics


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-root", default=None)
    ap.add_argument("--n", type=int, default=10_000, help="number of 'generated' images (MNIST test images)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cache-dir", default=None, help="reference-statistics cache (default: a fresh temp dir, "
                                                      "so the cold reference computation is timed too)")
    ap.add_argument("--no-floor", action="store_true", help="skip the real-vs-real FID floor")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    cache_dir = args.cache_dir or tempfile.mkdtemp(prefix="bench_metrics_cache_")
    try:
        return _run(args, cache_dir)
    finally:
        if args.cache_dir is None:
            shutil.rmtree(cache_dir, ignore_errors=True)


def _run(args, cache_dir) -> int:

    t = time.perf_counter()
    clf = load_classifier("cpu")
    splits = mnist_splits(args.data_root, with_test=True)
    samples = splits.test.images[:args.n]
    t_load = time.perf_counter() - t

    t = time.perf_counter()
    ref = reference_statistics(clf, "val", data_root=args.data_root, cache_dir=cache_dir)
    t_ref_cold = time.perf_counter() - t
    t = time.perf_counter()
    ref = reference_statistics(clf, "val", data_root=args.data_root, cache_dir=cache_dir)
    t_ref_warm = time.perf_counter() - t

    t = time.perf_counter()
    ref.knn_radii(3)                 # k-NN radii of the reference: once per reference, kept on the object
    t_radii = time.perf_counter() - t

    timings: dict = {}
    t = time.perf_counter()
    m = evaluate_samples(samples, ref, clf, splits.train, timings=timings)
    total = time.perf_counter() - t

    n = len(samples)
    print(f"evaluate_samples on {n} MNIST test images vs val reference ({ref.n}), memorization vs "
          f"{len(splits.train)} training images; torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs")
    print(f"{'stage':<42}{'seconds':>10}{'images/s':>12}")
    rows = [("load classifier + MNIST", t_load), (f"reference stats val, cold ({ref.n} img)", t_ref_cold),
            ("reference stats val, cached", t_ref_warm), ("reference k-NN radii (once per reference)", t_radii)]
    rows += [(f"  {k}", v) for k, v in timings.items()]
    rows += [("evaluate_samples total", total)]
    for name, sec in rows:
        ips = f"{n / sec:,.0f}" if name.startswith("  ") or name.startswith("evaluate") else ""
        print(f"{name:<42}{sec:>10.2f}{ips:>12}")
    print("metrics: " + ", ".join(f"{k}={m[k]:.4g}" for k in METRIC_KEYS))
    print("extras:  " + ", ".join(f"{k}={v:.4g}" for k, v in m.items() if k not in METRIC_KEYS))
    if not args.no_floor:
        t = time.perf_counter()
        fl = real_vs_real_fid(clf, data_root=args.data_root, n=10_000, cache_dir=cache_dir)
        print(f"real-vs-real FID floor (10,000 train-split vs 10,000 test): total={fl.total:.4f} "
              f"mean={fl.mean_term:.4f} cov={fl.cov_term:.4f}  ({time.perf_counter() - t:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
