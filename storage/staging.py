"""Replacing a complete catalogue entry without ever having none.

A changed source (a new hub revision, a local folder whose files changed) is ingested into a
*staged* entry beside the live one (``families/<family>/staging/...``); only once the staged
entry is complete does it take the live entry's place (`swap_in`). Guarantees:

- until the staged entry is complete, the live entry is untouched and still read;
- on a local catalogue the swap is one atomic ``renameat2(RENAME_EXCHANGE)`` where the file
  system has it; elsewhere (object storage has no rename) the live entry is removed and the
  staged one copied in with its own ``zarr.json`` last, so a reader never sees a complete
  marker over missing arrays;
- a process killed in the middle leaves a complete staged entry, which `swap_in` finishes at
  the next start (`recover`): the new data is never lost, and the old is removed only after
  the new is complete.
"""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path

import zarr
from tvsplit.storage.folders import exchange_folders
from tvsplit.storage.writes import is_complete
from zarr.abc.store import Store
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync
from zarr.storage import LocalStore

STAGING = "staging"
_METADATA = "zarr.json"


def staged_path(live_path: str) -> str:
    """``families/F/base`` → ``families/F/staging/base``; ``families/F/vectors/m`` →
    ``families/F/staging/vectors/m``."""
    parts = live_path.split("/")
    return "/".join([*parts[:2], STAGING, *parts[2:]])


def swap_in(root: zarr.Group, live_path: str) -> None:
    """Put the complete staged entry of `live_path` in the live entry's place.

    Raises ValueError when the staged entry is absent or not complete (nothing changes)."""
    staged = staged_path(live_path)
    try:
        node = root[staged]
    except KeyError:
        raise ValueError(f"no staged entry at {staged}") from None
    if not isinstance(node, zarr.Group) or not is_complete(node):
        raise ValueError(f"the staged entry at {staged} is not complete")
    store = root.store
    if isinstance(store, LocalStore):
        _swap_local(Path(store.root), live_path, staged)
    else:
        _swap_by_copy(store, live_path, staged)


def recover(root: zarr.Group, live_path: str) -> bool:
    """Finish a swap that a killed process left half-done: True when a complete staged entry
    was put in place. An incomplete staged entry is left for the next ingest to resume."""
    try:
        node = root[staged_path(live_path)]
    except KeyError:
        return False
    if isinstance(node, zarr.Group) and is_complete(node):
        swap_in(root, live_path)
        return True
    return False


def _swap_local(root: Path, live_path: str, staged: str) -> None:
    live_dir, staged_dir = root / live_path, root / staged
    if not live_dir.exists():
        live_dir.parent.mkdir(parents=True, exist_ok=True)
        staged_dir.rename(live_dir)
        return
    if exchange_folders(live_dir, staged_dir):  # one atomic step; the old is now staged
        shutil.rmtree(staged_dir)
        return
    aside = staged_dir.parent / f".old-{staged_dir.name}-{uuid.uuid4().hex[:8]}"
    live_dir.rename(aside)  # a kill here leaves the complete staged entry: `recover` ends it
    staged_dir.rename(live_dir)
    shutil.rmtree(aside)


def _swap_by_copy(store: Store, live_path: str, staged: str) -> None:
    """Object storage has no rename: remove the old, copy the new in (its own zarr.json
    last, so it is never marked complete over missing arrays), then drop the staged copy."""

    async def run() -> None:
        await store.delete_dir(live_path)
        keys = sorted([key async for key in store.list_prefix(f"{staged}/")])
        marker = f"{staged}/{_METADATA}"
        prototype = default_buffer_prototype()
        for key in [k for k in keys if k != marker] + [marker]:
            value = await store.get(key, prototype=prototype)
            assert value is not None, key
            await store.set(live_path + key[len(staged) :], value)
        await store.delete_dir(staged)

    sync(run())
