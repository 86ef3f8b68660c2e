"""Source kinds are one registry: built-ins in order, catch-alls last, plugins by entry point."""

from __future__ import annotations

import textwrap

import torch
from safetensors.torch import save_file
from tvsplit.storage import source_kinds
from tvsplit.storage.sources import open_source

from tvsplit.plugins import forget_loaded


def test_builtin_kinds_are_tried_specific_first_and_catch_alls_last() -> None:
    names = [k.name for k in source_kinds.source_kinds()]
    assert names[:3] == ["kohya-file", "peft-adapter", "kohya-folder"]
    assert names[-2:] == ["weights-file", "model-folder"]


def test_a_package_registers_a_source_kind_through_its_entry_point(tmp_path, monkeypatch):
    """A made-up format: a folder with ``pointer.txt`` naming a safetensors file elsewhere.
    The generic model-folder reader would refuse it (no weights in the folder)."""
    (tmp_path / "pointer_plugin.py").write_text(
        textwrap.dedent(
            """
            from pathlib import Path

            from tvsplit.storage.checkpoint import Checkpoint
            from tvsplit.storage.source_kinds import register_source_kind
            from tvsplit.storage.sources import OpenedSource

            def matches(location):
                return (location / "pointer.txt").is_file()

            def open_pointer(ref, location, *, allow_pickle):
                target = Path((location / "pointer.txt").read_text().strip())
                checkpoint = Checkpoint.from_file(target)
                return OpenedSource(ref, "model", location, checkpoint=checkpoint, files=[target])

            register_source_kind("pointer-folder", matches, open_pointer)
            """
        )
    )
    dist = tmp_path / "pointer_plugin-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: pointer-plugin\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[tvsplit.sources]\npointer = pointer_plugin\n")
    weights = tmp_path / "elsewhere.safetensors"
    save_file({"w": torch.arange(6.0).reshape(2, 3)}, weights)
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "pointer.txt").write_text(str(weights))
    monkeypatch.syspath_prepend(str(tmp_path))
    forget_loaded("tvsplit.sources")
    try:
        opened = open_source(str(folder))
        assert opened.kind == "model" and opened.files == [weights]
        assert torch.equal(opened.checkpoint["w"], torch.arange(6.0).reshape(2, 3))
        names = [k.name for k in source_kinds.source_kinds()]
        assert names.index("pointer-folder") < names.index("model-folder")
    finally:
        source_kinds._KINDS.pop("pointer-folder", None)
        forget_loaded("tvsplit.sources")
