"""What a source is now, found cheaply: for `sync`, which only ingests what changed.

- A hub repository: its revision resolved to a commit by one API call
  (``huggingface_hub.HfApi.model_info``); nothing is downloaded. Offline, the commit the
  local hub cache holds for that revision.
- A local file or folder: the size and modification time of every file the source reads
  (the same files ingest reads and checksums). Only when one of those changed are the
  files hashed (sha256), and the source counts as changed only if a checksum differs from
  the one recorded at ingest: a touched file with the same bytes is not new.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tvsplit.storage.errors import SourceError, SourceUnavailableError
from tvsplit.storage.provenance import sha256_file
from tvsplit.storage.sources import SourceRef, _open_location, parse_source

Stat = tuple[int, int]  # (size, mtime_ns)


@dataclass
class Revision:
    """A source's current identity: its commit (hub) or its files' stats (local)."""

    source: str
    commit: str | None = None
    stats: dict[str, Stat] = field(default_factory=dict)  # relative file name → stat
    location: Path | None = None

    def record(self) -> dict[str, Any]:
        """The JSON form kept beside the catalogue entry (no checksums: those are the
        entry's own provenance)."""
        return {
            "source": self.source,
            "commit": self.commit,
            "stats": {name: list(stat) for name, stat in self.stats.items()},
        }


def current_revision(source: str, *, allow_pickle: bool = False) -> Revision:
    """The source's identity now (one hub API call, or a stat of each local file)."""
    ref = parse_source(source)
    if ref.is_hub:
        return Revision(source, commit=_hub_commit(ref))
    assert ref.path is not None
    if not ref.path.exists():
        raise SourceError(f"{ref.path}: no such file or folder")
    opened = _open_location(ref, ref.path, allow_pickle=allow_pickle)
    stats = {}
    for path in opened.files:
        stat = os.stat(path)
        stats[opened.relative(path)] = (stat.st_size, stat.st_mtime_ns)
    return Revision(source, stats=stats, location=opened.location)


def changed(
    now: Revision, recorded: Mapping[str, Any] | None, entry_attrs: Mapping[str, Any] | None
) -> tuple[bool, str]:
    """Whether the source differs from what the complete catalogue entry was made from,
    and why. `recorded` is `Revision.record()` from the last sync, `entry_attrs` the
    entry's provenance (its ``commit`` and per-file ``files`` sha256)."""
    if entry_attrs is None:
        return True, "new"
    if entry_attrs.get("source") != now.source:
        return True, "source changed"
    if now.commit is not None:
        old = entry_attrs.get("commit")
        return (old != now.commit, f"commit {str(old)[:12]} → {now.commit[:12]}")
    stats = {k: tuple(v) for k, v in ((recorded or {}).get("stats") or {}).items()}
    if stats == now.stats:
        return False, "unchanged (size and mtime)"
    checksums = dict(entry_attrs.get("files") or {})
    if set(checksums) != set(now.stats):
        return True, "files added or removed"
    assert now.location is not None
    root = now.location if now.location.is_dir() else now.location.parent
    for name, digest in checksums.items():
        path = root / name if now.location.is_dir() else now.location
        if sha256_file(path) != digest:
            return True, f"{name} changed (sha256)"
    return False, "unchanged (sha256; only touched)"


def _hub_commit(ref: SourceRef) -> str:
    """The commit `ref.revision` points at: asked of the hub, or read from the cache
    offline."""
    from huggingface_hub import HfApi, constants, try_to_load_from_cache
    from huggingface_hub.errors import (
        HfHubHTTPError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    assert ref.repo_id is not None and ref.revision is not None
    label = f"hf://{ref.repo_id}@{ref.revision}"
    if not constants.HF_HUB_OFFLINE:
        try:
            info = HfApi().model_info(
                ref.repo_id, revision=ref.revision, token=os.environ.get("HF_TOKEN") or None
            )
        except RepositoryNotFoundError:
            raise SourceError(f"{label}: repository not found or not accessible") from None
        except RevisionNotFoundError:
            raise SourceError(f"{label}: revision not found") from None
        except OfflineModeIsEnabled:
            pass
        except (HfHubHTTPError, OSError) as error:
            raise SourceUnavailableError(f"{label}: {error}") from None
        else:
            if info.sha:
                return info.sha
    cached = try_to_load_from_cache(ref.repo_id, "config.json", revision=ref.revision)
    if isinstance(cached, str):
        return Path(cached).parent.name
    raise SourceUnavailableError(f"{label}: offline and not in the local hub cache")
