"""`studyctl`: the command line of the toolkit (a typer app)."""
from __future__ import annotations

import typer

app = typer.Typer(
    name="studyctl",
    help="Systematic bias-variance studies of diffusion models (DDPMs) on Ray.\n\n"
         "Typical use: `studyctl launch quickstart.yaml`, then `studyctl ui runs/quickstart`.",
    no_args_is_help=True,
    add_completion=False,
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


if __name__ == "__main__":
    app()
