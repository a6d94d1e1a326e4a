"""The analysis commands of `studyctl` (figures, decompose, generalization) and the analysis steps a
launch runs after its trials (the study file's `analysis` section). cli.py registers the commands on its
typer app; this module, like cli.py, sits on top of orchestrator/ and analysis/ and calls both."""
from __future__ import annotations

import time
from pathlib import Path

import typer

from records.layout import (FIGURES, GROUND_TRUTH, MLFLOW_ARTIFACTS, MLFLOW_DB, RAY, STUDY_FILE, TRIAL_FILES, TRIAL_KINDS,
                            analysis_table, figures_dir, generalization_dir, generalization_table, kind_dir,
                            read_study_file, report_file, study_file)

EXIT_BAD_STUDY = 2   # a bad study file or folder: every command exits with it


# The study file's `analysis` steps: what each does, the files that say it is done (what it writes:
# analysis/decompose.py, analysis/generalization.py, analysis/report.py) and the errors that skip it
# (a study without seed groups or subset pairs) instead of stopping the launch.
ANALYSIS_STEPS = {
    "decompose": ("bias² + noise and variance of every group of seeds, at every snapshot",
                  lambda d: (analysis_table(d, "decomposition"), analysis_table(d, "distance_to_memorization")),
                  (FileNotFoundError, ValueError)),
    "generalization": ("same-noise similarity and memorization of every pair of disjoint subsets",
                       lambda d: (generalization_table(d),), (FileNotFoundError, ValueError)),
    "figures": ("every figure and the report", lambda d: (report_file(figures_dir(d)),), (FileNotFoundError,)),
}
# What the decomposition and generalization read: the trials' records and files. The figures read
# everything in the study folder but these (MLflow's store changes at every launch).
ANALYSIS_INPUTS = (*TRIAL_KINDS, TRIAL_FILES, GROUND_TRUTH)
NOT_FIGURE_INPUTS = (FIGURES, MLFLOW_DB, MLFLOW_ARTIFACTS, RAY, STUDY_FILE)


def after_sweep(spec, out: Path) -> None:
    """The study file's `analysis` section: the decomposition and generalization (opt-in), then the
    figures (default). Each step says what it does and how long it took; a step whose output is newer
    than everything it reads is skipped (a relaunch of a finished study redoes nothing); Ctrl-C (or
    SIGTERM) stops the analysis with a message and exit status 130."""
    from .sweep import sigterm_as_interrupt

    a = spec.analysis
    steps = [name for name, on in (("decompose", a.decompose), ("generalization", a.generalization)) if on]
    steps += ["figures"] if a.figures or steps else []
    if not steps:
        return
    typer.echo(f"analysis (the study file's `analysis` section): {', '.join(steps)}. The trials are finished and "
               f"recorded; Ctrl-C stops the analysis")
    step = steps[0]
    try:
        with sigterm_as_interrupt():
            for i, step in enumerate(steps, 1):
                analysis_step(spec, out, step, f"analysis {i}/{len(steps)}: {step}")
    except KeyboardInterrupt:
        typer.echo(f"interrupted during the analysis ({step}); the trials' records are complete: "
                   f"`studyctl {step} {out}` runs it again", err=True)
        raise typer.Exit(130)


def analysis_step(spec, out: Path, step: str, where: str) -> None:
    what, outputs, skippable = ANALYSIS_STEPS[step]
    inputs = ANALYSIS_INPUTS if step != "figures" else \
        tuple(p.name for p in out.iterdir() if p.name not in NOT_FIGURE_INPUTS)
    if up_to_date(out, outputs(out), inputs):
        typer.echo(f"{where}: up to date (written after the last change to what it reads); "
                   f"`studyctl {step} {out}` redoes it")
        return
    typer.echo(f"{where}: {what} ...")
    t0 = time.time()
    try:
        ANALYSIS_RUN[step](spec, out)
    except skippable as e:
        typer.echo(f"{where} skipped: {e}", err=True)
        return
    typer.echo(f"{where}: done in {time.time() - t0:.0f} s")


def decompose_step(spec, out: Path) -> None:
    from analysis.decompose import decompose as run_decompose

    table = run_decompose(out, n_points=spec.analysis.decompose_points)
    typer.echo(f"decomposition: {table['group_id'].nunique()} group(s) -> {kind_dir(out, 'decomposition')}")


ANALYSIS_RUN = {"decompose": decompose_step,
                 "generalization": lambda spec, out: run_generalization(out),
                 "figures": lambda spec, out: write_figures(out, formats=spec.analysis.figure_formats)}


def up_to_date(out: Path, outputs: tuple[Path, ...], inputs: tuple[str, ...]) -> bool:
    """Every output exists and was written after the newest file under the inputs (make's rule)."""
    def newest(path: Path) -> int:
        if path.is_file():
            return path.stat().st_mtime_ns
        return max((f.stat().st_mtime_ns for f in path.rglob("*") if f.is_file()), default=0)

    files = list(outputs)
    if not all(f.is_file() for f in files):
        return False
    return min(f.stat().st_mtime_ns for f in files) >= max((newest(out / p) for p in inputs if (out / p).exists()),
                                                           default=0)


def study_dir(directory: str) -> Path:
    d = Path(directory).expanduser().resolve()
    if not study_file(d).exists():
        typer.echo(f"error: {d} is not a study folder (no {STUDY_FILE}): give the folder `studyctl launch` "
                   f"wrote (default runs/<study name>)", err=True)
        raise typer.Exit(EXIT_BAD_STUDY)
    return d


def figures(directory: str = typer.Argument(..., help="A study folder (written by `studyctl launch`)."),
            mlflow: bool = typer.Option(True, help="Also attach the figures to the study's MLflow parent run."),
            formats: str = typer.Option(None, "--formats", help="The files of each figure, a comma list from "
                                        "png, pdf, svg that includes png (default: the study file's "
                                        "analysis.figure_formats, png,pdf)."),
            ) -> None:
    """Regenerate every figure (PNG, and PDF unless the study file says otherwise) and an
    index.html report into DIR/figures/.

    Reads the Parquet tables only: the thesis's figures 26-30 per trial and the
    study-level overlays by capacity, schedule and training-set size. A half-finished
    study gets the figures of what exists; the report names what is missing.
    """
    from pydantic import ValidationError

    from .spec import AnalysisSpec

    try:
        chosen = None if formats is None else AnalysisSpec(
            figure_formats=[f.strip() for f in formats.split(",") if f.strip()]).figure_formats
    except ValidationError as e:
        err = e.errors()[0]
        why = str(err["ctx"]["error"]) if err["type"] == "value_error" else (
            f"bad value {formats!r}: {err['msg']}; allowed: a comma list of distinct formats from png, pdf, svg "
            f"that includes png")
        typer.echo(f"error: option '--formats': {why}", err=True)
        raise typer.Exit(EXIT_BAD_STUDY)
    try:
        write_figures(directory, mlflow, chosen)
    except FileNotFoundError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(EXIT_BAD_STUDY)


def study_figure_formats(directory) -> list[str]:
    """The formats the study file in `directory` asks for (analysis.figure_formats, or its default)."""
    from .spec import AnalysisSpec

    return AnalysisSpec.model_validate((read_study_file(directory) or {}).get("analysis") or {}).figure_formats


def write_figures(directory, mlflow: bool = True, formats: list[str] | None = None) -> None:
    """Figures + report from the Parquet records (as `formats`, default the study file's), attached
    to the study's MLflow parent run."""
    from analysis.report import make_figures

    formats = formats or study_figure_formats(directory)
    figs, report, missing = make_figures(directory, formats)
    typer.echo(f"wrote {len(figs.written)} figures ({' + '.join(f.upper() for f in formats)}) and the report {report}")
    for tid, state, err in missing:
        typer.echo(f"  missing/incomplete trial {tid}: {state}{' - ' + str(err) if err else ''}")
    if mlflow:
        from .tracking import find_parent_run, log_artifact

        found = find_parent_run(directory)
        if found is not None:
            log_artifact(found[0], found[1], report.parent, "figures")
            typer.echo(f"figures attached to MLflow run {found[1]}")


def decompose(directory: str = typer.Argument(..., help="A study folder (written by `studyctl launch`)."),
              points: int = typer.Option(256, help="Held-out points (x_0, eps) per timestep: the first N "
                                                   "validation images, eps from the evaluation seed."),
              t_grid: str = typer.Option(None, "--t-grid", help="Timesteps: a count n (n timesteps covering 1..T, "
                                         "as Residual(t)) or a comma list '1,10,100' (default: the study's "
                                         "evaluation.t_grid)."),
              eval_seed: int = typer.Option(None, "--eval-seed", help="Seed of eps (default: the study's "
                                                                      "evaluation.seed)."),
              steps: str = typer.Option("all", help="Snapshots to decompose: all (every evaluation step) or final."),
              device: str = typer.Option(None, help="cpu or cuda (default: cuda if available)."),
              references: bool = typer.Option(True, help="Also each trial's distance to the reference denoisers "
                                                         "(memorizing, Gaussian-linear; on molrg the true f*)."),
              quality_steps: str = typer.Option(None, "--quality-steps", help="molrg only: sample quality at the "
                                                "final snapshot (default) or at all of them."),
              quality_samples: int = typer.Option(None, "--quality-samples", help="molrg only: samples per trial "
                                                  "for the sample quality (default 256)."),
              ) -> None:
    """Bias-variance decomposition over trials that differ only in seed or training subset.

    For every such group, every evaluation snapshot, EMA and raw weights and every t:
    residual = bias2_plus_noise + variance (unbiased, exact identity; data / optimization
    variance where subsets are crossed with seeds) on held-out points, with 95% intervals,
    into DIR/decomposition/; the distance to the empirical optimal (memorizing) denoiser on
    training points into DIR/distance_to_memorization/; each trial's distance to the reference
    denoisers into DIR/reference_distances/. On molrg studies f* is exact: bias2, noise and the
    cross term are split, and DIR/sample_quality/ holds exact sample-quality measures. Then
    redraws the figures. See docs/decomposition.md and docs/ground_truth.md.
    """
    from analysis.decompose import decompose as run_decompose

    try:
        grid = None if t_grid is None else (int(t_grid) if "," not in t_grid else
                                             [int(t) for t in t_grid.split(",") if t.strip()])
    except ValueError:
        typer.echo(f"error: option '--t-grid': bad value {t_grid!r}: allowed: a count n >= 2 or a comma list of "
                   f"timesteps in 1..T", err=True)
        raise typer.Exit(EXIT_BAD_STUDY)
    try:
        table = run_decompose(directory, n_points=points, t_grid=grid, eval_seed=eval_seed, steps=steps,
                              device=device, references=references, quality_steps=quality_steps,
                              quality_samples=quality_samples)
    except (FileNotFoundError, ValueError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(EXIT_BAD_STUDY)
    typer.echo(f"decomposition: {table['group_id'].nunique()} group(s), {len(table)} rows -> "
               f"{kind_dir(directory, 'decomposition')}")
    write_figures(directory)


def generalization(directory: str = typer.Argument(..., help="A study folder (written by `studyctl launch`)."),
                   samples: int = typer.Option(None, help="Same-noise samples per model (default: the study's "
                                                          "evaluation.n_samples)."),
                   optimum_max_n: int = typer.Option(1024, help="Distance to the exact empirical optimal denoiser "
                                                                "for subsets of at most this many images."),
                   clip: bool = typer.Option(True, help="Clip DDIM's x0 estimate to the data range [-1, 1] at "
                                                        "each step (see docs/generalization.md)."),
                   device: str = typer.Option(None, help="cpu or cuda (default: cuda if available)."),
                   running: bool = typer.Option(False, "--running", help="Also pair trials still RUNNING "
                                                "(their evaluations so far)."),
                   ) -> None:
    """Memorization -> generalization over trials that differ only in data.subset_index.

    At every evaluation step of each pair, both EMA models sample (DDIM eta = 0) from the
    study's fixed evaluation noise (read from the trials' own evaluations when they kept them,
    evaluation.keep_samples with the same clipping; else drawn again from the EMA snapshots);
    writes DIR/generalization/generalization.parquet
    (same-noise similarity, nearest training images, memorized fraction, held-out baseline)
    and distance_to_memorization.parquet, logs them to the study's MLflow run, then redraws
    the figures.
    """
    d = study_dir(directory)
    try:
        run_generalization(d, n_samples=samples, optimum_max_n=optimum_max_n, clip_x0=1.0 if clip else None,
                            device=device, include_running=running)
    except (FileNotFoundError, ValueError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(EXIT_BAD_STUDY)
    write_figures(d)


def run_generalization(out: Path, **kw) -> None:
    """analysis.generalization, then its summary onto the study's MLflow parent run (if any)."""
    from analysis.generalization import generalization as run_generalization
    from analysis.generalization import slug

    table, _ = run_generalization(out, **kw)
    typer.echo(f"generalization: {table['pair_id'].nunique()} pair(s), {len(table)} rows -> "
               f"{generalization_dir(out)}")
    from .tracking import find_parent_run, log_artifact, log_metrics

    found = find_parent_run(out)
    if found is None:
        return
    models = table[table["member"].isin(["a", "b"])]
    per_step = models.groupby(["pair_id", "step"])[["same_noise_cosine", "memorized_fraction"]].mean()
    log_metrics(found[0], found[1], [(f"generalization/{slug(pid)}/{col}", float(v), int(step))
                                     for (pid, step), r in per_step.iterrows() for col, v in r.items()])
    log_artifact(found[0], found[1], generalization_dir(out), "generalization")
