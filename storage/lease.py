"""Leases: one process at a time works on a decomposition run or writes an edit's folder.

A lease is a small JSON object naming its holder (host, pid, a random token), when it was
taken and when it was last renewed. It lives in the catalogue (``leases/<family>/<kind>/
<name>.json``; ``leases`` is an empty Zarr group, so nothing that lists the catalogue sees
the lease files) or, for a local folder, beside it (``.<name>.lease``).

Guarantees:

- taking a lease is one atomic create-if-absent: ``O_CREAT | O_EXCL`` on a local disk, a
  conditional write ``If-None-Match: *`` on S3 (s3fs ``pipe_file(mode="create")``; moto
  honours it too), ``mode="create"`` on fsspec's in-memory store. Two processes racing for
  a free lease: exactly one gets it.
- renewing, taking over and releasing are each one conditional replace (or delete): the
  lease object is changed only if it still holds exactly the bytes the caller last saw, in
  one atomic step, so a renewal can never overwrite a lease another process took over, and
  of several takers only one succeeds. The compare is: on a local disk, ``flock`` on the
  lease file itself (every change of the file, and every read, happens under it; a taker
  that deleted or replaced the file is noticed by comparing inodes after locking); on S3,
  ``If-Match`` on the ETag the caller read (``PutObject`` and ``DeleteObject``, which moto
  honours too); on fsspec's in-memory store (one process), a lock.
- while held, a heartbeat thread renews it every ``ttl / 4`` seconds; a renewal whose
  compare fails (another holder took it, or it was removed) marks this one ``lost`` and
  stops for good (the work itself is idempotent, so the worst case is the same result
  written twice by a holder that was paused longer than ``ttl``).
- a lease whose holder is dead (same host: ``storage.folders.pid_alive``) or whose last
  renewal is older than its ``ttl`` is taken over by conditionally replacing the stale
  bytes with the taker's own.
- nothing here knows Prefect, Dask or the math; clocks of different hosts are assumed to
  agree within a small fraction of ``ttl``.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar

from tvsplit.storage.errors import StorageError
from tvsplit.storage.folders import pid_alive
from tvsplit.storage.names import check_node_name

__all__ = [
    "LEASES",
    "LEASE_TTL",
    "Holder",
    "Lease",
    "LeaseBusyError",
    "LeaseLocation",
    "catalogue_leases",
    "folder_lease",
    "run_lease",
]

LEASES = "leases"
#: Seconds without renewal after which a lease of a holder on another host is taken over.
LEASE_TTL = float(os.environ.get("TVSPLIT_LEASE_TTL", "120"))
_TAKEN = ".taken-"  # takeover markers of earlier versions (storage.gc removes them)
_MEMORY_LOCK = threading.Lock()  # the compare of fsspec's in-memory store (one process)
_GROUP_METADATA = b'{"zarr_format": 3, "node_type": "group", "attributes": {}}'


class LeaseBusyError(StorageError):
    """The lease is held by another live process (``holder`` names it)."""

    def __init__(self, message: str, holder: Holder | None) -> None:
        super().__init__(message)
        self.holder = holder


@dataclass(frozen=True)
class Holder:
    """Who holds a lease, since when, and until when it counts as alive without renewal."""

    host: str
    pid: int
    token: str
    started: float
    renewed: float
    ttl: float
    purpose: str = ""

    @classmethod
    def of_this_process(cls, ttl: float, purpose: str) -> Holder:
        now = time.time()
        return cls(socket.gethostname(), os.getpid(), uuid.uuid4().hex, now, now, ttl, purpose)

    def describe(self) -> str:
        """``host pid 1234 (since 2026-12-02 16:40:43 UTC, renewed 3 s ago)``."""
        since = datetime.fromtimestamp(self.started, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
        ago = max(0.0, time.time() - self.renewed)
        what = f", {self.purpose}" if self.purpose else ""
        return f"{self.host} pid {self.pid} (since {since}, renewed {ago:.0f} s ago{what})"

    def stale(self, now: float | None = None) -> bool:
        """True when the holder is known dead (same host, no such process) or its lease
        was not renewed within its ``ttl``."""
        now = time.time() if now is None else now
        same_host = self.host == socket.gethostname()
        if same_host and self.pid != os.getpid() and not pid_alive(self.pid):
            return True
        return now - self.renewed > self.ttl

    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self)).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> Holder | None:
        """The holder a lease object names, or None when it is unreadable (cut short)."""
        try:
            raw = json.loads(data)
            return cls(
                str(raw["host"]), int(raw["pid"]), str(raw["token"]), float(raw["started"]),
                float(raw["renewed"]), float(raw["ttl"]), str(raw.get("purpose", "")),
            )  # fmt: skip
        except (ValueError, KeyError, TypeError):
            return None


class LeaseLocation:
    """Where lease objects live: a local folder, or a prefix of an fsspec file system.

    ``replace_if`` and ``delete_if`` are the conditional primitives: each changes ``key``
    only when it still holds ``expected``, atomically against every other change made
    through this class (see the module's docstring for how, per store)."""

    def __init__(self, root: str, fs: Any = None) -> None:
        self.root = root.rstrip("/")
        self.fs = fs  # None: a local folder, written with os calls

    def path(self, key: str) -> str:
        return f"{self.root}/{key}"

    def _kind(self) -> str:
        if self.fs is None:
            return "local"
        protocols = self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,)
        if "memory" in protocols:
            return "memory"
        if "s3" in protocols or "s3a" in protocols:
            return "s3"
        return "other"

    # -- the primitives ----------------------------------------------------------------------
    def create(self, key: str, data: bytes) -> bool:
        """Create ``key`` holding ``data`` if it does not exist; False if it does (atomic)."""
        path = self.path(key)
        if self.fs is None:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            try:
                handle = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o644)
            except FileExistsError:
                return False
            try:
                fcntl.flock(handle, fcntl.LOCK_EX)  # readers wait until it is written whole
                os.write(handle, data)
                os.fsync(handle)
            finally:
                os.close(handle)
            return True
        lock = _MEMORY_LOCK if self._kind() == "memory" else contextlib.nullcontext()
        try:
            with lock:
                self.fs.pipe_file(path, data, mode="create")
        except FileExistsError:
            return False
        return True

    def read(self, key: str) -> bytes | None:
        path = self.path(key)
        try:
            if self.fs is None:
                with _locked_file(path, fcntl.LOCK_SH) as handle:
                    return None if handle is None else _read_all(handle)
            return self.fs.cat_file(path)
        except FileNotFoundError:
            return None

    def write(self, key: str, data: bytes) -> None:
        """Overwrite ``key`` with ``data`` in one step (a reader sees old or new);
        unconditional: leases change through ``replace_if``."""
        path = self.path(key)
        if self.fs is None:
            partial = f"{path}.{uuid.uuid4().hex[:8]}.partial"
            Path(partial).write_bytes(data)
            os.replace(partial, path)
        else:
            self.fs.pipe_file(path, data)

    def replace_if(self, key: str, expected: bytes, data: bytes) -> bool:
        """Set ``key`` to ``data`` if it holds exactly ``expected`` now; False if it holds
        anything else or nothing (one atomic compare-and-write)."""
        kind = self._kind()
        path = self.path(key)
        if kind == "local":
            with _locked_file(path, fcntl.LOCK_EX) as handle:
                if handle is None or _read_all(handle) != expected:
                    return False
                os.pwrite(handle, data, 0)
                os.ftruncate(handle, len(data))
                os.fsync(handle)
                return True
        if kind == "memory":
            with _MEMORY_LOCK:
                if self.read(key) != expected:
                    return False
                self.fs.pipe_file(path, data)
                return True
        if kind == "s3":
            etag = self._s3_etag_of(path, expected)
            if etag is None:
                return False
            try:
                self.fs.pipe_file(path, data, IfMatch=etag)
            except OSError as error:
                if _precondition_failed(error):
                    return False
                raise
            return True
        # Another store: no atomic compare known; read-compare-write (documented gap).
        if self.read(key) != expected:
            return False
        self.fs.pipe_file(path, data)
        return True

    def delete_if(self, key: str, expected: bytes) -> bool:
        """Delete ``key`` if it holds exactly ``expected`` now (atomic, as ``replace_if``)."""
        kind = self._kind()
        path = self.path(key)
        if kind == "local":
            with _locked_file(path, fcntl.LOCK_EX) as handle:
                if handle is None or _read_all(handle) != expected:
                    return False
                os.unlink(path)  # under the lock: a waiter sees the inode gone
                return True
        if kind == "memory":
            with _MEMORY_LOCK:
                if self.read(key) != expected:
                    return False
                self.delete(key)
                return True
        if kind == "s3":
            etag = self._s3_etag_of(path, expected)
            if etag is None:
                return False
            bucket, object_key, _ = self.fs.split_path(path)
            try:
                self.fs.call_s3("delete_object", Bucket=bucket, Key=object_key, IfMatch=etag)
            except OSError as error:
                if _precondition_failed(error):
                    return False
                raise
            finally:
                self.fs.invalidate_cache(path)
            return True
        if self.read(key) != expected:
            return False
        self.delete(key)
        return True

    def _s3_etag_of(self, path: str, expected: bytes) -> str | None:
        """The ETag of ``path`` when its content is ``expected``, else None. Two HEADs around
        one GET: equal ETags prove the bytes read are the version that ETag names."""
        for _ in range(5):
            try:
                self.fs.invalidate_cache(path)
                before = self.fs.info(path)["ETag"]
                data = self.fs.cat_file(path)
                self.fs.invalidate_cache(path)
                after = self.fs.info(path)["ETag"]
            except FileNotFoundError:
                return None
            if before == after:
                return before if data == expected else None
        return None  # changing under us all the time: certainly not ours any more

    def delete(self, key: str) -> None:
        path = self.path(key)
        with contextlib.suppress(FileNotFoundError):
            if self.fs is None:
                os.unlink(path)
            else:
                self.fs.rm_file(path)

    def modified(self, key: str) -> float | None:
        """When ``key`` was last written (epoch seconds), None when unknown or absent."""
        path = self.path(key)
        try:
            if self.fs is None:
                return os.stat(path).st_mtime
            return self.fs.modified(path).timestamp()
        except (FileNotFoundError, NotImplementedError, AttributeError, OSError):
            return None

    def keys(self, prefix: str = "") -> list[str]:
        """Every object under ``prefix`` (leases, takeover markers, partial renewals), as
        keys relative to the location's root."""
        base = self.path(prefix).rstrip("/")
        if self.fs is None:
            found = [str(p) for p in Path(base).rglob("*") if p.is_file()]
        else:
            try:
                found = list(self.fs.find(base))
            except FileNotFoundError:
                return []
        root = self.root if self.fs is None else self.fs._strip_protocol(self.root)
        keys = [p[len(root) + 1 :] for p in found if p.startswith(root + "/")]
        return sorted(k for k in keys if k != "zarr.json")

    def ensure_group(self) -> None:
        """Mark the leases folder as an empty Zarr group, so listing the catalogue's root
        does not warn about an unknown object (its contents are never listed by Zarr)."""
        self.create("zarr.json", _GROUP_METADATA)


@contextlib.contextmanager
def _locked_file(path: str, mode: int) -> Iterator[int | None]:
    """A descriptor of the file at ``path`` under ``flock(mode)``, checked after locking to
    still be the file at ``path`` (not one deleted or replaced meanwhile); None if absent."""
    while True:
        try:
            handle = os.open(path, os.O_RDWR if mode == fcntl.LOCK_EX else os.O_RDONLY)
        except FileNotFoundError:
            yield None
            return
        try:
            fcntl.flock(handle, mode)
            try:
                current = os.stat(path).st_ino == os.fstat(handle).st_ino
            except FileNotFoundError:
                current = False
            if current:
                yield handle
                return
        finally:
            os.close(handle)  # closing gives the lock back


def _read_all(handle: int) -> bytes:
    size = os.fstat(handle).st_size
    return os.pread(handle, size, 0)


def _precondition_failed(error: OSError) -> bool:
    """True when an S3 call was refused because its ``If-Match`` did not hold (or the object
    was gone)."""
    if isinstance(error, FileNotFoundError):
        return True
    cause = getattr(error.__cause__, "response", None) or {}
    code = str(cause.get("Error", {}).get("Code", ""))
    return code in ("PreconditionFailed", "412", "NoSuchKey", "404") or (
        error.errno == errno.EINVAL and "precondition" in str(error).lower()
    )


def catalogue_leases(catalogue: Any) -> LeaseLocation:
    """The lease location of a `storage.catalogue.Catalogue` (its ``leases/`` prefix)."""
    from tvsplit.storage.object_store import protocol, storage_options

    url = str(catalogue.url)
    if protocol(url) in (None, "file"):
        return LeaseLocation(str(Path(url.removeprefix("file://")) / LEASES))
    from fsspec.core import url_to_fs

    options = storage_options(url, getattr(catalogue, "options", None)) or {}
    fs, path = url_to_fs(url, **options)
    return LeaseLocation(f"{path.rstrip('/')}/{LEASES}", fs)


def run_key(family: str, run: str) -> str:
    """The lease key of decomposition run ``run`` of ``family``."""
    return f"{check_node_name('family', family)}/decompositions/{check_node_name('run', run)}.json"


class Lease:
    """One lease ``key`` at ``location``; a context manager that acquires and releases it.

    Acquiring a lease this process already holds (a CLI that claimed a run before starting
    the flow engine, then the flow claiming it again) nests: only the outermost release
    gives it up.
    """

    _held: ClassVar[dict[tuple[str, str], list[Any]]] = {}  # (root, key) → [lease, depth]
    _held_lock = threading.Lock()

    def __init__(
        self,
        location: LeaseLocation,
        key: str,
        *,
        ttl: float = LEASE_TTL,
        purpose: str = "",
        label: str | None = None,
    ) -> None:
        self.location, self.key, self.ttl, self.purpose = location, key, ttl, purpose
        self.label = label or key
        self.holder: Holder | None = None
        self.lost = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._outer: Lease | None = None
        self._written = b""  # the lease object's bytes as this holder last wrote them

    # -- inspecting --------------------------------------------------------------------------
    def current(self) -> Holder | None:
        """The holder the lease object names now (None: free, or unreadable)."""
        data = self.location.read(self.key)
        return None if data is None else Holder.from_bytes(data)

    def busy_message(self, holder: Holder | None) -> str:
        who = holder.describe() if holder is not None else "a process whose lease is being written"
        return f"{self.label} is held by {who}"

    # -- taking and giving back ---------------------------------------------------------------
    def __enter__(self) -> Lease:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()

    def try_acquire(self) -> bool:
        """Take the lease if it is free or stale; False if a live holder has it."""
        registry = (self.location.root, self.key)
        with Lease._held_lock:
            held = Lease._held.get(registry)
            if held is not None:
                held[1] += 1
                self._outer, self.holder = held[0], held[0].holder
                return True
        me = Holder.of_this_process(self.ttl, self.purpose)
        mine = me.to_bytes()
        if not self.location.create(self.key, mine):
            data = self.location.read(self.key)
            if data is None:  # released meanwhile: try again at once
                if not self.location.create(self.key, mine):
                    return False
            elif not self._is_stale(Holder.from_bytes(data)):
                return False
            elif not self.location.replace_if(self.key, data, mine):
                return False  # renewed, released or taken by another taker meanwhile
        self.holder, self._written = me, mine
        with Lease._held_lock:
            Lease._held[registry] = [self, 1]
        self._thread = threading.Thread(target=self._beat, name="tvsplit-lease", daemon=True)
        self._thread.start()
        return True

    def acquire(
        self,
        *,
        wait: bool = True,
        on_wait: Callable[[Holder | None], None] | None = None,
        poll: float = 2.0,
    ) -> Lease:
        """Take the lease; while a live holder has it, wait (``on_wait`` is called once with
        that holder) or, without ``wait``, raise LeaseBusyError naming the holder."""
        told = False
        while not self.try_acquire():
            holder = self.current()
            if not wait:
                raise LeaseBusyError(self.busy_message(holder), holder)
            if not told and on_wait is not None:
                on_wait(holder)
                told = True
            time.sleep(poll)
        return self

    def release(self) -> None:
        """Give the lease back (delete it if it is still ours); nested holds only unwind."""
        registry = (self.location.root, self.key)
        with Lease._held_lock:
            held = Lease._held.get(registry)
            if held is None:
                return
            held[1] -= 1
            if held[1] > 0:
                return
            del Lease._held[registry]
        owner = self._outer or self
        owner._stop.set()
        if owner._thread is not None:
            owner._thread.join()
        if owner.holder is not None and not owner.lost:
            owner.location.delete_if(self.key, owner._written)  # never another holder's

    # -- internals -----------------------------------------------------------------------------
    def _is_stale(self, holder: Holder | None) -> bool:
        if holder is not None:
            return holder.stale()
        written = self.location.modified(self.key)  # unreadable: being written, or cut short
        return written is None or time.time() - written > self.ttl

    def _beat(self) -> None:
        assert self.holder is not None
        interval = max(0.05, self.ttl / 4)
        while not self._stop.wait(interval):
            renewed = Holder(**{**asdict(self.holder), "renewed": time.time()})
            data = renewed.to_bytes()
            try:
                if not self.location.replace_if(self.key, self._written, data):
                    self.lost = True  # taken over or removed: never written again
                    return
            except Exception:  # a transient store error: try again at the next beat
                continue
            self.holder, self._written = renewed, data


def run_lease(catalogue: Any, family: str, run: str, *, ttl: float = LEASE_TTL) -> Lease:
    """The lease of decomposition run ``run`` of ``family`` in ``catalogue``."""
    location = catalogue_leases(catalogue)
    location.ensure_group()
    return Lease(
        location,
        run_key(family, run),
        ttl=ttl,
        purpose=f"decompose {family}",
        label=f"decomposition run {family}/{run}",
    )


def folder_lease(target: str | Path, *, ttl: float = LEASE_TTL) -> Lease:
    """The lease of a local output folder (``.<name>.lease`` beside it)."""
    target = Path(target).absolute()
    return Lease(
        LeaseLocation(str(target.parent)),
        f".{target.name}.lease",
        ttl=ttl,
        purpose=f"write {target.name}",
        label=f"output folder {target}",
    )
