"""Folders that appear only when complete, and replace their predecessor only then.

``atomic_folder(target)`` builds one folder beside ``target``; ``FolderReplacement`` builds
several (a model and its LoRA adapter) and puts them in place together. Used by every writer
of folders (model folders, LoRA adapters, the vision zoo). Imports nothing heavy: a recovery
at start-up costs no torch import.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import shutil
import socket
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import Any

from tvsplit.storage.errors import StorageError

__all__ = [
    "FolderError",
    "FolderReplacement",
    "atomic_folder",
    "exchange_folders",
    "recover_replacement",
]


class FolderError(StorageError):
    """A folder that cannot be written or replaced as asked; the message names it."""


def _temporary_beside(target: Path, tag: str) -> Path:
    return target.parent / f".{target.name}.{tag}-{uuid.uuid4().hex[:8]}"


# -- atomic rename primitives ------------------------------------------------------------
_AT_FDCWD = -100
_RENAME_NOREPLACE = 1
_RENAME_EXCHANGE = 2
_renameat2: Any = None
_renameat2_checked = False


def _libc_renameat2() -> Any:
    """glibc's ``renameat2`` (Linux ≥ 3.15, glibc ≥ 2.28), or None where there is none."""
    global _renameat2, _renameat2_checked
    if not _renameat2_checked:
        _renameat2_checked = True
        if sys.platform.startswith("linux"):
            try:
                function = ctypes.CDLL(None, use_errno=True).renameat2
            except (OSError, AttributeError):
                function = None
            if function is not None:
                function.argtypes = [
                    ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint
                ]  # fmt: skip
                function.restype = ctypes.c_int
            _renameat2 = function
    return _renameat2


def _rename2(source: Path, destination: Path, flags: int) -> bool:
    """``renameat2(source, destination, flags)``; False when the system or file system does
    not support it (then the caller falls back to plain renames); other errors raise."""
    function = _libc_renameat2()
    if function is None:
        return False
    result = function(
        _AT_FDCWD, os.fsencode(source), _AT_FDCWD, os.fsencode(destination), flags
    )  # fmt: skip
    if result == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(source), None, str(destination))


def exchange_folders(first: Path, second: Path) -> bool:
    """Swap two existing paths in one atomic step (Linux ``RENAME_EXCHANGE``); False if the
    platform or file system cannot, and nothing was changed."""
    return _rename2(first, second, _RENAME_EXCHANGE)


def _rename_no_replace(source: Path, destination: Path) -> None:
    """Rename ``source`` to a ``destination`` that must not exist (atomic where supported)."""
    if _rename2(source, destination, _RENAME_NOREPLACE):
        return
    if destination.exists():
        raise FileExistsError(errno.EEXIST, "exists", str(destination))
    os.rename(source, destination)


def _identity(path: Path) -> list[int] | None:
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return None
    return [info.st_dev, info.st_ino]


def _fsync_folder(folder: Path) -> None:
    try:
        handle = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(handle)
    except OSError:
        pass
    finally:
        os.close(handle)


def _journal_path(primary: Path) -> Path:
    return primary.parent / f".{primary.name}.replace.json"


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` runs on this host; a child of ours that exited is reaped and
    counts as gone (a zombie still answers ``kill(pid, 0)``)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with contextlib.suppress(ChildProcessError):
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return False
    return True
    return True


class FolderReplacement:
    """Replace one or more folders together, each only once its new version is complete.

    ``stage(target)`` returns an empty temporary folder beside ``target`` to build into;
    ``remove(target)`` asks for ``target`` to go (an old LoRA adapter beside a model that no
    longer has one); ``commit()`` puts everything in place. As a context manager it commits
    when the block ends without an exception and otherwise deletes what was staged, leaving
    every target exactly as it was.

    Guarantees: before ``commit`` no target is touched. ``commit`` writes a journal
    (``.<first target>.replace.json``: for each target the identity (device, inode) of its new
    folder and where the old one goes), then swaps each target with its new folder in one
    atomic step (Linux ``renameat2(RENAME_EXCHANGE)``; elsewhere the old folder is renamed
    aside and the new one into place), then removes the journal and the old folders. A
    process killed during ``commit`` leaves every target complete (old or new; with the
    fallback a target may sit aside for a moment) and the journal; the next
    ``recover_replacement`` of the first target (every writer here calls it before it
    starts) rolls the replacement forward, so all targets end new, never a mix.
    """

    def __init__(self, *, overwrite: bool = False) -> None:
        self.overwrite = overwrite
        self._items: list[tuple[Path, Path | None]] = []  # (target, staged or None = remove)
        self._committed = False

    def __enter__(self) -> FolderReplacement:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if exc_type is not None:
            self.abort()
            return
        try:
            self.commit()
        except BaseException:
            self.abort()
            raise

    @property
    def targets(self) -> list[Path]:
        return [target for target, _ in self._items]

    def _check_new(self, target: Path) -> Path:
        target = Path(target).absolute()
        if target in self.targets:
            raise FolderError(f"{target}: staged twice in one replacement")
        if not self._items:
            recover_replacement(target)
        if target.exists() and not self.overwrite:
            raise FolderError(f"{target}: already exists; pass overwrite=True to replace it")
        return target

    def stage(self, target: str | Path) -> Path:
        """An empty temporary folder beside ``target`` that ``commit`` moves to ``target``."""
        target = self._check_new(Path(target))
        target.parent.mkdir(parents=True, exist_ok=True)
        staged = _temporary_beside(target, "tmp")
        staged.mkdir()
        self._items.append((target, staged))
        return staged

    def remove(self, target: str | Path) -> None:
        """Have ``commit`` remove ``target`` (if it exists then) with the others."""
        self._items.append((self._check_new(Path(target)), None))

    def abort(self) -> None:
        """Delete everything staged; no target is touched. After ``commit`` started this does
        nothing: its journal finishes the job at the next ``recover_replacement``."""
        if self._committed:
            return
        for _, staged in self._items:
            if staged is not None:
                shutil.rmtree(staged, ignore_errors=True)
        self._items = []

    def commit(self) -> None:
        """Put every staged folder at its target (see the class docstring for the steps)."""
        if self._committed:
            raise FolderError("replacement already committed")
        if not self._items:
            return
        entries = []
        for target, staged in self._items:
            if staged is not None:
                _fsync_folder(staged)
            if not self.overwrite and staged is not None and target.exists():
                raise FolderError(f"{target}: appeared while writing; the new folder was discarded")
            entries.append(
                {
                    "target": str(target),
                    "staged": None if staged is None else str(staged),
                    "new": None if staged is None else _identity(staged),
                    "old": _identity(target),
                    "aside": str(_temporary_beside(target, "old")),
                }
            )
        journal = _journal_path(self._items[0][0])
        record = {"pid": os.getpid(), "host": socket.gethostname(), "entries": entries}
        partial = journal.with_name(journal.name + f".{uuid.uuid4().hex[:8]}.partial")
        with open(partial, "w") as handle:
            json.dump(record, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(partial, journal)
        _fsync_folder(journal.parent)
        self._committed = True
        _roll_forward(journal, record)


def _roll_forward(journal: Path, record: dict[str, Any]) -> None:
    """Finish the replacement ``record`` describes (each step is safe to repeat)."""
    for entry in record["entries"]:
        target = Path(entry["target"])
        aside = Path(entry["aside"])
        here = _identity(target)
        if entry["new"] is None:  # removal: move the old folder aside, if it is still there
            if here is not None and here == entry["old"]:
                os.rename(target, aside)
            continue
        if here == entry["new"]:
            continue  # already in place
        staged = Path(entry["staged"])
        if _identity(staged) != entry["new"]:
            continue  # neither here nor staged: nothing left to do for this one
        if here is not None:
            if exchange_folders(staged, target):
                continue  # the old folder now sits at the staged path
            os.rename(target, aside)
        _rename_no_replace(staged, target)
    _fsync_folder(journal.parent)
    journal.unlink(missing_ok=True)
    for entry in record["entries"]:
        shutil.rmtree(entry["aside"], ignore_errors=True)
        if entry["staged"] is not None:
            shutil.rmtree(entry["staged"], ignore_errors=True)


def recover_replacement(target: str | Path) -> bool:
    """Roll forward a replacement of ``target`` that a killed process left half done.

    A journal whose writer is still alive on this host is left alone. Returns True if a
    replacement was finished."""
    journal = _journal_path(Path(target).absolute())
    try:
        record = json.loads(journal.read_text())
    except FileNotFoundError:
        return False
    except (OSError, ValueError) as error:
        raise FolderError(f"{journal}: unreadable replacement journal: {error}") from error
    pid = int(record.get("pid", -1))
    if record.get("host") == socket.gethostname() and pid != os.getpid() and pid_alive(pid):
        raise FolderError(f"{target}: process {record['pid']} is replacing this folder right now")
    _roll_forward(journal, record)
    return True


@contextmanager
def atomic_folder(target: str | Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``target``; move it to ``target`` when the
    block ends without an exception, delete it otherwise (``FolderReplacement`` of one).

    Raises FolderError if ``target`` exists and ``overwrite`` is False (checked before
    and after the block). With ``overwrite`` an existing target is replaced only once the
    new folder is complete, in one atomic exchange where the system has one.
    """
    replacement = FolderReplacement(overwrite=overwrite)
    staged = replacement.stage(target)
    try:
        yield staged
        replacement.commit()
    except BaseException:
        replacement.abort()
        raise
