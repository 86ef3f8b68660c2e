"""LoRA export (tasks/lora_export.py): truncated SVD, and a PEFT adapter on a tiny GPT-2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tvsplit.tasks.lora_export import LoraExportError, lora_from_delta, write_lora_adapter


def low_rank(out: int, inp: int, rank: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(out, rank, generator=g) @ torch.randn(rank, inp, generator=g) / rank


def test_exact_rank_is_reproduced_in_peft_shapes() -> None:
    delta = low_rank(12, 20, 3, seed=0)  # Linear layout: out × in
    pair = lora_from_delta(delta, 3)
    assert pair.lora_A.shape == (3, 20) and pair.lora_B.shape == (12, 3)
    assert pair.relative_error < 1e-5
    assert torch.allclose(pair.lora_B @ pair.lora_A, delta, atol=1e-5)


def test_truncation_error_is_the_tail_of_the_spectrum() -> None:
    g = torch.Generator().manual_seed(1)
    delta = torch.randn(16, 10, generator=g, dtype=torch.float64)
    pair = lora_from_delta(delta, 4)
    measured = float((delta - pair.delta()).norm() / delta.norm())
    assert pair.lora_A.dtype == torch.float64
    assert abs(pair.relative_error - measured) < 1e-10
    singular = torch.linalg.svdvals(delta)
    assert abs(pair.relative_error - float(singular[4:].norm() / singular.norm())) < 1e-10
    assert lora_from_delta(delta, 50).rank == 10  # clamped to min(out, in)
    assert lora_from_delta(torch.zeros(4, 3), 2).relative_error == 0.0


def test_fan_in_fan_out_factors_the_transpose() -> None:
    delta = low_rank(8, 24, 2, seed=2).T  # Conv1D layout: in × out = 24 × 8
    pair = lora_from_delta(delta, 2, fan_in_fan_out=True)
    assert pair.lora_A.shape == (2, 24) and pair.lora_B.shape == (8, 2)
    assert torch.allclose(pair.delta(fan_in_fan_out=True), delta, atol=1e-5)


def test_bad_inputs_name_the_module() -> None:
    with pytest.raises(LoraExportError, match="h.0.ln_1.bias: LoRA needs a 2-D weight"):
        lora_from_delta(torch.ones(5), 2, module="h.0.ln_1.bias")
    with pytest.raises(LoraExportError, match="m: ΔW contains NaN"):
        lora_from_delta(torch.full((2, 2), float("nan")), 1, module="m")


def test_adapter_loads_with_peft_and_reproduces_base_plus_delta(tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        n_embd=32, n_layer=2, n_head=2, vocab_size=64, n_positions=32, bos_token_id=0,
        eos_token_id=0,
    )  # fmt: skip
    torch.manual_seed(0)
    base = GPT2LMHeadModel(config).eval()
    state = {k: v.clone() for k, v in base.state_dict().items()}
    rank = 4
    # Conv1D weights are stored in × out; c_attn's ΔW is exactly rank 4, c_fc's is full rank
    deltas = {
        "transformer.h.0.attn.c_attn": low_rank(96, 32, rank, seed=3).T * 0.1,
        "transformer.h.1.mlp.c_fc": torch.randn(32, 128, generator=torch.Generator().manual_seed(4))
        * 0.05,
        "transformer.h.1.attn.c_proj": low_rank(32, 32, 2, seed=5).T * 0.1,
    }
    report = write_lora_adapter(
        tmp_path / "adapter", iter(deltas.items()), rank=rank, fan_in_fan_out=True
    )
    assert report.relative_errors["transformer.h.0.attn.c_attn"] < 1e-5
    assert report.relative_errors["transformer.h.1.attn.c_proj"] < 1e-5
    assert 0.1 < report.relative_errors["transformer.h.1.mlp.c_fc"] < 1.0

    config_json = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config_json["r"] == config_json["lora_alpha"] == rank
    assert config_json["fan_in_fan_out"] is True
    weights = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert weights["base_model.model.transformer.h.0.attn.c_attn.lora_A.weight"].shape == (4, 32)
    assert weights["base_model.model.transformer.h.0.attn.c_attn.lora_B.weight"].shape == (96, 4)

    merged = PeftModel.from_pretrained(base, tmp_path / "adapter").merge_and_unload()
    merged_state = merged.state_dict()
    for module, delta in deltas.items():
        name = f"{module}.weight"
        got = merged_state[name] - state[name]
        error = float((got - delta).norm() / delta.norm())
        # within the truncation error (plus float32 rounding)
        assert error <= report.relative_errors[module] + 1e-5, (module, error)
    untouched = "transformer.h.1.attn.c_attn.weight"
    assert torch.equal(merged_state[untouched], state[untouched])


def test_adapter_folder_is_not_left_half_written(tmp_path: Path) -> None:
    def deltas():
        yield "a.lin", torch.ones(3, 3)
        raise RuntimeError("source failed")

    with pytest.raises(RuntimeError, match="source failed"):
        write_lora_adapter(tmp_path / "adapter", deltas(), rank=1)
    with pytest.raises(LoraExportError, match="b: LoRA needs a 2-D"):
        write_lora_adapter(tmp_path / "adapter", [("b", torch.ones(3))], rank=1)
    assert list(tmp_path.iterdir()) == []
