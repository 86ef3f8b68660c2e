"""Model sources named by a string, opened as lazy tensor views.

A source string is one of::

    hf://org/name[@revision]     a hub repository (fetched into the hub cache)
    path/to/folder               a full model (safetensors, sharded or not) or a LoRA adapter
    path/to/file.safetensors     full weights, or a task vector (see below)
    delta:<any of the above>     force "this is already a task vector"

A folder holding ``adapter_config.json`` is a PEFT LoRA adapter; a ``.safetensors`` file in
the kohya / A1111 LoRA layout (or a folder holding only such a file) is a Stable-Diffusion
LoRA, read with diffusers' loader (`storage.kohya`); otherwise it is a model.
A ``.safetensors`` file whose metadata has ``tvsplit.kind = task_vector`` (what tvsplit
writes) is a ready task vector. Pickle checkpoints are refused unless `allow_pickle`.
Each of these is a registered source kind (`storage.source_kinds`, registered at the end of
this module); another package adds kinds through the ``tvsplit.sources`` entry point group.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from tvsplit.storage.checkpoint import (
    KIND_METADATA_KEY,
    PICKLE_SUFFIXES,
    TASK_VECTOR_KIND,
    Checkpoint,
    file_metadata,
    refuse_pickle,
)
from tvsplit.storage.errors import SourceError
from tvsplit.storage.hub import check_repo_id, fetch
from tvsplit.storage.kohya import is_kohya_file
from tvsplit.storage.lora import ADAPTER_CONFIG, LoraAdapter
from tvsplit.storage.provenance import sha256_file
from tvsplit.storage.source_kinds import open_with_kind, register_source_kind

SourceKind = Literal["model", "lora", "delta"]
DELTA_PREFIX = "delta:"
HUB_PREFIX = "hf://"


@dataclass(frozen=True)
class SourceRef:
    """A parsed source string (nothing is opened or fetched)."""

    text: str
    repo_id: str | None = None
    revision: str | None = None
    path: Path | None = None
    delta: bool = False

    @property
    def is_hub(self) -> bool:
        return self.repo_id is not None


def parse_source(text: str) -> SourceRef:
    """Parse a source string; SourceError naming it when malformed."""
    if not isinstance(text, str) or not text.strip():
        raise SourceError("a source must be a non-empty string")
    raw = text.strip()
    body = raw
    delta = body.startswith(DELTA_PREFIX)
    if delta:
        body = body[len(DELTA_PREFIX) :]
    if body.startswith(HUB_PREFIX):
        repo, _, revision = body[len(HUB_PREFIX) :].partition("@")
        if _ and not revision:
            raise SourceError(f"{raw!r}: empty revision after '@'")
        return SourceRef(raw, repo_id=check_repo_id(repo), revision=revision or "main", delta=delta)
    if "://" in body:
        raise SourceError(
            f"{raw!r}: unsupported scheme (use hf://org/name@rev, a local folder or a .safetensors file)"
        )
    return SourceRef(raw, path=Path(body).expanduser(), delta=delta)


@dataclass
class OpenedSource:
    """A source ready to read: what it is, where it lives, and its provenance."""

    ref: SourceRef
    kind: SourceKind
    location: Path
    commit: str | None = None
    checkpoint: Checkpoint | None = None
    adapter: LoraAdapter | None = None
    files: list[Path] = field(default_factory=list)

    @property
    def text(self) -> str:
        return self.ref.text

    def relative(self, path: Path) -> str:
        """A file's name relative to the source location (as recorded in provenance)."""
        root = self.location if self.location.is_dir() else self.location.parent
        try:
            return str(path.relative_to(root))
        except ValueError:
            return str(path)

    def checksums(self) -> dict[str, str]:
        """sha256 of every file this source reads, by relative name (streamed, cached)."""
        return {self.relative(p): sha256_file(p) for p in self.files}

    def provenance(self) -> dict[str, Any]:
        """Source string, resolved commit (hub only) and file checksums."""
        return {
            "source": self.text,
            "kind": self.kind,
            "commit": self.commit,
            "files": self.checksums(),
        }


def open_source(source: str | SourceRef, *, allow_pickle: bool = False) -> OpenedSource:
    """Resolve (fetching hub repositories) and open a source, detecting its kind.

    Raises SourceError (bad input, names the path) or SourceUnavailableError (network).
    """
    ref = parse_source(source) if isinstance(source, str) else source
    commit = None
    if ref.is_hub:
        assert ref.repo_id is not None and ref.revision is not None
        snapshot = fetch(ref.repo_id, ref.revision, allow_pickle=allow_pickle)
        location, commit = snapshot.folder, snapshot.commit
    else:
        assert ref.path is not None
        location = ref.path
        if not location.exists():
            raise SourceError(f"{location}: no such file or folder")
    opened = _open_location(ref, location, allow_pickle=allow_pickle)
    opened.commit = commit
    return opened


def _open_location(ref: SourceRef, location: Path, *, allow_pickle: bool) -> OpenedSource:
    return open_with_kind(ref, location, allow_pickle=allow_pickle)


# -- the built-in source kinds (storage.source_kinds: specific ones first, catch-alls last) --
def _kohya_file(ref: SourceRef, location: Path, *, allow_pickle: bool) -> OpenedSource:
    return _kohya_source(ref, location)


def _peft_adapter(ref: SourceRef, location: Path, *, allow_pickle: bool) -> OpenedSource:
    if ref.delta:
        raise SourceError(f"{location}: a LoRA adapter cannot be read as a ready task vector")
    adapter = LoraAdapter(location, allow_pickle=allow_pickle)
    return OpenedSource(ref, "lora", location, adapter=adapter, files=adapter.files)


def _only_weights_file(folder: Path) -> Path | None:
    weights = sorted(folder.glob("*.safetensors"))
    return weights[0] if len(weights) == 1 else None


def _kohya_folder(ref: SourceRef, location: Path, *, allow_pickle: bool) -> OpenedSource:
    weights = _only_weights_file(location)
    assert weights is not None
    return _kohya_source(ref, weights)


def _weights_file(ref: SourceRef, location: Path, *, allow_pickle: bool) -> OpenedSource:
    checkpoint = Checkpoint.from_file(location, allow_pickle=allow_pickle)
    kind: SourceKind = "delta" if ref.delta or _is_task_vector(location) else "model"
    return OpenedSource(ref, kind, location, checkpoint=checkpoint, files=[location])


def _model_folder(ref: SourceRef, location: Path, *, allow_pickle: bool) -> OpenedSource:
    checkpoint = _folder_checkpoint(location, allow_pickle=allow_pickle)
    kind: SourceKind = "delta" if ref.delta else "model"
    files = checkpoint.files
    index = Path(checkpoint.label)
    if index.suffix == ".json":
        files = [index, *files]
    return OpenedSource(ref, kind, location, checkpoint=checkpoint, files=files)


def _is_kohya_folder(location: Path) -> bool:
    if not location.is_dir():
        return False
    weights = _only_weights_file(location)
    return weights is not None and is_kohya_file(weights)


register_source_kind("kohya-file", lambda p: p.is_file() and is_kohya_file(p), _kohya_file)
register_source_kind("peft-adapter", lambda p: (p / ADAPTER_CONFIG).is_file(), _peft_adapter)
register_source_kind("kohya-folder", _is_kohya_folder, _kohya_folder)
register_source_kind("weights-file", Path.is_file, _weights_file, catch_all=True)
register_source_kind("model-folder", Path.is_dir, _model_folder, catch_all=True)


def _kohya_source(ref: SourceRef, path: Path) -> OpenedSource:
    if ref.delta:
        raise SourceError(f"{path}: a LoRA file cannot be read as a ready task vector")
    adapter = LoraAdapter.from_kohya(path)
    return OpenedSource(ref, "lora", path, adapter=adapter, files=adapter.files)


def _folder_checkpoint(folder: Path, *, allow_pickle: bool) -> Checkpoint:
    """The weights of a model folder: sharded index, single file, or (allowed) pickle."""
    indexes = sorted(folder.glob("*.safetensors.index.json"))
    if len(indexes) > 1:
        raise SourceError(
            f"{folder}: several safetensors indexes ({', '.join(p.name for p in indexes)})"
        )
    if indexes:
        return Checkpoint.from_index(indexes[0])
    files = sorted(folder.glob("*.safetensors"))
    if (folder / "model.safetensors").is_file():
        files = [folder / "model.safetensors"]
    if len(files) == 1:
        return Checkpoint.from_file(files[0])
    if len(files) > 1:
        raise SourceError(
            f"{folder}: {len(files)} .safetensors files and no model.safetensors.index.json; "
            "point at one file"
        )
    pickles = sorted(folder.glob("*.bin.index.json")) or sorted(
        p for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES
    )
    if pickles:
        if not allow_pickle:
            refuse_pickle(pickles[0])
        if pickles[0].name.endswith(".index.json"):
            return Checkpoint.from_index(pickles[0], allow_pickle=True)
        if len(pickles) > 1:
            raise SourceError(f"{folder}: {len(pickles)} pickle checkpoints and no index")
        return Checkpoint.from_file(pickles[0], allow_pickle=True)
    raise SourceError(
        f"{folder}: no model weights found (expected model.safetensors, a sharded "
        "model.safetensors.index.json, or adapter_config.json + adapter_model.safetensors)"
    )


def _is_task_vector(path: Path) -> bool:
    if path.suffix != ".safetensors":
        return False
    return file_metadata(path).get(KIND_METADATA_KEY) == TASK_VECTOR_KIND


def task_vector_metadata() -> dict[str, str]:
    """safetensors metadata marking a file as a ready task vector (for writers)."""
    return {KIND_METADATA_KEY: TASK_VECTOR_KIND, "format": "pt"}
