"""The catalogue: base weights, task vectors and decompositions of model families in Zarr 3.

Layout (under any local path or fsspec URL)::

    families/<family>/base/<param>              base weights
    families/<family>/vectors/<member>/<param>  task vectors
    families/<family>/decompositions/<run>/     decomposition outputs

Guarantees:

- arrays are float32 (the source dtype is kept in attrs), chunked along rows into
  4–16 MiB chunks (an array smaller than that is one chunk), compressed with Blosc-LZ4
  after a byte shuffle (arrays written before it: zstd, read as they are);
- parameter names are stored under reversible zarr-safe keys (`storage.names`) and the
  true name is kept in each array's attrs;
- a base may be kept by reference to its source file instead of a copy (``layout:
  reference``: an empty array whose attrs name the file, the tensor and the file's size,
  mtime and sha256; `EntryWriter.write_reference`); reading it reads that file, and a file
  gone or changed since (size or mtime moved and sha256 differs) is a CatalogueError;
- every entry (a base or a vector group) and every array carries provenance attrs under
  the ``tvsplit`` key; an array is marked complete only after its data is written, and an
  entry only after all its arrays are, so readers never trust a half-written entry and a
  rerun skips what is complete (`EntryWriter`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import zarr
from tvsplit.storage.errors import CatalogueError
from tvsplit.storage.integrity import MANIFEST, manifest_of, read_checked, warn_once
from tvsplit.storage.lazy import lazy_module
from tvsplit.storage.lowrank import LAYOUT as FACTORS
from tvsplit.storage.lowrank import LowRankDelta
from tvsplit.storage.names import check_node_name, param_key, param_name
from tvsplit.storage.object_store import storage_options
from tvsplit.storage.provenance import tvsplit_version, utc_now
from tvsplit.storage.staging import recover, staged_path, swap_in
from tvsplit.storage.writes import (
    ATTRS,
    COMPLETE,
    FORMAT_VERSION,
    ITEMSIZE,
    LEGACY_FORMAT,
    PARTIAL,
    float32_array,
    format_version,
    is_complete,
    mark_complete,
    mark_format,
    mark_partial,
    node_attrs,
    write_array,
)
from zarr.abc.store import Store
from zarr.core.buffer.cpu import NDBuffer
from zarr.errors import GroupNotFoundError
from zarr.storage import FsspecStore, LocalStore

if TYPE_CHECKING:
    import torch
else:
    torch = lazy_module("torch")  # imported on first use (storage/lazy.py)

Rows = slice | int | None
REFERENCE = "reference"  # the ``layout`` attr of a parameter kept by reference to its file


@dataclass(frozen=True)
class EntryInfo:
    """What the catalogue knows about one entry (a family's base or one of its vectors)."""

    family: str
    member: str | None
    status: str
    attrs: dict[str, Any]

    @property
    def complete(self) -> bool:
        return self.status == COMPLETE

    @property
    def label(self) -> str:
        return entry_label(self.family, self.member)


def entry_label(family: str, member: str | None) -> str:
    """Human label of an entry: ``family/base`` or ``family/vectors/member``."""
    return f"{family}/base" if member is None else f"{family}/vectors/{member}"


def entry_path(family: str, member: str | None) -> str:
    """Zarr path of an entry inside the catalogue root."""
    check_node_name("family", family)
    if member is None:
        return f"families/{family}/base"
    return f"families/{family}/vectors/{check_node_name('member', member)}"


class Catalogue:
    """A Zarr 3 catalogue at `url` (a local path or any fsspec URL such as ``s3://b/c.zarr``).

    Reading never creates anything; the store is created on the first write.
    `member=None` addresses a family's base entry throughout.
    """

    def __init__(self, url: str, *, storage_options: dict[str, Any] | None = None) -> None:
        self.url = str(url)
        self._storage_options = storage_options
        self._root: zarr.Group | None = None
        self._writable = False

    def __repr__(self) -> str:
        return f"Catalogue({self.url!r})"

    @property
    def options(self) -> dict[str, Any] | None:
        """The fsspec storage options given in code (merged with the environment's when
        the store is opened, `storage.object_store`)."""
        return self._storage_options

    # -- opening ---------------------------------------------------------------------------
    def _open(self, *, write: bool) -> zarr.Group | None:
        if self._root is not None and (self._writable or not write):
            return self._root
        kwargs: dict[str, Any] = {"zarr_format": 3}
        options = storage_options(self.url, self._storage_options)
        if options:
            kwargs["storage_options"] = options
        if write:
            self._root = zarr.open_group(store=self.url, mode="a", **kwargs)
            self._writable = True
            if format_version(self._root) is None and "families" not in self._root:
                mark_format(self._root)  # a new catalogue is written in the current format
        else:
            try:
                self._root = zarr.open_group(store=self.url, mode="r", **kwargs)
            except (GroupNotFoundError, FileNotFoundError):
                return None
        self._check_format(self._root)
        return self._root

    def format_version(self) -> int | None:
        """The catalogue's format version (`storage.writes.FORMAT_VERSION`); ``LEGACY_FORMAT``
        for one written before versions; None when there is no catalogue yet."""
        root = self._open(write=False)
        if root is None:
            return None
        version = format_version(root)
        if version is None:
            return LEGACY_FORMAT if "families" in root else None
        return version

    def _check_format(self, root: zarr.Group) -> None:
        """Refuse a catalogue newer than this code; warn once about one older than it."""
        version = format_version(root)
        if version is not None and version > FORMAT_VERSION:
            raise CatalogueError(
                f"{self.url}: catalogue format {version} was written by a newer tvsplit (this "
                f"one reads formats {LEGACY_FORMAT}-{FORMAT_VERSION}); upgrade tvsplit "
                "(`pip install -U tvsplit`)"
            )
        if (version or LEGACY_FORMAT) < FORMAT_VERSION and "families" in root:
            warn_once(
                root.store,
                f"{self.url}: catalogue format {version or LEGACY_FORMAT} (before integrity "
                f"manifests); it is read without checksum checks. Upgrade it in place, keeping "
                f"every array: `tvsplit catalogue upgrade {self.url}` (then `tvsplit catalogue "
                "verify`)",
            )

    def _group(self, path: str) -> zarr.Group | None:
        root = self._open(write=False)
        if root is None:
            return None
        try:
            node = root[path]
        except KeyError:
            return None
        return node if isinstance(node, zarr.Group) else None

    # -- listing ---------------------------------------------------------------------------
    def families(self) -> list[str]:
        """Names of all families (sorted), whatever the state of their entries."""
        group = self._group("families")
        return sorted(name for name, _ in group.groups()) if group is not None else []

    def entry(self, family: str, member: str | None = None) -> EntryInfo | None:
        """The entry's status and provenance attrs, or None when it does not exist."""
        return self._info(family, member, entry_path(family, member))

    def _info(self, family: str, member: str | None, path: str) -> EntryInfo | None:
        group = self._group(path)
        if group is None:
            return None
        attrs = node_attrs(group)
        return EntryInfo(family, member, str(attrs.get("status", PARTIAL)), attrs)

    def members(self, family: str, *, include_partial: bool = False) -> list[str]:
        """Names of the family's task vectors (sorted); only complete ones unless asked."""
        group = self._group(f"families/{check_node_name('family', family)}/vectors")
        if group is None:
            return []
        names = []
        for name, sub in group.groups():
            if include_partial or is_complete(sub):
                names.append(name)
        return sorted(names)

    def has_base(self, family: str) -> bool:
        """Whether the family's base entry is complete."""
        info = self.entry(family)
        return info is not None and info.complete

    def _complete_group(self, family: str, member: str | None) -> zarr.Group:
        label = entry_label(family, member)
        group = self._group(entry_path(family, member))
        if group is None:
            raise CatalogueError(f"{self.url}: no entry {label}")
        if not is_complete(group):
            raise CatalogueError(
                f"{self.url}: entry {label} is incomplete (an ingest stopped part-way); "
                "rerun the ingest to finish it"
            )
        return group

    def parameters(self, family: str, member: str | None = None) -> list[str]:
        """Parameter names of a complete entry, in ingest order (from its manifest)."""
        group = self._complete_group(family, member)
        return list(group.attrs[ATTRS]["parameters"])

    def array_attrs(self, family: str, name: str, member: str | None = None) -> dict[str, Any]:
        """Provenance attrs of one stored parameter."""
        attrs = dict(self._array(family, name, member).attrs[ATTRS])
        attrs.pop(MANIFEST, None)
        return attrs

    def _array(self, family: str, name: str, member: str | None) -> zarr.Array:
        return self.open_entry(family, member).array(name)

    # -- reading ---------------------------------------------------------------------------
    def open_entry(self, family: str, member: str | None = None) -> EntryReader:
        """A reader of one complete entry, for reading many of its parameters: the entry is
        opened and checked complete once (CatalogueError when absent or incomplete)."""
        return EntryReader(
            self._complete_group(family, member), f"{self.url}: entry {entry_label(family, member)}"
        )

    def read(
        self, family: str, name: str, *, member: str | None = None, rows: Rows = None
    ) -> torch.Tensor:
        """One parameter of one complete entry as a float32 tensor: whole, or rows `rows`
        (a slice or an index along the first dimension). Reads only the chunks needed."""
        return self.open_entry(family, member).read(name, rows=rows)

    # -- writing ---------------------------------------------------------------------------
    def writer(
        self,
        family: str,
        member: str | None,
        fingerprint: Mapping[str, Any],
        *,
        staged: bool = False,
    ) -> EntryWriter:
        """Open an entry for writing, resuming it when possible.

        `fingerprint` (JSON-able: source, resolved commit, file checksums, ...) identifies
        what the entry is made from. A partial entry with the same fingerprint is resumed
        (its complete arrays are kept); one with another fingerprint is wiped. A complete
        entry raises CatalogueError: delete it first to rebuild it, or write a `staged`
        replacement beside it and `promote` it once finished (the live entry stays readable
        until then; `storage.staging`).
        """
        root = self._open(write=True)
        assert root is not None
        path = entry_path(family, member)
        label = entry_label(family, member)
        existing = self.entry(family, member)
        if staged:
            path, label = staged_path(path), f"{label} (staged replacement)"
            existing = self._info(family, member, path)
        fingerprint = dict(fingerprint)
        if existing is not None:
            if existing.complete:
                raise CatalogueError(f"{self.url}: entry {label} is already complete")
            if existing.attrs.get("fingerprint") != fingerprint:
                del root[path]
                existing = None
        if existing is None:
            group = root.require_group(path)
            mark_partial(
                group,
                {
                    "fingerprint": fingerprint,
                    "started": utc_now(),
                    "tvsplit_version": tvsplit_version(),
                },
            )
        else:
            group = root[path]
            assert isinstance(group, zarr.Group)
        return EntryWriter(group, label)

    def promote(self, family: str, member: str | None = None) -> None:
        """Put the complete staged replacement of an entry in the live entry's place (the
        old entry is removed only then; a kill part-way is finished by `recover_staged`)."""
        root = self._open(write=True)
        assert root is not None
        try:
            swap_in(root, entry_path(family, member))
        except ValueError as error:
            raise CatalogueError(f"{self.url}: {entry_label(family, member)}: {error}") from None

    def recover_staged(self, family: str, member: str | None = None) -> bool:
        """Finish a replacement a killed process left half-done; True if one was finished."""
        if self._group(staged_path(entry_path(family, member))) is None:
            return False
        root = self._open(write=True)
        assert root is not None
        return recover(root, entry_path(family, member))

    def delete(self, family: str, member: str | None = None) -> bool:
        """Delete an entry (complete or not); True if something was deleted."""
        root = self._open(write=False)
        path = entry_path(family, member)
        if root is None or self._group(path) is None:
            return False
        root = self._open(write=True)
        assert root is not None
        del root[path]
        return True

    def family_group(self, family: str, path: str, *, create: bool = False) -> zarr.Group:
        """The group ``families/<family>/<path>`` (created when `create`, else CatalogueError
        when absent); for the decomposition results and caches kept beside a family."""
        full = f"families/{check_node_name('family', family)}/{path}"
        if create:
            root = self._open(write=True)
            assert root is not None
            return root.require_group(full)
        group = self._group(full)
        if group is None:
            raise CatalogueError(f"{self.url}: no group {family}/{path}")
        return group

    def family_subtree(self, family: str, path: str) -> zarr.Group:
        """The group ``families/<family>/<path>`` (created if absent), opened for writing as
        the root of a store of its own.

        For writing many small nodes under one folder (decomposition results, cached bases):
        zarr checks and writes every ancestor of each node it creates, one file operation
        per level, so a node created here costs 2 levels of checks instead of 6–7 (measured
        4 ms → 1.2 ms per array on a local disk). Readers see the same nodes through the
        catalogue root as usual."""
        group = self.family_group(family, path, create=True)
        full = f"families/{check_node_name('family', family)}/{path}"
        store = group.store
        if isinstance(store, LocalStore):
            sub: Store = LocalStore(Path(store.root) / full)
        elif isinstance(store, FsspecStore):
            sub = FsspecStore(store.fs, path=f"{store.path.rstrip('/')}/{full}")
        else:  # another store kind: the group as it is (correct, only slower to write)
            return group
        return zarr.open_group(store=sub, mode="a", zarr_format=3)

    def decomposition_group(self, family: str, run: str, *, create: bool = False) -> zarr.Group:
        """The group ``families/<family>/decompositions/<run>`` (created when `create`)."""
        try:
            return self.family_group(
                family, f"decompositions/{check_node_name('run', run)}", create=create
            )
        except CatalogueError:
            raise CatalogueError(f"{self.url}: no decomposition {family}/{run}") from None


class EntryReader:
    """Reads the parameters of one entry found complete when it was opened."""

    def __init__(self, group: zarr.Group, label: str) -> None:
        self._group = group
        self.label = label
        self._checked_files: set[str] = set()

    def array(self, name: str) -> zarr.Array:
        """The stored array of parameter `name` (CatalogueError naming it when absent)."""
        try:
            array = self._group[param_key(name)]
        except KeyError:
            raise CatalogueError(f"{self.label} has no parameter {name!r}") from None
        assert isinstance(array, zarr.Array)
        return array

    def factors(self, name: str) -> LowRankDelta | None:
        """Parameter `name` as LoRA factors when it is stored so, else None."""
        array = self.array(name)
        layout = dict(array.attrs.get(ATTRS, {}))
        if layout.get("layout") != FACTORS:
            return None
        packed = self._checked(name, array, layout)
        return LowRankDelta.from_packed(torch.from_numpy(np.ascontiguousarray(packed)), layout)

    def _checked(
        self, name: str, array: zarr.Array, attrs: dict[str, Any], read: Any = None
    ) -> Any:
        """``read()`` (default: all of ``array``) after the integrity checks of its chunks."""
        label = f"{self.label}: parameter {name!r}"
        return read_checked(array, manifest_of(attrs), label, read)

    def shape(self, name: str) -> tuple[int, ...]:
        """The parameter's shape (for factors: the dense ΔW's, not the packed array's; by
        reference: the referenced tensor's)."""
        array = self.array(name)
        layout = dict(array.attrs.get(ATTRS, {}))
        if layout.get("layout") in (FACTORS, REFERENCE):
            return tuple(int(s) for s in layout["param_shape"])
        return tuple(array.shape)

    def referenced(self, name: str, rows: Rows = None) -> torch.Tensor | None:
        """Parameter `name` read from the file it is kept by reference to (float32; whole or
        rows `rows`), or None when it is stored in the catalogue."""
        attrs = dict(self.array(name).attrs.get(ATTRS, {}))
        if attrs.get("layout") != REFERENCE:
            return None
        path = attrs["ref_file"]
        if path not in self._checked_files:
            self._check_reference(name, attrs)
            self._checked_files.add(path)
        from safetensors import safe_open

        with safe_open(path, framework="pt") as handle:
            if rows is None:
                tensor = handle.get_tensor(attrs["ref_key"])
            else:
                view = handle.get_slice(attrs["ref_key"])
                tensor = view[rows] if isinstance(rows, slice) else view[rows : rows + 1][0]
        return tensor.to(torch.float32).contiguous()

    def _check_reference(self, name: str, attrs: dict[str, Any]) -> None:
        from tvsplit.storage.provenance import sha256_file

        path = Path(attrs["ref_file"])
        where = f"{self.label}: parameter {name!r} is kept by reference to {path}"
        try:
            stat = path.stat()
        except OSError:
            raise CatalogueError(
                f"{where}, which is gone; restore it or re-ingest the base (tvsplit catalogue "
                "rm, then ingest)"
            ) from None
        if (stat.st_size, stat.st_mtime_ns) == (attrs["ref_size"], attrs["ref_mtime_ns"]):
            return
        if stat.st_size != attrs["ref_size"] or sha256_file(path) != attrs["ref_sha256"]:
            raise CatalogueError(
                f"{where}, which changed since it was ingested (sha256 differs); restore it "
                "or re-ingest the base (tvsplit catalogue rm, then ingest)"
            )

    def stored_bytes(self, name: str) -> int:
        """Bytes of the parameter as stored, uncompressed (factors: the factors' bytes)."""
        array = self.array(name)
        return math.prod(array.shape) * ITEMSIZE

    def read(self, name: str, *, rows: Rows = None) -> torch.Tensor:
        """Parameter `name` as a float32 tensor: whole, or rows `rows` (a slice or an index
        along the first dimension). Reads only the chunks needed (factors: all of them, the
        dense ΔW computed on read)."""
        low_rank = self.factors(name)
        if low_rank is not None:
            dense = low_rank.dense()
            return dense if rows is None else dense[rows].contiguous()
        referenced = self.referenced(name, rows)
        if referenced is not None:
            return referenced
        array = self.array(name)
        attrs = dict(array.attrs.get(ATTRS, {}))
        whole = rows is None or array.ndim == 0
        data = self._checked(
            name, array, attrs, (lambda: array[...]) if whole else lambda: array[rows]
        )
        return torch.from_numpy(np.ascontiguousarray(data))

    def read_into(self, name: str, out: torch.Tensor) -> torch.Tensor:
        """Read parameter `name` into `out` (a contiguous float32 CPU tensor of its shape);
        ValueError naming both shapes when they differ.

        Zarr still decodes each chunk into a buffer of its own before copying it into `out`;
        what this spares, against ``read`` then ``torch.stack``, is the stacking copy and the
        page faults of a fresh (T, *shape) allocation per parameter (measured: 33 % less
        time reading a family's GPT-2-sized slices into one reused buffer)."""
        array = self.array(name)
        shape = self.shape(name)
        if shape != tuple(out.shape):
            raise ValueError(
                f"{self.label}: parameter {name!r} has shape {shape}, expected {tuple(out.shape)}"
            )
        if out.dtype != torch.float32 or out.device.type != "cpu" or not out.is_contiguous():
            raise ValueError("read_into needs a contiguous float32 CPU tensor")
        low_rank = self.factors(name)
        if low_rank is not None:
            out.copy_(low_rank.dense())
            return out
        referenced = self.referenced(name)
        if referenced is not None:
            out.copy_(referenced)
            return out
        self._checked(
            name, array, dict(array.attrs.get(ATTRS, {})),
            lambda: array.get_basic_selection(Ellipsis, out=NDBuffer.from_numpy_array(out.numpy())),
        )  # fmt: skip
        return out


class EntryWriter:
    """Writes the arrays of one entry; marks each complete after its data, the entry last."""

    def __init__(self, group: zarr.Group, label: str) -> None:
        self._group = group
        self.label = label
        self._complete: set[str] | None = None  # listed once, then kept up to date

    def completed(self) -> set[str]:
        """Names of the parameters already written completely (kept on resume): the store
        is listed on the first call; later calls add what this writer wrote since."""
        if self._complete is None:
            self._complete = {
                param_name(key) for key, array in self._group.arrays() if is_complete(array)
            }
        return set(self._complete)

    def write_factors(self, name: str, delta: LowRankDelta, attrs: Mapping[str, Any]) -> int:
        """Store a LoRA ΔW as its factors (one packed array, float32) under `name`; return the
        stored bytes. Readers get the factors (``factors``) or the dense ΔW (``read``)."""
        return self.write(name, delta.packed(), {**attrs, **delta.layout()}, shape=delta.shape)

    def write_reference(
        self, name: str, file: Path, key: str, shape: Sequence[int], attrs: Mapping[str, Any]
    ) -> int:
        """Keep parameter `name` by reference to tensor `key` of safetensors `file` (its
        size, mtime and sha256 recorded, checked on read); nothing of it is copied: returns
        0 bytes. Readers get the tensor from the file (``read``), as float32."""
        from tvsplit.storage.provenance import sha256_file

        file = Path(file).absolute()
        stat = file.stat()
        reference = {
            "layout": REFERENCE,
            "param_shape": [int(s) for s in shape],
            "ref_file": str(file),
            "ref_key": key,
            "ref_size": stat.st_size,
            "ref_mtime_ns": stat.st_mtime_ns,
            "ref_sha256": sha256_file(file),
        }
        return self.write(name, torch.empty(0), {**attrs, **reference}, shape=shape)

    def write(
        self,
        name: str,
        tensor: torch.Tensor | None,
        attrs: Mapping[str, Any],
        *,
        shape: Sequence[int] | None = None,
    ) -> int:
        """Store `tensor` as float32 under `name` with provenance `attrs`; return its bytes.

        `tensor=None` with ``attrs["shape"]`` stores an all-zero array without writing any
        chunk (zarr's fill value). Overwrites an incomplete array of the same name. `shape`
        (the parameter's, recorded in attrs) is for a tensor stored in another layout.
        """
        data = None if tensor is None else float32_array(tensor)
        stored = tuple(data.shape) if data is not None else tuple(int(s) for s in attrs["shape"])
        param_shape = stored if shape is None else tuple(int(s) for s in shape)
        meta = {
            **attrs,
            "name": name,
            "shape": list(param_shape),
            "stored_dtype": "float32",
            "created": utc_now(),
            "tvsplit_version": tvsplit_version(),
        }
        write_array(self._group, param_key(name), data, meta, shape=stored)
        self._written(name)
        return math.prod(stored) * ITEMSIZE

    def _written(self, name: str) -> None:
        if self._complete is not None:
            self._complete.add(name)

    def copy_array(
        self,
        name: str,
        data: np.ndarray | None,
        attrs: Mapping[str, Any],
        *,
        shape: Sequence[int],
    ) -> None:
        """Store an array read from another entry with its provenance `attrs` kept as they
        are (``data=None``: all zeros of `shape`, no chunk written); for
        ``storage.upgrade``, which rewrites an older format's arrays unchanged."""
        write_array(self._group, param_key(name), data, attrs, shape=shape)
        self._written(name)

    def finish(self, parameters: Sequence[str], attrs: Mapping[str, Any]) -> None:
        """Mark the entry complete with its manifest (`parameters`, in order) and `attrs`.

        Raises CatalogueError naming the first parameter not written completely.
        """
        done = self.completed()
        missing = [name for name in parameters if name not in done]
        if missing:
            raise CatalogueError(
                f"entry {self.label}: cannot mark complete, {len(missing)} parameter(s) not "
                f"written, first {missing[0]!r}"
            )
        mark_complete(
            self._group,
            {
                **node_attrs(self._group),
                **attrs,
                "parameters": list(parameters),
                "completed": utc_now(),
            },
        )
