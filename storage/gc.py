"""Garbage collection of a catalogue: ``tvsplit catalogue gc``.

`collect` lists what no complete entry or decomposition refers to, without changing anything;
`remove` deletes what `collect` marked ``remove``. What counts as garbage, per family:

- cached basis packs (``bases/<settings>/<param>/<pack>``) none of whose member fingerprints
  is the current fingerprint of a complete member (re-ingested or removed members); whole
  parameter or settings folders when all their packs are such; ``bases/b-...`` folders of
  the old per-member layout, which nothing reads;
- complete decomposition runs of which a member was removed from the family;
- partial entries, partial staged replacements (``staging/...``), folders an interrupted swap
  set aside (``.old-...``), partial decomposition runs and partial packs: only when nothing
  under them was written for ``grace`` seconds (their files' modification times);
- lease objects of dead or expired holders, and old takeover markers;
- with ``superseded``: complete runs older than the newest complete run with the same
  settings, unless their name is in ``referenced`` (runs an edited model's card or an MLflow
  run names): those are listed as ``keep``.

Guarantees: nothing a running job could be writing is removed. A complete staged entry is
never removed (it is the new data of a half-done swap that the next ingest finishes); a
partial node is removed only once idle for the grace period; a decomposition run is removed
only while `remove` holds its lease (`storage.lease`), so a decompose that is running, or
starts meanwhile, keeps its run. Each node is first marked partial (attr ``removing``) and
then deleted, so a removal cut short leaves nothing that passes for complete; the next
`collect` lists such a node at once. Works on any catalogue location (local, memory://,
s3://): it reads through Zarr and fsspec only.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import zarr
from tvsplit.storage.catalogue import Catalogue, entry_path
from tvsplit.storage.decompositions import list_runs
from tvsplit.storage.errors import CatalogueError
from tvsplit.storage.lease import (
    _TAKEN,
    Holder,
    catalogue_leases,
    run_key,
    run_lease,
)
from tvsplit.storage.object_store import storage_options
from tvsplit.storage.provenance import utc_now
from tvsplit.storage.staging import STAGING
from tvsplit.storage.writes import ATTRS, COMPLETE, PARTIAL, ZARR_JSON, is_complete, node_attrs

__all__ = ["GRACE_HOURS", "KEEP", "REMOVE", "Finding", "collect", "remove"]

GRACE_HOURS = 24.0
REMOVE, KEEP = "remove", "keep"
OLD_BASIS_LAYOUT = "b-"  # per-member basis folders of the first cache layout (never read)
Fingerprint = Callable[[Catalogue, str, str], str]


@dataclass(frozen=True)
class Finding:
    """One node `collect` looked at: its path under the catalogue root, what it is, why it
    goes (or, for a superseded run some card or MLflow run names, why it stays), its bytes."""

    family: str
    path: str
    kind: str
    reason: str
    nbytes: int
    action: str = REMOVE
    run: str | None = None  # a decomposition run: removed only while holding its lease
    lease: bool = False  # a lease object (removed by key, not as a Zarr node)


class _Files:
    """The catalogue's files through fsspec: sizes and modification times under a path."""

    def __init__(self, catalogue: Catalogue) -> None:
        from fsspec.core import url_to_fs

        options = storage_options(catalogue.url, catalogue.options) or {}
        self.fs, root = url_to_fs(catalogue.url, **options)
        self.root = root.rstrip("/")

    def full(self, path: str) -> str:
        return f"{self.root}/{path}"

    def usage(self, path: str) -> tuple[int, float]:
        """(bytes, newest modification time) of every file under ``path``."""
        try:
            found = self.fs.find(self.full(path), detail=True)
        except FileNotFoundError:
            return 0, 0.0
        total, newest = 0, 0.0
        for info in found.values():
            total += int(info.get("size") or 0)
            newest = max(newest, _mtime(info))
        return total, newest

    def children(self, path: str) -> list[str]:
        """Names directly under ``path`` (files and folders)."""
        try:
            listed = self.fs.ls(self.full(path), detail=False)
        except FileNotFoundError:
            return []
        return sorted(str(item).rstrip("/").rsplit("/", 1)[-1] for item in listed)

    def rm(self, path: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm(self.full(path), recursive=True)


def _mtime(info: dict[str, Any]) -> float:
    for key in ("mtime", "LastModified", "last_modified", "created", "modified"):
        value = info.get(key)
        if isinstance(value, datetime):
            return value.timestamp()
        if isinstance(value, int | float):
            return float(value)
    return 0.0


def _idle(files: _Files, path: str, grace: float, now: float) -> tuple[bool, int, str]:
    """(idle for ``grace`` seconds, bytes, how long idle as text) of the files under path."""
    nbytes, newest = files.usage(path)
    idle = now - newest
    return idle > grace, nbytes, f"untouched for {idle / 3600:.1f} h"


def collect(
    catalogue: Catalogue,
    *,
    fingerprint: Fingerprint,
    grace_hours: float = GRACE_HOURS,
    superseded: bool = False,
    referenced: Iterable[str] = (),
    now: float | None = None,
) -> list[Finding]:
    """What `remove` would delete (``action == "remove"``), plus superseded runs kept
    because ``referenced`` names them. ``fingerprint(catalogue, family, member)`` is the
    fingerprint cached bases record (`tasks.decompose_job.member_fingerprint`)."""
    now = time.time() if now is None else now
    grace = grace_hours * 3600
    files = _Files(catalogue)
    found: list[Finding] = []
    named = set(referenced)
    for family in catalogue.families():
        complete = catalogue.members(family)
        present = set(catalogue.members(family, include_partial=True))
        prints = {m: fingerprint(catalogue, family, m) for m in complete}
        found += _entries(catalogue, files, family, grace, now)
        found += _staging(catalogue, files, family, grace, now)
        found += _bases(catalogue, files, family, prints, grace, now)
        found += _runs(catalogue, files, family, present, grace, now, superseded, named)
        found += _leases(catalogue, family, grace, now)
    return found


def _entries(catalogue: Catalogue, files: _Files, family: str, grace: float, now: float):
    for member in [None, *catalogue.members(family, include_partial=True)]:
        info = catalogue.entry(family, member)
        if info is None or info.complete:
            continue
        path = entry_path(family, member)
        idle, nbytes, how = _idle(files, path, grace, now)
        if idle or info.attrs.get("removing"):
            yield Finding(family, path, "partial entry", f"ingest stopped part-way, {how}", nbytes)


def _staging(catalogue: Catalogue, files: _Files, family: str, grace: float, now: float):
    try:
        staging = catalogue.family_group(family, STAGING)
    except CatalogueError:
        return
    base = f"families/{family}/{STAGING}"
    nodes = [("base", staging["base"])] if "base" in staging else []
    if "vectors" in staging:
        vectors = staging["vectors"]
        nodes += [(f"vectors/{name}", group) for name, group in vectors.groups()]
    for name, node in nodes:
        if not isinstance(node, zarr.Group) or is_complete(node):
            continue  # a complete staged entry is a half-done swap: the next ingest ends it
        path = f"{base}/{name}"
        idle, nbytes, how = _idle(files, path, grace, now)
        if idle or node_attrs(node).get("removing"):
            yield Finding(family, path, "staged entry", f"partial replacement, {how}", nbytes)
    for folder in (base, f"{base}/vectors"):
        for name in files.children(folder):
            if name.startswith(".old-"):
                path = f"{folder}/{name}"
                idle, nbytes, how = _idle(files, path, grace, now)
                if idle:
                    yield Finding(
                        family, path, "set-aside entry", f"left by a cut-short swap, {how}", nbytes
                    )


def _bases(
    catalogue: Catalogue,
    files: _Files,
    family: str,
    prints: dict[str, str],
    grace: float,
    now: float,
):
    try:
        bases = catalogue.family_group(family, "bases")
    except CatalogueError:
        return
    current = set(prints.items())
    for key in sorted(name for name, _ in bases.groups()):
        folder = f"families/{family}/bases/{key}"
        if key.startswith(OLD_BASIS_LAYOUT):
            nbytes, _ = files.usage(folder)
            yield Finding(
                family, folder, "old basis cache", "per-member layout, never read", nbytes
            )
            continue
        settings_group = bases[key]
        assert isinstance(settings_group, zarr.Group)
        params = sorted(settings_group.groups())
        per_settings: list[Finding] = []
        for param, group in params:
            per_param: list[Finding] = []
            packs = sorted(group.arrays())
            listed = {pack for pack, _ in packs}
            # Chunks of a pack whose write stopped before its metadata: no node, only files.
            orphans = [
                name
                for name in files.children(f"{folder}/{param}")
                if name not in listed and name != ZARR_JSON
            ]
            for orphan in orphans:
                path = f"{folder}/{param}/{orphan}"
                idle, nbytes, how = _idle(files, path, grace, now)
                if idle:
                    per_param.append(
                        Finding(
                            family, path, "basis pack", f"cut short, no metadata, {how}", nbytes
                        )
                    )
            for pack, array in packs:
                path = f"{folder}/{param}/{pack}"
                attrs = node_attrs(array)
                if attrs.get("status") != COMPLETE:
                    idle, nbytes, how = _idle(files, path, grace, now)
                    if idle or attrs.get("removing"):
                        per_param.append(
                            Finding(family, path, "basis pack", f"partial, {how}", nbytes)
                        )
                    continue
                made_from = {(e.get("member"), e.get("fingerprint")) for e in attrs["entries"]}
                if not made_from & current:
                    nbytes, _ = files.usage(path)
                    members = ", ".join(sorted(str(m) for m, _ in made_from))
                    per_param.append(
                        Finding(
                            family,
                            path,
                            "basis pack",
                            f"superseded: no complete member has the fingerprint it was made "
                            f"from ({members})",
                            nbytes,
                        )
                    )
            children = len(packs) + len(orphans)
            if children and len(per_param) == children:  # the whole parameter folder goes
                nbytes, _ = files.usage(f"{folder}/{param}")
                per_param = [
                    Finding(
                        family,
                        f"{folder}/{param}",
                        "basis packs",
                        f"{children} pack(s): " + "; ".join(sorted({f.reason for f in per_param})),
                        nbytes,
                    )
                ]
            per_settings += per_param
        whole = [f for f in per_settings if f.kind == "basis packs"]
        if params and len(whole) == len(params):
            nbytes, _ = files.usage(folder)
            reasons = sorted({f.reason.split(": ", 1)[-1] for f in whole})
            yield Finding(
                family, folder, "basis cache",
                f"{len(params)} parameter(s), every pack unused: " + "; ".join(reasons), nbytes,
            )  # fmt: skip
        else:
            yield from per_settings


def _runs(
    catalogue: Catalogue,
    files: _Files,
    family: str,
    present: set[str],
    grace: float,
    now: float,
    superseded: bool,
    referenced: set[str],
):
    location = catalogue_leases(catalogue)
    newest: dict[str, tuple[str, str]] = {}  # settings → (completed, run)
    kept: list[tuple[str, dict[str, Any]]] = []
    for run, attrs in list_runs(catalogue, family):
        path = f"families/{family}/decompositions/{run}"
        data = location.read(run_key(family, run))
        holder = Holder.from_bytes(data) if data is not None else None
        if holder is not None and not holder.stale():
            continue  # a live decompose holds it
        if attrs.get("status") != COMPLETE:
            idle, nbytes, how = _idle(files, path, grace, now)
            if idle or attrs.get("removing"):
                yield Finding(
                    family, path, "decomposition", f"unfinished run, {how}", nbytes, run=run
                )
            continue
        removed = sorted(set(attrs.get("members", [])) - present)
        if removed:
            nbytes, _ = files.usage(path)
            yield Finding(
                family, path, "decomposition", f"member(s) removed: {', '.join(removed)}",
                nbytes, run=run,
            )  # fmt: skip
            continue
        kept.append((run, attrs))
        settings = json.dumps(attrs.get("settings", {}), sort_keys=True)
        stamp = str(attrs.get("completed") or attrs.get("started") or "")
        if settings not in newest or (stamp, run) > newest[settings]:
            newest[settings] = (stamp, run)
    if not superseded:
        return
    for run, attrs in kept:
        settings = json.dumps(attrs.get("settings", {}), sort_keys=True)
        latest = newest[settings][1]
        if run == latest:
            continue
        path = f"families/{family}/decompositions/{run}"
        nbytes, _ = files.usage(path)
        if run in referenced:
            yield Finding(
                family, path, "decomposition",
                f"superseded by {latest}, but an edited model or MLflow run names it", nbytes,
                action=KEEP, run=run,
            )  # fmt: skip
        else:
            yield Finding(
                family, path, "decomposition", f"superseded by {latest} (same settings)",
                nbytes, run=run,
            )  # fmt: skip


def _leases(catalogue: Catalogue, family: str, grace: float, now: float):
    location = catalogue_leases(catalogue)
    for key in location.keys(f"{family}/"):
        data = location.read(key)
        if data is None:
            continue
        if key.endswith(".json"):
            holder = Holder.from_bytes(data)
            if holder is not None and holder.stale():  # liveness is about the real now
                yield Finding(
                    family, key, "lease", f"holder {holder.host} pid {holder.pid} gone",
                    len(data), lease=True,
                )  # fmt: skip
            continue
        written = location.modified(key) or 0.0
        if (_TAKEN in key or key.endswith(".partial")) and now - written > grace:
            yield Finding(family, key, "lease marker", "left by a takeover", len(data), lease=True)


def remove(catalogue: Catalogue, findings: Sequence[Finding]) -> int:
    """Delete every finding marked ``remove``; returns the bytes freed. A decomposition run
    is deleted only while holding its lease; one some process claimed meanwhile is skipped
    (and not counted)."""
    files = _Files(catalogue)
    location = catalogue_leases(catalogue)
    freed = 0
    for finding in findings:
        if finding.action != REMOVE:
            continue
        if finding.lease:
            location.delete(finding.path)
            freed += finding.nbytes
            continue
        lease = run_lease(catalogue, finding.family, finding.run) if finding.run else None
        if lease is not None and not lease.try_acquire():
            continue
        try:
            _demote(catalogue, finding.path)
            files.rm(finding.path)
        finally:
            if lease is not None:
                lease.release()
        freed += finding.nbytes
    return freed


def _demote(catalogue: Catalogue, path: str) -> None:
    """Mark the node at ``path`` partial (``removing``) before its files go, so a removal
    cut short leaves nothing marked complete."""
    root = catalogue._open(write=True)
    assert root is not None
    try:
        node = root[path]
    except KeyError:
        return
    attrs = node_attrs(node)
    if attrs or node.attrs.get(ATTRS) is not None:
        node.attrs[ATTRS] = {**attrs, "status": PARTIAL, "removing": utc_now()}
