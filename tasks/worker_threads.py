"""Torch threads in Dask process workers: each gets its share of its machine's cores.

A `dask worker` process starts torch with one thread per core; two such processes on a
2-core machine run four compute threads on two cores and are slower together than one
alone. `share_cores` sets, once per process, ``torch.set_num_threads`` to the cores of this
host divided by the task threads of all the Dask workers on it (as the scheduler lists
them), at least 1. ``TVSPLIT_TORCH_THREADS`` sets the number explicitly. Threaded workers
inside the driver's process (the embedded LocalCluster) are left alone: the flow already
splits the cores between them.
"""

from __future__ import annotations

import os
import threading
from typing import Any

_lock = threading.Lock()
_configured_pid: int | None = None


def host_share(cores: int, workers: list[dict[str, Any]], host: str) -> int:
    """Cores per task thread on `host`, given the scheduler's worker records."""
    threads = sum(int(w.get("nthreads", 1)) for w in workers if w.get("host") == host)
    return max(1, cores // max(1, threads))


def share_cores() -> int | None:
    """Set this worker process's torch threads to its share (once); the number set, or None
    when not in a separate Dask worker process."""
    global _configured_pid
    if _configured_pid == os.getpid():
        return None
    with _lock:
        if _configured_pid == os.getpid():
            return None
        _configured_pid = os.getpid()
        threads = _threads_for_this_process()
        if threads is not None:
            import torch

            torch.set_num_threads(threads)
        return threads


def _threads_for_this_process() -> int | None:
    explicit = os.environ.get("TVSPLIT_TORCH_THREADS")
    if explicit:
        return max(1, int(explicit))
    try:
        from distributed import get_worker
        from distributed.worker import Worker

        worker = get_worker()
    except (ImportError, ValueError):
        return None  # not inside a Dask worker
    if len(Worker._instances) > 1:  # threaded workers in the driver: the flow splits cores
        return None
    workers = worker.client.scheduler_info()["workers"]
    records = [
        {"host": _host(address), "nthreads": info.get("nthreads", 1)}
        for address, info in workers.items()
    ]
    return host_share(os.cpu_count() or 1, records, _host(worker.address))


def _host(address: str) -> str:
    return address.split("://")[-1].rsplit(":", 1)[0]
