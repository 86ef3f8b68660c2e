"""Dask process workers each run torch on their share of the host's cores."""

from __future__ import annotations

import os

import distributed
from tvsplit.tasks.worker_threads import host_share


def test_host_share_divides_cores_by_the_task_threads_on_the_host() -> None:
    here = [
        {"host": "a", "nthreads": 1},
        {"host": "a", "nthreads": 1},
        {"host": "b", "nthreads": 4},
    ]
    assert host_share(8, here, "a") == 4
    assert host_share(2, here, "a") == 1
    assert host_share(2, here, "b") == 1  # 4 threads on 2 cores: never below one
    assert host_share(16, here, "b") == 4


def _threads_after_share() -> tuple[int | None, int]:
    import torch
    from tvsplit.tasks.worker_threads import share_cores

    return share_cores(), torch.get_num_threads()


def test_each_of_two_process_workers_gets_its_share() -> None:
    with distributed.LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
        host="127.0.0.1",
    ) as cluster, distributed.Client(cluster) as client:  # fmt: skip
        client.wait_for_workers(2)
        workers = list(client.scheduler_info()["workers"])
        results = [client.submit(_threads_after_share, workers=[w], pure=False).result()
                   for w in workers]  # fmt: skip
    share = max(1, (os.cpu_count() or 1) // 2)
    assert results == [(share, share), (share, share)]
