"""Integrity of stored arrays: per-chunk checksums, and a manifest of the chunks at completion.

Every array tvsplit writes (``storage.writes``) gets zarr 3's ``crc32c`` codec after its
compressor: each stored chunk ends with the CRC-32C of its compressed bytes, and zarr checks
it on decode, so a flipped or truncated chunk fails to read instead of decoding to wrong numbers.
A *missing* chunk would still read as the fill value (zeros), by zarr's design; so when an
array is completed its **manifest** is recorded with it: the key of every stored chunk and
that chunk's stored CRC (its last four bytes, read back by key with a 4-byte suffix
request). Readers check the manifest by key (one small ranged read per chunk, concurrently;
never a listing of the store, which is slow and was stale on S3) before decoding, so a
deleted chunk, or one replaced by another write, is caught too.

Guarantees: ``read_checked`` returns the array's data only if every manifest chunk is
present with its recorded CRC and decodes with a matching checksum; otherwise it raises
``IntegrityError`` naming the array and what to do. Arrays written before this (no manifest,
no checksum codec) are read unchecked, with one ``IntegrityWarning`` per store and process,
and reported by ``tvsplit catalogue verify``. Works on any zarr store (local, fsspec, S3).
"""

from __future__ import annotations

import asyncio
import threading
import warnings
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import numpy as np
import zarr
from tvsplit.storage.errors import CatalogueError
from zarr.abc.store import SuffixByteRequest
from zarr.codecs import Crc32cCodec
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync

__all__ = [
    "MANIFEST",
    "IntegrityError",
    "IntegrityWarning",
    "check_manifest",
    "checksum_codec",
    "has_checksums",
    "read_checked",
    "stored_manifest",
    "warn_once",
]

#: Key of the manifest ({chunk key: stored CRC-32C, hex}) in an array's tvsplit attrs (and,
#: for a group written whole, ``{array name: manifest}`` in the group's attrs).
MANIFEST = "chunks"
_CHECKSUM_MISMATCH = "checksum do not match"
_warned: set[str] = set()
_lock = threading.Lock()

T = TypeVar("T")


class IntegrityError(CatalogueError):
    """A stored array whose chunks are missing, truncated or corrupt; the message names the
    entry or run, the array and what to do."""


class IntegrityWarning(UserWarning):
    """Arrays read without checks because they were written before integrity manifests."""


def checksum_codec() -> Crc32cCodec:
    """The bytes-to-bytes codec every stored array ends with (after its compressor)."""
    return Crc32cCodec()


def has_checksums(array: zarr.AsyncArray | zarr.Array) -> bool:
    """True if the array's chunks carry a CRC-32C (written by this version or later)."""
    return any(isinstance(codec, Crc32cCodec) for codec in array.compressors)


def _chunk_keys(array: zarr.AsyncArray | zarr.Array) -> list[str]:
    encode = array.metadata.encode_chunk_key
    return [encode(coords) for coords in np.ndindex(*array.cdata_shape)]


async def _suffixes(array: zarr.AsyncArray | zarr.Array, keys: list[str]) -> list[bytes | None]:
    prototype = default_buffer_prototype()
    request = SuffixByteRequest(4)
    base = array.store_path

    async def one(key: str) -> bytes | None:
        buffer = await (base / key).get(prototype=prototype, byte_range=request)
        return None if buffer is None else buffer.to_bytes()

    return list(await asyncio.gather(*(one(key) for key in keys)))


async def stored_manifest(array: zarr.AsyncArray | zarr.Array) -> dict[str, str] | None:
    """{chunk key: stored CRC-32C (hex)} of every chunk the store holds for ``array`` (chunks
    never written, which read as the fill value, are left out). Await it after the data.
    None for an array without the checksum codec (nothing to record)."""
    if not has_checksums(array):
        return None
    keys = _chunk_keys(array)
    tails = await _suffixes(array, keys)
    return {key: tail.hex() for key, tail in zip(keys, tails, strict=True) if tail is not None}


def _advice(label: str) -> str:
    if "/decompositions/" in f"/{label}" or " run " in label:
        return "rerun the decomposition (damaged parameters are redone) or remove the run"
    if "/bases/" in label:
        return "it is a cache: run `tvsplit catalogue gc` or rerun the decomposition"
    return "re-ingest the member (`tvsplit ingest`) or restore the catalogue from a backup"


def check_manifest(array: zarr.Array, manifest: Mapping[str, str], label: str) -> None:
    """Raise IntegrityError naming ``label`` if a chunk of ``manifest`` is missing or its
    stored CRC is not the recorded one (a truncated or replaced chunk). Reads by key."""
    keys = sorted(manifest)
    if not keys:
        return
    tails = sync(_suffixes(array, keys))
    for key, tail in zip(keys, tails, strict=True):
        if tail is None:
            raise IntegrityError(f"{label}: chunk {key} is missing; {_advice(label)}")
        if tail.hex() != manifest[key]:
            raise IntegrityError(
                f"{label}: chunk {key} is truncated or was overwritten (its checksum is not "
                f"the one recorded when the array was completed); {_advice(label)}"
            )


def warn_once(store: object, message: str) -> None:
    """Warn ``message`` (an IntegrityWarning) unless this process already warned about the
    store: one warning per store and process, whichever reader saw it first."""
    root = str(store)
    with _lock:
        if root in _warned:
            return
        _warned.add(root)
    warnings.warn(message, IntegrityWarning, stacklevel=4)


def _warn_unchecked(array: zarr.Array, label: str) -> None:
    warn_once(
        array.store,
        f"{label}: written before integrity manifests; arrays of {array.store} are read "
        "unchecked (`tvsplit catalogue verify` lists them; `tvsplit catalogue upgrade` adds "
        "checksums and manifests, keeping every array)",
    )


def read_checked(
    array: zarr.Array,
    manifest: Mapping[str, str] | None,
    label: str,
    read: Callable[[], T] | None = None,
) -> T | np.ndarray:
    """``read()`` (default: the whole array) after checking ``manifest`` by key, with any
    checksum failure of a chunk's decode turned into IntegrityError naming ``label``.

    ``manifest=None`` means the array predates manifests: read unchecked, warn once."""
    if manifest is None:
        _warn_unchecked(array, label)
    else:
        check_manifest(array, manifest, label)
    try:
        return read() if read is not None else array[...]
    except ValueError as error:
        if _CHECKSUM_MISMATCH in str(error):
            raise IntegrityError(
                f"{label}: a chunk is corrupt (checksum mismatch on read); {_advice(label)}"
            ) from None
        raise
    except RuntimeError as error:  # zstd: a chunk too short even to carry its checksum
        if "ecompress" in str(error) or "zstd" in str(error).lower():
            raise IntegrityError(
                f"{label}: a chunk is truncated ({error}); {_advice(label)}"
            ) from None
        raise


def manifest_of(attrs: Mapping[str, Any], name: str | None = None) -> dict[str, str] | None:
    """The manifest recorded in ``attrs`` (an array's; or, with ``name``, a group's for its
    array ``name``); None when it predates manifests."""
    recorded = attrs.get(MANIFEST)
    if recorded is None:
        return None
    if name is not None:
        recorded = recorded.get(name) if isinstance(recorded, Mapping) else None
        if recorded is None:
            return None
    return dict(recorded)
