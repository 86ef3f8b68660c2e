"""Where a command's time goes: named stages timed inside the process, written out on request.

``with stage("reading"): ...`` (or ``add("reading", seconds)``) adds wall seconds to a
stage; threads may record at the same time, so stages that overlap (a reader thread beside
the compute) sum to more than the wall time: each is that stage's busy time.

With ``TVSPLIT_STAGES=<file>`` in the environment the process writes, at exit, one JSON
object ``{"entered": <epoch s when tvsplit's entry point started>, "stages": {name: s}}``
(benchmarks/cli_bench.py reads it). Without it nothing is written and a stage costs two
``perf_counter`` calls. This module imports nothing heavy (it is imported before the CLI
decides what it needs).

Stage names used across tvsplit: ``imports`` (modules a command loads), ``orchestration``
(reaching Prefect: the local server, flow and task runs around the work), ``tracking``
(MLflow, its import included), ``reading``, ``compute``, ``writing``, ``work`` (a flow's
body where it is not split further), and ``flow``/``flow body`` (around and inside a flow
call: their difference is added to ``orchestration`` when the file is written).
"""

from __future__ import annotations

import atexit
import functools
import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import ParamSpec, TypeVar

P = ParamSpec("P")
T = TypeVar("T")

ENV = "TVSPLIT_STAGES"

_lock = threading.Lock()
_totals: dict[str, float] = {}
_entered: float = time.time()


def mark_entered(epoch_seconds: float) -> None:
    """Record when the entry point started (before its own imports)."""
    global _entered
    _entered = epoch_seconds


def add(name: str, seconds: float) -> None:
    """Add ``seconds`` to stage ``name`` (thread-safe)."""
    with _lock:
        _totals[name] = _totals.get(name, 0.0) + seconds


@contextmanager
def stage(name: str) -> Iterator[None]:
    """Time the block into stage ``name`` (also when it raises)."""
    start = time.perf_counter()
    try:
        yield
    finally:
        add(name, time.perf_counter() - start)


def timed(name: str) -> Callable[[Callable[P, T]], Callable[P, T]]:
    """Decorator: time every call of the function into stage ``name`` (the signature is kept,
    so it can sit under Prefect's ``@flow``: ``@flow(...)`` then ``@timed("flow body")``)."""

    def decorate(function: Callable[P, T]) -> Callable[P, T]:
        @functools.wraps(function)
        def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
            with stage(name):
                return function(*args, **kwargs)

        return wrapper

    return decorate


def snapshot() -> dict[str, float]:
    """The stages so far; ``flow`` minus ``flow body`` folded into ``orchestration``."""
    with _lock:
        totals = dict(_totals)
    around, inside = totals.pop("flow", None), totals.pop("flow body", None)
    if around is not None and inside is not None:
        totals["orchestration"] = totals.get("orchestration", 0.0) + max(0.0, around - inside)
    return totals


def _write() -> None:
    path = os.environ.get(ENV)
    if not path:
        return
    try:
        with open(path, "w") as handle:
            json.dump({"entered": _entered, "stages": snapshot()}, handle)
    except OSError:
        pass  # a benchmark aid: never fail a command over it


atexit.register(_write)
