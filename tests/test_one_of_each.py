"""The one-of-each helpers: validation-error formatter, write protocol, model side files,
progress helper, and the CLI leaves importing without the CLI root (no import circle)."""

from __future__ import annotations

import fnmatch
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from pydantic import BaseModel, Field, ValidationError
from safetensors.torch import save_file
from tvsplit.storage.errors import format_validation_error, validation_problems
from tvsplit.storage.hub import ALLOW_PATTERNS
from tvsplit.storage.model_files import SIDE_FILE_NAMES, side_files
from tvsplit.storage.model_folder import DIFFUSERS_LAYOUT, weight_layout, write_model_folder
from tvsplit.storage.writes import (
    ATTRS,
    codecs,
    is_complete,
    status,
    write_array,
    write_group,
)


class _Inner(BaseModel):
    weight: float = Field(allow_inf_nan=False)


class _Outer(BaseModel):
    max_rank_fraction: float = Field(0.5, gt=0, le=1)
    members: list[_Inner] = []


def _error(data: dict) -> ValidationError:
    with pytest.raises(ValidationError) as caught:
        _Outer.model_validate(data)
    return caught.value


def test_validation_errors_name_each_field_in_every_style() -> None:
    error = _error({"max_rank_fraction": 2, "members": [{"weight": 1}, {"weight": "inf"}]})
    problems = validation_problems(error)
    assert len(problems) == 2
    assert problems[0].startswith("max_rank_fraction: Input should be less than or equal to 1")
    assert problems[1].startswith("members[1].weight: ")
    inline = format_validation_error(error, source="r.yaml", prefix=("params",))
    assert (
        inline.startswith("r.yaml: params.max_rank_fraction: ") and "; params.members[1]" in inline
    )
    flags = format_validation_error(_error({"max_rank_fraction": 0}), flag=True)
    assert flags.startswith("--max-rank-fraction: Input should be greater than 0")
    bullets = format_validation_error(error, source="r.yaml: invalid", bullets=True).splitlines()
    assert bullets[0] == "r.yaml: invalid" and all(b.startswith("  - ") for b in bullets[1:])


def test_write_protocol_marks_complete_only_after_data(tmp_path: Path) -> None:
    root = zarr.open_group(str(tmp_path / "s.zarr"), mode="a", zarr_format=3)
    data = np.arange(12, dtype=np.float32).reshape(3, 4)
    array = write_array(root, "a/b", data, {"name": "x"})
    assert is_complete(array) and array.attrs[ATTRS]["name"] == "x"
    assert [type(c) for c in array.compressors] == [type(c) for c in codecs()]
    np.testing.assert_array_equal(root["a/b"][...], data)
    zeros = write_array(root, "z", None, {}, shape=(2, 2))
    assert is_complete(zeros) and float(np.abs(zeros[...]).sum()) == 0

    class Boom(RuntimeError):
        pass

    class CutShort(dict):  # the second array's write fails (a crash mid-group)
        def items(self):
            yield "ok", data
            raise Boom

    with pytest.raises(Boom):
        write_group(root, "g", CutShort(), {"k": 1})
    assert status(root["g"]) == "partial"  # a crash leaves the group partial
    group = write_group(root, "g", {"ok": data}, {"k": 1}, partial_attrs={"name": "g"})
    assert is_complete(group) and group.attrs[ATTRS]["k"] == 1


def test_hub_fetch_and_folder_writer_use_one_side_file_list(tmp_path: Path) -> None:
    for name in ("spiece.model", "preprocessor_config.json", "model_index.json"):
        assert name in SIDE_FILE_NAMES
    fetched = lambda path: any(fnmatch.fnmatch(path, p) for p in ALLOW_PATTERNS)  # noqa: E731
    # A diffusers pipeline: its index, component configs and weights are all fetched.
    for path in (
        "model_index.json",
        "scheduler/scheduler_config.json",
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors",
        "unet/diffusion_pytorch_model-00001-of-00002.safetensors",
        "unet/diffusion_pytorch_model.safetensors.index.json",
        "text_encoder/config.json",
        "tokenizer/vocab.json",
        "spiece.model",
        "preprocessor_config.json",
    ):
        assert fetched(path), path
    assert not fetched("unet/diffusion_pytorch_model.bin")  # pickle only when allowed
    # Every side file the writer copies from a base is one the hub fetch brings.
    base = tmp_path / "unet"
    base.mkdir()
    (base / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel"}))
    (base / "notes.txt").write_text("not a side file")
    save_file({"w": torch.zeros(2)}, str(base / "diffusion_pytorch_model.safetensors"))
    assert weight_layout(base) == DIFFUSERS_LAYOUT
    assert side_files(base) == ["config.json"] and all(fetched(f) for f in side_files(base))
    summary = write_model_folder(tmp_path / "out", {"w": torch.ones(2)}, copy_from=base)
    assert summary.files == ("diffusion_pytorch_model.safetensors",)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "config.json",
        "diffusion_pytorch_model.safetensors",
    ]


def test_cli_leaves_import_without_the_cli_root() -> None:
    code = (
        "import sys\n"
        "import tvsplit.flows.decompose_cli, tvsplit.flows.catalogue_cli\n"
        "assert 'tvsplit.flows.cli' not in sys.modules, 'a leaf imports the CLI root'\n"
        "from typer.testing import CliRunner\n"
        "from tvsplit.flows.cli import app\n"
        "text = CliRunner().invoke(app, ['--help']).output\n"
        "for verb in ('ingest', 'catalogue', 'decompose', 'edit', 'serve', 'evaluate'):\n"
        "    assert verb in text, verb\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
