"""`studyctl`: the command line of the toolkit (a typer app).

(Over 400 lines on purpose: one short function per command with its --help text; the work
is in orchestrator/ and analysis/, which this module — the top of the dependency graph — calls.)
"""
from __future__ import annotations

import time
from pathlib import Path

import typer

from records.layout import (FIGURES, GROUND_TRUTH, MLFLOW_ARTIFACTS, MLFLOW_DB, RAY, STUDY_FILE, TRIAL_FILES, TRIAL_KINDS,
                            analysis_table, figures_dir, generalization_dir, generalization_table, kind_dir,
                            mlflow_artifacts, mlflow_db, read_study_file, report_file, study_file)

from . import packaged_study_names


def _flag_without_type(display_type_rich):
    """typer 0.29 prints a type after every option in --help, `<bool>` after a flag too (`--local <bool>`),
    as if it took a value: a flag shows none."""
    def display(self, ctx):
        return None if self.is_flag else display_type_rich(self, ctx)
    return display


if hasattr(typer.core.TyperOption, "display_type_rich"):  # typer 0.29; other versions print --help their way
    typer.core.TyperOption.display_type_rich = _flag_without_type(typer.core.TyperOption.display_type_rich)

app = typer.Typer(
    name="studyctl",
    help="Systematic bias-variance studies of diffusion models (DDPMs) on Ray.\n\n"
         "Typical use: `studyctl launch quickstart.yaml`, then `studyctl ui runs/quickstart`.",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode="markdown",  # docstring paragraphs re-flow to the terminal width
)


@app.callback()
def _main() -> None:
    """Systematic bias-variance studies of diffusion models (DDPMs) on Ray."""


@app.command()
def version() -> None:
    """Print the versions of studyctl and of the libraries it runs on."""
    import importlib.metadata as md

    def v(name: str) -> str:
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            return "not installed"

    typer.echo(f"studyctl {v('studyctl')}")
    for name in ("torch", "torchvision", "ray", "mlflow"):
        typer.echo(f"  {name:<12}{v(name)}")



# ------------------------------------------------------------------------------ studies
EXIT_BAD_STUDY = 2


STUDY_ARG_HELP = f"Study YAML: a path, or a packaged study's name ({', '.join(packaged_study_names())})."
SET_HELP = ("Override a study field, FIELD=VALUE in YAML syntax (repeatable), e.g. "
            "--set evaluation.n_samples=10000 --set training.precision=bf16.")


def _load(file: str, overrides: list[str] | None = None):
    """Load + validate a study file (a path, or a packaged study's bare name); exit 2 if bad."""
    from .spec import StudyError
    from .study_file import load_study_file

    try:
        return load_study_file(file, overrides or [])
    except StudyError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(EXIT_BAD_STUDY)


def _plan_or_exit(spec):
    """The study's plan (its sweep expanded and every trial validated: once per command); exit 2 if bad."""
    import dataclasses

    from diffusion_core.config import resolve_data_root

    from .plan import build_plan
    from .spec import StudyError

    # Workers may start elsewhere (another node, another working dir): pin the data root.
    spec.data = dataclasses.replace(spec.data, root=str(resolve_data_root(spec.data.root).resolve()))
    try:
        return build_plan(spec)
    except StudyError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(EXIT_BAD_STUDY)


def _print_table(plan) -> None:
    import pandas as pd

    df = pd.DataFrame(plan.table(), dtype=object).fillna("-")
    with pd.option_context("display.max_rows", 500, "display.max_columns", 30, "display.width", 160):
        typer.echo(df.to_string(index=False))
    r = plan.spec.resources
    typer.echo(f"{len(plan.trials)} trial(s); each: {r.workers_per_trial} DDP worker(s) x "
               f"(CPU {r.cpus_per_worker:g}, GPU {r.gpus_per_worker:g})")
    dropped = plan.dropped
    if dropped:
        typer.echo(f"{len(dropped)} duplicate trial(s) dropped (same resolved config as a listed trial): "
                   + "; ".join(", ".join(f"{k}={v}" for k, v in ov.items()) for ov in dropped))


@app.command()
def validate(file: str = typer.Argument(..., help=STUDY_ARG_HELP),
             overrides: list[str] = typer.Option(None, "--set", help=SET_HELP)) -> None:
    """Check a study file and print the expanded trial table and count.

    Exit status 2 (with a message naming the field, the bad value and what is allowed)
    if the file is wrong; nothing is started.
    """
    spec = _load(file, overrides)
    plan = _plan_or_exit(spec)
    _print_table(plan)
    for note in plan.notes():
        typer.echo(f"note: {note}")
    if spec.resources.stack > 1:
        from .stacking import describe, stack_groups

        typer.echo(describe(stack_groups(plan), spec.resources.stack))
    typer.echo(f"study {spec.name!r} is valid; output folder {spec.output_dir()}")


@app.command()
def launch(file: str = typer.Argument(..., help=STUDY_ARG_HELP),
           address: str = typer.Option(None, "--address", help="Join this Ray cluster (e.g. ray://head:10001 or "
                                       "head:6379); default: the study's ray_address, else a local Ray "
                                       "sized to this machine."),
           output: str = typer.Option(None, "--output", "-o", help="Study folder for records, checkpoints and "
                                      "the MLflow store (default: the study's output, else `runs/<name>`)."),
           dry_run: bool = typer.Option(False, "--dry-run", help="Validate and print the plan; start nothing."),
           local: bool = typer.Option(False, "--local", help="No Ray: run the trials one after another in this "
                                      "process (first GPU if the study asks for GPUs, else CPU), with a "
                                      "progress bar. Same records; no ASHA."),
           no_tracking: bool = typer.Option(False, "--no-tracking", help="No MLflow (tracking.enabled: false): "
                                            "Parquet records, grids and figures only."),
           overrides: list[str] = typer.Option(None, "--set", help=SET_HELP),
           ) -> None:
    """Run a study: a Ray Tune sweep of Ray Train DDP trials, recorded to Parquet + MLflow.

    Each trial trains with N DDP workers, evaluates on the study's schedule (losses,
    Residual(t), sample grids, metrics) and checkpoints at every evaluation. Exit status
    0 when every trial finished, 1 when some failed (named at the end), 2 for a bad study
    file. An interrupted launch is finished with `studyctl resume DIR`.
    """
    spec = _load(file, overrides)
    if no_tracking:
        spec.tracking.enabled = False
    plan = _plan_or_exit(spec)
    out = spec.output_dir(output)
    if dry_run:
        _print_table(plan)
        runner = "this process (--local)" if local else f"Ray {address or spec.ray_address or 'local'}"
        typer.echo(f"dry run: would write to {out}; trials run in {runner}")
        return
    _run_sweep(plan, out, address, local=local)


def _run_sweep(plan, out: Path, address: str | None, local: bool = False) -> None:
    """Run (or finish) the sweep, then the study's `analysis` steps; exits with the sweep's code."""
    from .driver import SetupError
    from .sweep import launch as run_launch

    t0 = time.time()
    try:
        code = run_launch(plan, out, address=address, local=local, echo=typer.echo)
    except SetupError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1)
    except KeyboardInterrupt:  # before the trials started (the sweep handles its own interrupts)
        typer.echo(f"interrupted — `studyctl resume {out}{' --local' if local else ''}` continues", err=True)
        raise typer.Exit(130)
    trials_s = time.time() - t0
    if code == 130:  # interrupted: the message is printed; no analysis of a half-run sweep
        typer.echo(f"wall time {trials_s:.0f} s")
        raise typer.Exit(code)
    try:
        _after_sweep(plan.spec, out)
    finally:
        total = time.time() - t0
        typer.echo(f"wall time {total:.0f} s (trials {trials_s:.0f} s, analysis {total - trials_s:.0f} s)")
    raise typer.Exit(code)


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


def _after_sweep(spec, out: Path) -> None:
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
                _analysis_step(spec, out, step, f"analysis {i}/{len(steps)}: {step}")
    except KeyboardInterrupt:
        typer.echo(f"interrupted during the analysis ({step}); the trials' records are complete: "
                   f"`studyctl {step} {out}` runs it again", err=True)
        raise typer.Exit(130)


def _analysis_step(spec, out: Path, step: str, where: str) -> None:
    what, outputs, skippable = ANALYSIS_STEPS[step]
    inputs = ANALYSIS_INPUTS if step != "figures" else \
        tuple(p.name for p in out.iterdir() if p.name not in NOT_FIGURE_INPUTS)
    if _up_to_date(out, outputs(out), inputs):
        typer.echo(f"{where}: up to date (written after the last change to what it reads); "
                   f"`studyctl {step} {out}` redoes it")
        return
    typer.echo(f"{where}: {what} ...")
    t0 = time.time()
    try:
        _ANALYSIS_RUN[step](spec, out)
    except skippable as e:
        typer.echo(f"{where} skipped: {e}", err=True)
        return
    typer.echo(f"{where}: done in {time.time() - t0:.0f} s")


def _decompose_step(spec, out: Path) -> None:
    from analysis.decompose import decompose as run_decompose

    table = run_decompose(out, n_points=spec.analysis.decompose_points)
    typer.echo(f"decomposition: {table['group_id'].nunique()} group(s) -> {kind_dir(out, 'decomposition')}")


_ANALYSIS_RUN = {"decompose": _decompose_step,
                 "generalization": lambda spec, out: _run_generalization(out),
                 "figures": lambda spec, out: _write_figures(out)}


def _up_to_date(out: Path, outputs: tuple[Path, ...], inputs: tuple[str, ...]) -> bool:
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


def _study_dir(directory: str) -> Path:
    d = Path(directory).expanduser().resolve()
    if not study_file(d).exists():
        typer.echo(f"error: {d} is not a study folder (no {STUDY_FILE}): give the folder `studyctl launch` "
                   f"wrote (default runs/<study name>)", err=True)
        raise typer.Exit(EXIT_BAD_STUDY)
    return d


@app.command()
def resume(directory: str = typer.Argument(..., help="The study folder of an interrupted launch."),
           address: str = typer.Option(None, "--address", help="Join this Ray cluster instead of a local one."),
           local: bool = typer.Option(False, "--local", help="No Ray: finish the trials in this process "
                                      "(see `launch --local`).")
           ) -> None:
    """Finish what an interrupted launch left: finished trials are not run again, an
    interrupted trial continues from its last checkpoint (and its MLflow child run)."""
    from .spec import StudyError, parse_study

    d = _study_dir(directory)
    try:
        spec = parse_study(read_study_file(d), str(study_file(d)))
    except StudyError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(EXIT_BAD_STUDY)
    _run_sweep(_plan_or_exit(spec), d, address, local=local)


@app.command()
def status(directory: str = typer.Argument(..., help="A study folder (written by `studyctl launch`).")) -> None:
    """Trials with their state, progress and latest metrics (from the Parquet records)."""
    from .status import summary_lines

    d = _study_dir(directory)
    summary_lines(d, typer.echo)


@app.command()
def ui(directory: str = typer.Argument(..., help="A study folder (written by `studyctl launch`)."),
       port: int = typer.Option(5000, help="Port on 127.0.0.1."),
       host: str = typer.Option("127.0.0.1", help="Interface to listen on (127.0.0.1: this machine only).")) -> None:
    """Start the MLflow UI against the study's store (Ctrl-C stops it)."""
    import os
    import sys

    from .tracking import study_store

    d = _study_dir(directory)
    _, uri = study_store(d)
    if uri is None:
        typer.echo(f"{d} was run without MLflow (tracking.enabled: false): its records are the Parquet tables; "
                   f"`studyctl status {d}` and `studyctl figures {d}` read them")
        raise typer.Exit(0)
    if not uri.startswith("sqlite:") and not uri.startswith("file:"):
        typer.echo(f"this study logs to {uri}: open that server in a browser instead")
        raise typer.Exit(0)
    busy = _port_in_use(host, port)
    if busy:
        typer.echo(f"error: port {port} on {host} is already in use ({busy}); another server (perhaps another "
                   f"study's UI) answers there. Stop it, or pick a free port: --port {_free_port(host)}", err=True)
        raise typer.Exit(1)
    # One server process: one person browses a study, and MLflow's default of 4 workers, each
    # importing MLflow, took minutes to start on a loaded 2-core machine.
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri,
           "--default-artifact-root", mlflow_artifacts(d).as_uri(), "--host", host, "--port", str(port),
           "--workers", "1"]
    from .tracking import experiment_url, study_experiment_id

    exp_id = study_experiment_id(d) if mlflow_db(d).exists() or not uri.startswith("sqlite:") else None
    base = f"http://{host}:{port}"
    typer.echo(f"MLflow UI for {d} on {experiment_url(base, exp_id) if exp_id else base}  (Ctrl-C stops it)")
    sys.stdout.flush()
    # Become the MLflow UI (exec): signals sent to `studyctl ui` reach MLflow directly.
    os.execv(sys.executable, cmd)


def _port_in_use(host: str, port: int) -> str | None:
    """Why (host, port) cannot be listened on, or None if it can. Checked before exec'ing MLflow,
    which would print its URL, fail to bind and still exit 0."""
    import socket

    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers do: TIME_WAIT is not "busy"
        try:
            s.bind((host, port))
        except OSError as e:
            return e.strerror or str(e)
    return None


def _free_port(host: str) -> int:
    import socket

    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------ analysis
@app.command()
def figures(directory: str = typer.Argument(..., help="A study folder (written by `studyctl launch`)."),
            mlflow: bool = typer.Option(True, help="Also attach the figures to the study's MLflow parent run.")
            ) -> None:
    """Regenerate every figure (PNG + PDF) and an index.html report into DIR/figures/.

    Reads the Parquet tables only: the thesis's figures 26-30 per trial and the
    study-level overlays by capacity, schedule and training-set size. A half-finished
    study gets the figures of what exists; the report names what is missing.
    """
    try:
        _write_figures(directory, mlflow)
    except FileNotFoundError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(EXIT_BAD_STUDY)


def _write_figures(directory, mlflow: bool = True) -> None:
    """Figures + report from the Parquet records, attached to the study's MLflow parent run."""
    from analysis.report import make_figures

    figs, report, missing = make_figures(directory)
    typer.echo(f"wrote {len(figs.written)} figures (PNG + PDF) and the report {report}")
    for tid, state, err in missing:
        typer.echo(f"  missing/incomplete trial {tid}: {state}{' - ' + str(err) if err else ''}")
    if mlflow:
        from .tracking import find_parent_run, log_artifact

        found = find_parent_run(directory)
        if found is not None:
            log_artifact(found[0], found[1], report.parent, "figures")
            typer.echo(f"figures attached to MLflow run {found[1]}")


@app.command()
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
    _write_figures(directory)


@app.command()
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
    d = _study_dir(directory)
    try:
        _run_generalization(d, n_samples=samples, optimum_max_n=optimum_max_n, clip_x0=1.0 if clip else None,
                            device=device, include_running=running)
    except (FileNotFoundError, ValueError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(EXIT_BAD_STUDY)
    _write_figures(d)


def _run_generalization(out: Path, **kw) -> None:
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


classifier_app = typer.Typer(help="The MNIST feature classifier behind FID, IS and precision/recall.",
                             no_args_is_help=True)
app.add_typer(classifier_app, name="classifier")


@classifier_app.command("train")
def classifier_train(data_root: str = typer.Option(None, help="Folder containing MNIST/raw (default "
                                                              "$STUDYCTL_DATA_ROOT, else ./data)."),
                     out: str = typer.Option(None, help="Weights file to write (default: the shipped file)."),
                     force: bool = typer.Option(False, "--force", help="Overwrite an existing weights file "
                                                                       "(the shipped one included)."),
                     seed: int = typer.Option(0, help="Training seed (the shipped weights: 0)."),
                     epochs: int = typer.Option(6, help="Epochs over the 48,000-image training split.")) -> None:
    """Retrain the reduced ResNet-18 deterministically on the training split (progress bar).

    Refuses to overwrite the shipped weights unless --force; writes the provenance record
    (sha256, seed, epochs, test accuracy, command) beside them.
    """
    from diffusion_core.metrics.train_classifier import main

    argv = ["--seed", str(seed), "--epochs", str(epochs)]
    argv += ["--data-root", data_root] if data_root else []
    argv += ["--out", out] if out else []
    argv += ["--force"] if force else []
    raise typer.Exit(main(argv))


if __name__ == "__main__":
    app()
