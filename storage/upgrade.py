"""``tvsplit catalogue upgrade``: rewrite a catalogue of an older format as the current one.

What it does, per family (format 1 → 2, `storage.writes.FORMAT_VERSION`):

- every complete **entry** (base, members) with an array lacking its CRC-32C codec or its
  chunk manifest is copied, array by array and attrs unchanged, into a staged replacement
  beside it (`Catalogue.writer(..., staged=True)`), written by the current write protocol;
  only once complete does it take the live entry's place (`Catalogue.promote`);
- every complete **decomposition parameter** without a manifest is written again the same
  way: staged group first, swapped in only when complete (`storage.staging.swap_in`);
- every complete **cached basis pack** without a manifest is written again under a new key
  beside the old one, and the old pack is removed after;
- last, the root is marked with the current format version.

Guarantees: nothing is removed before its replacement is complete, so a kill at any point
leaves a catalogue that reads (old nodes as before, upgraded ones checked); rerunning
finishes the job (a half-done swap is completed, a partial staged copy resumed) and an
upgraded catalogue is left as it is (idempotent). Values are copied exactly (float32 in,
float32 out). Incomplete nodes are not touched (an ingest or decomposition rerun finishes
them) and are reported. A catalogue of a newer format than this code is refused.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import zarr
from tvsplit.storage.catalogue import Catalogue, entry_label
from tvsplit.storage.errors import CatalogueError
from tvsplit.storage.integrity import MANIFEST, has_checksums, manifest_of
from tvsplit.storage.names import param_name
from tvsplit.storage.provenance import tvsplit_version, utc_now
from tvsplit.storage.staging import recover, staged_path, swap_in
from tvsplit.storage.writes import (
    FORMAT_VERSION,
    is_complete,
    mark_format,
    node_attrs,
    write_array,
    write_group,
)

__all__ = ["UpgradeReport", "upgrade_catalogue"]

#: suffix of a basis pack written again by the upgrade (beside the pack it replaces)
UPGRADED_PACK = "-v2"


@dataclass
class UpgradeReport:
    """What the upgrade did: formats before and after, nodes rewritten, nodes left alone."""

    url: str
    before: int | None
    after: int
    entries: list[str] = field(default_factory=list)
    run_parameters: int = 0
    packs: int = 0
    skipped: list[str] = field(default_factory=list)  # incomplete nodes, with the reason

    @property
    def changed(self) -> bool:
        return bool(self.entries or self.run_parameters or self.packs) or self.before != self.after


def _current(array: zarr.Array, manifest: object) -> bool:
    return manifest is not None and has_checksums(array)


def _stored_attrs(node: zarr.Group | zarr.Array) -> dict:
    attrs = node_attrs(node)
    attrs.pop("status", None)
    attrs.pop(MANIFEST, None)
    return attrs


def _data(array: zarr.Array, attrs: dict) -> np.ndarray | None:
    """The array's values (None for an all-zero array stored without chunks)."""
    if attrs.get("kind") == "zero":
        return None
    return np.ascontiguousarray(array[...], dtype=np.float32)


def _upgrade_entry(
    catalogue: Catalogue, family: str, member: str | None, report: UpgradeReport
) -> None:
    label = entry_label(family, member)
    catalogue.recover_staged(family, member)  # a swap a killed upgrade left half done
    info = catalogue.entry(family, member)
    if info is None:
        return
    if not info.complete:
        report.skipped.append(f"{label}: incomplete (rerun the ingest to finish it)")
        return
    group = catalogue._complete_group(family, member)
    arrays = dict(group.arrays())
    if all(_current(a, manifest_of(node_attrs(a))) for a in arrays.values()):
        return
    writer = catalogue.writer(family, member, info.attrs.get("fingerprint", {}), staged=True)
    done = writer.completed()
    parameters = list(info.attrs["parameters"])
    for key, array in arrays.items():
        name = param_name(key)
        if name in done:
            continue  # copied by an upgrade that was stopped
        attrs = _stored_attrs(array)
        writer.copy_array(name, _data(array, attrs), attrs, shape=array.shape)
    entry_attrs = _stored_attrs(group)
    entry_attrs.pop("parameters", None)
    writer.finish(parameters, {**entry_attrs, "upgraded": utc_now()})
    catalogue.promote(family, member)
    report.entries.append(label)


def _upgrade_runs(catalogue: Catalogue, family: str, report: UpgradeReport) -> None:
    try:
        runs = catalogue.family_group(family, "decompositions")
    except CatalogueError:
        return
    root = catalogue._open(write=True)
    assert root is not None
    for run, group in sorted(runs.groups()):
        for key, sub in sorted(group.groups()):
            live = f"families/{family}/decompositions/{run}/{key}"
            if recover(root, live):
                sub = root[live]
            if not is_complete(sub):
                report.skipped.append(
                    f"{family}/decompositions/{run}/{param_name(key)}: incomplete (a rerun of "
                    "the decomposition redoes it)"
                )
                continue
            attrs = node_attrs(sub)
            stored = dict(sub.arrays())
            if isinstance(attrs.get(MANIFEST), dict) and all(
                has_checksums(a) for a in stored.values()
            ):
                continue
            staged = staged_path(live)
            parent, name = staged.rsplit("/", 1)
            arrays = {k: np.ascontiguousarray(a[...], dtype=np.float32) for k, a in stored.items()}
            kept = _stored_attrs(sub)
            write_group(
                root.require_group(parent), name, arrays, {**kept, "upgraded": utc_now()},
                partial_attrs={"name": kept.get("name", param_name(key))},
            )  # fmt: skip
            swap_in(root, live)
            report.run_parameters += 1


def _upgrade_packs(catalogue: Catalogue, family: str, report: UpgradeReport) -> None:
    try:
        bases = catalogue.family_group(family, "bases")
    except CatalogueError:
        return
    root = catalogue._open(write=True)
    assert root is not None
    for settings, folder in sorted(bases.groups()):
        for param, _ in sorted(folder.groups()):
            path = f"families/{family}/bases/{settings}/{param}"
            writable = root[path]
            assert isinstance(writable, zarr.Group)
            for key, array in sorted(writable.arrays()):
                attrs = node_attrs(array)
                if not is_complete(array) or _current(array, manifest_of(attrs)):
                    continue
                kept = _stored_attrs(array)
                new_key = (
                    key.removesuffix(UPGRADED_PACK)
                    if key.endswith(UPGRADED_PACK)
                    else key + UPGRADED_PACK
                )
                write_array(writable, new_key, np.ascontiguousarray(array[...], np.float32), kept)
                del writable[key]  # only now: the copy is complete
                report.packs += 1


def upgrade_catalogue(
    catalogue: Catalogue, *, say: Callable[[str], None] | None = None
) -> UpgradeReport:
    """Upgrade ``catalogue`` in place to `FORMAT_VERSION` (see the module's guarantees);
    ``say`` gets one line per family. Raises CatalogueError for a missing catalogue or one
    of a newer format."""
    before = catalogue.format_version()
    if before is None:
        raise CatalogueError(f"{catalogue.url}: no catalogue here (nothing to upgrade)")
    report = UpgradeReport(catalogue.url, before, FORMAT_VERSION)
    for family in catalogue.families():
        for member in [None, *catalogue.members(family, include_partial=True)]:
            _upgrade_entry(catalogue, family, member, report)
        _upgrade_runs(catalogue, family, report)
        _upgrade_packs(catalogue, family, report)
        if say is not None:
            say(f"{family}: checked")
    root = catalogue._open(write=True)
    assert root is not None
    if before != FORMAT_VERSION:
        mark_format(root, upgraded_from=before, upgraded=utc_now(), by=tvsplit_version())
    return report
