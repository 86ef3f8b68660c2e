"""Lazy, read-only views of checkpoint files: one tensor in memory at a time.

`Checkpoint` is a `Mapping[str, torch.Tensor]` over a single ``.safetensors`` file, a
sharded checkpoint (``*.safetensors.index.json``), or, only when explicitly allowed, a
pickle checkpoint (``.bin``/``.pt``, loaded with ``torch.load(weights_only=True)``).
Indexing loads exactly one tensor; each safetensors access opens and closes the file, so
no mapping of an already-read tensor stays resident and memory does not grow with the
number of parameters read.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import _TYPES as SAFETENSORS_TYPES
from tvsplit.storage.errors import PickleRefusedError, SourceError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
TASK_VECTOR_KIND = "task_vector"
KIND_METADATA_KEY = "tvsplit.kind"


def refuse_pickle(path: Path) -> None:
    """Raise PickleRefusedError naming `path` (pickle can run code on load)."""
    raise PickleRefusedError(
        f"{path}: pickle checkpoints can run arbitrary code when loaded and are refused; "
        "convert the checkpoint to safetensors, or pass --allow-pickle to load it with "
        "torch.load(weights_only=True)"
    )


class Checkpoint(Mapping[str, torch.Tensor]):
    """Parameter name → tensor, read lazily from one or more checkpoint files."""

    def __init__(self, weight_map: Mapping[str, Path], label: str) -> None:
        self._weight_map = dict(weight_map)
        self.label = label
        self._pickle_file: Path | None = None
        self._pickle_state: dict[str, torch.Tensor] | None = None

    # -- constructors ----------------------------------------------------------------------
    @classmethod
    def from_file(cls, path: Path, *, allow_pickle: bool = False) -> Checkpoint:
        """A checkpoint over one ``.safetensors`` (or, when allowed, pickle) file."""
        path = Path(path)
        if not path.is_file():
            raise SourceError(f"{path}: no such file")
        if path.suffix in PICKLE_SUFFIXES:
            if not allow_pickle:
                refuse_pickle(path)
            state = _load_pickle(path)
            return cls(dict.fromkeys(state, path), str(path))
        if path.suffix != ".safetensors":
            raise SourceError(f"{path}: expected a .safetensors file")
        try:
            with safe_open(str(path), framework="pt") as handle:
                names = list(handle.keys())
        except Exception as error:
            raise SourceError(f"{path}: not a readable safetensors file ({error})") from None
        return cls(dict.fromkeys(names, path), str(path))

    @classmethod
    def from_index(cls, index: Path, *, allow_pickle: bool = False) -> Checkpoint:
        """A sharded checkpoint described by an index JSON (``weight_map``: name → shard)."""
        index = Path(index)
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise SourceError(
                f"{index}: not a checkpoint index with a weight_map ({error})"
            ) from None
        if not isinstance(weight_map, Mapping):
            raise SourceError(f"{index}: weight_map is not a mapping of names to shard files")
        shards = {
            name: index.parent / _shard_name(index, name, shard)
            for name, shard in weight_map.items()
        }
        for name, shard in shards.items():
            if not shard.is_file():
                raise SourceError(f"{index}: shard {shard.name} (holding {name!r}) is missing")
            if shard.suffix in PICKLE_SUFFIXES and not allow_pickle:
                refuse_pickle(shard)
        _check_shards(index, shards)
        return cls(shards, str(index))

    # -- mapping ---------------------------------------------------------------------------
    def __getitem__(self, name: str) -> torch.Tensor:
        path = self.file_of(name)
        if path.suffix in PICKLE_SUFFIXES:
            return self._pickle_tensor(path, name)
        try:
            with safe_open(str(path), framework="pt") as handle:
                return handle.get_tensor(name)
        except Exception as error:  # a file changed or damaged since it was opened
            raise SourceError(f"{path}: cannot read tensor {name!r} ({error})") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._weight_map)

    def __len__(self) -> int:
        return len(self._weight_map)

    def __contains__(self, name: object) -> bool:
        return name in self._weight_map

    # -- metadata --------------------------------------------------------------------------
    def file_of(self, name: str) -> Path:
        """The file holding `name`; SourceError naming the checkpoint when absent."""
        try:
            return self._weight_map[name]
        except KeyError:
            raise SourceError(f"{self.label}: no parameter {name!r}") from None

    @property
    def files(self) -> list[Path]:
        """The distinct files of this checkpoint, in first-use order."""
        return list(dict.fromkeys(self._weight_map.values()))

    def header(self, name: str) -> tuple[tuple[int, ...], str]:
        """`(shape, dtype)` of a parameter, read from the file header (no data loaded)."""
        path = self.file_of(name)
        if path.suffix in PICKLE_SUFFIXES:
            tensor = self._pickle_tensor(path, name)
            return tuple(tensor.shape), str(tensor.dtype).removeprefix("torch.")
        with safe_open(str(path), framework="pt") as handle:
            view = handle.get_slice(name)
            return tuple(view.get_shape()), _safetensors_dtype(view.get_dtype())

    def headers(self) -> dict[str, tuple[tuple[int, ...], str]]:
        """`(shape, dtype)` of every parameter in checkpoint order, each file's header read
        once (no safetensors data loaded)."""
        found: dict[str, tuple[tuple[int, ...], str]] = {}
        for path in self.files:
            if path.suffix in PICKLE_SUFFIXES:
                names = [n for n, p in self._weight_map.items() if p == path]
                found.update({n: self.header(n) for n in names})
                continue
            with safe_open(str(path), framework="pt") as handle:
                for name in handle.keys():  # noqa: SIM118 (safe_open is not a mapping)
                    if self._weight_map.get(name) == path:
                        view = handle.get_slice(name)
                        found[name] = tuple(view.get_shape()), _safetensors_dtype(view.get_dtype())
        return {name: found[name] for name in self._weight_map}

    def _pickle_tensor(self, path: Path, name: str) -> torch.Tensor:
        if self._pickle_file != path:
            self._pickle_state = None
            self._pickle_state = _load_pickle(path)
            self._pickle_file = path
        assert self._pickle_state is not None
        return self._pickle_state[name]


def _shard_name(index: Path, name: str, shard: object) -> str:
    """The shard file an index entry names; SourceError naming the entry when it is not a
    plain relative path inside the index's folder (``../x``, ``/abs``: never followed)."""
    if not isinstance(shard, str) or not shard:
        raise SourceError(f"{index}: weight_map entry {name!r} does not name a shard file")
    normal = os.path.normpath(shard)
    if os.path.isabs(shard) or normal == ".." or normal.startswith(".." + os.sep):
        raise SourceError(
            f"{index}: weight_map entry {name!r} names {shard!r}, outside the checkpoint's "
            "folder; refused"
        )
    return normal


def _check_shards(index: Path, shards: Mapping[str, Path]) -> None:
    """Every safetensors shard opens (its header is sound and fits the file) and holds the
    tensors the index puts in it; SourceError naming the shard otherwise."""
    wanted: dict[Path, list[str]] = {}
    for name, shard in shards.items():
        wanted.setdefault(shard, []).append(name)
    for shard, names in wanted.items():
        if shard.suffix != ".safetensors":
            continue
        try:
            with safe_open(str(shard), framework="pt") as handle:
                held = set(handle.keys())
        except Exception as error:
            raise SourceError(f"{shard}: not a readable safetensors file ({error})") from None
        absent = [name for name in names if name not in held]
        if absent:
            raise SourceError(
                f"{index}: shard {shard.name} does not hold {absent[0]!r} "
                f"({len(absent)} tensor(s) the index puts there)"
            )


def file_metadata(path: Path) -> dict[str, str]:
    """The free-form ``__metadata__`` of a safetensors file (empty when absent)."""
    with safe_open(str(path), framework="pt") as handle:
        return dict(handle.metadata() or {})


_ST_DTYPES = {code: str(dtype).removeprefix("torch.") for code, dtype in SAFETENSORS_TYPES.items()}
"""safetensors dtype code → torch dtype name, from safetensors' own table (every code it can
store: F8, U16–U64 and C64 included)."""


def _safetensors_dtype(code: str) -> str:
    return _ST_DTYPES.get(code, code.lower())


def _load_pickle(path: Path) -> dict[str, torch.Tensor]:
    """A pickle checkpoint loaded with `weights_only=True` (memory-mapped when possible)."""
    try:
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # legacy (non-zip) format cannot be memory-mapped
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as error:  # weights_only refuses any object that is not plain data
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise SourceError(
            f"{path}: refused, it cannot be loaded as plain data with weights_only=True ({reason})"
        ) from None
    if (
        isinstance(state, Mapping)
        and "state_dict" in state
        and isinstance(state["state_dict"], Mapping)
    ):
        state = state["state_dict"]
    if not isinstance(state, Mapping) or not all(
        isinstance(v, torch.Tensor) for v in state.values()
    ):
        raise SourceError(f"{path}: expected a mapping of parameter names to tensors")
    return dict(state)
