"""`studyctl`: the command line of the toolkit (a typer app).

One short function per command with its --help text; the work is in orchestrator/ and analysis/,
which this module — the top of the dependency graph — calls. The analysis commands and a launch's
analysis steps are in cli_analysis.py.
"""
from __future__ import annotations

import time
from pathlib import Path

import typer

from records.layout import mlflow_artifacts, mlflow_db, read_study_file, study_file

from . import packaged_study_names
from .cli_analysis import EXIT_BAD_STUDY, after_sweep, decompose, figures, generalization, study_dir


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
        after_sweep(plan.spec, out)
    finally:
        total = time.time() - t0
        typer.echo(f"wall time {total:.0f} s (trials {trials_s:.0f} s, analysis {total - trials_s:.0f} s)")
    raise typer.Exit(code)


@app.command()
def resume(directory: str = typer.Argument(..., help="The study folder of an interrupted launch."),
           address: str = typer.Option(None, "--address", help="Join this Ray cluster instead of a local one."),
           local: bool = typer.Option(False, "--local", help="No Ray: finish the trials in this process "
                                      "(see `launch --local`).")
           ) -> None:
    """Finish what an interrupted launch left: finished trials are not run again, an
    interrupted trial continues from its last checkpoint (and its MLflow child run)."""
    from .spec import StudyError, parse_study

    d = study_dir(directory)
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

    d = study_dir(directory)
    summary_lines(d, typer.echo)


@app.command()
def ui(directory: str = typer.Argument(..., help="A study folder (written by `studyctl launch`)."),
       port: int = typer.Option(5000, help="Port on 127.0.0.1."),
       host: str = typer.Option("127.0.0.1", help="Interface to listen on (127.0.0.1: this machine only).")) -> None:
    """Start the MLflow UI against the study's store (Ctrl-C stops it)."""
    import os
    import sys

    from .tracking import study_store

    d = study_dir(directory)
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
    # importing MLflow, took minutes to start on a loaded 2-core machine. Nor MLflow 3's job runner
    # (GenAI evaluation jobs: 8 more processes, ~5 s of CPU each to start); a user's own value wins.
    os.environ.setdefault(MLFLOW_JOBS_ENV, "false")
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


MLFLOW_JOBS_ENV = "MLFLOW_SERVER_ENABLE_JOB_EXECUTION"


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
# (orchestrator/cli_analysis.py: the commands that read a study's records and draw its figures)
for command in (figures, decompose, generalization):
    app.command()(command)

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
