"""Replacing folders (storage/folders.py FolderReplacement): the old folder stays until the
new one is complete, a killed replacement is rolled forward, groups end all-new."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import tvsplit.storage.folders as model_folder
from tvsplit.storage.folders import (
    FolderError,
    FolderReplacement,
    atomic_folder,
    exchange_folders,
    recover_replacement,
)


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _make(folder: Path, version: str, files: int = 3) -> None:
    folder.mkdir(parents=True)
    for i in range(files):
        (folder / f"part{i}.txt").write_text(version)


def _versions(folder: Path) -> set[str]:
    return {p.read_text() for p in folder.iterdir()}


def test_exchange_swaps_two_folders_atomically(tmp_path: Path) -> None:
    _make(tmp_path / "a", "a")
    _make(tmp_path / "b", "b")
    if not exchange_folders(tmp_path / "a", tmp_path / "b"):
        pytest.skip("this file system has no RENAME_EXCHANGE (the fallback is tested below)")
    assert _versions(tmp_path / "a") == {"b"} and _versions(tmp_path / "b") == {"a"}


@pytest.mark.parametrize("exchange", [True, False], ids=["exchange", "rename-aside"])
def test_failed_build_leaves_the_old_folder_byte_identical(tmp_path, monkeypatch, exchange):
    if not exchange:
        monkeypatch.setattr(model_folder, "_rename2", lambda *args: False)
    target = tmp_path / "out"
    _make(target, "old")
    before = _snapshot(target)
    with pytest.raises(RuntimeError, match="boom"), atomic_folder(target, overwrite=True) as new:
        (new / "part0.txt").write_text("new")
        raise RuntimeError("boom")
    assert _snapshot(target) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    with atomic_folder(target, overwrite=True) as new:
        (new / "only.txt").write_text("new")
    assert _snapshot(target) == {"only.txt": b"new"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize("exchange", [True, False], ids=["exchange", "rename-aside"])
def test_a_replacement_killed_half_way_is_rolled_forward(tmp_path, monkeypatch, exchange):
    """A crash between the first and second target's swap (simulated by an error in the
    second swap: after commit started nothing is deleted) leaves a journal; the next start
    finishes it: both targets new, nothing left beside them."""
    if not exchange:
        monkeypatch.setattr(model_folder, "_rename2", lambda *args: False)
    model, adapter, stale = tmp_path / "m", tmp_path / "m-lora", tmp_path / "gone"
    for folder in (model, adapter, stale):
        _make(folder, "old")
    real = model_folder._rename_no_replace if not exchange else model_folder.exchange_folders
    calls = []

    def crash_on_second(first, second):
        calls.append(first)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")
        return real(first, second)

    name = "exchange_folders" if exchange else "_rename_no_replace"
    monkeypatch.setattr(model_folder, name, crash_on_second)
    replacement = FolderReplacement(overwrite=True)
    with pytest.raises(KeyboardInterrupt), replacement:
        _make_into(replacement.stage(model), "new")
        _make_into(replacement.stage(adapter), "new")
        replacement.remove(stale)
    assert _versions(model) == {"new"}  # first swapped; the adapter is still old (a mix) ...
    assert not adapter.exists() or _versions(adapter) == {"old"}
    monkeypatch.setattr(model_folder, name, real)
    assert recover_replacement(model)  # ... until the next start rolls it forward
    assert _versions(model) == {"new"} and _versions(adapter) == {"new"}
    assert not stale.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m", "m-lora"]
    assert not recover_replacement(model)


def _make_into(folder: Path, version: str) -> None:
    for i in range(3):
        (folder / f"part{i}.txt").write_text(version)


def test_without_overwrite_an_existing_target_is_refused_before_and_after(tmp_path):
    _make(tmp_path / "out", "old")
    with pytest.raises(FolderError, match="already exists"):
        FolderReplacement().stage(tmp_path / "out")
    replacement = FolderReplacement()
    with pytest.raises(FolderError, match="appeared while writing"), replacement:
        _make_into(replacement.stage(tmp_path / "late"), "new")
        _make(tmp_path / "late", "other")
    assert _versions(tmp_path / "late") == {"other"}


WRITER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from tvsplit.storage.folders import FolderReplacement
    root = Path(sys.argv[1])
    version = 0
    while True:
        version += 1
        with FolderReplacement(overwrite=True) as replacement:
            for name in ("model", "model-lora"):
                staged = replacement.stage(root / name)
                for i in range(20):
                    (staged / f"part{i}.bin").write_bytes(str(version).encode() * 2000)
        print(version, flush=True)
    """
)


def test_sigkill_during_writes_leaves_one_complete_version(tmp_path: Path) -> None:
    """A process replacing a model and its adapter in a loop is killed with SIGKILL at
    several moments; after the next start's recovery both folders hold one and the same
    complete version (never a mix of files, never old model with new adapter)."""
    for attempt, delay in enumerate((0.02, 0.1, 0.25, 0.4)):
        root = tmp_path / f"try{attempt}"
        root.mkdir()
        child = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(root)], stdout=subprocess.PIPE, text=True
        )
        assert child.stdout is not None
        child.stdout.readline()  # one version is complete
        time.sleep(delay)
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
        recover_replacement(root / "model")
        versions = [_versions(root / name) for name in ("model", "model-lora")]
        assert all(len(v) == 1 for v in versions), versions
        assert versions[0] == versions[1]
        assert all(len(list((root / n).iterdir())) == 20 for n in ("model", "model-lora"))
