"""Decomposition runs and cached member bases in the catalogue.

Layout inside a family::

    decompositions/<run>/                     run attrs: settings, members, status, summary
    decompositions/<run>/<param>/             one parameter: attrs = diagnostics, status
        basis, right_basis, coefficients      S (m × k), R (n × k'), C (T, k, n | k')
        basis.<i>, coefficients.<i>, ...      per-member arrays (method "pairwise")
    bases/<settings>/<member>/<param>/        a member's cached basis: left, right, sigma

Guarantees: a parameter group (and a cached basis) is marked complete only after all its
arrays are written, and a run only after every parameter is, so a reader never takes a
half-written result as complete and a rerun redoes exactly what is missing. A cached basis
records the fingerprint of the member it was made from and is ignored when it differs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import zarr
from zarr.codecs import ZstdCodec

from storage.catalogue import ATTRS, COMPLETE, PARTIAL, Catalogue, row_chunks
from storage.errors import CatalogueError
from storage.names import check_node_name, param_key, param_name
from storage.provenance import tvsplit_version, utc_now

ArrayMap = Mapping[str, torch.Tensor]


def _write_arrays(group: zarr.Group, arrays: ArrayMap) -> None:
    for key, tensor in arrays.items():
        data = tensor.detach().to(device="cpu", dtype=torch.float32).contiguous().numpy()
        array = group.create_array(
            name=key,
            shape=data.shape,
            dtype="float32",
            chunks=row_chunks(data.shape) if data.ndim else (),
            compressors=ZstdCodec(level=1),
            fill_value=0.0,
            overwrite=True,
        )
        array[...] = data


def _read_arrays(group: zarr.Group) -> dict[str, torch.Tensor]:
    return {
        key: torch.from_numpy(np.ascontiguousarray(array[...])) for key, array in group.arrays()
    }


def _status(node: zarr.Group) -> str:
    try:
        return str(dict(node.attrs.get(ATTRS, {})).get("status", PARTIAL))
    except Exception:  # metadata cut short by a crash
        return PARTIAL


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
        attrs = dict(group.attrs.get(ATTRS, {}))
        if attrs.get("settings") == dict(settings) and attrs.get("members") == list(members):
            return
        group.attrs[ATTRS] = {
            "status": PARTIAL,
            "settings": dict(settings),
            "members": list(members),
            "parameters": list(parameters),
            "started": utc_now(),
            "tvsplit_version": tvsplit_version(),
        }

    def attrs(self) -> dict[str, Any]:
        return dict(self._group().attrs.get(ATTRS, {}))

    def completed(self) -> set[str]:
        """Parameters whose results are completely written."""
        try:
            group = self._group()
        except CatalogueError:
            return set()
        return {param_name(key) for key, sub in group.groups() if _status(sub) == COMPLETE}

    def write_parameter(self, name: str, arrays: ArrayMap, diagnostics: Mapping[str, Any]) -> None:
        """Store one parameter's arrays, then mark it complete with its diagnostics."""
        group = self._group(create=True).require_group(param_key(name))
        group.attrs[ATTRS] = {"status": PARTIAL, "name": name}
        for key, _ in list(group.arrays()):
            del group[key]
        _write_arrays(group, arrays)
        group.attrs[ATTRS] = {
            **dict(diagnostics),
            "name": name,
            "status": COMPLETE,
            "created": utc_now(),
        }

    def read_parameter(self, name: str) -> StoredSplit:
        """One parameter's stored split; raises CatalogueError when absent or incomplete."""
        group = self._group()
        try:
            sub = group[param_key(name)]
        except KeyError:
            raise CatalogueError(f"{self.label}: no parameter {name!r}") from None
        if not isinstance(sub, zarr.Group) or _status(sub) != COMPLETE:
            raise CatalogueError(
                f"{self.label}: parameter {name!r} is incomplete; rerun the decomposition"
            )
        return StoredSplit(name, _read_arrays(sub), dict(sub.attrs[ATTRS]))

    def finish(self, summary: Mapping[str, Any]) -> None:
        """Mark the run complete; raises CatalogueError naming a parameter still missing."""
        attrs = self.attrs()
        missing = [p for p in attrs.get("parameters", []) if p not in self.completed()]
        if missing:
            raise CatalogueError(
                f"{self.label}: cannot mark complete, {len(missing)} parameter(s) missing, "
                f"first {missing[0]!r}"
            )
        self._group().attrs[ATTRS] = {
            **attrs,
            **dict(summary),
            "status": COMPLETE,
            "completed": utc_now(),
        }


def list_runs(catalogue: Catalogue, family: str) -> list[tuple[str, dict[str, Any]]]:
    """Every decomposition run of a family with its attrs (settings, members, status)."""
    try:
        group = catalogue.family_group(family, "decompositions")
    except CatalogueError:
        return []
    return sorted((name, dict(sub.attrs.get(ATTRS, {}))) for name, sub in group.groups())


class BasisCache:
    """Member bases cached per (family, settings key, member, parameter).

    One array per entry, ``[left; right]`` packed as (m + n, r) with the singular values in
    its attrs: three small writes per entry (metadata, data, completion), which matters
    when a family has hundreds of parameters and members. An entry is valid only when
    complete and made from the member's current fingerprint.
    """

    def __init__(self, catalogue: Catalogue, family: str, settings_key: str) -> None:
        self.catalogue = catalogue
        self.family = check_node_name("family", family)
        self.key = check_node_name("settings key", settings_key)

    def _folder(self, member: str) -> str:
        return f"bases/{self.key}/{check_node_name('member', member)}"

    def prepare(self, members: Sequence[str]) -> None:
        """Create the members' folders up front: concurrent jobs creating the same new group
        race in zarr (one of them fails with ContainsGroupError)."""
        for member in members:
            self.catalogue.family_group(self.family, self._folder(member), create=True)

    def get(self, member: str, name: str, fingerprint: str) -> dict[str, Any] | None:
        """The cached ``left``, ``right``, ``sigma`` and ``attrs``, or None when absent,
        incomplete or stale."""
        try:
            group = self.catalogue.family_group(self.family, self._folder(member))
            array = group[param_key(name)]
        except (CatalogueError, KeyError):
            return None
        try:
            attrs = dict(array.attrs.get(ATTRS, {}))
        except Exception:  # metadata cut short by a crash
            return None
        if attrs.get("status") != COMPLETE or attrs.get("fingerprint") != fingerprint:
            return None
        packed = torch.from_numpy(np.ascontiguousarray(array[...]))
        rank, rows = int(attrs["rank"]), int(attrs["left_rows"])
        return {
            "left": packed[:rows, :rank],
            "right": packed[rows:, :rank],
            "sigma": torch.tensor(attrs["sigma"], dtype=torch.float32),
            "attrs": attrs,
        }

    def put(
        self, member: str, name: str, fingerprint: str, arrays: ArrayMap, attrs: Mapping[str, Any]
    ) -> None:
        """Store one member basis (``left`` m × r, ``right`` n × r, ``sigma``)."""
        left, right = arrays["left"].detach().cpu().float(), arrays["right"].detach().cpu().float()
        rank = left.shape[1]
        packed = (
            torch.cat([left, right]) if rank else torch.zeros(left.shape[0] + right.shape[0], 1)
        )
        meta = {
            **dict(attrs),
            "rank": rank,
            "left_rows": left.shape[0],
            "sigma": [float(v) for v in arrays["sigma"].detach().cpu().flatten()],
            "fingerprint": fingerprint,
        }
        group = self.catalogue.family_group(self.family, self._folder(member), create=True)
        array = group.create_array(
            name=param_key(name),
            shape=tuple(packed.shape),
            dtype="float32",
            chunks=row_chunks(packed.shape),
            compressors=ZstdCodec(level=1),
            fill_value=0.0,
            attributes={ATTRS: {**meta, "status": PARTIAL}},
            overwrite=True,
        )
        array[...] = packed.numpy()
        array.attrs[ATTRS] = {**meta, "status": COMPLETE}
