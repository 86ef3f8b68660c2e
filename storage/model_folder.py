"""Write a model folder tensor by tensor: sharded safetensors, an index, the base's config and
tokenizer files, and a model card.

The layout is the one transformers writes and reads: one ``model.safetensors`` when
everything fits in one shard, else ``model-00001-of-0000N.safetensors`` … plus
``model.safetensors.index.json`` (``{"metadata": {"total_size", "total_parameters"},
"weight_map": {tensor: file}}``). Every shard carries the safetensors metadata
``{"format": "pt"}`` that transformers checks. When the base copied from is a diffusers
folder (its ``config.json`` has diffusers' ``_class_name`` / ``_diffusers_version`` keys), the
folder gets diffusers' names instead (``diffusion_pytorch_model.safetensors``, shards
``diffusion_pytorch_model-00001-of-0000N.safetensors`` and
``diffusion_pytorch_model.safetensors.index.json``), so ``UNet2DModel.from_pretrained`` and
the like load it.

Guarantees: the folder is built in a temporary folder beside the target
(``.<name>.tmp-<random>``) and moved into place only after the last file is written, so a
folder at the target is always complete; an existing target is replaced in one atomic
exchange (``FolderReplacement``), never removed before its replacement is complete. An
exception inside the ``with`` block removes the temporary folder and leaves the target
untouched. A process killed outright can leave a ``.<name>.tmp-*`` folder beside the target
(removed by ``tvsplit catalogue gc``-style clean-up), never a partial folder at it.
Memory: with a ``plan`` (every tensor's name, shape and dtype, in order: what an edit knows
from its base before computing anything) the shards and their safetensors headers are laid
out up front and each tensor is written at its offset as it is added, so nothing is
buffered and writing overlaps the caller's compute; the files are the ones ``save_file``
would write (tensors aligned, largest item size first) up to the order of equal-sized ones.
Without a plan, tensors are held until their shard is written, so at most one shard
(``max_shard_bytes``, plus one tensor) is buffered.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import torch
from safetensors.torch import _TYPES as SAFETENSORS_DTYPES
from safetensors.torch import save_file
from tvsplit.storage.folders import (
    FolderError,
    FolderReplacement,
    atomic_folder,
    exchange_folders,
    recover_replacement,
)
from tvsplit.storage.model_files import SIDE_FILE_NAMES, side_files

__all__ = [
    "DEFAULT_MAX_SHARD_BYTES",
    "DIFFUSERS_LAYOUT",
    "MODEL_FILES",
    "TRANSFORMERS_LAYOUT",
    "FolderReplacement",
    "ModelFolderError",
    "ModelFolderSummary",
    "ModelFolderWriter",
    "WeightLayout",
    "atomic_folder",
    "exchange_folders",
    "recover_replacement",
    "weight_layout",
    "write_model_folder",
]

DEFAULT_MAX_SHARD_BYTES = 2 * 10**9

#: Files copied from the base's folder when present (weights and README are never copied):
#: the one list of `storage.model_files`, which the hub fetch uses too.
MODEL_FILES = SIDE_FILE_NAMES

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


@dataclass(frozen=True)
class WeightLayout:
    """File names of one library's weights: ``<stem>.safetensors`` when unsharded, else
    ``<stem>-00001-of-0000N.safetensors`` … and ``<stem>.safetensors.index.json``."""

    stem: str

    @property
    def single_file(self) -> str:
        return f"{self.stem}.safetensors"

    @property
    def index_file(self) -> str:
        return f"{self.stem}.safetensors.index.json"

    def shard(self, i: int, count: int) -> str:
        return f"{self.stem}-{i:05d}-of-{count:05d}.safetensors"


TRANSFORMERS_LAYOUT = WeightLayout("model")
DIFFUSERS_LAYOUT = WeightLayout("diffusion_pytorch_model")


def weight_layout(base_folder: str | Path | None) -> WeightLayout:
    """Diffusers' layout when ``base_folder`` holds a diffusers ``config.json`` (one with
    ``_class_name`` or ``_diffusers_version``), transformers' otherwise."""
    if base_folder is None:
        return TRANSFORMERS_LAYOUT
    config = Path(base_folder) / "config.json"
    try:
        data = json.loads(config.read_text(encoding="utf-8")) if config.is_file() else {}
    except (OSError, ValueError):
        return TRANSFORMERS_LAYOUT
    if isinstance(data, dict) and ("_diffusers_version" in data or "_class_name" in data):
        return DIFFUSERS_LAYOUT
    return TRANSFORMERS_LAYOUT


class ModelFolderError(FolderError):
    """A model folder that cannot be written as asked; the message names the folder/tensor."""


Plan = Mapping[str, tuple[tuple[int, ...], str | torch.dtype]]
"""Tensor name → (shape, dtype), in the order the tensors will be added."""

_SAFETENSORS_CODE = {dtype: code for code, dtype in SAFETENSORS_DTYPES.items()}


def _torch_dtype(value: str | torch.dtype, where: str) -> torch.dtype:
    dtype = value if isinstance(value, torch.dtype) else getattr(torch, str(value), None)
    if not isinstance(dtype, torch.dtype) or dtype not in _SAFETENSORS_CODE:
        raise ModelFolderError(f"{where}: dtype {value!r} cannot be stored in safetensors")
    return dtype


class _PlannedShards:
    """The shard files of a plan: headers written and files sized on creation, each tensor
    then written at its offset (``os.pwrite``); `missing` names what was never written.

    Shards split as the buffered writer splits them (plan order, ``max_bytes``); inside a
    shard the data is laid out largest item size first, as ``save_file`` does, so every
    tensor stays aligned to its item size (readers that map the file need that)."""

    def __init__(self, folder: Path, plan: Plan, max_bytes: int, metadata: dict, where: str):
        self.specs: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
        self.shards: list[list[str]] = []
        size = 0
        for name, (shape, dtype) in plan.items():
            dtype = _torch_dtype(dtype, f"{where}: tensor {name!r}")
            shape = tuple(int(n) for n in shape)
            nbytes = dtype.itemsize * math.prod(shape)
            if not self.shards or (self.shards[-1] and size + nbytes > max_bytes):
                self.shards.append([])
                size = 0
            self.specs[name] = (shape, dtype)
            self.shards[-1].append(name)
            size += nbytes
        self.paths = [
            folder / f"shard-{i:05d}.safetensors.partial" for i in range(1, len(self.shards) + 1)
        ]
        self._place: dict[str, tuple[int, int, int]] = {}  # name → shard, offset, nbytes
        self._fds: list[int] = []
        self._data_start: list[int] = []
        self._written: set[str] = set()
        try:
            for index, (path, names) in enumerate(zip(self.paths, self.shards, strict=True)):
                self._create(index, path, names, metadata)
        except OSError as error:
            self.close()
            raise ModelFolderError(f"{where}: creating a shard: {error}") from error

    def _create(self, index: int, path: Path, names: list[str], metadata: dict) -> None:
        header: dict[str, object] = {"__metadata__": metadata}
        end = 0
        for name in sorted(names, key=lambda n: -self.specs[n][1].itemsize):  # stable
            shape, dtype = self.specs[name]
            nbytes = dtype.itemsize * math.prod(shape)
            self._place[name] = (index, end, nbytes)
            header[name] = {
                "dtype": _SAFETENSORS_CODE[dtype], "shape": list(shape),
                "data_offsets": [end, end + nbytes],
            }  # fmt: skip
            end += nbytes
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)  # safetensors pads its header to 8 bytes
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        self._fds.append(fd)
        os.write(fd, len(text).to_bytes(8, "little") + text)
        os.ftruncate(fd, 8 + len(text) + end)  # sized up front: tensors land at offsets
        self._data_start.append(8 + len(text))

    def write(self, name: str, tensor: torch.Tensor) -> None:
        shard, offset, nbytes = self._place[name]
        data = memoryview(tensor.reshape(-1).view(torch.uint8).numpy()) if nbytes else b""
        position = self._data_start[shard] + offset
        while data:
            done = os.pwrite(self._fds[shard], data, position)
            data, position = data[done:], position + done
        self._written.add(name)

    @property
    def missing(self) -> list[str]:
        return [name for name in self.specs if name not in self._written]

    def close(self) -> None:
        while self._fds:
            os.close(self._fds.pop())


@dataclass(frozen=True)
class ModelFolderSummary:
    """What was written: the folder, its weight files, byte and parameter totals."""

    path: Path
    files: tuple[str, ...]
    total_size: int
    total_parameters: int
    weight_map: dict[str, str] = field(repr=False)


class ModelFolderWriter:
    """Streamed writer of one model folder; use as a context manager::

        with ModelFolderWriter(out, copy_from=base_dir, model_card=text) as writer:
            for name, tensor in tensors:
                writer.add(name, tensor)
        summary = writer.summary

    Tensors are written in the order added; a shard is closed when the next tensor would
    take it over ``max_shard_bytes`` (a tensor larger than the limit gets a shard of its
    own), as transformers does. ``layout`` names the files (default: diffusers' names when
    ``copy_from`` is a diffusers folder, see ``weight_layout``; transformers' otherwise).
    ``plan``: every tensor's (shape, dtype) by name, in order; then each tensor goes to disk
    as it is added (module docstring), and adding one the plan does not hold, with another
    shape or dtype, or closing before every planned tensor was added is a ModelFolderError.
    """

    def __init__(
        self,
        target: str | Path,
        *,
        max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
        copy_from: str | Path | None = None,
        copy_files: tuple[str, ...] | None = None,
        model_card: str | None = None,
        extra_files: Mapping[str, str | bytes] | None = None,
        metadata: Mapping[str, str] | None = None,
        overwrite: bool = False,
        layout: WeightLayout | None = None,
        replacement: FolderReplacement | None = None,
        plan: Plan | None = None,
    ) -> None:
        if max_shard_bytes <= 0:
            raise ModelFolderError(f"max_shard_bytes must be > 0, got {max_shard_bytes}")
        self.target = Path(target).absolute()
        self.max_shard_bytes = max_shard_bytes
        self.copy_from = None if copy_from is None else Path(copy_from)
        if self.copy_from is not None and not self.copy_from.is_dir():
            raise ModelFolderError(f"{self.copy_from}: base folder to copy files from not found")
        self.copy_files = copy_files
        self.layout = layout or weight_layout(self.copy_from)
        self.model_card = model_card
        self.extra_files = dict(extra_files or {})
        self.metadata = {**(metadata or {}), "format": "pt"}
        self.overwrite = overwrite
        self.replacement = replacement
        self.plan = None if plan is None else dict(plan)
        self._planned: _PlannedShards | None = None
        self.summary: ModelFolderSummary | None = None
        self._context: AbstractContextManager[Path] | None = None
        self._folder: Path | None = None
        self._buffer: dict[str, torch.Tensor] = {}
        self._buffer_bytes = 0
        self._storages: set[int] = set()
        self._shards: list[list[str]] = []
        self._names: set[str] = set()
        self._total_size = 0
        self._total_parameters = 0

    # -- context management
    def __enter__(self) -> ModelFolderWriter:
        if self.replacement is not None:  # the caller commits it (with other folders)
            self._context = nullcontext(self.replacement.stage(self.target))
        else:
            self._context = atomic_folder(self.target, overwrite=self.overwrite)
        self._folder = self._context.__enter__()
        if self.plan is not None:
            try:
                self._planned = _PlannedShards(
                    self._folder, self.plan, self.max_shard_bytes, self.metadata, str(self.target)
                )
            except BaseException as error:
                self._context.__exit__(type(error), error, error.__traceback__)
                self._context = self._folder = None
                raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        assert self._context is not None
        context = self._context
        try:
            if exc_type is None and self.summary is None:
                self._write_remaining()
        except BaseException as error:
            context.__exit__(type(error), error, error.__traceback__)
            raise
        else:
            context.__exit__(exc_type, exc, traceback)
        finally:
            if self._planned is not None:
                self._planned.close()
            self._context = None
            self._folder = None
            self._buffer.clear()

    def close(self) -> ModelFolderSummary:
        """Write what is buffered, the index and the side files now (the ``with`` block's end
        then only moves the folder into place); returns the summary."""
        if self.summary is None:
            self._write_remaining()
        assert self.summary is not None
        return self.summary

    def _require_open(self) -> Path:
        if self._folder is None or self._context is None:
            raise ModelFolderError(f"{self.target}: the writer is not open; use it in a `with`")
        return self._folder

    # -- tensors
    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Queue one tensor; writes the current shard first if this one would overflow it."""
        self._require_open()
        if name in self._names:
            raise ModelFolderError(f"{self.target}: tensor {name!r} was added twice")
        if not isinstance(tensor, torch.Tensor):
            raise ModelFolderError(
                f"{self.target}: tensor {name!r} is a {type(tensor).__name__}, not a torch.Tensor"
            )
        tensor = tensor.detach().to("cpu").contiguous()
        if self._planned is not None:
            self._add_planned(name, tensor)
            return
        storage = tensor.untyped_storage()
        if storage.data_ptr() in self._storages or storage.nbytes() != tensor.nbytes:
            tensor = tensor.clone()  # safetensors refuses tensors that share memory
        nbytes = tensor.nbytes
        if self._buffer and self._buffer_bytes + nbytes > self.max_shard_bytes:
            self._flush()
        self._buffer[name] = tensor
        self._storages.add(tensor.untyped_storage().data_ptr())
        self._buffer_bytes += nbytes
        self._names.add(name)
        self._total_size += nbytes
        self._total_parameters += tensor.numel()

    def _add_planned(self, name: str, tensor: torch.Tensor) -> None:
        assert self._planned is not None
        spec = self._planned.specs.get(name)
        if spec is None:
            raise ModelFolderError(f"{self.target}: tensor {name!r} is not in the write plan")
        if (tuple(tensor.shape), tensor.dtype) != spec:
            raise ModelFolderError(
                f"{self.target}: tensor {name!r} is {tuple(tensor.shape)} {tensor.dtype}; "
                f"the write plan says {spec[0]} {spec[1]}"
            )
        try:
            self._planned.write(name, tensor)
        except OSError as error:
            raise ModelFolderError(f"{self.target}: writing tensor {name!r}: {error}") from error
        self._names.add(name)
        self._total_size += tensor.nbytes
        self._total_parameters += tensor.numel()

    def _flush(self) -> None:
        if self._planned is not None:
            return
        folder = self._require_open()
        if not self._buffer:
            return
        path = folder / f"shard-{len(self._shards) + 1:05d}.safetensors.partial"
        try:
            save_file(self._buffer, str(path), metadata=self.metadata)
        except Exception as error:
            raise ModelFolderError(f"{self.target}: writing shard {path.name}: {error}") from error
        self._shards.append(list(self._buffer))
        self._buffer = {}
        self._buffer_bytes = 0
        self._storages = set()

    def _write_remaining(self) -> None:
        folder = self._require_open()
        self._flush()
        if self._planned is not None:
            missing = self._planned.missing
            if missing:
                more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
                raise ModelFolderError(
                    f"{self.target}: {len(missing)} planned tensor(s) were never added: "
                    f"{', '.join(missing[:3])}{more}"
                )
            self._planned.close()
            self._shards = self._planned.shards
        if not self._shards:
            raise ModelFolderError(f"{self.target}: no tensors were added")
        count = len(self._shards)
        layout = self.layout
        files = (
            [layout.single_file]
            if count == 1
            else [layout.shard(i, count) for i in range(1, count + 1)]
        )
        weight_map: dict[str, str] = {}
        for i, (names, file) in enumerate(zip(self._shards, files, strict=True), start=1):
            os.rename(folder / f"shard-{i:05d}.safetensors.partial", folder / file)
            weight_map.update(dict.fromkeys(names, file))
        if count > 1:
            index = {
                "metadata": {
                    "total_size": self._total_size,
                    "total_parameters": self._total_parameters,
                },
                "weight_map": dict(sorted(weight_map.items())),
            }
            (folder / layout.index_file).write_text(json.dumps(index, indent=2) + "\n")
        self._copy_side_files(folder)
        self.summary = ModelFolderSummary(
            path=self.target,
            files=tuple(files),
            total_size=self._total_size,
            total_parameters=self._total_parameters,
            weight_map=weight_map,
        )

    def _copy_side_files(self, folder: Path) -> None:
        if self.copy_from is not None:
            names = side_files(self.copy_from) if self.copy_files is None else self.copy_files
            for name in names:
                source = self.copy_from / name
                if source.is_file():
                    (folder / name).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(source, folder / name)
        for name, content in self.extra_files.items():
            if Path(name).name != name:
                raise ModelFolderError(f"{self.target}: extra file {name!r} must be a plain name")
            mode = "wb" if isinstance(content, bytes) else "w"
            with open(folder / name, mode) as handle:
                handle.write(content)
        if self.model_card is not None:
            (folder / "README.md").write_text(self.model_card, encoding="utf-8")


def write_model_folder(
    target: str | Path,
    tensors: Mapping[str, torch.Tensor] | Iterator[tuple[str, torch.Tensor]],
    **options: object,
) -> ModelFolderSummary:
    """Write ``tensors`` (a mapping, or an iterator of ``(name, tensor)`` consumed lazily) as
    a model folder at ``target``; ``options`` are ``ModelFolderWriter``'s keyword arguments."""
    items = tensors.items() if isinstance(tensors, Mapping) else tensors
    writer = ModelFolderWriter(target, **options)  # type: ignore[arg-type]
    with writer:
        for name, tensor in items:
            writer.add(name, tensor)
    assert writer.summary is not None
    return writer.summary
