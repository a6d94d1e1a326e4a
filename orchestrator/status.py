"""What a study folder says about its trials: statuses, progress, latest losses and metrics.

Read from the Parquet records and each trial's summary.json (written by the worker at
every evaluation), so `studyctl status` works while a launch runs, after it, or after it
was killed.
"""
from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Callable

from records.layout import summary_file, worker_file
from records.parquet import latest_per_trial, read_table

FINISHED = ("COMPLETED", "FAILED", "STOPPED")
SECTION_COLUMNS = ("data.", "model.", "diffusion.", "training.", "evaluation.")
STATUS_COLUMNS = ("status", "progress", "step", "total_steps", "loss", "val_loss", "fid", "inception_score",
                  "wall_seconds", "error")


def statuses(out: Path) -> dict[str, str]:
    df = read_table(out, "trials")
    return {} if df.empty else dict(zip(df["trial_id"], df["status"]))


def read_summary(out: Path, trial_id: str) -> dict:
    """A trial's summary.json ({} if it has none yet)."""
    f = summary_file(out, trial_id)
    try:
        return json.loads(f.read_text())
    except (OSError, ValueError):
        return {}


def status_table(out: Path):
    """One row per trial: status, progress, latest loss / val loss / metrics."""
    import pandas as pd

    trials = read_table(out, "trials")
    if trials.empty:
        return trials
    cols = ["trial_id", "status"] + [c for c in trials.columns if c not in ("study", "trial_id", "status")
                                     and not c.startswith(SECTION_COLUMNS)]
    df = trials[cols].copy()
    live = {tid: read_summary(out, tid) for tid in df["trial_id"]}
    df["step"] = [max(int(live[t].get("step") or 0), int(x) if pd.notna(x) else 0)
                  for t, x in zip(df["trial_id"], df["step"])]
    df["total_steps"] = pd.array([live[t].get("total_steps") or (int(x) if pd.notna(x) else None)
                                  for t, x in zip(df["trial_id"], df["total_steps"])], dtype="Int64")
    df["wall_seconds"] = [max(float(live[t].get("wall_seconds") or 0), float(x) if pd.notna(x) else 0) or None
                          for t, x in zip(df["trial_id"], df["wall_seconds"])]
    df["status"] = [("INTERRUPTED" if st == "RUNNING" and _stale(out, t) else st)
                    for t, st in zip(df["trial_id"], df["status"])]
    df["error"] = df["error"].fillna("") if "error" in df else ""
    df["progress"] = [f"{100 * s / t:.0f}%" if pd.notna(t) and t else "-"
                      for s, t in zip(df["step"], df["total_steps"])]
    steps = read_table(out, "train_steps")
    if not steps.empty:
        df["loss"] = df["trial_id"].map(latest_per_trial(steps).set_index("trial_id")["loss"])
    epochs = read_table(out, "epochs")
    if not epochs.empty:
        df["val_loss"] = df["trial_id"].map(latest_per_trial(epochs).set_index("trial_id")["val_loss"])
    evals = read_table(out, "evals")
    if not evals.empty:
        last = latest_per_trial(evals).set_index("trial_id")
        for k in ("fid", "inception_score"):
            if k in last and last[k].notna().any():
                df[k] = df["trial_id"].map(last[k])
    swept = swept_values(trials)
    df = df.merge(swept, left_on="trial_id", right_index=True, how="left")
    keep = ["trial_id", *swept.columns] + [c for c in STATUS_COLUMNS if c in df]
    return df[keep].sort_values("trial_id").reset_index(drop=True)


def swept_values(trials):
    """The config fields that differ between the trials (what the sweep varied), indexed by trial id;
    each column named by its field's last part (base_width, schedule, seed) unless two sections share it."""
    import pandas as pd

    cols = [c for c in trials.columns if c.startswith(SECTION_COLUMNS)
            and trials[c].astype(str).nunique(dropna=False) > 1]
    short = [c.split(".", 1)[1] for c in cols]
    names = {c: (s if short.count(s) == 1 and s not in STATUS_COLUMNS else c) for c, s in zip(cols, short)}
    out = trials.set_index("trial_id")[cols].rename(columns=names)
    return out.astype(object).where(pd.notna(out), "-")


def _stale(out: Path, trial_id: str) -> bool:
    """A RUNNING trial whose worker process (on this host) is gone: killed with its launch."""
    try:
        w = json.loads(worker_file(out, trial_id, 0).read_text())
    except (OSError, ValueError):
        return False
    if w.get("host") != socket.gethostname():  # another node: its processes are not visible here
        return False
    try:
        os.kill(int(w["pid"]), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, KeyError, ValueError, TypeError):
        return False
    return False


def summary_lines(out: Path, echo: Callable[[str], None] = print) -> None:
    import pandas as pd

    df = status_table(out)
    if df.empty:
        echo("no trials recorded yet")
        return
    with pd.option_context("display.max_columns", 20, "display.width", 160, "display.max_colwidth", 60):
        echo(df.to_string(index=False))
