"""The one write protocol of the catalogue: partial, then data, then complete.

Every node tvsplit writes in Zarr (a catalogue entry's arrays, a decomposition run's
parameter groups, a basis pack) carries its attrs under the ``tvsplit`` key, with a
``status``. A group is created ``partial`` with its attrs, its arrays are written, and only
then is it marked ``complete``. An array's chunks are written first and its metadata last,
in one write, already ``complete`` (`write_array`): until then there is no array to read,
only chunks, which the next write of the name removes (and `storage.gc` once idle). A
reader trusts complete nodes only, so a crash at any point leaves nothing half-written that
passes for complete, and a rerun redoes exactly the nodes that are not complete. A node
whose metadata cannot be read (cut short by a crash) counts as partial.

The catalogue's root carries the format version of its layout (``FORMAT_VERSION``, written
by `mark_format` when a catalogue is created and by ``tvsplit catalogue upgrade``); a
catalogue without one predates it (`LEGACY_FORMAT`).

All arrays are float32, chunked by whole rows (`row_chunks`), compressed with Blosc's LZ4
after a byte shuffle (`compressors`) and checksummed per chunk (CRC-32C), whoever writes
them; a node marked complete records the manifest of its chunks (``storage.integrity``), so
readers catch a missing, truncated or corrupt chunk. Zarr records the codecs of each array
in its metadata, so arrays written with earlier codecs (zstd, by tvsplit before this one)
read as they are.
"""

from __future__ import annotations

import asyncio
import math
import warnings
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import zarr
from tvsplit.storage.integrity import MANIFEST, IntegrityError, checksum_codec, stored_manifest
from tvsplit.storage.lazy import lazy_module
from zarr import AsyncArray
from zarr.codecs import BloscCodec
from zarr.core.buffer import default_buffer_prototype
from zarr.core.group import GroupMetadata
from zarr.core.metadata import ArrayV3Metadata
from zarr.core.sync import sync
from zarr.errors import ZarrUserWarning
from zarr.storage import MemoryStore, StorePath

if TYPE_CHECKING:
    import torch
else:
    torch = lazy_module("torch")  # imported on first use (storage/lazy.py)

ATTRS = "tvsplit"
ZARR_JSON = "zarr.json"
COMPLETE = "complete"
PARTIAL = "partial"
#: The compressor of every array tvsplit writes: Blosc's LZ4 after a byte shuffle (the four
#: bytes of each float32 grouped by position, so exponents sit together). Chosen against
#: zstd level 1 (used before) on GPT-2-sized task vectors (`benchmarks/ingest_bench.py
#: --codecs`): float32 noise-like deltas 0.94 of raw bytes against zstd's 0.88, deltas of
#: bfloat16 models 0.46 against 0.36, at 28-70 % less CPU to write (two runs) and less to read; no
#: compression wrote faster still but would double a bfloat16 family's catalogue.
#: (Type size and shuffle are left to zarr, which sets them from each array's dtype.)
BLOSC = {"cname": "lz4", "clevel": 5}
#: The catalogue layout this code writes, in the root's attrs under ``FORMAT_KEY``.
#: 1 (`LEGACY_FORMAT`, nothing recorded; tvsplit before the format version): arrays without
#: per-chunk CRC-32C or chunk manifests, LoRA members stored dense.
#: 2: every stored array checksummed per chunk (CRC-32C), every complete node recording its
#: chunk manifest (`storage.integrity`); LoRA members may be stored as factors
#: (`storage.lowrank`). Readers of 2 read 1 (unchecked, one warning); `storage.upgrade`
#: rewrites 1 as 2.
FORMAT_VERSION = 2
LEGACY_FORMAT = 1
FORMAT_KEY = "format_version"
CHUNK_TARGET = 8 << 20
CHUNK_MAX = 16 << 20
ITEMSIZE = 4  # float32
#: Every chunk written is stored, even one that is all zeros: zarr's test for a chunk equal to
#: the fill value compares it element by element as raw bytes (11 % of ingest's CPU time,
#: measured), and an all-zero chunk compresses to almost nothing. (An all-zero array given
#: as ``data=None`` still stores no chunk.)
WRITE_CONFIG = {"write_empty_chunks": True}
# An array whose write was cut short has chunks but no metadata (`write_array`): no node, by
# design, which zarr reports with a warning on every listing of its group. Not news to a user.
warnings.filterwarnings(
    "ignore",
    message=r"Object at .* is not recognized as a component of a Zarr hierarchy",
    category=ZarrUserWarning,
)


def row_chunks(shape: Sequence[int], itemsize: int = ITEMSIZE) -> tuple[int, ...]:
    """Chunk shape for an array: whole rows, about 8 MiB per chunk (at most 16 MiB).

    A row larger than 16 MiB is split along its next dimensions as well.
    """
    shape = tuple(int(s) for s in shape)
    if not shape:
        return ()
    chunks = list(shape)
    for axis in range(len(shape)):
        inner = math.prod(chunks[axis + 1 :]) * itemsize
        if inner * shape[axis] <= CHUNK_MAX:
            break
        if inner <= CHUNK_MAX:
            chunks[axis] = max(1, min(shape[axis], CHUNK_TARGET // max(inner, 1)))
            break
        chunks[axis] = 1
    return tuple(max(1, c) for c in chunks)


def compressors() -> tuple[Any, ...]:
    """The compressor of every stored array (before its checksum): Blosc as ``BLOSC``."""
    return (BloscCodec(**BLOSC),)


def codecs() -> tuple[Any, ...]:
    """The bytes codecs of every stored array: `compressors`, then CRC-32C."""
    return (*compressors(), checksum_codec())


def float32_array(tensor: torch.Tensor) -> np.ndarray:
    """`tensor` as a contiguous float32 numpy array on the CPU (no copy when it is one)."""
    return tensor.detach().to(device="cpu", dtype=torch.float32).contiguous().numpy()


def node_attrs(node: zarr.Group | zarr.Array) -> dict[str, Any]:
    """The node's ``tvsplit`` attrs; empty when absent or unreadable (cut short by a crash)."""
    try:
        return dict(node.attrs.get(ATTRS, {}))
    except Exception:
        return {}


def status(node: zarr.Group | zarr.Array) -> str:
    """``complete`` or ``partial`` (an unreadable or unmarked node is partial)."""
    return str(node_attrs(node).get("status", PARTIAL))


def is_complete(node: zarr.Group | zarr.Array) -> bool:
    return status(node) == COMPLETE


def format_version(root: zarr.Group) -> int | None:
    """The format version recorded in the catalogue root's attrs; None when none is (a new,
    empty root, or a catalogue written before versions: `LEGACY_FORMAT`)."""
    value = node_attrs(root).get(FORMAT_KEY)
    return None if value is None else int(value)


def mark_format(root: zarr.Group, version: int = FORMAT_VERSION, **extra: Any) -> None:
    """Record ``version`` (and ``extra`` attrs, e.g. when it was upgraded) in the root's attrs,
    keeping the others."""
    root.attrs[ATTRS] = {**node_attrs(root), **extra, FORMAT_KEY: int(version)}


def mark_partial(node: zarr.Group | zarr.Array, attrs: Mapping[str, Any]) -> None:
    """Replace the node's attrs with `attrs`, marked partial (before its data is written)."""
    node.attrs[ATTRS] = {**attrs, "status": PARTIAL}


def mark_complete(node: zarr.Group | zarr.Array, attrs: Mapping[str, Any]) -> None:
    """Replace the node's attrs with `attrs`, marked complete: call it after the data."""
    node.attrs[ATTRS] = {**attrs, "status": COMPLETE}


def array_metadata(shape: tuple[int, ...]) -> ArrayV3Metadata:
    """The zarr metadata (no attrs) of a float32 array of ``shape`` stored the catalogue's
    way (`row_chunks`, `codecs`, fill value 0): made by zarr's own ``create_array`` in
    memory, once per shape and codecs, so it is exactly what zarr would write."""
    chosen = codecs()
    key = (tuple(shape), repr(chosen))
    if key not in _METADATA:
        template = zarr.create_array(
            MemoryStore(), shape=shape, dtype="float32", chunks=row_chunks(shape) if shape else (),
            compressors=chosen, fill_value=0.0,
        )  # fmt: skip
        assert isinstance(template.metadata, ArrayV3Metadata)
        _METADATA[key] = template.metadata
    return _METADATA[key]


_METADATA: dict[tuple[tuple[int, ...], str], ArrayV3Metadata] = {}


async def _write_node(
    store_path: StorePath, data: np.ndarray | None, metadata: ArrayV3Metadata, attrs: Any
) -> tuple[AsyncArray, dict[str, str] | None]:
    """Write one array at `store_path`: whatever was there goes (its metadata first, so a
    crash part-way never leaves old metadata over a mix of chunks), the chunks are written,
    their manifest read back by key, and only then the metadata, in one write with
    ``attrs`` (``None``: no tvsplit attrs, for a group's arrays whose manifests the group
    records). Until that last write the node has no metadata: readers do not see it."""
    await (store_path / ZARR_JSON).delete()
    await store_path.delete_dir()
    array = AsyncArray(metadata=metadata, store_path=store_path, config=WRITE_CONFIG)
    manifest: dict[str, str] | None = {}
    if data is not None:
        await array.setitem(Ellipsis, data)
        manifest = await stored_manifest(array)
        chunks = math.prod(array.cdata_shape)
        if manifest is not None and len(manifest) != chunks:
            # Every chunk was just written (empty ones too): one gone means another writer
            # replaced the node meanwhile; completing it would record a manifest with a hole.
            raise IntegrityError(
                f"{store_path}: {chunks - len(manifest)} of {chunks} chunk(s) vanished while "
                "the array was written (another process writing the same node?); nothing "
                "was marked complete: rerun"
            )
    if attrs is not None:
        recorded = {**attrs, MANIFEST: manifest} if manifest is not None else dict(attrs)
        metadata = metadata.update_attributes({ATTRS: {**recorded, "status": COMPLETE}})
    prototype = default_buffer_prototype()
    await (store_path / ZARR_JSON).set(metadata.to_buffer_dict(prototype)[ZARR_JSON])
    return AsyncArray(metadata=metadata, store_path=store_path, config=WRITE_CONFIG), manifest


async def _ensure_groups(store_path: StorePath, names: Sequence[str]) -> None:
    """Plain group metadata at each of ``names`` under ``store_path`` where none is (zarr
    writes it only if absent, so two writers of the same folder do not collide)."""
    group = GroupMetadata(zarr_format=3).to_buffer_dict(default_buffer_prototype())[ZARR_JSON]
    for index in range(len(names)):
        await (store_path / "/".join(names[: index + 1]) / ZARR_JSON).set_if_not_exists(group)


def write_array(
    group: zarr.Group,
    name: str,
    data: np.ndarray | None,
    attrs: Mapping[str, Any],
    *,
    shape: Sequence[int] | None = None,
) -> zarr.Array:
    """Write one float32 array under `name` by the protocol and return it.

    For an array the protocol takes one metadata write: the chunks are written first and
    the metadata last, marked complete with the chunks' manifest, so a crash leaves either
    the complete array or none a reader sees (chunks without metadata are no node; the
    next write of `name` removes them). The parent `group` exists, so its ancestors are not
    checked again (zarr's ``create_array`` checks and writes every ancestor of the array:
    ten store requests for an entry's array, more than its data takes for small arrays).

    ``data=None`` with ``shape`` stores an all-zero array without writing any chunk (zarr's
    fill value). Replaces whatever an earlier attempt left under `name`; `name` may be a
    path (missing intermediate groups are written only if absent, which does not race)."""
    shape = tuple(int(s) for s in (data.shape if data is not None else (shape or ())))
    if data is not None:
        data = np.ascontiguousarray(data, dtype=np.float32)
    *folders, _ = name.split("/")
    base = StorePath(group.store, group.path)
    metadata = array_metadata(shape)

    async def write() -> AsyncArray:
        if folders:
            await _ensure_groups(base, folders)
        array, _ = await _write_node(base / name, data, metadata, attrs)
        return array

    return zarr.Array(sync(write()))


def write_group(
    parent: zarr.Group,
    name: str,
    arrays: Mapping[str, np.ndarray],
    attrs: Mapping[str, Any],
    *,
    partial_attrs: Mapping[str, Any] | None = None,
) -> zarr.Group:
    """Write a group of float32 arrays under `name` by the protocol: the group is created
    partial (with `partial_attrs`), its arrays written (concurrently), then it is marked
    complete with `attrs` and their manifests. Replaces whatever an earlier attempt left
    under `name`."""
    group = parent.create_group(
        name, overwrite=True, attributes={ATTRS: {**(partial_attrs or {}), "status": PARTIAL}}
    )
    base = StorePath(group.store, group.path)
    data = {key: np.ascontiguousarray(value, np.float32) for key, value in arrays.items()}
    metadata = {key: array_metadata(tuple(value.shape)) for key, value in data.items()}

    async def write() -> list[dict[str, str] | None]:
        written = await asyncio.gather(
            *(_write_node(base / key, data[key], metadata[key], None) for key in data)
        )
        return [manifest for _, manifest in written]

    manifests = dict(zip(data, sync(write()), strict=True))
    unrecorded = None in manifests.values()
    mark_complete(group, attrs if unrecorded else {**attrs, MANIFEST: manifests})
    return group
