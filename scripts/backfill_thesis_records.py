"""Give the shipped thesis run's records (results/thesis/) the columns added after it ran, from what
depends on no weights -- run once, on a CPU, after the H200 run (issue 24):

- evals: real_h_y, real_h_y_given_x (the entropy plane's real point) and the real-data intervals
  real_{fid,inception_score,precision,recall}_{lo,hi}, by diffusion_core.evaluation.real_data_metrics
  with the study file's evaluation seed, sample count, IS splits and interval_halves (default 50):
  the same 1,000 test images the run drew (its recorded real_fid, real_inception_score, real_precision
  and real_recall are recomputed as a check and must agree to float tolerance; CPU vs the H200's GPU).
- trials: eval_seconds (the sum of the trial's evals.eval_seconds) and train_seconds (wall_seconds
  minus that), records.parquet.time_split.

    PYTHONPATH=. STUDYCTL_DATA_ROOT=../shared/data python scripts/backfill_thesis_records.py results/thesis
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import pandas as pd
import pyarrow as pa

from diffusion_core import metrics
from diffusion_core.config import EvalConfig, resolve_data_root
from diffusion_core.data import mnist_splits
from diffusion_core.evaluation import real_data_metrics
from records.layout import kind_dir
from records.parquet import time_split, write_atomic_table

CHECKED = ("real_fid", "real_inception_score", "real_precision", "real_recall")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("study_dir", type=Path)
    args = ap.parse_args(argv)
    trials = pd.read_parquet(kind_dir(args.study_dir, "trials"))
    if len(trials) != 1:
        sys.exit(f"expected the thesis run's one trial, found {len(trials)}")
    tr = trials.iloc[0]
    root = resolve_data_root(None)
    seed, is_splits = int(tr["evaluation.seed"]), int(tr["evaluation.is_splits"])
    clf = metrics.load_classifier("cpu")
    ref = metrics.reference_statistics(clf, "val", data_root=root, split_seed=int(tr["data.split_seed"]))
    train = mnist_splits(root, split_seed=int(tr["data.split_seed"])).train.images
    parts = sorted(kind_dir(args.study_dir, "evals").glob(f"{tr.trial_id}--s*.parquet"))
    n = int(pd.read_parquet(parts[0])["real_n_samples"].iloc[0])
    real = real_data_metrics(n, clf, ref, train, data_root=root, seed=seed, is_splits=is_splits,
                             interval_halves=EvalConfig().interval_halves)
    recorded = pd.read_parquet(parts[0]).iloc[0]
    for k in CHECKED:
        if not math.isclose(real[k], float(recorded[k]), rel_tol=2e-3):
            sys.exit(f"{k}: recomputed {real[k]:.6g}, recorded {recorded[k]:.6g}: not the run's draw")
        print(f"{k}: recorded {recorded[k]:.6g}, recomputed {real[k]:.6g}")
    for part in parts:
        df = pd.read_parquet(part)
        for k, v in real.items():
            if k not in CHECKED and k != "real_n_samples":
                df[k] = v
        write_atomic_table(part, pa.Table.from_pandas(df, preserve_index=False))
    split = time_split(args.study_dir, tr.trial_id, float(tr["wall_seconds"]))
    trial_part = kind_dir(args.study_dir, "trials") / f"{tr.trial_id}.parquet"
    t = pd.read_parquet(trial_part)
    for k, v in split.items():
        t[k] = v
    write_atomic_table(trial_part, pa.Table.from_pandas(t, preserve_index=False))
    print({k: v for k, v in real.items() if k not in CHECKED}, split)
    return 0


if __name__ == "__main__":
    sys.exit(main())
