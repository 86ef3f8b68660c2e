"""CLI verb `tvsplit evaluate [SUITE] [--preset P] [--list]`: list the registered suites, or
run one through the generic suite flow (flows/suite.py).

This module builds its own typer app; `tvsplit.flows.cli` attaches it (no import of cli here).
Listing reads the suites' declarations only (no torch, Prefect, Dask or MLflow).
"""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table
from tvsplit.flows.console import fail, out

app = typer.Typer()  # attached at the top level by tvsplit.flows.cli


def list_suites() -> None:
    """Print every registered suite: name, title, presets."""
    from tvsplit.tasks.suites.base import SuiteError
    from tvsplit.tasks.suites.registry import get_suite, suite_names

    table = Table("suite", "presets", "what it asks")
    for name in suite_names():
        try:
            cls = get_suite(name)
        except SuiteError as error:
            table.add_row(name, "", f"[red]{error}[/]")
            continue
        table.add_row(name, ", ".join(cls.presets), cls.description or cls.title)
    out.print(table)


def run_suite_command(
    suite: str,
    preset: str,
    *,
    workers: int = 2,
    scheduler: str | None = None,
    results: str | None = "RESULTS.md",
    catalogue: str | None = None,
    track: bool = True,
    command: str | None = None,
    verbose: bool = False,
) -> None:
    """Run ``suite`` at ``preset`` and print its summary; a bad suite, preset or input is
    one ``error:`` line. ``verbose``: every step and per-parameter diagnostic as well."""
    from tvsplit.flows.decompose import DecomposeError
    from tvsplit.flows.ingest import USER_ERRORS
    from tvsplit.tasks.suites.base import SuiteError
    from tvsplit.tasks.suites.registry import get_suite

    try:
        get_suite(suite).preset_settings(preset)  # fail fast, before any engine starts
    except SuiteError as error:
        fail(str(error))
    from tvsplit.flows.settings import load_settings, prefect_run_settings
    from tvsplit.flows.suite import suite_flow
    from tvsplit.flows.tracking import ui_hint

    try:
        with prefect_run_settings():
            outcome = suite_flow(
                suite, preset=preset, catalogue_url=catalogue, workers=workers,
                scheduler=scheduler, track=track, results_path=results or None,
                command=command, verbose=verbose,
            )  # fmt: skip
    except (*USER_ERRORS, DecomposeError, SuiteError) as error:
        fail(str(error))
    out.print(outcome.suite.summary(outcome.result), highlight=False, markup=False, soft_wrap=True)
    if outcome.model_dir:
        score = outcome.suite.score(outcome.model_test)
        out.print(
            f"edited model ({outcome.result.exported['row']}, "
            f"{outcome.result.exported['family']}): {outcome.model_dir} — test score {score:.2f}",
            markup=False, highlight=False, soft_wrap=True,
        )  # fmt: skip
    if outcome.results_path:
        out.print(
            f"results: {outcome.results_path} (section {outcome.suite.name!r})",
            markup=False, highlight=False, soft_wrap=True,
        )  # fmt: skip
    timings = ", ".join(f"{k} {v:.0f} s" for k, v in outcome.timings.items())
    out.print(f"timings: {timings}", highlight=False, soft_wrap=True)
    if track:
        hint = ui_hint(load_settings(catalogue=catalogue))
        out.print(f"MLflow: {hint}", markup=False, highlight=False, soft_wrap=True)


@app.command("evaluate")
def evaluate(
    suite: Annotated[
        str | None, typer.Argument(help="Registered suite to run (see --list).")
    ] = None,
    preset: str = typer.Option("full", help="Preset: small (CI-sized), full (published), ..."),
    list_: bool = typer.Option(False, "--list", help="List the registered suites and exit."),
    workers: int = typer.Option(2, help="LocalCluster workers for the decomposition."),
    scheduler: str | None = typer.Option(None, help="Dask scheduler address."),
    results: str = typer.Option(
        "RESULTS.md", help="Markdown file whose section of this suite is rewritten ('' none)."
    ),
    catalogue: str | None = typer.Option(None, "--catalogue", help="Catalogue path or URL."),
    track: bool = typer.Option(True, help="Log to MLflow (parent run, one nested run per row)."),
    verbose: bool = typer.Option(
        False, "--verbose", "-v", help="Print every step and per-parameter diagnostic."
    ),
) -> None:
    """Run a registered evaluation suite end to end: its family → ingest → decompose →
    coefficients on validation → test scores → the chosen edit → MLflow → its RESULTS.md
    section. Without SUITE (or with --list), list the suites."""
    if list_ or suite is None:
        list_suites()
        return
    run_suite_command(
        suite, preset, workers=workers, scheduler=scheduler, results=results,
        catalogue=catalogue, track=track, verbose=verbose,
    )  # fmt: skip
