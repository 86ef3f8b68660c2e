"""Provenance helpers: file checksums, timestamps, the tvsplit version."""

from __future__ import annotations

import hashlib
import os
from datetime import UTC, datetime
from functools import cache
from importlib import metadata
from pathlib import Path

_HASHES: dict[tuple[str, int, int], str] = {}
_BLOCK = 4 << 20


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file's bytes, read in 4 MiB blocks (never whole in memory).

    Cached per process by (real path, size, mtime), so a base read by several jobs is
    hashed once; a file changed on disk is hashed again.
    """
    real = os.path.realpath(path)
    stat = os.stat(real)
    key = (real, stat.st_size, stat.st_mtime_ns)
    if key not in _HASHES:
        digest = hashlib.sha256()
        with open(real, "rb") as handle:
            while block := handle.read(_BLOCK):
                digest.update(block)
        _HASHES[key] = digest.hexdigest()
    return _HASHES[key]


def utc_now() -> str:
    """The current UTC time, ISO 8601 to the second."""
    return datetime.now(UTC).isoformat(timespec="seconds")


@cache
def tvsplit_version() -> str:
    """The installed tvsplit version (``0+unknown`` when not installed as a package)."""
    try:
        return metadata.version("tvsplit")
    except metadata.PackageNotFoundError:
        return "0+unknown"
