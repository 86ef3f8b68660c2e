"""CLI verbs for the catalogue: `tvsplit ingest SPEC`, `tvsplit catalogue
ls|show|rm|verify|upgrade|gc`.

The catalogue location comes from ``--catalogue``, else ``TVSPLIT_CATALOGUE``, else the
default (`flows.settings`). User errors print their reason and exit with status 1,
without a traceback.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table
from tvsplit.flows.console import fail as _fail
from tvsplit.flows.console import out as _out
from tvsplit.flows.settings import load_settings, missing_local_catalogue, prefect_run_settings

app = typer.Typer()  # `ingest` and the `catalogue` group; attached by tvsplit.flows.cli
catalogue_app = typer.Typer(help="Inspect and edit the catalogue.", no_args_is_help=True)
app.add_typer(catalogue_app, name="catalogue")

CatalogueOption = typer.Option(
    None, "--catalogue", help="Catalogue path or fsspec URL (default: $TVSPLIT_CATALOGUE)."
)


def _report(rows: list[dict]) -> Table:
    table = Table("status", "params", "written", "MB", "s", "commit", "reason")
    table.add_column("entry", no_wrap=True)
    table.columns.insert(0, table.columns.pop())
    table.columns[-1].overflow = "fold"
    for r in rows:
        commit = (r.get("commit") or "")[:12]
        table.add_row(
            r["entry"],
            r["status"],
            str(r.get("parameters", "")),
            str(r.get("written", "")),
            f"{r.get('megabytes', 0):.1f}",
            f"{r.get('seconds', 0):.1f}",
            commit,
            r.get("reason", ""),
        )
    return table


@app.command("ingest")
def ingest_command(
    spec: Annotated[Path, typer.Argument(help="Catalogue spec YAML (families, bases, members).")],
    catalogue: str | None = CatalogueOption,
    allow_pickle: bool = typer.Option(
        False, "--allow-pickle", help="Accept .bin/.pt checkpoints (loaded weights_only)."
    ),
    progress: bool = typer.Option(True, help="Show progress bars."),
) -> None:
    """Fetch every source of SPEC and store its base weights and task vectors."""
    from tvsplit.flows.ingest import USER_ERRORS, IngestFailedError, ingest

    url = load_settings(catalogue=catalogue).catalogue
    try:
        with prefect_run_settings():
            rows = ingest(spec, url, allow_pickle=allow_pickle, progress=progress)
    except IngestFailedError as error:
        _out.print(_report(error.rows))
        _fail(str(error))
    except USER_ERRORS as error:
        _fail(str(error))
    else:
        _out.print(_report(rows))
        _out.print(f"catalogue: {url}")


@catalogue_app.command("ls")
def ls_command(catalogue: str | None = CatalogueOption) -> None:
    """List families with their base and members (complete ones; partial ones marked)."""
    url = load_settings(catalogue=catalogue).catalogue
    if missing_local_catalogue(url):
        _out.print(f"{url}: no families")
        return
    from tvsplit.storage.catalogue import Catalogue

    cat = Catalogue(url)
    families = cat.families()
    if not families:
        _out.print(f"{cat.url}: no families")
        return
    table = Table("family", "base", "members", "partial")
    for family in families:
        complete = cat.members(family)
        partial = sorted(set(cat.members(family, include_partial=True)) - set(complete))
        base = cat.entry(family)
        base_text = "-" if base is None else base.status
        table.add_row(family, base_text, ", ".join(complete), ", ".join(partial))
    _out.print(table)


@catalogue_app.command("show")
def show_command(
    family: str,
    catalogue: str | None = CatalogueOption,
    param: str | None = typer.Option(
        None, "--param", help="Show this parameter's eigenvalue spectrum in each run."
    ),
    run: str | None = typer.Option(None, "--run", help="Only this decomposition run."),
) -> None:
    """Show a family's entries, its decomposition runs with their settings, and with
    --param one parameter's spectrum against the chance level and the threshold used."""
    from tvsplit.storage.catalogue import Catalogue
    from tvsplit.storage.errors import StorageError

    cat = Catalogue(load_settings(catalogue=catalogue).catalogue)
    try:
        if family not in cat.families():
            _fail(f"{cat.url}: no family {family!r}")
        table = Table("status", "source", "commit", "params", "completed")
        table.add_column("entry", no_wrap=True)
        table.columns.insert(0, table.columns.pop())
        table.columns[2].overflow = "fold"
        for member in [None, *cat.members(family, include_partial=True)]:
            info = cat.entry(family, member)
            if info is None:
                continue
            attrs = info.attrs
            fingerprint = attrs.get("fingerprint", {})
            table.add_row(
                info.label,
                info.status,
                str(attrs.get("source") or fingerprint.get("source", "")),
                str(attrs.get("commit") or fingerprint.get("commit") or "")[:12],
                str(len(attrs.get("parameters", []))) if info.complete else "",
                str(attrs.get("completed", "")),
            )
        _out.print(table)
        _show_runs(cat, family, param, run)
    except StorageError as error:
        _fail(str(error))


def _show_runs(cat, family: str, param: str | None, only: str | None) -> None:
    """Decomposition runs of a family (settings, status) and, for --param, its spectrum."""
    from tvsplit.storage.decompositions import DecompositionRun, list_runs
    from tvsplit.tasks.report import spectrum_text

    runs = [(name, attrs) for name, attrs in list_runs(cat, family) if only in (None, name)]
    if only and not runs:
        _fail(f"{cat.url}: family {family!r} has no decomposition run {only!r}")
    if not runs:
        _out.print("no decomposition runs yet: `tvsplit decompose " + family + "`")
        return
    _out.print(f"[bold]decomposition runs of {family}[/]")
    for name, attrs in runs:
        settings = attrs.get("settings", {})
        cut = (
            f"min_tasks={settings['min_tasks']}"
            if settings.get("min_tasks")
            else f"τ={settings.get('threshold')}"
        )
        _out.print(
            f"  {name}  [{attrs.get('status', '')}]  method={settings.get('method', '')} {cut} "
            f"rank={settings.get('rank', '')} cap={settings.get('max_rank_fraction', '')} "
            f"two_sided={settings.get('two_sided', False)}  "
            f"members={','.join(attrs.get('members', []))}  "
            f"params={len(attrs.get('parameters', []))}",
            highlight=False,
            soft_wrap=True,
        )
    if param is None:
        return
    for name, _ in runs:
        stored = DecompositionRun(cat, family, name).read_parameter(param)
        d = {**stored.diagnostics, "name": param}
        _out.print(
            f"[bold]{param}[/] in run {name}: k = {d['k']}, ranks {d['ranks']}, "
            f"threshold {d['threshold_used']:.3f} (|), chance level {d['chance']} (:), "
            f"gap {d['gap']}"
        )
        for line in spectrum_text(d):
            _out.print(line, highlight=False)


@catalogue_app.command("rm")
def rm_command(
    family: str,
    member: str | None = typer.Option(None, help="Member to delete (default: the base)."),
    catalogue: str | None = CatalogueOption,
) -> None:
    """Delete one entry (a family's base, or one member) from the catalogue."""
    from tvsplit.storage.catalogue import Catalogue, entry_label

    cat = Catalogue(load_settings(catalogue=catalogue).catalogue)
    try:
        deleted = cat.delete(family, member)
    except ValueError as error:
        _fail(str(error))
    if not deleted:
        _fail(f"{cat.url}: no entry {entry_label(family, member)}")
    _out.print(f"deleted {entry_label(family, member)}")


@catalogue_app.command("verify")
def verify_command(
    family: Annotated[str | None, typer.Argument(help="Only this family (default: all).")] = None,
    catalogue: str | None = CatalogueOption,
) -> None:
    """Check every stored array (entries, decomposition runs, cached bases) against its
    chunk manifest and checksums; exit status 1 if anything is damaged."""
    from tvsplit.storage.catalogue import Catalogue
    from tvsplit.storage.errors import StorageError
    from tvsplit.storage.verify import DAMAGED, UNCHECKED, verify_catalogue

    cat = Catalogue(load_settings(catalogue=catalogue).catalogue)
    try:
        rows = verify_catalogue(cat, family)
    except StorageError as error:
        _fail(str(error))
    table = Table("family", "node", "arrays", "MB", "status", "detail")
    table.columns[-1].overflow = "fold"
    colour = {DAMAGED: "red", UNCHECKED: "yellow"}
    for row in rows:
        status = f"[{colour[row.status]}]{row.status}[/]" if row.status in colour else row.status
        table.add_row(
            row.family, row.node, str(row.arrays), f"{row.nbytes / 1e6:.1f}", status, row.detail
        )
    _out.print(table)
    damaged = sum(row.status == DAMAGED for row in rows)
    unchecked = sum(row.status == UNCHECKED for row in rows)
    summary = f"{len(rows)} node(s) checked: {damaged} damaged, {unchecked} written before checks"
    if damaged:
        _fail(summary)
    _out.print(summary)


@catalogue_app.command("upgrade")
def upgrade_command(
    path: Annotated[
        str | None,
        typer.Argument(help="Catalogue path or URL (default: --catalogue, $TVSPLIT_CATALOGUE)."),
    ] = None,
    catalogue: str | None = CatalogueOption,
) -> None:
    """Rewrite a catalogue of an older format in the current one, in place: every array
    kept, each node replaced only once its new copy is complete (safe to stop and rerun;
    does nothing to a current catalogue)."""
    import warnings

    from tvsplit.storage.catalogue import Catalogue
    from tvsplit.storage.errors import StorageError
    from tvsplit.storage.integrity import IntegrityWarning
    from tvsplit.storage.upgrade import upgrade_catalogue

    cat = Catalogue(path or load_settings(catalogue=catalogue).catalogue)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", IntegrityWarning)  # this command is the remedy
            report = upgrade_catalogue(cat)
    except StorageError as error:
        _fail(str(error))
    for line in report.skipped:
        _out.print(f"[yellow]left as is:[/] {line}")
    if not report.changed:
        _out.print(f"{cat.url}: already catalogue format {report.after}; nothing to do")
        return
    _out.print(
        f"{cat.url}: catalogue format {report.before} → {report.after}: "
        f"{len(report.entries)} entr{'y' if len(report.entries) == 1 else 'ies'}, "
        f"{report.run_parameters} decomposition parameter(s), {report.packs} cached basis "
        "pack(s) rewritten with checksums and manifests; check it with `tvsplit catalogue "
        "verify`"
    )


def referenced_runs(settings) -> set[str]:
    """Decomposition runs something still names: the model cards (``README.md``) of the
    edited models under the models folder, and the ``decomposition`` parameter of every
    MLflow run in the tracking store."""
    import re

    names: set[str] = set()
    models = Path(settings.models)
    if models.is_dir():
        for card in [*models.glob("*/README.md"), *models.glob("*/*/README.md")]:
            text = card.read_text(encoding="utf-8", errors="replace")
            names |= set(re.findall(r"decomposition run `([^`]+)`", text))
            names |= set(re.findall(r"^\s*decomposition:\s*(\S+)\s*$", text, re.MULTILINE))
    import mlflow
    from mlflow.tracking import MlflowClient
    from tvsplit.flows.tracking import tracking_uri

    uri = tracking_uri(settings)
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).exists():
        return names  # no tracking store yet: nothing names a run there
    mlflow.set_tracking_uri(uri)
    client = MlflowClient()
    experiments = [e.experiment_id for e in client.search_experiments()]
    if experiments:
        for run in client.search_runs(experiments, filter_string="params.decomposition != ''"):
            names.add(run.data.params.get("decomposition", ""))
    return names - {""}


@catalogue_app.command("gc")
def gc_command(
    catalogue: str | None = CatalogueOption,
    dry_run: bool = typer.Option(False, "--dry-run", help="List what would go; change nothing."),
    superseded: bool = typer.Option(
        False,
        "--superseded",
        help="Also remove complete decomposition runs older than the newest with the same "
        "settings, unless an edited model's card or an MLflow run names them.",
    ),
    grace: float = typer.Option(
        24.0,
        "--grace",
        min=0.0,
        help="Hours a partial entry, run or staged replacement must be idle before it goes "
        "(a running job writes within that time).",
    ),
) -> None:
    """Remove what no complete entry or decomposition refers to: superseded basis caches,
    decompositions of removed members, leftovers of killed runs (idle beyond --grace), stale
    leases; with --superseded, older runs of the same settings. Prints what goes, with bytes."""
    from tvsplit.storage.catalogue import Catalogue
    from tvsplit.storage.errors import StorageError
    from tvsplit.storage.gc import KEEP, REMOVE, collect, remove
    from tvsplit.tasks.decompose_job import member_fingerprint

    settings = load_settings(catalogue=catalogue)
    cat = Catalogue(settings.catalogue)
    try:
        named = referenced_runs(settings) if superseded else set()
        findings = collect(
            cat,
            fingerprint=member_fingerprint,
            grace_hours=grace,
            superseded=superseded,
            referenced=named,
        )
        freed = 0 if dry_run else remove(cat, findings)
    except StorageError as error:
        _fail(str(error))
    gone = [f for f in findings if f.action == REMOVE]
    verb = "would remove" if dry_run else "removed"
    table = Table("family", "kind", "path", "MB", "action", "reason")
    table.columns[2].overflow = "fold"
    table.columns[-1].overflow = "fold"
    for f in findings:
        action = verb if f.action == REMOVE else f"[green]{KEEP}[/]"
        path = f.path.removeprefix(f"families/{f.family}/")
        table.add_row(f.family, f.kind, path, f"{f.nbytes / 1e6:.2f}", action, f.reason)
    if findings:
        _out.print(table)
    total = sum(f.nbytes for f in gone) if dry_run else freed
    _out.print(
        f"{cat.url}: {len(gone)} node(s) {verb}, {total / 1e6:.2f} MB "
        f"{'would be ' if dry_run else ''}freed",
        highlight=False,
    )
