"""The `tvsplit` command line: one typer app; the CLI leaf modules build their own apps
(`catalogue_cli`, `decompose_cli`) and this module attaches them."""

from __future__ import annotations

import typer
from tvsplit.flows import catalogue_cli, decompose_cli, evaluate_cli, server_cli, sync_cli

app = typer.Typer(
    name="tvsplit",
    help="Split task vectors into shared and unique parts, and edit models with them.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)


def _print_version(value: bool) -> None:
    if value:
        from tvsplit import __version__

        typer.echo(f"tvsplit {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: bool = typer.Option(
        False,
        "--version",
        callback=_print_version,
        is_eager=True,
        help="Print the version and exit.",
    ),
    debug: bool = typer.Option(
        False, "--debug", help="Show the traceback of an error (also TVSPLIT_DEBUG=1)."
    ),
) -> None:
    """tvsplit: shared and unique parts of task vectors, on Prefect, Dask, Zarr and MLflow."""
    from tvsplit.flows.console import quiet_third_party

    quiet_third_party()  # the project shows its own progress
    if debug:
        import os

        from tvsplit.flows.console import DEBUG_VARIABLE

        os.environ[DEBUG_VARIABLE] = "1"


@app.command()
def demo(
    planted: bool = typer.Option(
        False, "--planted", help="Only split a synthetic family with planted structure (seconds)."
    ),
    preset: str = typer.Option("full", help="Vision suite preset: full (the demo) or small."),
    size: int = typer.Option(256, help="--planted: rows and columns of each parameter."),
    members: int = typer.Option(8, help="--planted: task vectors in the synthetic family."),
    noise: float = typer.Option(0.1, help="--planted: noise level σ (‖N‖₂ ≈ 2σ)."),
    seed: int = typer.Option(0, help="--planted: seed of the synthetic family."),
    verbose: bool = typer.Option(
        False, "--verbose", "-v", help="Print every step and per-parameter diagnostic."
    ),
) -> None:
    """The main job on embedded defaults: the vision suite through the whole pipeline
    (zoo → ingest → decompose → evaluate → edit → MLflow → RESULTS.md). A rerun reuses the
    zoo, the catalogue and the decomposition runs."""
    if planted:
        from tvsplit.flows.demo import run_demo

        run_demo(size=size, members=members, noise=noise, seed=seed)
        return
    from tvsplit.flows.evaluate_cli import run_suite_command

    command = "make demo" if preset == "full" else None
    run_suite_command("vision", preset, command=command, verbose=verbose)


# The leaves build their own apps and never import this module: no import circle.
app.add_typer(catalogue_cli.app)  # `ingest`, `catalogue ls|show|rm`
app.add_typer(decompose_cli.app)  # `decompose`, `edit`
app.add_typer(sync_cli.app)  # `sync`, `serve`
app.add_typer(evaluate_cli.app)  # `evaluate [SUITE] [--preset P] [--list]`
app.add_typer(server_cli.server_app, name="server")  # `server status|start|stop`
