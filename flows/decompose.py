"""The decomposition flow: every parameter of a family split on a Dask cluster.

Parameters are the unit of work, storage and resumption (each is written and marked
complete on its own); they are dispatched in size-balanced batches, one Prefect task per
batch, because a task run costs a fixed ~0.1–0.3 s of orchestration that a small parameter's
split does not. A batch streams its parameters through a pipeline (the next ones read while
one is split, results written behind), so on a local cluster there is one batch per worker;
progress is shown per parameter from the run's completed set.

Plan → dispatch (prefect-dask; GPU workers with ``--gpu``) → collect → track in MLflow.
Resumable and idempotent: the run name derives from (family, members, settings, member
revisions), finished parameters are skipped on rerun, member bases are cached so adding a
member costs one new basis per parameter. A failing parameter is retried, then reported
without losing the others, and the run stays unfinished until it succeeds.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import dask
from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact
from prefect.futures import as_completed
from prefect.states import Failed
from tvsplit.flows.checks import (
    DecomposeError,
    SchedulerLostError,
    check_scheduler,
    check_settings_for_family,
    check_workers,
    plan,
)
from tvsplit.flows.console import debug_enabled, progress_bars
from tvsplit.flows.settings import Settings, load_settings, prefect_run_settings
from tvsplit.flows.tracking import prepare_experiment, use_experiment
from tvsplit.storage.catalogue import Catalogue
from tvsplit.storage.decompositions import BasisCache, DecompositionRun
from tvsplit.storage.errors import one_line
from tvsplit.storage.lease import Holder, Lease, LeaseBusyError, run_lease
from tvsplit.tasks.decompose_job import (
    SplitSettings,
    decompose_batch_task,
    member_fingerprint,
    plan_batches,
    run_id,
)
from tvsplit.tasks.report import (
    CHANCE_TABLE,
    chance_rows,
    chance_summary,
    chance_warnings,
    shared_energy_heatmap,
    spectrum_figure,
    summary_rows,
)

LOOPBACK = "127.0.0.1"
__all__ = [
    "DecomposeError",
    "DecomposeResult",
    "SchedulerLostError",
    "decompose_family",
    "plan",
    "run_decompose",
]


@dataclass
class DecomposeResult:
    """What a decomposition flow did."""

    family: str
    run: str
    members: list[str]
    parameters: list[str]
    computed: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    bases_computed: int = 0
    diagnostics: list[dict[str, Any]] = field(default_factory=list)
    mlflow_run_id: str | None = None
    warnings: list[str] = field(default_factory=list)
    """Per-parameter diagnostics worth a look (threshold near chance), one line each."""
    summary: str | None = None
    """The warnings summed up in one line (None: none); what a caller prints by default."""


@flow(name="tvsplit-decompose", log_prints=True)
def decompose_family(
    family: str,
    members: list[str] | None = None,
    settings: SplitSettings | None = None,
    catalogue_url: str | None = None,
    gpu: bool = False,
    track: bool = True,
    show_progress: bool = True,
    batches: int | None = None,
    wait: bool = True,
) -> DecomposeResult:
    """Split every parameter of ``family`` and write run ``decompositions/<run>``, as
    ``batches`` Dask jobs of similar size (default 8; `run_decompose`: one per local
    worker). The run is claimed first (`claim_run`): while another process splits it, this
    one waits for it (or, without ``wait``, stops with DecomposeError naming it)."""
    logger = get_run_logger()
    app_settings = load_settings(catalogue=catalogue_url)
    settings = settings or SplitSettings()
    catalogue = Catalogue(app_settings.catalogue)
    chosen, parameters = plan(catalogue, family, members)
    fingerprints = {m: member_fingerprint(catalogue, family, m) for m in chosen}
    run = run_id(family, chosen, settings, fingerprints)
    try:
        lease = claim_run(catalogue, family, run, wait=wait, say=logger.warning)
        try:
            return _split_run(
                logger, app_settings, catalogue, family, run, chosen, parameters, fingerprints,
                settings, gpu=gpu, track=track, show_progress=show_progress, batches=batches,
            )  # fmt: skip
        finally:
            lease.release()
    except DecomposeError as error:
        # The run ends Failed with the message, and the caller gets the error, without the
        # flow engine logging a traceback of what is a reported outcome, not a bug.
        return Failed(message=str(error), data=error)  # type: ignore[return-value]


#: How a Dask future reports that its client lost the scheduler (distributed's
#: FutureCancelledError reason, and the message of a comm closed under it).
_LOST = ("scheduler-connection-lost", "lost the connection to the scheduler")


def scheduler_lost(error: BaseException) -> bool:
    """Whether a job's error means the connection to the Dask scheduler was lost (every job
    in flight is cancelled then), not that the job itself failed."""
    from distributed.comm.core import CommClosedError

    text = f"{getattr(error, 'reason', '')} {error}".lower()
    return isinstance(error, CommClosedError) or any(mark in text for mark in _LOST)


def failure_error(
    run: str, failed: dict[str, str], total: int, *, lost: bool, shown: int = 3
) -> DecomposeError:
    """The one error a run with unfinished parameters ends with: a lost scheduler said as
    such (SchedulerLostError), else the first ``shown`` failures and how many more."""
    saved = total - len(failed)
    if lost:
        return SchedulerLostError(
            f"run {run}: the connection to the Dask scheduler was lost mid-run; {saved} of "
            f"{total} parameter(s) are saved and kept; start the scheduler again (or use "
            f"another) and rerun the same command to split the other {len(failed)}"
        )
    first = "; ".join(f"{name}: {why}" for name, why in list(failed.items())[:shown])
    more = f"; and {len(failed) - shown} more" if len(failed) > shown else ""
    return DecomposeError(
        f"run {run}: {len(failed)} of {total} parameter(s) failed after retries ({first}"
        f"{more}); the others are saved, rerun to finish"
    )


def claim_run(
    catalogue: Catalogue, family: str, run: str, *, wait: bool, say: Callable[[str], Any]
) -> Lease:
    """Take run ``run``'s lease (`storage.lease`): one process at a time splits a run. While
    another live process holds it, wait (saying once who holds it) or, without ``wait``,
    raise DecomposeError naming the holder. Nests: the CLI claims before the engines start,
    the flow again inside."""
    lease = run_lease(catalogue, family, run)

    def waiting(holder: Holder | None) -> None:
        say(f"{lease.busy_message(holder)}; waiting for it to finish (--no-wait: exit instead)")

    try:
        return lease.acquire(wait=wait, on_wait=waiting)
    except LeaseBusyError as error:
        raise DecomposeError(
            f"{error}; nothing was done: rerun later, or without --no-wait to wait for it"
        ) from None


def _split_run(
    logger: Any,
    app_settings: Settings,
    catalogue: Catalogue,
    family: str,
    run: str,
    chosen: list[str],
    parameters: list[str],
    fingerprints: dict[str, str],
    settings: SplitSettings,
    *,
    gpu: bool,
    track: bool,
    show_progress: bool,
    batches: int | None,
) -> DecomposeResult:
    """The body of `decompose_family`, run while holding the run's lease."""
    if track:
        prepare_experiment("tvsplit-decompose", app_settings)  # beside the splitting
    store = DecompositionRun(catalogue, family, run)
    store.begin(settings.model_dump(), chosen, parameters)
    done = store.completed()
    todo = [p for p in parameters if p not in done]
    result = DecomposeResult(
        family, run, chosen, parameters, skipped=[p for p in parameters if p in done]
    )
    logger.info(
        "run %s: %d parameters, %d to split, %d done", run, len(parameters), len(todo), len(done)
    )

    BasisCache(catalogue, family, settings.basis_key()).prepare()
    first = catalogue.open_entry(family, chosen[0])
    sizes = {p: first.stored_bytes(p) // 4 for p in todo}
    groups = plan_batches(sizes, batches or 8)
    annotation = dask.annotate(resources={"GPU": 1}) if gpu else contextlib.nullcontext()
    with annotation:
        futures = {
            decompose_batch_task.submit(
                app_settings.catalogue, family, run, group, chosen, fingerprints, settings
            ): group
            for group in groups
        }
    errors: dict[str, str] = {}
    lost = False
    progress = (
        _ParameterProgress(store, todo, f"splitting {family}")
        if show_progress and todo
        else contextlib.nullcontext()
    )
    with progress:
        for future in as_completed(list(futures)):
            group = futures[future]
            try:
                reports = future.result()
            except Exception as error:  # reported below; the other batches go on
                lost |= scheduler_lost(error)
                for name in group:
                    errors[name] = f"{type(error).__name__}: {one_line(str(error))}"
                if not lost:  # a lost scheduler cancels every batch: said once, below
                    logger.warning(
                        "a batch of %d parameter(s) failed: %s", len(group), one_line(str(error))
                    )
                continue
            result.bases_computed += sum(int(r["bases_computed"]) for r in reports)
    complete = store.completed()
    result.computed = [p for p in todo if p in complete]
    result.failed = {p: errors.get(p, "not completed") for p in todo if p not in complete}

    result.diagnostics = [
        {**store.read_diagnostics(p), "name": p} for p in parameters if p not in result.failed
    ]
    result.warnings = chance_warnings(result.diagnostics)
    for warning in result.warnings:  # in the flow run's log; callers print them on --verbose
        logger.debug(warning)
    rows = summary_rows(result.diagnostics)
    create_table_artifact(
        key=f"decompose-{family}".lower().replace("_", "-"),
        table=rows,
        description=f"Decomposition {family}/{run}: one row per parameter",
    )
    if result.failed:
        raise failure_error(run, result.failed, len(parameters), lost=lost)
    store.finish({"bases_computed": result.bases_computed})
    if track:
        result.mlflow_run_id = _track(app_settings, result, settings)
    result.summary = chance_summary(result.diagnostics, tracked=result.mlflow_run_id is not None)
    if result.summary:
        logger.info(result.summary)
    return result


class _ParameterProgress:
    """A progress bar of the parameters split so far, while the batches run: a thread
    counts the run's completed parameters every second or so (less often when listing them
    takes long: at most 5 % of the time goes to looking). A failed count keeps the last."""

    def __init__(self, store: DecompositionRun, todo: list[str], label: str) -> None:
        self._store, self._wanted, self._label = store, set(todo), label
        self._stop = threading.Event()
        self._progress = progress_bars(unit="parameters")

    def __enter__(self) -> _ParameterProgress:
        self._progress.start()
        self._bar = self._progress.add_task(self._label, total=len(self._wanted))
        self._thread = threading.Thread(target=self._poll, name="tvsplit-progress", daemon=True)
        self._thread.start()
        return self

    def _count(self) -> None:
        try:
            done = len(self._store.completed() & self._wanted)
        except Exception:  # a transient listing error: keep the last count
            return
        self._progress.update(self._bar, completed=done)

    def _poll(self) -> None:
        interval = 1.0
        while not self._stop.wait(interval):
            started = time.perf_counter()
            self._count()
            interval = max(1.0, 20 * (time.perf_counter() - started))

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._count()
        self._progress.stop()


HEATMAP = "shared_energy_heatmap.png"
SPECTRA = "eigenvalue_spectra.png"


def _track(app_settings: Settings, result: DecomposeResult, settings: SplitSettings) -> str:
    """One MLflow run: settings as params, per-parameter metrics, summary table, plots."""
    import matplotlib.pyplot as plt
    import mlflow

    use_experiment("tvsplit-decompose", app_settings)
    rows = summary_rows(result.diagnostics)
    with mlflow.start_run(run_name=f"{result.family}/{result.run}") as active:
        mlflow.log_params(
            {
                **settings.model_dump(),
                "family": result.family,
                "run": result.run,
                "members": ",".join(result.members),
                "catalogue": app_settings.catalogue,
            }
        )
        metrics: dict[str, float] = {
            "parameters": len(result.parameters),
            "bases_computed": result.bases_computed,
        }
        for row in rows:
            name = row["parameter"]
            for key in ("k", "gap", "chance", "top_eigenvalue"):
                metrics[f"{key}/{name}"] = row[key]
            for member in result.members:
                metrics[f"shared_energy/{name}/{member}"] = row[f"shared_energy/{member}"]
        mlflow.log_metrics(metrics)
        mlflow.log_table({k: [row[k] for row in rows] for k in rows[0]}, "summary.json")
        chance = chance_rows(result.diagnostics)
        if chance:
            mlflow.log_table({k: [row[k] for row in chance] for k in chance[0]}, CHANCE_TABLE)
        for figure, name in (
            (shared_energy_heatmap(result.diagnostics), HEATMAP),
            (spectrum_figure(result.diagnostics), SPECTRA),
        ):
            mlflow.log_figure(figure, name)
            plt.close(figure)
        return active.info.run_id


_CHATTY = ("client", "utils")  # distributed's loggers of a client's lost connection


@contextlib.contextmanager
def dask_cluster(scheduler: str | None, workers: int, gpu: bool) -> Iterator[Any]:
    """A Dask task runner for the flow: on ``scheduler`` (``tcp://host:8786``) or a fresh
    threaded LocalCluster of ``workers`` workers. With ``gpu``, refuses a cluster where no
    worker offers a ``GPU`` resource (a job asking for one would wait forever)."""
    import torch
    from distributed import Client, LocalCluster
    from prefect_dask import DaskTaskRunner

    # distributed sets its logger to INFO on import: cluster start/stop chatter, not news.
    logging.getLogger("distributed").setLevel(logging.WARNING)
    # A lost scheduler is reported once, as the run's error (`failure_error`); the client's
    # attempts to reconnect would log it again, each with a traceback (shown with --debug).
    quiet = [] if debug_enabled() else [logging.getLogger(f"distributed.{n}") for n in _CHATTY]
    levels = [(logger, logger.level) for logger in quiet]
    for logger in quiet:
        logger.setLevel(logging.CRITICAL)

    cluster = None
    threads = torch.get_num_threads()
    if scheduler is None:
        if gpu and not torch.cuda.is_available():
            raise DecomposeError(
                "--gpu: this machine has no CUDA device; pass --scheduler of a cluster with GPU workers"
            )
        resources = {"GPU": 1} if gpu else None
        # Threaded workers share this process: split the cores between them rather than let
        # every worker's torch spin up a thread per core (oversubscription slows all of them).
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, workers)))
        cluster = LocalCluster(
            n_workers=workers,
            threads_per_worker=1,
            processes=False,
            # Loopback only: `dashboard_address=None` still serves the dashboard on
            # 0.0.0.0:8787, and each in-process worker its own on 0.0.0.0 (checked with psutil).
            dashboard_address=f"{LOOPBACK}:0",
            worker_dashboard_address=f"{LOOPBACK}:0",
            resources=resources,
        )
    try:
        if gpu:
            with Client(cluster if cluster is not None else scheduler, timeout=30) as client:
                offered = [
                    w.get("resources", {}) for w in client.scheduler_info()["workers"].values()
                ]
            if not any(r.get("GPU", 0) >= 1 for r in offered):
                where = scheduler or "the local cluster"
                raise DecomposeError(
                    f"--gpu: no worker of {where} offers a GPU resource; start workers with "
                    "`dask worker SCHEDULER --resources GPU=1`"
                )
        # By address, not by cluster object: the flow (with its task runner) travels in the
        # context of every job, and a live cluster object does not pickle.
        yield DaskTaskRunner(
            address=cluster.scheduler_address if cluster is not None else scheduler
        )
    finally:
        if cluster is not None:
            cluster.close()
        torch.set_num_threads(threads)
        for logger, level in levels:
            logger.setLevel(level)


def run_decompose(
    family: str,
    *,
    members: list[str] | None = None,
    settings: SplitSettings | None = None,
    catalogue_url: str | None = None,
    scheduler: str | None = None,
    workers: int = 2,
    gpu: bool = False,
    track: bool = True,
    show_progress: bool = True,
    wait: bool = True,
    say: Callable[[str], Any] = print,
) -> DecomposeResult:
    """Claim the run, start (or join) the cluster and run the decomposition flow on it.

    The run's lease is taken before any engine starts, so a second process waits (or with
    ``wait=False`` stops at once) without a flow run, a cluster or a failure of its own."""
    # Fail fast, before any engine or cluster starts (InputError names the setting).
    catalogue = Catalogue(load_settings(catalogue=catalogue_url).catalogue)
    chosen, _ = plan(catalogue, family, members)
    check_settings_for_family(settings or SplitSettings(), len(chosen))
    check_workers(workers)
    check_scheduler(scheduler)
    fingerprints = {m: member_fingerprint(catalogue, family, m) for m in chosen}
    run = run_id(family, chosen, settings or SplitSettings(), fingerprints)
    lease = claim_run(catalogue, family, run, wait=wait, say=say)
    try:
        with prefect_run_settings(), dask_cluster(scheduler, workers, gpu) as runner:
            return decompose_family.with_options(task_runner=runner)(
                family,
                members=members,
                settings=settings,
                catalogue_url=catalogue_url,
                gpu=gpu,
                track=track,
                show_progress=show_progress,
                batches=workers if scheduler is None else None,
                wait=wait,
            )
    finally:
        lease.release()
