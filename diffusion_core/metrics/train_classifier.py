"""Regenerate the shipped MNIST classifier (diffusion_core/metrics/mnist_classifier.pt + .json).

    python -m diffusion_core.metrics.train_classifier --data-root /path/to/data [--force]

Trains on the 48,000-image MNIST training split only; refuses to overwrite the shipped
weights unless --force. `studyctl classifier train` calls `train_classifier()` directly.
"""
from __future__ import annotations

import argparse
import json
import sys

from .classifier import WEIGHTS_PATH, _current_command, train_classifier


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m diffusion_core.metrics.train_classifier", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-root", default=None, help="folder containing MNIST/raw (default $STUDYCTL_DATA_ROOT or ./data)")
    ap.add_argument("--out", default=None, help=f"weights file to write (default: the shipped {WEIGHTS_PATH.name})")
    ap.add_argument("--force", action="store_true", help="overwrite an existing weights file")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (default 1: on a shared 2-core machine 2 OpenMP threads stall "
                         "badly whenever another process runs; 0 leaves torch's default)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    try:
        meta = train_classifier(data_root=args.data_root, out=args.out, force=args.force, seed=args.seed,
                                epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                                num_threads=args.threads or None, device=args.device,
                                progress=not args.no_progress, command=_current_command())
    except FileExistsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    summary = {k: meta[k] for k in ("sha256", "parameters", "epochs", "test_accuracy", "train_seconds")}
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
