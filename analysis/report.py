"""`studyctl figures DIR`: every figure from the Parquet records, plus an index.html report."""
from __future__ import annotations

import html
import os
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from records.atomic import write_text
from records.layout import figures_dir, report_file
from records.layout import study_file as study_file_of
from records.parquet import latest_per_trial

from .captions import caption
from .figures import TRIAL_FIGURES
from .style import save, styled
from .figures_ground_truth import ground_truth_figures
from .figures_study import study_overlays
from .tables import Study, final_evals, load_study

FINAL_COLUMNS = ["fid", "fid_mean_term", "fid_cov_term", "inception_score", "h_y", "h_y_given_x", "precision",
                 "recall", "memorized_fraction"]

@dataclass
class FigureSet:
    written: dict[str, Path] = field(default_factory=dict)   # name -> PNG path (the other formats beside it)
    skipped: dict[str, str] = field(default_factory=dict)    # name -> why


def write_figures(study: Study, out: Path, formats) -> FigureSet:
    """Every figure of `study` into `out`, each as `formats` (the study file's analysis.figure_formats)."""
    result = FigureSet()
    for trial in study.trial_ids():
        for name, fn in TRIAL_FIGURES.items():
            key = f"{trial}/{name}"
            with styled():
                fig = fn(study, trial)
                if fig is not None:
                    result.written[key] = save(fig, out / trial / name, formats)
            if fig is None:
                result.skipped[key] = f"no data yet (trial status {study.status(trial)})"
    with styled():
        overlays = study_overlays(study)
        for name, fig in overlays.items():
            if fig is not None:
                result.written[name] = save(fig, out / name, formats)
    for name, fig in overlays.items():
        if fig is None:
            result.skipped[name] = "needs a swept field with >= 2 values and records for it"
    with styled():
        truth = ground_truth_figures(study)
        for name, fig in truth.items():
            if fig is not None:
                result.written[name] = save(fig, out / name, formats)
    for name, fig in truth.items():
        if fig is None:
            result.skipped[name] = "needs `studyctl decompose` tables (bias2 and sample quality: a molrg study)"
    return result



def missing_trials(study: Study) -> list[tuple[str, str, str]]:
    """(trial_id, status, error) of every trial that did not complete."""
    out = []
    if "status" in study.trials:
        for r in study.trials.itertuples():
            if r.status != "COMPLETED":
                # A RUNNING/PENDING row has no error: Parquet gives NaN there, which is truthy.
                err = getattr(r, "error", None)
                out.append((r.trial_id, r.status, err if isinstance(err, str) else ""))
    return out


def trial_summary(study: Study) -> pd.DataFrame:
    cols = ["trial_id", "status"] + [c for c in study.swept if c in study.trials]
    table = study.trials[cols] if len(study.trials) else pd.DataFrame({"trial_id": study.trial_ids()})
    fe = final_evals(study)
    if len(fe):
        keep = ["trial_id", "epoch"] + [c for c in FINAL_COLUMNS if c in fe]
        table = table.merge(fe[keep].rename(columns={"epoch": "final_epoch"}), on="trial_id", how="left")
    if len(study.epochs):
        last = latest_per_trial(study.epochs, "epoch")[["trial_id", "train_loss", "val_loss"]]
        table = table.merge(last, on="trial_id", how="left")
    return table


def write_report(study: Study, figs: FigureSet, out: Path) -> Path:
    study_file = study_file_of(study.dir)
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(study.name)}</title>",
             "<style>body{font-family:sans-serif;max-width:1100px;margin:auto;padding:1em}"
             "img{max-width:100%;border:1px solid #ddd}table{border-collapse:collapse;font-size:12px}"
             "td,th{border:1px solid #ccc;padding:2px 6px}pre{background:#f6f6f6;padding:.5em;overflow:auto}"
             ".warn{color:#a00}.wide{max-width:100%;overflow-x:auto}</style></head><body>",
             f"<h1>Study {html.escape(study.name)}</h1>"]
    missing = missing_trials(study)
    if missing:
        parts.append("<h2 class='warn'>Incomplete trials</h2><ul>")
        for tid, status, err in missing:
            parts.append(f"<li class='warn'><b>{html.escape(tid)}</b>: {html.escape(status)}"
                         f"{' — ' + html.escape(str(err)) if err else ''} (its figures show what exists)</li>")
        parts.append("</ul>")
    parts.append("<h2>Trials and final metrics</h2>")
    # Many swept fields and metric columns are wider than the page: the table scrolls in its own box.
    parts.append("<div class='wide'>" + trial_summary(study).to_html(index=False, float_format=lambda v: f"{v:.4g}",
                                                                      na_rep="—") + "</div>")
    study_figs = {k: v for k, v in figs.written.items() if "/" not in k}
    if study_figs:
        parts.append("<h2>Study-level figures</h2>")
        for name, png in study_figs.items():
            parts.append(f"<h3>{html.escape(name)}</h3><p>{html.escape(caption(name))}</p>"
                         f"<img src='{html.escape(os.path.relpath(png, out))}'>")
    for trial in study.trial_ids():
        items = {k: v for k, v in figs.written.items() if k.startswith(trial + "/")}
        parts.append(f"<h2>Trial {html.escape(trial)} ({html.escape(study.status(trial))})</h2>")
        for name, png in items.items():
            parts.append(f"<h3>{html.escape(name.split('/')[-1])}</h3><p>{html.escape(caption(name))}</p>"
                         f"<img src='{html.escape(os.path.relpath(png, out))}'>")
        skipped = [k.split("/")[-1] for k in figs.skipped if k.startswith(trial + "/")]
        if skipped:
            parts.append(f"<p class='warn'>Not drawn (no records yet): {html.escape(', '.join(skipped))}</p>")
    if study_file.exists():
        parts.append(f"<h2>Study file</h2><pre>{html.escape(study_file.read_text())}</pre>")
    parts.append("</body></html>")
    path = report_file(out)
    write_text(path, "\n".join(parts))
    return path


def make_figures(study_dir: str | os.PathLike, formats) -> tuple[FigureSet, Path, list]:
    """Write every figure (as each of `formats`) and the report; returns (figures, report path,
    incomplete trials)."""
    study = load_study(study_dir)
    out = figures_dir(study.dir)
    figs = write_figures(study, out, formats)
    report = write_report(study, figs, out)
    return figs, report, missing_trials(study)
