"""The registry of source kinds: how a local file or folder is recognised and opened.

A kind is a name, a ``matches(location)`` test that looks only at names and small headers,
and an ``open(ref, location, allow_pickle=...)`` that returns an `OpenedSource` (a model or
task-vector `Checkpoint`, or a `LoraAdapter`). `storage.sources.open_source` tries the kinds
in order: the specific ones (kohya file, PEFT adapter folder, kohya folder, then every kind
a plugin or caller registered), and last the catch-alls (a weights file, a model folder), so
a new kind never has to out-guess the generic readers. Other installed packages register
kinds through the ``tvsplit.sources`` entry point group (a module that calls
`register_source_kind`), loaded on first lookup.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tvsplit.plugins import load_entry_points

if TYPE_CHECKING:
    from tvsplit.storage.sources import OpenedSource, SourceRef

Opener = Callable[..., "OpenedSource"]


@dataclass(frozen=True)
class SourceKindReader:
    """One registered source kind."""

    name: str
    matches: Callable[[Path], bool]
    open: Opener
    catch_all: bool = False


_KINDS: dict[str, SourceKindReader] = {}


def register_source_kind(
    name: str, matches: Callable[[Path], bool], open: Opener, *, catch_all: bool = False
) -> SourceKindReader:
    """Register a source kind; ValueError when the name is taken. `open` is called as
    ``open(ref, location, allow_pickle=bool)`` for a location `matches` accepted."""
    if name in _KINDS:
        raise ValueError(f"source kind {name!r} is already registered")
    reader = SourceKindReader(name, matches, open, catch_all)
    _KINDS[name] = reader
    return reader


def source_kinds() -> list[SourceKindReader]:
    """Every kind in the order they are tried (plugins loaded first)."""
    load_entry_points("tvsplit.sources")
    kinds = list(_KINDS.values())
    return [k for k in kinds if not k.catch_all] + [k for k in kinds if k.catch_all]


def open_with_kind(ref: SourceRef, location: Path, *, allow_pickle: bool) -> Any:
    """Open `location` with the first kind that matches it (the catch-alls match anything
    that exists)."""
    for kind in source_kinds():
        if kind.matches(location):
            return kind.open(ref, location, allow_pickle=allow_pickle)
    from tvsplit.storage.errors import SourceError

    raise SourceError(f"{location}: no source kind reads it")
