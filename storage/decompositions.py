"""Decomposition runs and cached member bases in the catalogue.

Layout inside a family::

    decompositions/<run>/                     run attrs: settings, members, status, summary
    decompositions/<run>/<param>/             one parameter: attrs = diagnostics, status
        basis, right_basis, coefficients      S (m × k), R (n × k'), C (T, k, n | k')
        basis.<i>, coefficients.<i>, ...      per-member arrays (method "pairwise")
    bases/<settings>/<param>/<pack>           cached member bases: [left; right] side by side

Guarantees: a parameter group (and a cached basis) is marked complete only after all its
arrays are written, and a run only after every parameter is, so a reader never takes a
half-written result as complete and a rerun redoes exactly what is missing. A cached basis
records the fingerprint of the member it was made from and is ignored when it differs.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import zarr
from tvsplit.storage.catalogue import Catalogue
from tvsplit.storage.errors import CatalogueError
from tvsplit.storage.integrity import (
    MANIFEST,
    IntegrityError,
    check_manifest,
    manifest_of,
    read_checked,
)
from tvsplit.storage.lazy import lazy_module
from tvsplit.storage.names import check_node_name, param_key, param_name
from tvsplit.storage.provenance import tvsplit_version, utc_now
from tvsplit.storage.writes import (
    COMPLETE,
    float32_array,
    is_complete,
    mark_complete,
    mark_partial,
    node_attrs,
    write_array,
    write_group,
)

if TYPE_CHECKING:
    import torch
else:
    torch = lazy_module("torch")  # imported on first use (storage/lazy.py)

ArrayMap = Mapping[str, "torch.Tensor"]
logger = logging.getLogger(__name__)


def _read_arrays(group: zarr.Group, label: str) -> dict[str, torch.Tensor]:
    """Every array of a complete group, each checked against the group's manifest."""
    attrs = node_attrs(group)
    has_manifest = MANIFEST in attrs
    out = {}
    for key, array in group.arrays():
        manifest = manifest_of(attrs, key)
        if has_manifest and manifest is None:
            raise IntegrityError(f"{label}: array {key!r} is not in the manifest of its group")
        data = read_checked(array, manifest, f"{label}: array {key!r}")
        out[key] = torch.from_numpy(np.ascontiguousarray(data))
    if has_manifest and set(attrs[MANIFEST]) - set(out):
        missing = sorted(set(attrs[MANIFEST]) - set(out))[0]
        raise IntegrityError(f"{label}: array {missing!r} is missing; {_RERUN}")
    return out


def _intact(group: zarr.Group) -> bool:
    """True unless a chunk in the group's manifest is missing or not the recorded one (checked
    by key, without decoding): a damaged complete parameter counts as not done, so a rerun
    redoes it."""
    manifests = node_attrs(group).get(MANIFEST)
    if not isinstance(manifests, Mapping):
        return True  # written before manifests
    for key, manifest in manifests.items():
        try:
            array = group[key]
            assert isinstance(array, zarr.Array)
            check_manifest(array, manifest, key)
        except (KeyError, AssertionError, IntegrityError):
            return False
    return True


_RERUN = "rerun the decomposition (damaged parameters are redone) or remove the run"


def _diagnostics(group: zarr.Group) -> dict[str, Any]:
    attrs = node_attrs(group)
    attrs.pop(MANIFEST, None)
    return attrs


@dataclass(frozen=True)
class StoredSplit:
    """One parameter's stored split: the compact arrays and the diagnostics attrs."""

    name: str
    arrays: dict[str, torch.Tensor]
    diagnostics: dict[str, Any]


class DecompositionRun:
    """Writes and reads one decomposition run ``families/<family>/decompositions/<run>``."""

    def __init__(self, catalogue: Catalogue, family: str, run: str) -> None:
        self.catalogue = catalogue
        self.family = check_node_name("family", family)
        self.run = check_node_name("run", run)
        self._handle: zarr.Group | None = None  # the run group, once opened for writing

    @property
    def label(self) -> str:
        return f"{self.family}/decompositions/{self.run}"

    def _group(self, *, create: bool = False) -> zarr.Group:
        return self.catalogue.decomposition_group(self.family, self.run, create=create)

    def exists(self) -> bool:
        try:
            self._group()
        except CatalogueError:
            return False
        return True

    def begin(
        self, settings: Mapping[str, Any], members: Sequence[str], parameters: Sequence[str]
    ) -> None:
        """Create the run (or keep an unfinished one with the same settings and members)."""
        group = self._group(create=True)
        attrs = node_attrs(group)
        if attrs.get("settings") == dict(settings) and attrs.get("members") == list(members):
            return
        mark_partial(
            group,
            {
                "settings": dict(settings),
                "members": list(members),
                "parameters": list(parameters),
                "started": utc_now(),
                "tvsplit_version": tvsplit_version(),
            },
        )

    def attrs(self) -> dict[str, Any]:
        return node_attrs(self._group())

    def completed(self) -> set[str]:
        """Parameters whose results are completely written."""
        try:
            group = self._group()
        except CatalogueError:
            return set()
        return {param_name(key) for key, sub in group.groups() if is_complete(sub) and _intact(sub)}

    def write_parameter(self, name: str, arrays: ArrayMap, diagnostics: Mapping[str, Any]) -> None:
        """Store one parameter's arrays, then mark it complete with its diagnostics."""
        if self._handle is None:
            self._handle = self.catalogue.family_subtree(self.family, f"decompositions/{self.run}")
        write_group(
            self._handle,
            param_key(name),
            {key: float32_array(tensor) for key, tensor in arrays.items()},
            {**dict(diagnostics), "name": name, "created": utc_now()},
            partial_attrs={"name": name},
        )

    def _complete_parameter(self, name: str) -> zarr.Group:
        try:
            sub = self._group()[param_key(name)]
        except KeyError:
            raise CatalogueError(f"{self.label}: no parameter {name!r}") from None
        if not isinstance(sub, zarr.Group) or not is_complete(sub):
            raise CatalogueError(
                f"{self.label}: parameter {name!r} is incomplete; rerun the decomposition"
            )
        return sub

    def read_parameter(self, name: str) -> StoredSplit:
        """One parameter's stored split; raises CatalogueError when absent or incomplete."""
        sub = self._complete_parameter(name)
        label = f"{self.label}: parameter {name!r}"
        return StoredSplit(name, _read_arrays(sub, label), _diagnostics(sub))

    def read_diagnostics(self, name: str) -> dict[str, Any]:
        """One parameter's diagnostics without its arrays (CatalogueError as above)."""
        return _diagnostics(self._complete_parameter(name))

    def finish(self, summary: Mapping[str, Any]) -> None:
        """Mark the run complete; raises CatalogueError naming a parameter still missing."""
        attrs = self.attrs()
        done = self.completed()
        missing = [p for p in attrs.get("parameters", []) if p not in done]
        if missing:
            raise CatalogueError(
                f"{self.label}: cannot mark complete, {len(missing)} parameter(s) missing, "
                f"first {missing[0]!r}"
            )
        mark_complete(self._group(), {**attrs, **dict(summary), "completed": utc_now()})


def list_runs(catalogue: Catalogue, family: str) -> list[tuple[str, dict[str, Any]]]:
    """Every decomposition run of a family with its attrs (settings, members, status)."""
    try:
        group = catalogue.family_group(family, "decompositions")
    except CatalogueError:
        return []
    return sorted((name, node_attrs(sub)) for name, sub in group.groups())


def _unpack(
    array: zarr.Array, fingerprints: Mapping[str, str], skip: set[str], label: str = "basis pack"
) -> dict[str, dict[str, Any]]:
    """The entries of one complete pack made from the given members' fingerprints."""
    attrs = node_attrs(array)
    if attrs.get("status") != COMPLETE:
        return {}
    wanted = [
        entry
        for entry in attrs["entries"]
        if entry["member"] not in skip and fingerprints.get(entry["member"]) == entry["fingerprint"]
    ]
    if not wanted:
        return {}
    packed = torch.from_numpy(np.ascontiguousarray(read_checked(array, manifest_of(attrs), label)))
    rows = int(attrs["left_rows"])
    found = {}
    for entry in wanted:
        columns = slice(entry["offset"], entry["offset"] + entry["rank"])
        found[entry["member"]] = {
            "left": packed[:rows, columns],
            "right": packed[rows:, columns],
            "sigma": torch.tensor(entry["sigma"], dtype=torch.float32),
            "attrs": entry["attrs"],
        }
    return found


class BasisCache:
    """Member bases cached per (family, settings key, parameter), written in packs.

    A pack is one array holding the bases one job computed for one parameter: each member's
    ``[left; right]`` (m + n, r) side by side, its rank, column offset, singular values and
    fingerprint in the pack's attrs. A job writes one pack per parameter rather than one
    entry per member (three small writes instead of 3 T, which dominates the I/O of a
    family with hundreds of parameters); adding a member later writes a pack of one.
    A member's entry is used only from a complete pack made from its current fingerprint.
    """

    def __init__(self, catalogue: Catalogue, family: str, settings_key: str) -> None:
        self.catalogue = catalogue
        self.family = check_node_name("family", family)
        self.key = check_node_name("settings key", settings_key)
        self._handle: zarr.Group | None = None  # the settings folder, once opened for writing

    def _folder(self, name: str | None = None) -> str:
        return f"bases/{self.key}" if name is None else f"bases/{self.key}/{param_key(name)}"

    def prepare(self) -> None:
        """Create the settings folder up front: concurrent jobs creating the same new group
        race in zarr (one of them fails with ContainsGroupError); the per-parameter folders
        below it are created with their first pack, which does not race."""
        self.catalogue.family_group(self.family, self._folder(), create=True)

    def get(self, name: str, fingerprints: Mapping[str, str]) -> dict[str, dict[str, Any]]:
        """The cached bases of parameter `name` for those of `fingerprints`' members that
        have one made from that fingerprint: member → ``left``, ``right``, ``sigma``,
        ``attrs``."""
        try:
            group = self.catalogue.family_group(self.family, self._folder(name))
        except CatalogueError:
            return {}
        found: dict[str, dict[str, Any]] = {}
        for key, array in group.arrays():
            label = f"{self.family}/{self._folder(name)}/{key}"
            try:
                found |= _unpack(array, fingerprints, set(found), label)
            except IntegrityError as error:  # a damaged cache entry is a miss, said once
                logger.warning("%s (recomputing it)", error)
            except Exception:  # cut short by a crash, or not a pack: a cache miss, not an error
                continue
        return found

    def put(self, name: str, bases: Mapping[str, tuple[str, ArrayMap, Mapping[str, Any]]]) -> None:
        """Store one pack: member → (fingerprint, arrays ``left`` m × r, ``right`` n × r,
        ``sigma``, attrs), for parameter `name`. Marked complete after its data."""
        if not bases:
            return
        columns, entries, offset = [], [], 0
        rows = next(iter(bases.values()))[1]["left"].shape[0]
        for member, (fingerprint, arrays, attrs) in bases.items():
            left = arrays["left"].detach().cpu().float()
            right = arrays["right"].detach().cpu().float()
            columns.append(torch.cat([left, right]))
            entries.append(
                {
                    "member": check_node_name("member", member),
                    "fingerprint": fingerprint,
                    "rank": left.shape[1],
                    "offset": offset,
                    "sigma": [float(v) for v in arrays["sigma"].detach().cpu().flatten()],
                    "attrs": dict(attrs),
                }
            )
            if columns[0].shape[0] != columns[-1].shape[0] or left.shape[0] != rows:
                raise ValueError(
                    f"{self.family}/{self._folder(name)}: member {member!r}'s basis has "
                    f"{left.shape[0]} + {right.shape[0]} rows, the first member's "
                    f"{rows} + {columns[0].shape[0] - rows}"
                )
            offset += left.shape[1]
        packed = torch.cat(columns, dim=1) if offset else torch.zeros(columns[0].shape[0], 1)
        meta = {"entries": entries, "left_rows": rows}
        pack = (
            "p-"
            + hashlib.sha256(
                json.dumps(sorted((e["member"], e["fingerprint"]) for e in entries)).encode()
            ).hexdigest()[:16]
        )
        if self._handle is None:
            self._handle = self.catalogue.family_subtree(self.family, self._folder())
        # One call creating the parameter's folder and the pack: zarr writes missing parents
        # only if absent, so jobs of two runs writing the same parameter do not collide.
        write_array(self._handle, f"{param_key(name)}/{pack}", packed.numpy(), meta)
