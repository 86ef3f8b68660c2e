"""CLI verbs `tvsplit sync SPEC` and `tvsplit serve SPEC`: the catalogue kept up to date with
its spec, once or on a schedule (flows/schedule.py).

This module builds its own typer app; `tvsplit.flows.cli` attaches it (no import of cli here).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table
from tvsplit.flows.console import fail as _fail
from tvsplit.flows.console import out as _out
from tvsplit.flows.settings import load_settings, prefect_run_settings

app = typer.Typer()  # attached at the top level by tvsplit.flows.cli


@app.command("sync")
def sync_command(
    spec: Annotated[Path, typer.Argument(help="Catalogue spec YAML (families, bases, members).")],
    catalogue: str | None = typer.Option(None, "--catalogue", help="Catalogue path or URL."),
    scheduler: str | None = typer.Option(None, help="Dask scheduler address."),
    workers: int = typer.Option(2, help="LocalCluster workers (ignored with --scheduler)."),
    track: bool = typer.Option(True, help="Log decompositions to MLflow."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Only say what would be done."),
) -> None:
    """Ingest what is new or changed in SPEC, re-decompose the families it touches, rerun
    their configured suites. With nothing new, does nothing (and starts no flow)."""
    from tvsplit.flows.decompose import DecomposeError
    from tvsplit.flows.ingest import USER_ERRORS
    from tvsplit.flows.schedule import apply_sync, plan_sync

    url = load_settings(catalogue=catalogue).catalogue
    try:
        plan = plan_sync(spec, url)
    except (*USER_ERRORS, ConnectionError) as error:
        _fail(str(error))
    table = Table("entry", "source", "status")
    for check in plan.sources:
        status = f"[yellow]{check.reason}[/]" if check.changed else check.reason
        table.add_row(check.label, check.source, status)
    _out.print(table)
    for family, why in plan.decompose.items():
        _out.print(f"decompose {family}: {why}")
    _out.print(plan.summary(), highlight=False)
    if plan.nothing_new or dry_run:
        return
    try:
        with prefect_run_settings():
            report = apply_sync(plan, scheduler=scheduler, workers=workers, track=track)
    except (*USER_ERRORS, DecomposeError) as error:
        _fail(str(error))
    ingested = [r for r in report.ingested if r["status"] != "skipped"]
    _out.print(f"ingested {len(ingested)} source(s): {', '.join(r['entry'] for r in ingested)}")
    for family, outcome in report.decomposed.items():
        _out.print(
            f"decomposed {family}: run {outcome['run']}, {outcome['computed']} parameter(s) "
            f"split, {outcome['bases_computed']} member basis(es) computed"
        )
    for family, outcome in report.suites.items():
        _out.print(f"suite of {family}: {outcome}")


@app.command("serve")
def serve_command(
    spec: Annotated[
        str | None,
        typer.Argument(help="Catalogue spec YAML to sync (default: decompose every family)."),
    ] = None,
    cron: str = typer.Option("0 3 * * *", help="When to run the sync."),
    catalogue: str | None = typer.Option(None, "--catalogue", help="Catalogue path or URL."),
    scheduler: str | None = typer.Option(None, help="Dask scheduler address."),
    workers: int = typer.Option(2, help="LocalCluster workers (ignored with --scheduler)."),
    name: str = typer.Option("nightly-sync", help="Deployment name."),
) -> None:
    """Serve the sync on a cron schedule (needs a Prefect server: set PREFECT_API_URL,
    e.g. after `prefect server start`)."""
    if not os.environ.get("PREFECT_API_URL"):
        _fail(
            "serving a schedule needs a Prefect server: run `prefect server start` and set "
            "PREFECT_API_URL=http://127.0.0.1:4200/api"
        )
    from tvsplit.flows.schedule import sync_catalogue

    url = load_settings(catalogue=catalogue).catalogue
    spec_path = str(Path(spec).resolve()) if spec else None
    _out.print(f"serving tvsplit-sync on '{cron}' for {url} (Ctrl-C stops)")
    sync_catalogue.serve(
        name=name,
        cron=cron,
        parameters={
            "spec": spec_path, "catalogue_url": url, "scheduler": scheduler, "workers": workers,
        },
    )  # fmt: skip
