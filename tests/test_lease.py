"""Leases (storage/lease.py): one holder at a time on local disk, memory:// and S3 (moto_server),
takeover of dead or expired holders, renewal; and two `tvsplit decompose` processes at once."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from tvsplit.storage.catalogue import Catalogue
from tvsplit.storage.decompositions import DecompositionRun, list_runs
from tvsplit.storage.lease import (
    Holder,
    Lease,
    LeaseBusyError,
    LeaseLocation,
    catalogue_leases,
    folder_lease,
    run_key,
    run_lease,
)

# A process that tries once to take a lease and prints whether it got it, then holds it
# until its stdin closes (so that a winner keeps it while the others try).
_TAKE_ONCE = textwrap.dedent(
    """
    import sys
    from tvsplit.storage.catalogue import Catalogue
    from tvsplit.storage.lease import run_lease
    lease = run_lease(Catalogue(sys.argv[1]), "fam", "r1")
    print("got" if lease.try_acquire() else "busy", flush=True)
    sys.stdin.read()
    lease.release()
    """
)


def _foreign(location: LeaseLocation, key: str, *, renewed_ago: float, ttl: float = 60.0) -> bytes:
    """Write the lease of a holder on another host, renewed `renewed_ago` seconds ago (the
    stamps taken from the lease's own clock)."""
    me = Holder.of_this_process(ttl, "x")
    holder = replace(
        me, host="elsewhere", pid=4242, started=me.started - 100, renewed=me.renewed - renewed_ago
    )
    assert location.create(key, holder.to_bytes())
    return holder.to_bytes()


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def _check_semantics(catalogue: Catalogue) -> None:
    """Busy, takeover of an expired and of a dead holder, renewal and release."""
    location = catalogue_leases(catalogue)
    key = run_key("fam", "r1")
    _foreign(location, key, renewed_ago=1)
    lease = run_lease(catalogue, "fam", "r1", ttl=60)
    with pytest.raises(LeaseBusyError, match=r"held by elsewhere pid 4242 \(since .*, x\)"):
        lease.acquire(wait=False)
    assert lease.current().host == "elsewhere"  # refused: untouched
    location.delete(key)

    _foreign(location, key, renewed_ago=120, ttl=60)  # expired: taken over
    assert lease.try_acquire()
    me = lease.current()
    assert (me.host, me.pid) == (socket.gethostname(), os.getpid())
    lease.release()
    assert lease.current() is None and location.read(key) is None

    dead = replace(Holder.of_this_process(3600, ""), pid=_dead_pid(), token="t")
    assert location.create(key, dead.to_bytes())  # fresh, but its process is gone
    quick = run_lease(catalogue, "fam", "r1", ttl=0.2)
    assert quick.try_acquire()
    first = quick.current()
    deadline = time.monotonic() + 30
    while quick.current().renewed == first.renewed:  # the heartbeat renews it
        assert time.monotonic() < deadline, "lease never renewed"
        time.sleep(0.05)
    assert quick.current().token == first.token and not quick.lost
    # Someone else took it: the holder notices at its next renewal. (A renewal that read
    # its own lease just before the other's write still rewrites it: write until noticed.)
    deadline = time.monotonic() + 60
    while not quick.lost:
        assert time.monotonic() < deadline, "a lost lease not noticed"
        location.write(key, _foreign_bytes())
        time.sleep(0.1)
    quick.release()
    assert Holder.from_bytes(location.read(key)).host == "elsewhere"  # not ours: left alone
    location.delete(key)


def _foreign_bytes() -> bytes:
    return replace(
        Holder.of_this_process(60, ""), host="elsewhere", pid=1, token="other"
    ).to_bytes()


def test_lease_semantics_on_local_disk(tmp_path):
    catalogue = Catalogue(str(tmp_path / "catalogue.zarr"))
    _check_semantics(catalogue)
    leases = tmp_path / "catalogue.zarr" / "leases"
    assert json.loads((leases / "zarr.json").read_text())["node_type"] == "group"


def test_lease_semantics_on_memory_store():
    _check_semantics(Catalogue(f"memory://lease-{uuid.uuid4().hex[:8]}/catalogue.zarr"))


def test_nested_claims_in_one_process_release_once(tmp_path):
    catalogue = Catalogue(str(tmp_path / "catalogue.zarr"))
    outer = run_lease(catalogue, "fam", "r1").acquire()
    inner = run_lease(catalogue, "fam", "r1").acquire(wait=False)
    inner.release()
    assert outer.current() is not None  # still held by the outer claim
    outer.release()
    assert outer.current() is None


def _race(url: str, env: dict[str, str] | None = None, processes: int = 4) -> list[str]:
    """`processes` processes try to take the same free lease at once; their answers."""
    children = [
        subprocess.Popen(
            [sys.executable, "-c", _TAKE_ONCE, url],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, **(env or {})},
        )
        for _ in range(processes)
    ]
    answers = [child.stdout.readline().strip() for child in children]
    for child in children:
        child.communicate("")
        assert child.returncode == 0
    return answers


def test_exactly_one_of_racing_processes_gets_a_local_lease(tmp_path):
    answers = _race(str(tmp_path / "catalogue.zarr"))
    assert sorted(answers) == ["busy", "busy", "busy", "got"]


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    from servers import moto_s3

    with moto_s3(tmp_path_factory.mktemp("moto-logs")) as (_, env):
        yield env


def test_lease_on_s3_is_a_conditional_write(s3, monkeypatch):
    """On S3 (moto_server) the lease is taken with ``If-None-Match: *``: a second create of
    the same key fails, and of racing processes exactly one wins."""
    import s3fs

    for key, value in s3.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("TVSPLIT_STORAGE_OPTIONS", raising=False)
    s3fs.S3FileSystem.clear_instance_cache()
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    bucket = f"lease-{uuid.uuid4().hex[:8]}"
    fs.mkdir(bucket)
    url = f"s3://{bucket}/catalogue.zarr"
    location = catalogue_leases(Catalogue(url))
    assert location.create("k.json", b"1") and not location.create("k.json", b"2")
    assert location.read("k.json") == b"1"
    # Renewal, takeover and release are conditional writes (If-Match on the ETag read).
    assert not location.replace_if("k.json", b"0", b"3") and location.read("k.json") == b"1"
    assert location.replace_if("k.json", b"1", b"3") and location.read("k.json") == b"3"
    assert not location.delete_if("k.json", b"1") and location.read("k.json") == b"3"
    assert location.delete_if("k.json", b"3") and location.read("k.json") is None
    assert not location.replace_if("k.json", b"3", b"4") and location.read("k.json") is None
    _check_semantics(Catalogue(url))
    assert sorted(_race(url, s3)) == ["busy", "busy", "busy", "got"]


def test_folder_lease_is_beside_the_folder(tmp_path):
    lease = folder_lease(tmp_path / "model").acquire()
    assert (tmp_path / ".model.lease").is_file()
    lease.release()
    assert not (tmp_path / ".model.lease").exists()


# -- two `tvsplit decompose` processes at once ----------------------------------------------------
def _family(url: str) -> None:
    from tvsplit.tasks.synthetic import planted_family

    cat = Catalogue(url)
    shapes = {"blocks.0.mlp.weight": (40, 24), "blocks.0.attn.weight": (24, 24)}
    deltas = {
        name: planted_family(*shape, 3, shared_rank=2, unique_rank=2, noise=0.02, seed=i).deltas
        for i, (name, shape) in enumerate(shapes.items())
    }
    for member in [None, "m0", "m1", "m2"]:
        writer = cat.writer("fam", member, {"source": f"synthetic:{member}"})
        for name, stack in deltas.items():
            value = torch.zeros_like(stack[0]) if member is None else stack[int(member[1])]
            writer.write(name, value, {"source": "synthetic"})
        writer.finish(list(deltas), {"source": f"synthetic:{member}"})


def _decompose(url: str, tmp_path: Path, *flags: str) -> subprocess.Popen:
    env = {**os.environ, "TVSPLIT_DATA": str(tmp_path / "data"), "TVSPLIT_CATALOGUE": url}
    return subprocess.Popen(
        [sys.executable, "-m", "tvsplit.cli", "decompose", "fam", "--no-track", *flags],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def _stored(url: str) -> dict[str, dict[str, torch.Tensor]]:
    cat = Catalogue(url)
    (run, attrs), *others = list_runs(cat, "fam")
    assert not others and attrs["status"] == "complete"
    store = DecompositionRun(cat, "fam", run)
    return {name: store.read_parameter(name).arrays for name in attrs["parameters"]}


@pytest.mark.slow  # three CLI processes, each with its own Prefect server: minutes on 2 cores
def test_a_second_decompose_refuses_or_waits_for_the_holder(prefect_harness, tmp_path):
    from tvsplit.flows.decompose import run_decompose

    single, shared = str(tmp_path / "single.zarr"), str(tmp_path / "shared.zarr")
    _family(single)
    _family(shared)
    run = run_decompose("fam", catalogue_url=single, track=False, show_progress=False).run
    holder = run_lease(Catalogue(shared), "fam", run).acquire()  # this test holds it
    refused = _decompose(shared, tmp_path, "--no-wait")
    _, err = refused.communicate(timeout=600)
    assert refused.returncode == 1
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert f"held by {socket.gethostname()} pid {os.getpid()}" in lines[0]
    assert "Traceback" not in err and list_runs(Catalogue(shared), "fam") == []

    both = [_decompose(shared, tmp_path), _decompose(shared, tmp_path)]  # wait for the holder
    deadline = time.monotonic() + 600
    waiting = 0
    for process in both:  # each says once who it waits for, then blocks on our lease
        line = process.stderr.readline()
        while line and "waiting" not in line:
            assert time.monotonic() < deadline
            line = process.stderr.readline()
        waiting += f"pid {os.getpid()}" in line
    assert waiting == 2, line
    assert list_runs(Catalogue(shared), "fam") == []
    holder.release()
    for process in both:
        _, err = process.communicate(timeout=600)
        assert process.returncode == 0, err
        assert "failed" not in err and "Traceback" not in err
    expected, got = _stored(single), _stored(shared)
    assert got.keys() == expected.keys()
    for name, arrays in expected.items():
        assert arrays.keys() == got[name].keys()
        for key, value in arrays.items():
            assert torch.equal(value, got[name][key]), (name, key)
    assert not list(Path(shared, "leases", "fam").rglob("*.json"))  # both released their claim


def test_acquire_waits_for_a_live_holder_then_takes_the_lease(tmp_path):
    """The edit's output folder claim: a second writer waits (told once who holds it) and
    takes the lease as soon as the holder gives it back."""
    import threading

    lease = folder_lease(tmp_path / "model")
    _foreign(lease.location, lease.key, renewed_ago=0)  # alive, on another host
    told: list[Holder | None] = []
    taken = threading.Event()

    def claim() -> None:
        lease.acquire(on_wait=told.append, poll=0.05)
        taken.set()

    thread = threading.Thread(target=claim)
    thread.start()
    deadline = time.monotonic() + 30
    while not told:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert told[0].host == "elsewhere" and not taken.is_set()
    lease.location.delete(lease.key)  # the holder finishes
    thread.join(30)
    assert taken.is_set() and len(told) == 1 and lease.current().pid == os.getpid()
    lease.release()


# -- two lease objects racing renewal and takeover (threads, no processes) -----------------------
_NESTING = threading.local()  # store calls made inside another store call


class _Interleaved(LeaseLocation):
    """A lease location that calls ``between`` after each store call a lease's heartbeat
    thread makes: the worst moment for another process to act, whatever the calls are."""

    between: Callable[[], None] = staticmethod(lambda: None)

    def __getattribute__(self, name: str):
        value = super().__getattribute__(name)
        if name not in {"create", "read", "write", "replace_if", "delete_if", "delete"}:
            return value

        def call(*args, **kwargs):
            depth = getattr(_NESTING, "depth", 0)
            _NESTING.depth = depth + 1
            try:
                result = value(*args, **kwargs)
            finally:
                _NESTING.depth = depth
            if depth == 0 and threading.current_thread().name == "tvsplit-lease":
                super(_Interleaved, self).__getattribute__("between")()  # between calls only
            return result

        return call


def _two_views(root: str, fs=None) -> tuple[_Interleaved, LeaseLocation]:
    """Two locations of the same objects under different names, so that two Lease objects
    of one process act as two processes (the in-process nesting is keyed by root)."""
    if fs is None:
        Path(root, "alias").mkdir(parents=True, exist_ok=True)
        return _Interleaved(root), LeaseLocation(f"{root}/alias/..")
    return _Interleaved(root, fs), LeaseLocation(f"memory://{root}", fs)


def _views(kind: str, tmp_path: Path) -> tuple[_Interleaved, LeaseLocation]:
    if kind == "local":
        return _two_views(str(tmp_path / "leases"))
    import fsspec

    return _two_views(f"/race-{uuid.uuid4().hex[:8]}", fsspec.filesystem("memory"))


@pytest.mark.parametrize("kind", ["local", "memory"])
@pytest.mark.parametrize("at_call", [1, 2, 3])
def test_a_renewal_never_overwrites_a_takeover(kind, at_call, tmp_path, monkeypatch):
    """Holder A renews every 50 ms; B, believing A expired, takes the lease over right after
    the ``at_call``-th store call of A's heartbeat (between a read and a write, if a renewal
    were a read then a write). Afterwards B's lease is the one stored, A knows it lost it,
    and A never writes its own lease back: never two holders."""
    first, second = _views(kind, tmp_path)
    key = "fam/decompositions/r1.json"
    a = Lease(first, key, ttl=0.2)
    b = Lease(second, key, ttl=60)
    calls: list[bool] = []

    def take_over() -> None:
        calls.append(True)
        if len(calls) == at_call:
            with monkeypatch.context() as patch:
                patch.setattr(Holder, "stale", lambda self, now=None: True)  # B's view of A
                assert b.try_acquire()

    first.between = take_over
    assert a.try_acquire()
    deadline = time.monotonic() + 10
    while not a.lost:
        assert time.monotonic() < deadline, "A never noticed its lease was taken"
        time.sleep(0.01)
    assert b.holder is not None, "B never took the lease"
    time.sleep(0.15)  # a few more of A's beats, had it kept beating
    assert Holder.from_bytes(second.read(key)).token == b.holder.token
    a.release()  # lost: gives nothing back, deletes nothing
    assert Holder.from_bytes(second.read(key)).token == b.holder.token
    b.release()
    assert second.read(key) is None


@pytest.mark.parametrize("kind", ["local", "memory"])
def test_of_two_racing_takers_exactly_one_takes_an_expired_lease(kind, tmp_path):
    first, second = _views(kind, tmp_path)
    for round_ in range(20):
        key = f"fam/decompositions/t{round_}.json"
        stale = _foreign(first, key, renewed_ago=120, ttl=60)
        takers = [Lease(first, key, ttl=60), Lease(second, key, ttl=60)]
        start = threading.Barrier(2)
        got: dict[int, bool] = {}

        def take(index: int, takers=takers, start=start, got=got) -> None:
            start.wait()
            got[index] = takers[index].try_acquire()

        threads = [threading.Thread(target=take, args=(i,)) for i in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert sorted(got.values()) == [False, True], (round_, got)
        winner = takers[got[1]]
        stored = first.read(key)
        assert stored != stale and Holder.from_bytes(stored).token == winner.holder.token
        winner.release()
        assert first.read(key) is None
