"""Repository-wide processing: `tvsplit sync SPEC`, the nightly run, and the flows that
Prefect deployments run on a cluster.

`sync` brings a catalogue up to date with a catalogue spec:

1. resolve every source's current revision cheaply (`storage.revisions`: one hub API call
   per repository; size + mtime per local file, sha256 only when those changed);
2. ingest only what is new or changed (a changed base re-ingests its family's members:
   their task vectors are relative to it);
3. re-decompose only the families whose members changed or that have no finished run for
   their current members (member bases are cached, so a new member costs its own bases);
4. rerun a family's configured suite, where one is configured (``suite:`` in the spec);
5. report what changed. With nothing new it does no ingest and no decomposition, starts
   no flow, and says so.

Without a spec, `sync_catalogue` decomposes every family of the catalogue that has no
finished run for its current members (the earlier ``decompose_catalogue``).

Serve it on a schedule against a Prefect server (`PREFECT_API_URL`), no work pool needed::

    tvsplit serve SPEC --cron "0 3 * * *"

or deploy it with `deployments/prefect.yaml` (`prefect deploy --all`, a process work pool).
"""

# No `from __future__ import annotations` here: Prefect builds its parameter models from
# these flows' annotations in the worker's process, where string annotations that name
# imported classes (SplitSettings) could not be resolved (PydanticUserError "not fully
# defined").

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from tvsplit.flows.decompose import DecomposeError, run_decompose
from tvsplit.flows.ingest import CatalogueSpec, FamilySpec, SpecError, ingest, load_spec
from tvsplit.flows.settings import load_settings
from tvsplit.storage.catalogue import ATTRS, Catalogue, entry_label
from tvsplit.storage.decompositions import DecompositionRun
from tvsplit.storage.errors import CatalogueError
from tvsplit.storage.revisions import Revision, changed, current_revision
from tvsplit.tasks.decompose_job import SplitSettings, member_fingerprint, run_id

SYNC_GROUP = "sync"


@dataclass
class SourceCheck:
    """One source of the spec against the catalogue."""

    family: str
    member: str | None  # None: the base
    source: str
    changed: bool
    reason: str
    revision: Revision = field(repr=False)

    @property
    def label(self) -> str:
        return entry_label(self.family, self.member)


@dataclass
class SyncPlan:
    """What a sync has to do."""

    catalogue: str
    sources: list[SourceCheck]
    decompose: dict[str, str]  # family → why it needs a decomposition
    families: dict[str, FamilySpec]
    seconds: float = 0.0

    @property
    def to_ingest(self) -> list[SourceCheck]:
        return [s for s in self.sources if s.changed]

    @property
    def nothing_new(self) -> bool:
        return not self.to_ingest and not self.decompose

    def summary(self) -> str:
        if self.nothing_new:
            return (
                f"nothing new: {len(self.families)} family(ies), {len(self.sources)} source(s) "
                f"unchanged, every family decomposed ({self.seconds:.2f} s)"
            )
        return (
            f"{len(self.to_ingest)} source(s) to ingest, {len(self.decompose)} family(ies) to "
            f"decompose"
        )


@dataclass
class SyncReport:
    """What a sync did."""

    plan: SyncPlan
    ingested: list[dict[str, Any]] = field(default_factory=list)
    decomposed: dict[str, dict[str, Any]] = field(default_factory=dict)
    suites: dict[str, str] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "nothing_new": self.plan.nothing_new,
            "sources": [
                {"entry": s.label, "source": s.source, "changed": s.changed, "reason": s.reason}
                for s in self.plan.sources
            ],
            "ingested": self.ingested,
            "decomposed": self.decomposed,
            "suites": self.suites,
        }


# -- state kept beside each family -------------------------------------------------------------
def _recorded(catalogue: Catalogue, family: str) -> dict[str, Any]:
    try:
        group = catalogue.family_group(family, SYNC_GROUP)
    except CatalogueError:
        return {}
    return dict(group.attrs.get(ATTRS, {}))


def _record(catalogue: Catalogue, family: str, checks: list[SourceCheck]) -> None:
    """Remember the stats of the sources now in the catalogue (so the next sync hashes
    nothing unless a file's size or mtime moves)."""
    group = catalogue.family_group(family, SYNC_GROUP, create=True)
    state = dict(group.attrs.get(ATTRS, {}))
    for check in checks:
        state[check.label] = check.revision.record()
    group.attrs[ATTRS] = state


# -- plan ---------------------------------------------------------------------------------------
def plan_sync(
    spec: str | Path | CatalogueSpec,
    catalogue_url: str | None = None,
    settings: SplitSettings | None = None,
) -> SyncPlan:
    """Compare every source of `spec` with the catalogue (no Prefect, no download)."""
    started = time.perf_counter()
    url = load_settings(catalogue=catalogue_url).catalogue
    spec = spec if isinstance(spec, CatalogueSpec) else load_spec(spec)
    catalogue = Catalogue(url)
    checks: list[SourceCheck] = []
    decompose: dict[str, str] = {}
    for family, fspec in spec.families.items():
        recorded = _recorded(catalogue, family)
        base = _check(catalogue, family, None, fspec.base, recorded)
        checks.append(base)
        member_checks = []
        for member, source in fspec.members.items():
            check = _check(catalogue, family, member, source, recorded)
            if base.changed and not check.changed:
                check.changed, check.reason = True, f"the base changed ({base.reason})"
            member_checks.append(check)
        checks += member_checks
        if any(c.changed for c in member_checks):
            decompose[family] = "members changed"
        elif len(fspec.members) >= 2 and not _decomposed(
            catalogue, family, sorted(fspec.members), settings or SplitSettings()
        ):
            decompose[family] = "no finished run for its current members"
    return SyncPlan(url, checks, decompose, dict(spec.families), time.perf_counter() - started)


def _check(
    catalogue: Catalogue, family: str, member: str | None, source: str, recorded: dict
) -> SourceCheck:
    revision = current_revision(source)
    entry = catalogue.entry(family, member)
    attrs = entry.attrs if entry is not None and entry.complete else None
    is_changed, reason = changed(revision, recorded.get(entry_label(family, member)), attrs)
    return SourceCheck(family, member, source, is_changed, reason, revision)


def _decomposed(
    catalogue: Catalogue, family: str, members: list[str], settings: SplitSettings
) -> bool:
    """Whether the family has a finished run for exactly these members and settings."""
    fingerprints = {m: member_fingerprint(catalogue, family, m) for m in members}
    run = DecompositionRun(catalogue, family, run_id(family, members, settings, fingerprints))
    return run.exists() and run.attrs().get("status") == "complete"


# -- apply --------------------------------------------------------------------------------------
def apply_sync(
    plan: SyncPlan,
    *,
    settings: SplitSettings | None = None,
    scheduler: str | None = None,
    workers: int = 2,
    track: bool = True,
    progress: bool = False,
) -> SyncReport:
    """Ingest what changed, decompose the families that need it, rerun configured suites."""
    report = SyncReport(plan)
    catalogue = Catalogue(plan.catalogue)
    changed_by_family: dict[str, list[SourceCheck]] = {}
    for check in plan.to_ingest:
        changed_by_family.setdefault(check.family, []).append(check)
    if changed_by_family:
        families = {}
        for family, checks in changed_by_family.items():
            fspec = plan.families[family]
            wanted = {c.member for c in checks}
            families[family] = fspec.model_copy(
                update={"members": {m: s for m, s in fspec.members.items() if m in wanted}}
            )
        report.ingested = ingest(  # a changed source's entry is swapped in once complete
            CatalogueSpec(families=families), plan.catalogue, progress=progress, replace=True
        )
    for family in {s.family for s in plan.sources}:
        _record(catalogue, family, [s for s in plan.sources if s.family == family])
    failed: list[str] = []
    for family in plan.decompose:
        members = sorted(plan.families[family].members)
        try:
            result = run_decompose(
                family, members=members, settings=settings, catalogue_url=plan.catalogue,
                scheduler=scheduler, workers=workers, track=track, show_progress=False,
            )  # fmt: skip
        except DecomposeError as error:
            report.decomposed[family] = {"status": "failed", "reason": str(error)}
            failed.append(family)
            continue
        report.decomposed[family] = {
            "status": "done", "run": result.run, "computed": len(result.computed),
            "skipped": len(result.skipped), "bases_computed": result.bases_computed,
        }  # fmt: skip
    for family in plan.decompose:
        suite = getattr(plan.families[family], "suite", None)
        if suite and family not in failed:
            report.suites[family] = _run_suite(suite, family, plan.catalogue, track)
    if failed:
        raise DecomposeError(f"{len(failed)} family(ies) failed: {', '.join(failed)}")
    return report


def suite_preset(value: str) -> tuple[str, str]:
    """A spec's ``suite:`` value, ``NAME`` or ``NAME:PRESET``, as (name, preset); the
    preset defaults to ``full`` (as for ``tvsplit evaluate``)."""
    name, _, preset = value.partition(":")
    return name.strip(), preset.strip() or "full"


def _run_suite(suite: str, family: str, catalogue: str, track: bool) -> str:
    """Rerun a family's configured suite through the generic suite flow, on that family of
    the suite's pool (its section of ``<data>/RESULTS.md`` rewritten); returns what it did,
    or why it failed (a suite failure does not undo the sync)."""
    from tvsplit.flows.ingest import USER_ERRORS
    from tvsplit.flows.suite import suite_flow
    from tvsplit.tasks.suites.base import SuiteError

    name, preset = suite_preset(suite)
    results = load_settings().data / "RESULTS.md"
    try:
        outcome = suite_flow(
            name, preset=preset, catalogue_url=catalogue, families=[family], track=track,
            results_path=str(results), show_progress=False,
            command=f"tvsplit sync (family {family})",
        )  # fmt: skip
    except (*USER_ERRORS, SuiteError, DecomposeError) as error:
        return f"suite {name!r} ({preset}) failed: {error}"
    result = outcome.result
    run = f", MLflow run {outcome.mlflow_run_id}" if outcome.mlflow_run_id else ""
    return (
        f"suite {name!r} ({preset}) rerun: {len(result.rows)} row(s) on "
        f"{', '.join(result.families)}; section {name!r} of {outcome.results_path}{run}"
    )


def sync(
    spec: str | Path | CatalogueSpec,
    catalogue_url: str | None = None,
    *,
    settings: SplitSettings | None = None,
    scheduler: str | None = None,
    workers: int = 2,
    track: bool = True,
    progress: bool = False,
) -> SyncReport:
    """Plan, and apply only when there is something to do."""
    plan = plan_sync(spec, catalogue_url, settings)
    if plan.nothing_new:
        return SyncReport(plan)
    return apply_sync(
        plan, settings=settings, scheduler=scheduler, workers=workers, track=track,
        progress=progress,
    )  # fmt: skip


# -- flows the server runs ----------------------------------------------------------------------
@flow(name="tvsplit-sync", log_prints=True)
def sync_catalogue(
    spec: str | None = None,
    catalogue_url: str | None = None,
    families: list[str] | None = None,
    settings: SplitSettings | None = None,
    scheduler: str | None = None,
    workers: int = 2,
    track: bool = True,
) -> dict[str, Any]:
    """Bring the catalogue up to date with the spec at `spec` (a path on the worker), or,
    without one, decompose every family (or those named) that has no finished run for its
    current members. Returns what was done."""
    logger = get_run_logger()
    defaults = load_settings(spec=spec or None, scheduler=scheduler or None)
    spec, scheduler = defaults.spec, defaults.scheduler
    if spec is not None:
        report = sync(
            spec, catalogue_url, settings=settings, scheduler=scheduler, workers=workers,
            track=track,
        )  # fmt: skip
        logger.info(report.plan.summary())
        return report.as_dict()
    url = load_settings(catalogue=catalogue_url).catalogue
    catalogue = Catalogue(url)
    done: dict[str, Any] = {}
    failed = []
    for family in families or catalogue.families():
        members = catalogue.members(family)
        if len(members) < 2:
            done[family] = {"status": "skipped", "reason": f"{len(members)} complete member(s)"}
            continue
        if _decomposed(catalogue, family, members, settings or SplitSettings()):
            done[family] = {"status": "unchanged"}
            continue
        try:
            result = run_decompose(
                family, settings=settings, catalogue_url=url, scheduler=scheduler,
                workers=workers, track=track, show_progress=False,
            )  # fmt: skip
        except DecomposeError as error:
            logger.error("family %s failed: %s", family, error)
            done[family] = {"status": "failed", "reason": str(error)}
            failed.append(family)
            continue
        done[family] = {"status": "done", "run": result.run, "computed": len(result.computed)}
    if failed:
        raise DecomposeError(f"{len(failed)} family(ies) failed: {', '.join(failed)}")
    return {"decomposed": done}


@flow(name="tvsplit-decompose-on-cluster", log_prints=True)
def decompose_on_cluster(
    family: str,
    members: list[str] | None = None,
    settings: SplitSettings | None = None,
    catalogue_url: str | None = None,
    scheduler: str | None = None,
    workers: int = 2,
    gpu: bool = False,
    track: bool = True,
) -> dict[str, Any]:
    """One family's decomposition on the Dask cluster at `scheduler` (else
    ``TVSPLIT_SCHEDULER``, else a fresh local one bound to 127.0.0.1): what the
    decompose-family deployment runs."""
    scheduler = load_settings(scheduler=scheduler or None).scheduler
    result = run_decompose(
        family, members=members, settings=settings, catalogue_url=catalogue_url,
        scheduler=scheduler, workers=workers, gpu=gpu, track=track, show_progress=False,
    )  # fmt: skip
    return {
        "run": result.run, "computed": len(result.computed), "skipped": len(result.skipped),
        "bases_computed": result.bases_computed, "mlflow_run_id": result.mlflow_run_id,
    }  # fmt: skip


@flow(name="tvsplit-ingest-spec", log_prints=True)
def ingest_spec(spec: str | None = None, catalogue_url: str | None = None) -> list[dict[str, Any]]:
    """Ingest (or resume) every family of the spec file at `spec` (a path on the worker;
    default ``TVSPLIT_SPEC``)."""
    settings = load_settings(catalogue=catalogue_url, spec=spec or None)
    if settings.spec is None:
        raise SpecError("ingest-spec: no spec given (pass spec, or set TVSPLIT_SPEC)")
    return ingest(settings.spec, settings.catalogue, progress=False)


decompose_catalogue = sync_catalogue  # the earlier name
