"""Model folders (storage/model_folder.py): shards, index, side files, atomic rename."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from tvsplit.storage.folders import FolderError
from tvsplit.storage.model_folder import (
    INDEX_FILE,
    ModelFolderError,
    ModelFolderWriter,
    atomic_folder,
    write_model_folder,
)


def tiny_gpt2_folder(path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    """A tiny GPT-2 saved by transformers (config + weights), and its state dict without the
    tied lm_head."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(
        n_embd=32, n_layer=2, n_head=2, vocab_size=64, n_positions=32, bos_token_id=0,
        eos_token_id=0,
    )  # fmt: skip
    model = GPT2LMHeadModel(config)
    model.save_pretrained(path)
    state = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    return path, state


def test_gpt2_folder_written_in_shards_loads_with_transformers(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    base_dir, state = tiny_gpt2_folder(tmp_path / "base")
    (base_dir / "tokenizer_config.json").write_text('{"model_max_length": 32}')
    g = torch.Generator().manual_seed(1)
    edited = {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in state.items()}
    limit = 40_000  # bytes: forces several shards (the model is ~0.1 MB)
    target = tmp_path / "out" / "edited"
    summary = write_model_folder(
        target,
        iter(edited.items()),
        max_shard_bytes=limit,
        copy_from=base_dir,
        model_card="# edited\n\nrecipe: test\n",
    )
    files = sorted(p.name for p in target.iterdir())
    shards = [f for f in files if f.endswith(".safetensors")]
    assert len(shards) >= 2 and shards == list(summary.files)
    assert shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert {"config.json", "tokenizer_config.json", "README.md", INDEX_FILE} <= set(files)
    assert "model.safetensors" not in files  # the base's weights are not copied
    assert (target / "README.md").read_text() == "# edited\n\nrecipe: test\n"
    assert not list(target.parent.glob(".edited.*"))  # no temporary folder left

    index = json.loads((target / INDEX_FILE).read_text())
    assert set(index["weight_map"]) == set(edited)
    assert index["metadata"]["total_size"] == sum(v.nbytes for v in edited.values())
    for shard in shards:
        with safe_open(target / shard, framework="pt") as handle:
            assert handle.metadata() == {"format": "pt"}
            names = list(handle.keys())
            nbytes = sum(handle.get_tensor(n).nbytes for n in names)
            assert nbytes <= limit or len(names) == 1
            for name in names:
                assert index["weight_map"][name] == shard
                assert torch.equal(handle.get_tensor(name), edited[name])

    model = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32)
    loaded = model.state_dict()
    for name, tensor in edited.items():
        assert torch.equal(loaded[name], tensor), name
    assert torch.equal(loaded["lm_head.weight"], edited["transformer.wte.weight"])  # tied
    logits = model(torch.tensor([[1, 2, 3, 4]])).logits
    assert logits.shape == (1, 4, 64) and torch.isfinite(logits).all()


def test_one_shard_is_a_single_model_safetensors_without_index(tmp_path: Path) -> None:
    tensors = {"a": torch.ones(3), "b": torch.zeros(2, 2, dtype=torch.bfloat16)}
    summary = write_model_folder(tmp_path / "m", tensors)
    assert summary.files == ("model.safetensors",)
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["model.safetensors"]
    with safe_open(tmp_path / "m" / "model.safetensors", framework="pt") as handle:
        assert handle.get_tensor("b").dtype == torch.bfloat16


def test_a_tensor_larger_than_the_limit_gets_its_own_shard(tmp_path: Path) -> None:
    tensors = {"small1": torch.ones(2), "big": torch.ones(100), "small2": torch.ones(2)}
    summary = write_model_folder(tmp_path / "m", tensors, max_shard_bytes=64)
    assert summary.weight_map == {
        "small1": "model-00001-of-00003.safetensors",
        "big": "model-00002-of-00003.safetensors",
        "small2": "model-00003-of-00003.safetensors",
    }


def test_views_and_shared_storage_are_written(tmp_path: Path) -> None:
    whole = torch.arange(12.0)
    tensors = {"first": whole[:6], "second": whole[6:].view(2, 3), "alias": whole}
    write_model_folder(tmp_path / "m", tensors)
    with safe_open(tmp_path / "m" / "model.safetensors", framework="pt") as handle:
        assert torch.equal(handle.get_tensor("second"), torch.arange(6.0, 12.0).view(2, 3))
        assert torch.equal(handle.get_tensor("alias"), whole)


def test_interrupted_write_leaves_no_folder_at_the_target(tmp_path: Path) -> None:
    target = tmp_path / "out"
    writer = ModelFolderWriter(target, max_shard_bytes=16)
    with pytest.raises(RuntimeError, match="killed"), writer:
        for i in range(10):
            writer.add(f"t{i}", torch.ones(4))
            if i == 6:  # several shards are already on disk
                assert len(list(tmp_path.glob(".out.tmp-*/*.partial"))) >= 3
                raise RuntimeError("killed")
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []


def test_existing_target_is_kept_unless_overwrite(tmp_path: Path) -> None:
    target = tmp_path / "out"
    write_model_folder(target, {"a": torch.ones(1)})
    with pytest.raises(FolderError, match="already exists"):
        write_model_folder(target, {"a": torch.zeros(1)})
    writer = ModelFolderWriter(target, overwrite=True)
    with pytest.raises(RuntimeError, match="stop"), writer:
        writer.add("a", torch.zeros(1))
        raise RuntimeError("stop")
    with safe_open(target / "model.safetensors", framework="pt") as handle:
        assert handle.get_tensor("a").item() == 1.0  # the old folder survived the failure
    write_model_folder(target, {"a": torch.zeros(1)}, overwrite=True)
    with safe_open(target / "model.safetensors", framework="pt") as handle:
        assert handle.get_tensor("a").item() == 0.0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_writer_errors_name_the_tensor(tmp_path: Path) -> None:
    writer = ModelFolderWriter(tmp_path / "m")
    with pytest.raises(ModelFolderError, match="'a' was added twice"), writer:
        writer.add("a", torch.ones(1))
        writer.add("a", torch.ones(1))
    with pytest.raises(ModelFolderError, match="no tensors"):
        write_model_folder(tmp_path / "m", {})
    assert list(tmp_path.iterdir()) == []


def test_atomic_folder_renames_only_on_success(tmp_path: Path) -> None:
    with atomic_folder(tmp_path / "done") as folder:
        (folder / "x.txt").write_text("x")
        assert not (tmp_path / "done").exists()
    assert (tmp_path / "done" / "x.txt").read_text() == "x"


def tiny_unet_folder(path: Path):
    """A tiny diffusers UNet2DModel saved by diffusers (config.json + weights)."""
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, norm_num_groups=4,
        block_out_channels=(8, 16), down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"), attention_head_dim=4,
    )  # fmt: skip
    unet.save_pretrained(path)
    return path, unet


@pytest.mark.parametrize("limit", [40_000, None], ids=["sharded", "single"])
def test_diffusers_base_gives_a_folder_diffusers_loads(tmp_path: Path, limit: int | None) -> None:
    from diffusers import UNet2DModel
    from tvsplit.storage.model_folder import DIFFUSERS_LAYOUT, weight_layout
    from tvsplit.storage.sources import open_source

    base_dir, unet = tiny_unet_folder(tmp_path / "base")
    assert weight_layout(base_dir) == DIFFUSERS_LAYOUT
    g = torch.Generator().manual_seed(2)
    edited = {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in unet.state_dict().items()}
    target = tmp_path / "edited"
    options = {} if limit is None else {"max_shard_bytes": limit}
    summary = write_model_folder(target, edited, copy_from=base_dir, **options)
    files = {p.name for p in target.iterdir()}
    assert "config.json" in files and not any(f.startswith("model") for f in files)
    if limit is None:
        assert summary.files == ("diffusion_pytorch_model.safetensors",)
    else:
        count = len(summary.files)
        assert count >= 2
        assert summary.files[0] == f"diffusion_pytorch_model-00001-of-{count:05d}.safetensors"
        assert "diffusion_pytorch_model.safetensors.index.json" in files

    loaded = UNet2DModel.from_pretrained(target)
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, edited[name]), name
    # the project's own reader opens the same folder (the next edit's base)
    checkpoint = open_source(str(target)).checkpoint
    assert checkpoint is not None and set(checkpoint) == set(edited)


def test_transformers_config_keeps_transformers_names(tmp_path: Path) -> None:
    from tvsplit.storage.model_folder import TRANSFORMERS_LAYOUT, weight_layout

    base_dir, _ = tiny_gpt2_folder(tmp_path / "base")
    assert weight_layout(base_dir) == TRANSFORMERS_LAYOUT
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{not json")
    assert weight_layout(tmp_path / "broken") == TRANSFORMERS_LAYOUT
    assert weight_layout(None) == TRANSFORMERS_LAYOUT


def _plan(tensors: dict[str, torch.Tensor]) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    return {name: (tuple(t.shape), t.dtype) for name, t in tensors.items()}


def test_a_planned_write_streams_the_same_folder_transformers_loads(tmp_path: Path) -> None:
    """With a plan each tensor goes to disk when added: same shards, index and tensors as
    the buffered writer, and transformers loads it."""
    from transformers import AutoModelForCausalLM

    base_dir, state = tiny_gpt2_folder(tmp_path / "base")
    options = {"max_shard_bytes": 40_000, "copy_from": base_dir}
    buffered = write_model_folder(tmp_path / "buffered", state, **options)
    streamed = write_model_folder(tmp_path / "streamed", state, plan=_plan(state), **options)
    assert streamed.files == buffered.files and len(streamed.files) >= 2
    assert streamed.weight_map == buffered.weight_map
    assert (tmp_path / "streamed" / INDEX_FILE).read_text() == (
        tmp_path / "buffered" / INDEX_FILE
    ).read_text()
    for shard in streamed.files:
        with safe_open(tmp_path / "streamed" / shard, framework="pt") as handle:
            assert handle.metadata() == {"format": "pt"}
            for name in handle.keys():  # noqa: SIM118 (safe_open is not a mapping)
                assert torch.equal(handle.get_tensor(name), state[name]), name
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "streamed").state_dict()
    assert all(torch.equal(loaded[n], t) for n, t in state.items())


def test_a_planned_write_holds_every_dtype_and_shape(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    tensors = {
        "bf16": torch.randn(3, 5).to(torch.bfloat16),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 4),
        "mask": torch.tensor([True, False, True]),
        "ids": torch.arange(7, dtype=torch.int64),
        "half": torch.randn(4).half(),
        "u16": torch.tensor([1, 2, 3, 4, 5], dtype=torch.int32).to(torch.uint16),
        "c64": torch.randn(3, dtype=torch.complex64),
    }
    write_model_folder(tmp_path / "m", tensors, plan=_plan(tensors))
    path = tmp_path / "m" / "model.safetensors"
    loaded = load_file(path)  # safetensors' own validation
    assert set(loaded) == set(tensors)
    for name, tensor in tensors.items():
        assert loaded[name].dtype == tensor.dtype and torch.equal(loaded[name], tensor), name
    # every tensor aligned to its item size in the file (mapped readers need it)
    raw = path.read_bytes()
    length = int.from_bytes(raw[:8], "little")
    assert (8 + length) % 8 == 0
    header = json.loads(raw[8 : 8 + length])
    for name, tensor in tensors.items():
        assert header[name]["data_offsets"][0] % tensor.element_size() == 0, name
    # the checkpoint reader names every dtype as torch does (the edit's plan is built on it)
    from tvsplit.storage.checkpoint import Checkpoint

    heads = Checkpoint.from_file(path).headers()
    assert {n: getattr(torch, d) for n, (_, d) in heads.items()} == {
        n: t.dtype for n, t in tensors.items()
    }


def test_a_planned_write_refuses_what_the_plan_does_not_say(tmp_path: Path) -> None:
    tensors = {"a": torch.ones(3), "b": torch.ones(2, 2)}
    target = tmp_path / "m"
    cases = [
        ("c", torch.ones(1), "'c' is not in the write plan"),
        ("a", torch.ones(3, dtype=torch.float64), r"'a' is \(3,\) torch.float64"),
        ("a", tensors["a"], r"1 planned tensor\(s\) were never added: b"),
    ]
    for name, tensor, message in cases:
        with (
            pytest.raises(ModelFolderError, match=message),
            ModelFolderWriter(target, plan=_plan(tensors)) as writer,
        ):
            writer.add(name, tensor)
    assert not target.exists() and not list(tmp_path.iterdir())  # nothing half-written
