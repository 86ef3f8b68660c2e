"""Check every stored array of a catalogue (or of one family): ``tvsplit catalogue verify``.

For each complete node (a base or member entry, a decomposition run's parameter, a cached
basis pack) every array's chunks are checked against the manifest recorded at completion
(by key) and fully decoded (each chunk's CRC-32C checked). Incomplete nodes are skipped: a
reader never trusts them anyway.

Guarantee: a row is ``ok`` only if every array of the node read back with matching
checksums and no manifest chunk was missing; ``unchecked`` means the node was written
before manifests (it reads, but nothing proves it is intact); ``damaged`` names the first
bad array and what to do.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import zarr
from tvsplit.storage.catalogue import Catalogue, entry_label
from tvsplit.storage.errors import CatalogueError
from tvsplit.storage.integrity import (
    MANIFEST,
    IntegrityError,
    IntegrityWarning,
    has_checksums,
    manifest_of,
    read_checked,
)
from tvsplit.storage.writes import is_complete, node_attrs

__all__ = ["VerifyRow", "verify_catalogue"]

OK, UNCHECKED, DAMAGED = "ok", "unchecked", "damaged"


@dataclass(frozen=True)
class VerifyRow:
    """One checked node: what it is, how many arrays and bytes were read, and the verdict."""

    family: str
    node: str
    arrays: int
    nbytes: int
    status: str
    detail: str = ""


def _check_arrays(group: zarr.Group, label: str, *, group_manifest: bool) -> tuple[int, int, str]:
    """(arrays, bytes, status) of one complete node; raises IntegrityError when damaged."""
    attrs = node_attrs(group)
    arrays = nbytes = 0
    unchecked = False
    for key, array in group.arrays():
        own = attrs if group_manifest else node_attrs(array)
        manifest = manifest_of(own, key if group_manifest else None)
        unchecked |= manifest is None or not has_checksums(array)
        read_checked(array, manifest, f"{label}: array {key!r}")
        arrays += 1
        nbytes += array.nbytes
    if group_manifest and isinstance(attrs.get(MANIFEST), dict):
        missing = sorted(set(attrs[MANIFEST]) - {key for key, _ in group.arrays()})
        if missing:
            raise IntegrityError(f"{label}: array {missing[0]!r} is missing")
    return arrays, nbytes, UNCHECKED if unchecked else OK


def _row(family: str, node: str, group: zarr.Group, label: str, *, whole: bool) -> VerifyRow:
    try:
        arrays, nbytes, status = _check_arrays(group, label, group_manifest=whole)
    except IntegrityError as error:
        return VerifyRow(family, node, 0, 0, DAMAGED, str(error))
    return VerifyRow(family, node, arrays, nbytes, status)


def _children(group: zarr.Group) -> Iterator[tuple[str, zarr.Group]]:
    yield from sorted(group.groups(), key=lambda item: item[0])


def verify_catalogue(catalogue: Catalogue, family: str | None = None) -> list[VerifyRow]:
    """One row per complete node of ``family`` (default: every family)."""
    families = [family] if family is not None else catalogue.families()
    if family is not None and family not in catalogue.families():
        raise CatalogueError(f"{catalogue.url}: no family {family!r}")
    rows: list[VerifyRow] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", IntegrityWarning)  # the table says `unchecked`
        for name in families:
            rows.extend(_verify_family(catalogue, name))
    return rows


def _verify_family(catalogue: Catalogue, family: str) -> Iterator[VerifyRow]:
    for member in [None, *catalogue.members(family)]:
        info = catalogue.entry(family, member)
        if info is None or not info.complete:
            continue
        group = catalogue._complete_group(family, member)
        label = f"{catalogue.url}: entry {entry_label(family, member)}"
        yield _row(family, entry_label(family, member), group, label, whole=False)
    for folder in ("decompositions", "bases"):
        try:
            top = catalogue.family_group(family, folder)
        except CatalogueError:
            continue
        for first, sub in _children(top):
            for second, node in _children(sub):
                if not is_complete(node) and folder == "decompositions":
                    continue
                path = f"{family}/{folder}/{first}/{second}"
                if folder == "decompositions":
                    yield _row(family, path, node, path, whole=True)
                else:  # bases/<settings>/<param>/<pack>: each pack an array of its own
                    yield from _verify_packs(family, path, node)


def _verify_packs(family: str, path: str, group: zarr.Group) -> Iterator[VerifyRow]:
    for key, array in sorted(group.arrays(), key=lambda item: item[0]):
        attrs = node_attrs(array)
        if not is_complete(array):
            continue
        label = f"{path}/{key}"
        manifest = manifest_of(attrs)
        try:
            read_checked(array, manifest, label)
        except IntegrityError as error:
            yield VerifyRow(family, label, 0, 0, DAMAGED, str(error))
            continue
        status = OK if manifest is not None and has_checksums(array) else UNCHECKED
        yield VerifyRow(family, label, 1, array.nbytes, status)
