"""Repository-wide decomposition: every family of a catalogue, on a schedule.

`decompose_catalogue` runs the decomposition flow for each family with at least two complete
members. Runs are idempotent (named by family, members, settings and member revisions), so
a scheduled run only does work where something changed: a new member costs one new basis
per parameter, an unchanged family costs a look at its run's status.

Serve it on a schedule against a Prefect server (`PREFECT_API_URL`), no work pool needed::

    tvsplit serve --cron "0 3 * * *"

or deploy it with `deployments/prefect.yaml` (`prefect deploy --all`, with a process work pool).
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger
from tvsplit.flows.decompose import DecomposeError, run_decompose
from tvsplit.flows.settings import load_settings
from tvsplit.storage.catalogue import Catalogue
from tvsplit.tasks.decompose_job import SplitSettings


@flow(name="tvsplit-decompose-catalogue", log_prints=True)
def decompose_catalogue(
    catalogue_url: str | None = None,
    families: list[str] | None = None,
    settings: SplitSettings | None = None,
    scheduler: str | None = None,
    workers: int = 2,
    track: bool = True,
) -> dict[str, dict[str, Any]]:
    """Decompose every family (or those named); returns per family its run and what was done.

    A family that fails is reported and the others go on; the flow fails at the end if any did.
    """
    logger = get_run_logger()
    url = load_settings(catalogue=catalogue_url).catalogue
    catalogue = Catalogue(url)
    report: dict[str, dict[str, Any]] = {}
    for family in families or catalogue.families():
        members = catalogue.members(family)
        if len(members) < 2:
            report[family] = {"status": "skipped", "reason": f"{len(members)} complete member(s)"}
            continue
        try:
            result = run_decompose(
                family, settings=settings, catalogue_url=url, scheduler=scheduler, workers=workers,
                track=track, show_progress=False,
            )  # fmt: skip
        except DecomposeError as error:
            logger.error("family %s failed: %s", family, error)
            report[family] = {"status": "failed", "reason": str(error)}
            continue
        report[family] = {
            "status": "done",
            "run": result.run,
            "computed": len(result.computed),
            "skipped": len(result.skipped),
            "bases_computed": result.bases_computed,
        }
    failed = [f for f, r in report.items() if r["status"] == "failed"]
    if failed:
        raise DecomposeError(f"{len(failed)} family(ies) failed: {', '.join(failed)}")
    return report
