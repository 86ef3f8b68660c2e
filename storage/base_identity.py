"""A family's base identity: is a model source the base the family was ingested with?

Ingest records, in the base entry's attrs, the base's fingerprint (source, hub commit, the
sha256 of every file it read) and, under ``identity``, each file's real path, size and
modification time beside its sha256 (`identity_record`). ``base_mismatch`` compares another
source with that record: by hub commit when both have one, else by the files' sha256; a
file whose real path, size and modification time match the record is not read again.

Imports no torch.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from tvsplit.storage.provenance import sha256_file

IDENTITY = "identity"


def _stat(path: str) -> dict[str, Any]:
    real = os.path.realpath(path)
    stat = os.stat(real)
    return {"path": real, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def identity_record(opened: Any) -> dict[str, Any]:
    """``{"commit", "files": {name: {sha256, path, size, mtime_ns}}}`` of an opened source
    (`storage.sources.OpenedSource`); the sha256 come from its (cached) checksums."""
    checksums = opened.checksums()
    files = {}
    for path in opened.files:
        name = opened.relative(path)
        files[name] = {"sha256": checksums[name], **_stat(str(path))}
    return {"commit": opened.commit, "files": files}


def _recorded_sha(name: str, path: str, record: Mapping[str, Any]) -> str | None:
    """The recorded sha256 of ``path`` if it is the very file recorded (same real path,
    size and modification time), else None."""
    entry = (record.get("files") or {}).get(name)
    if not isinstance(entry, Mapping):
        return None
    try:
        now = _stat(path)
    except OSError:
        return None
    same = all(entry.get(key) == now[key] for key in ("path", "size", "mtime_ns"))
    return str(entry["sha256"]) if same and entry.get("sha256") else None


def base_mismatch(opened: Any, base_attrs: Mapping[str, Any]) -> str | None:
    """Why the opened source ``opened`` (`storage.sources.OpenedSource`) is not the base
    recorded in ``base_attrs`` (a base entry's attrs), or None when it is, or when the entry
    records no identity."""
    fingerprint = base_attrs.get("fingerprint") or {}
    files = fingerprint.get("files") or {}
    if not files and not fingerprint.get("commit"):
        return None
    if opened.commit and fingerprint.get("commit") == opened.commit:
        return None
    record = base_attrs.get(IDENTITY) or {}
    theirs = {opened.relative(p): str(p) for p in opened.files}
    if set(theirs) != set(files):
        missing = sorted(set(files) - set(theirs)) or sorted(set(theirs) - set(files))
        return (
            f"its files differ: the family's base has {', '.join(sorted(files))}, "
            f"this one {', '.join(sorted(theirs))} (first difference: {missing[0]})"
        )
    for name, path in sorted(theirs.items()):
        digest = _recorded_sha(name, path, record) or sha256_file(path)
        if digest != files[name]:
            return f"{name} has sha256 {digest[:12]}…, the family's base {files[name][:12]}…" + (
                f" (commit {fingerprint['commit']})"
                if fingerprint.get("commit") and fingerprint.get("commit") != opened.commit
                else ""
            )
    return None
