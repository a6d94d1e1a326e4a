"""records: what a study folder holds and how it is written and read.

The layer between the runners (orchestrator/) and the readers (analysis/): both import it,
neither imports the other. It depends on diffusion_core only (for the config dataclasses of
the EMA snapshots and the metric columns of the `evals` table).

    layout.py     where every file of a study folder lives (study.yaml, Parquet kinds, trial files)
    parquet.py    the Parquet tables: fixed schemas, the per-trial writer, the reader
    snapshots.py  the EMA snapshots: weights + the trial's core configs, saved and rebuilt
    atomic.py     atomic file replacement (temp file, fsync, rename, fsync the folder)
"""
