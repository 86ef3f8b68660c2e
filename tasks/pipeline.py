"""Read ahead, compute, write behind: the one pipeline the streamed jobs share.

``pipelined(items, read, compute, write)`` runs ``write(compute(read(item)))`` for every
item, in order, with ``read`` on one reader thread (the next items read while one is
computed), ``compute`` on the calling thread and ``write`` on one writer thread (the previous
results written while the next is computed); the decomposition job (`tasks.decompose_job`)
runs on it. ``computed_ahead(items, read, compute)`` is the same pipeline for a caller that
writes the results itself as it iterates (the edit job, `tasks.edit_job`, whose flow owns
the model folder being written): reads on a reader thread, the compute on a compute thread,
the caller's writing beside them.

Guarantees:

- ``write`` is called in the items' order, from one thread, so an ordered sink (a model
  folder being written tensor by tensor) can be given to it as is;
- memory is bounded whatever the number of items: the item being computed, the next one
  read (whatever its size), more read ahead (up to ``read_ahead`` items) only while the
  reads in flight fit in ``read_ahead_bytes`` (sizes from ``nbytes``), and at most
  ``writes_in_flight`` results queued for the writer;
- with ``failures`` (a dict) an item whose read, compute or write raises is recorded there
  and the others go on; without it the first error is raised once the threads have stopped
  (reads and writes not yet started are cancelled);
- time spent reading, computing and writing is added to the ``reading``, ``compute`` and
  ``writing`` stages (`tasks.stages`); they overlap, so each is a busy time.

This module imports nothing heavy.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import closing
from typing import TypeVar

from tvsplit.tasks.stages import add, stage

__all__ = [
    "READ_AHEAD",
    "READ_AHEAD_BYTES",
    "WRITES_IN_FLIGHT",
    "computed_ahead",
    "may_read_ahead",
    "pipelined",
]

K = TypeVar("K", bound=Hashable)
I = TypeVar("I")  # noqa: E741 (what `read` returns)
O = TypeVar("O")  # noqa: E741 (what `compute` returns)
R = TypeVar("R")

READ_AHEAD = 2  # items read while one is computed: hides a large read behind a small compute
READ_AHEAD_BYTES = 512 << 20  # beyond the next item, no more than this read ahead
WRITES_IN_FLIGHT = 4  # results queued for the writer


def may_read_ahead(
    in_flight: Sequence[int],
    following: int,
    read_ahead: int = READ_AHEAD,
    read_ahead_bytes: int = READ_AHEAD_BYTES,
) -> bool:
    """Whether to start reading an item of `following` bytes while reads of `in_flight`
    bytes are not yet computed: always when nothing is (it is needed next), else while
    fewer than ``read_ahead`` are and all of them fit in ``read_ahead_bytes``."""
    if not in_flight:
        return True
    return len(in_flight) < read_ahead and sum(in_flight) + following <= read_ahead_bytes


def _timed(name: str, function: Callable, *args):
    with stage(name):
        return function(*args)


def _computed(
    items: Sequence[K],
    read: Callable[[K], I],
    compute: Callable[[I], O],
    reading: ThreadPoolExecutor,
    *,
    nbytes: Callable[[K], int] | None,
    release: Callable[[I], None] | None,
    failures: dict[K, Exception] | None,
    read_ahead: int,
    read_ahead_bytes: int,
) -> Iterator[tuple[K, O]]:
    """``(item, compute(read(item)))`` in order, reads running ahead on ``reading``; the one
    core of both pipelines. Closing it early cancels the reads not yet started."""
    sizes = {item: (nbytes(item) if nbytes is not None else 0) for item in items}
    upcoming = deque(items)
    reads: deque[tuple[K, Future]] = deque()

    def start_reads() -> None:
        while upcoming and may_read_ahead(
            [sizes[n] for n, _ in reads], sizes[upcoming[0]], read_ahead, read_ahead_bytes
        ):
            following = upcoming.popleft()
            reads.append((following, reading.submit(_timed, "reading", read, following)))

    try:
        start_reads()
        while reads:
            item, loading = reads.popleft()
            start_reads()  # while this one is computed
            try:
                inputs = loading.result()
            except Exception as error:
                if failures is None:
                    raise
                failures[item] = error
                continue
            try:
                outputs = _timed("compute", compute, inputs)
            except Exception as error:
                if failures is None:
                    raise
                failures[item] = error
                continue
            finally:
                if release is not None:
                    release(inputs)
            yield item, outputs
    finally:  # an error, or the consumer stopped: nothing more is read
        upcoming.clear()
        for _, future in reads:
            future.cancel()


def pipelined(
    items: Sequence[K],
    read: Callable[[K], I],
    compute: Callable[[I], O],
    write: Callable[[O], R],
    *,
    nbytes: Callable[[K], int] | None = None,
    release: Callable[[I], None] | None = None,
    failures: dict[K, Exception] | None = None,
    read_ahead: int = READ_AHEAD,
    read_ahead_bytes: int = READ_AHEAD_BYTES,
    writes_in_flight: int = WRITES_IN_FLIGHT,
) -> list[R]:
    """``write(compute(read(item)))`` for each item, pipelined (see the module's guarantees);
    returns what ``write`` returned for the items written, in order. ``release(inputs)`` is
    called once ``compute`` is done with what ``read`` returned (to reuse its buffers)."""
    results: list[R] = []
    with (
        ThreadPoolExecutor(1, thread_name_prefix="tvsplit-read") as reading,
        ThreadPoolExecutor(1, thread_name_prefix="tvsplit-write") as writing,
    ):
        writes: deque[tuple[K, Future]] = deque()

        def collect(item: K, future: Future) -> None:
            try:
                results.append(future.result())
            except Exception as error:
                if failures is None:
                    raise
                failures[item] = error

        computed = _computed(
            items, read, compute, reading, nbytes=nbytes, release=release, failures=failures,
            read_ahead=read_ahead, read_ahead_bytes=read_ahead_bytes,
        )  # fmt: skip
        try:
            for item, outputs in computed:
                writes.append((item, writing.submit(_timed, "writing", write, outputs)))
                while len(writes) > writes_in_flight:
                    collect(*writes.popleft())
            while writes:
                collect(*writes.popleft())
        except BaseException:
            computed.close()
            for _, future in writes:
                future.cancel()
            raise
    return results


_DONE = object()


def computed_ahead(
    items: Sequence[K],
    read: Callable[[K], I],
    compute: Callable[[I], O],
    *,
    nbytes: Callable[[K], int] | None = None,
    read_ahead: int = READ_AHEAD,
    read_ahead_bytes: int = READ_AHEAD_BYTES,
    queued: int = WRITES_IN_FLIGHT,
    consumer_stage: str = "writing",
) -> Iterator[O]:
    """``compute(read(item))`` for each item, in order, for a caller that writes them itself:
    the same pipeline with the roles of the threads moved, so that the caller's own sink
    needs no callback: reads run ahead on a reader thread, the compute on a compute thread,
    and the caller consumes (writes) the results beside them, at most ``queued`` results
    waiting for it. The caller's time between results is added to ``consumer_stage``. The
    first error is raised to the caller; stopping early (``close``, an exception in the
    caller) stops the threads and reads nothing more."""
    handover: queue.Queue = queue.Queue(maxsize=max(1, queued))
    stop = threading.Event()

    def put(value: object) -> None:
        while not stop.is_set():
            try:
                handover.put(value, timeout=0.1)
                return
            except queue.Full:
                continue

    def produce() -> None:
        try:
            with ThreadPoolExecutor(1, thread_name_prefix="tvsplit-read") as reading:
                computed = _computed(
                    items, read, compute, reading, nbytes=nbytes, release=None, failures=None,
                    read_ahead=read_ahead, read_ahead_bytes=read_ahead_bytes,
                )  # fmt: skip
                with closing(computed):
                    for _, outputs in computed:
                        if stop.is_set():
                            return
                        put((outputs,))
            put(_DONE)
        except BaseException as error:  # handed to the caller
            put(error)

    producer = threading.Thread(target=produce, name="tvsplit-compute", daemon=True)
    producer.start()
    try:
        while True:
            value = handover.get()
            if value is _DONE:
                return
            if isinstance(value, BaseException):
                raise value
            start = time.perf_counter()
            yield value[0]
            add(consumer_stage, time.perf_counter() - start)
    finally:
        stop.set()
        producer.join()
