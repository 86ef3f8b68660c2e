"""The ingest flow: a catalogue spec (YAML) → base weights and task vectors in the catalogue.

Spec shape::

    families:
      <family>:
        base: <source>
        include: [optional parameter-name globs]
        exclude: [optional parameter-name globs]
        members:
          <member>: <source>
        suite: [optional NAME or NAME:PRESET, rerun by `tvsplit sync` after a decomposition]
        base_by_reference: [optional, false: keep the base as a reference to its files]

One Prefect task per source (the base first, then each member), retried with backoff on
network errors only. Progress shows as rich bars; the outcome of every source (ingested,
resumed, skipped, failed, not run) goes into a Prefect table artifact and is returned.
The flow composes; the work is in `tasks.ingest`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from prefect import flow
from prefect.artifacts import create_table_artifact
from prefect.states import State
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from rich.progress import Progress
from tvsplit.flows.console import progress_bars
from tvsplit.storage.errors import StorageError, validation_problems
from tvsplit.storage.names import check_node_name
from tvsplit.storage.sources import parse_source
from tvsplit.tasks.ingest import FAILED, IngestJob, IngestResult, ingest_source
from tvsplit.tasks.stages import stage, timed
from tvsplit.tasks.task_vector import TaskVectorError

NOT_RUN = "not run"


class SpecError(ValueError):
    """A catalogue spec that cannot be used; the message names the file and the field."""


def _source(value: str) -> str:
    parse_source(value)  # raises SourceError (a ValueError) with the reason
    return value.strip()


class FamilySpec(BaseModel):
    """One family: a base model, its members, and which parameters to catalogue."""

    model_config = ConfigDict(extra="forbid")

    base: str = Field(description="Source of the base model the members were fine-tuned from.")
    include: list[str] = Field(default_factory=list, description="Parameter-name globs to keep.")
    exclude: list[str] = Field(
        default_factory=list, description="Parameter-name globs to leave out."
    )
    members: dict[str, str] = Field(default_factory=dict, description="Member name → source.")
    suite: str | None = Field(
        default=None,
        description="Suite `tvsplit sync` reruns (through `tvsplit evaluate`'s flow, on this "
        "family of the suite's pool) after decomposing the family: NAME or NAME:PRESET "
        "(default preset full).",
    )
    base_by_reference: bool = Field(
        default=False,
        description="Keep the base by reference to its safetensors files instead of a copy "
        "(for large bases of adapter families; the files must stay where they are).",
    )

    @field_validator("base")
    @classmethod
    def _check_base(cls, value: str) -> str:
        return _source(value)

    @field_validator("members")
    @classmethod
    def _check_members(cls, value: dict[str, str]) -> dict[str, str]:
        for name, source in value.items():
            check_node_name("member", name)
            try:
                _source(source)
            except ValueError as error:
                raise ValueError(f"member {name!r}: {error}") from None
        return {name: source.strip() for name, source in value.items()}


class CatalogueSpec(BaseModel):
    """The whole spec file: families by name."""

    model_config = ConfigDict(extra="forbid")

    families: dict[str, FamilySpec] = Field(min_length=1)

    @field_validator("families")
    @classmethod
    def _check_names(cls, value: dict[str, FamilySpec]) -> dict[str, FamilySpec]:
        for name in value:
            check_node_name("family", name)
        return value


def parse_spec(data: Any, where: str = "spec") -> CatalogueSpec:
    """Validate spec data; SpecError listing each bad field as ``where: a.b.c: reason``."""
    try:
        return CatalogueSpec.model_validate(data)
    except ValidationError as error:
        lines = validation_problems(error)
        raise SpecError("\n".join(f"{where}: {line}" for line in lines)) from None


def load_spec(path: str | Path) -> CatalogueSpec:
    """Read and validate a spec YAML file; relative local sources resolve against its folder."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as error:
        raise SpecError(f"{path}: cannot read ({error.strerror})") from None
    except yaml.YAMLError as error:
        raise SpecError(f"{path}: not valid YAML ({error})") from None
    spec = parse_spec(data, str(path))
    for family in spec.families.values():
        family.base = _anchor(family.base, path.parent)
        family.members = {m: _anchor(s, path.parent) for m, s in family.members.items()}
    return spec


def _anchor(source: str, folder: Path) -> str:
    """A relative local path made relative to the spec's folder (hub ids untouched)."""
    ref = parse_source(source)
    if ref.path is None or ref.path.is_absolute():
        return source
    prefix = "delta:" if ref.delta else ""
    return prefix + str((folder / ref.path).resolve())


class RichIngestProgress:
    """One rich progress bar per job (parameters and bytes written)."""

    def __init__(self, progress: Progress) -> None:
        self._progress = progress
        self._bar: Any = None

    def start(self, label: str, total: int, done: int) -> None:
        self._bar = self._progress.add_task(label, total=total, completed=done)

    def advance(self, name: str, nbytes: int) -> None:
        self._progress.update(self._bar, advance=1)

    def stop(self) -> None:
        self._progress.refresh()


@flow(name="tvsplit-ingest", log_prints=False, validate_parameters=False)
@timed("flow body")
def ingest_flow(
    spec: CatalogueSpec,
    catalogue: str,
    allow_pickle: bool = False,
    progress: bool = True,
    replace: bool = False,
) -> list[dict[str, Any]]:
    """Ingest every family of `spec` into `catalogue`; return one report row per source.

    Per family the base runs first; when it fails, the members are reported "not run".
    With `replace`, a complete entry made from other files is rebuilt and swapped in only
    once the new one is complete (`IngestJob.replace`).
    """
    rows: list[dict[str, Any]] = []
    with progress_bars(progress, terminal_only=True) as bars:
        for family, fspec in spec.families.items():
            common = {
                "catalogue": catalogue,
                "family": family,
                "base_source": fspec.base,
                "include": tuple(fspec.include),
                "exclude": tuple(fspec.exclude),
                "allow_pickle": allow_pickle,
                "replace": replace,
            }
            jobs = [
                IngestJob(
                    member=None,
                    source=fspec.base,
                    base_by_reference=fspec.base_by_reference,
                    **common,
                )
            ]
            jobs += [
                IngestJob(member=name, source=source, **common)
                for name, source in fspec.members.items()
            ]
            base_failed = ""
            for job in jobs:
                if base_failed:
                    row = IngestResult(job.label, job.source, NOT_RUN, reason=base_failed).row()
                else:
                    state = ingest_source(job, RichIngestProgress(bars), return_state=True)
                    row = _report_row(job, state)
                    if job.member is None and row["status"] == FAILED:
                        base_failed = f"the base failed: {row['reason']}"
                rows.append({"family": family, **row})
    create_table_artifact(
        key="tvsplit-ingest",
        table=rows,
        description=f"Ingest into `{catalogue}`: what was ingested, resumed, skipped or failed.",
    )
    return rows


def _report_row(job: IngestJob, state: State) -> dict[str, Any]:
    """The report row of a finished task run (its result, or its failure message)."""
    if state.is_completed():
        return state.result().row()
    reason = state.message or "failed"
    try:
        error = state.result(raise_on_failure=False)
    except Exception:
        error = None
    if isinstance(error, BaseException):
        reason = f"{type(error).__name__}: {error}"
    return IngestResult(job.label, job.source, FAILED, reason=reason).row()


class IngestFailedError(RuntimeError):
    """Raised by `ingest` when any source failed; carries the report rows."""

    def __init__(self, rows: list[dict[str, Any]]) -> None:
        bad = [r for r in rows if r["status"] in (FAILED, NOT_RUN)]
        lines = [f"{r['entry']} ({r['source']}): {r['reason']}" for r in bad]
        super().__init__(f"{len(bad)} source(s) not ingested:\n" + "\n".join(lines))
        self.rows = rows


def ingest(
    spec: str | Path | CatalogueSpec,
    catalogue: str,
    *,
    allow_pickle: bool = False,
    progress: bool = True,
    replace: bool = False,
) -> list[dict[str, Any]]:
    """Run the ingest flow on a spec file (or a validated spec); return the report rows.

    Raises SpecError for a bad spec and IngestFailedError when any source failed (every
    other source is still ingested).
    """
    if not isinstance(spec, CatalogueSpec):
        spec = load_spec(spec)
    with stage("flow"):
        rows = ingest_flow(
            spec, catalogue, allow_pickle=allow_pickle, progress=progress, replace=replace
        )
    if any(r["status"] in (FAILED, NOT_RUN) for r in rows):
        raise IngestFailedError(rows)
    return rows


USER_ERRORS = (SpecError, StorageError, TaskVectorError, IngestFailedError)
