"""The shared read-ahead / compute / write-behind pipeline (tasks.pipeline)."""

from __future__ import annotations

import threading

import pytest
from tvsplit.tasks import pipeline, stages
from tvsplit.tasks.pipeline import computed_ahead, may_read_ahead, pipelined


def test_read_ahead_is_bounded_in_count_and_bytes():
    budget = pipeline.READ_AHEAD_BYTES
    assert may_read_ahead([], 10 * budget)  # the next item is read whatever its size
    assert may_read_ahead([1] * (pipeline.READ_AHEAD - 1), 1)
    assert not may_read_ahead([1] * pipeline.READ_AHEAD, 1)
    assert not may_read_ahead([budget // 2], budget // 2 + 1)
    assert not may_read_ahead([10 * budget], 1)  # nothing more beside an embedding


def test_writes_happen_in_order_on_one_thread_beside_the_compute():
    items = list(range(40))
    threads: dict[str, set[str]] = {"read": set(), "compute": set(), "write": set()}
    written: list[int] = []

    def read(i):
        threads["read"].add(threading.current_thread().name)
        return i

    def compute(i):
        threads["compute"].add(threading.current_thread().name)
        return i * i

    def write(value):
        threads["write"].add(threading.current_thread().name)
        written.append(value)
        return -value

    results = pipelined(items, read, compute, write)
    assert written == [i * i for i in items]
    assert results == [-i * i for i in items]
    assert threads["compute"] == {threading.current_thread().name}
    assert len(threads["read"]) == 1 and len(threads["write"]) == 1
    assert threads["read"].isdisjoint(threads["compute"] | threads["write"])


def test_reads_in_flight_and_queued_writes_stay_bounded():
    """Whatever the number of items, at most READ_AHEAD unconsumed reads (one when the next
    item alone exceeds the byte budget) and WRITES_IN_FLIGHT results wait."""
    lock = threading.Lock()
    state = {"read": 0, "computed": 0, "written": 0, "max_unread": 0, "max_queued": 0}
    release = threading.Event()

    def read(i):
        with lock:
            state["read"] += 1
            state["max_unread"] = max(state["max_unread"], state["read"] - state["computed"])
        return i

    def compute(i):
        with lock:
            state["computed"] += 1
            state["max_queued"] = max(state["max_queued"], state["computed"] - state["written"])
        return i

    def write(i):
        release.wait(0.001)  # a slow writer: results queue up
        with lock:
            state["written"] += 1
        return i

    assert pipelined(list(range(200)), read, compute, write) == list(range(200))
    assert state["max_unread"] <= pipeline.READ_AHEAD + 1  # +1: the one being computed
    assert state["max_queued"] <= pipeline.WRITES_IN_FLIGHT + 1

    state.update(read=0, computed=0, written=0, max_unread=0)
    huge = pipeline.READ_AHEAD_BYTES + 1
    pipelined(list(range(50)), read, compute, write, nbytes=lambda i: huge)
    assert state["max_unread"] <= 2  # the one computed and the next, never more


def test_failures_are_collected_and_the_rest_go_on():
    released: list[int] = []

    def read(i):
        if i == 3:
            raise OSError("read 3")
        return i

    def compute(i):
        if i == 5:
            raise ValueError("compute 5")
        return i

    def write(i):
        if i == 7:
            raise RuntimeError("write 7")
        return i

    failures: dict[int, Exception] = {}
    results = pipelined(
        list(range(10)), read, compute, write, release=released.append, failures=failures
    )
    assert results == [0, 1, 2, 4, 6, 8, 9]
    assert {k: type(e) for k, e in failures.items()} == {3: OSError, 5: ValueError, 7: RuntimeError}
    assert released == [i for i in range(10) if i != 3]  # every read is released once


def test_without_failures_the_first_error_is_raised_and_later_items_are_not_written():
    written: list[int] = []

    def compute(i):
        if i == 4:
            raise ValueError("bad item 4")
        return i

    with pytest.raises(ValueError, match="bad item 4"):
        pipelined(list(range(100)), lambda i: i, compute, written.append)
    assert written == list(range(len(written))) and len(written) <= 4  # none after item 4


def test_stages_record_busy_time(monkeypatch):
    monkeypatch.setattr(stages, "_totals", {})
    pipelined([1, 2], lambda i: i, lambda i: i, lambda i: i)
    assert {"reading", "compute", "writing"} <= set(stages.snapshot())


def test_computed_ahead_yields_in_order_computing_beside_the_caller():
    caller = threading.current_thread().name
    seen: set[str] = set()

    def compute(i):
        seen.add(threading.current_thread().name)
        return i + 100

    assert list(computed_ahead(range(30), lambda i: i, compute)) == [i + 100 for i in range(30)]
    assert caller not in seen and len(seen) == 1


def test_computed_ahead_holds_a_bounded_queue_for_a_slow_caller():
    computed: list[int] = []
    results = computed_ahead(range(1000), lambda i: i, lambda i: computed.append(i) or i)
    assert next(results) == 0
    threading.Event().wait(0.3)  # the compute thread runs ahead, up to the queue's bound
    ahead = len(computed)
    assert ahead <= pipeline.WRITES_IN_FLIGHT + 3  # queued + the one handed over + one computing
    results.close()  # the caller stops: nothing more is computed or read
    stopped = len(computed)
    threading.Event().wait(0.2)
    assert len(computed) == stopped < 1000


def test_computed_ahead_raises_the_first_error_to_the_caller():
    def compute(i):
        if i == 6:
            raise ValueError("bad 6")
        return i

    got: list[int] = []
    with pytest.raises(ValueError, match="bad 6"):
        for value in computed_ahead(range(50), lambda i: i, compute):
            got.append(value)
    assert got == list(range(6))
