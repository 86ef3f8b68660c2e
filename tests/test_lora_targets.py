"""LoRA export targets from the model's structure (meta-device build) or, without a config,
from shapes and the recipe: a tiny GPT-2 (Conv1D), a tiny Llama-like model (nn.Linear) and a
folder without config. Each export loads with PEFT, merges, and equals the dense edit."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import yaml
from fixtures_models import finetuned_copy, save_model, tiny_gpt2
from safetensors.torch import load_file
from tvsplit.tasks.lora_targets import SHAPES, STRUCTURE, LoraTargetError, lora_targets


def tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, vocab_size=64, max_position_embeddings=32,
        tie_word_embeddings=False,
    )  # fmt: skip
    return LlamaForCausalLM(config).eval()


def _shapes(folder):
    return [(name, tuple(t.shape)) for name, t in load_file(folder / "model.safetensors").items()]


def test_gpt2_structure_gives_conv1d_and_embeddings(repos):
    plan = lora_targets(repos.base, _shapes(repos.base))
    assert plan.rule == STRUCTURE and "GPT2LMHeadModel" in plan.source
    kinds = {name: kind for name, (_, kind) in plan.targets.items()}
    assert kinds["transformer.h.0.attn.c_attn.weight"] == "conv1d"
    assert kinds["transformer.h.1.mlp.c_proj.weight"] == "conv1d"
    assert kinds["transformer.wte.weight"] == kinds["transformer.wpe.weight"] == "embedding"
    assert plan.fan_in_fan_out
    assert "LayerNorm" in plan.skipped["transformer.h.0.ln_1.weight"]
    assert "not a module's weight" in plan.skipped["transformer.h.0.attn.c_attn.bias"]
    assert "model structure" in plan.describe() and "conv1d" in plan.describe()


def test_checkpoint_names_without_the_base_prefix_map_to_the_model(tmp_path):
    from transformers import GPT2Model

    torch.manual_seed(0)
    folder = save_model(GPT2Model(tiny_gpt2(0).config), tmp_path / "bare")
    config = json.loads((folder / "config.json").read_text())
    config["architectures"] = ["GPT2LMHeadModel"]  # saved by the body, loaded with a head
    (folder / "config.json").write_text(json.dumps(config))
    plan = lora_targets(folder, _shapes(folder))
    assert plan.targets["h.0.attn.c_attn.weight"] == ("transformer.h.0.attn.c_attn", "conv1d")


def test_mixed_linear_and_conv1d_keep_one_kind_and_say_why(repos):
    shapes = [
        (n, tuple(t.shape)) for n, t in load_file(repos.classifier / "model.safetensors").items()
    ]
    plan = lora_targets(repos.classifier, shapes)
    assert "score.weight" not in plan.targets
    assert "fan_in_fan_out is one flag" in plan.skipped["score.weight"]
    assert plan.targets["transformer.h.0.mlp.c_fc.weight"][1] == "conv1d"


def test_shape_rule_for_folders_without_a_transformers_config(tmp_path, repos):
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(repos.base / "model.safetensors", bare)
    plan = lora_targets(bare, _shapes(bare), fan_in_fan_out=True)
    assert plan.rule == SHAPES and "no config.json" in plan.source and plan.fan_in_fan_out
    assert plan.targets["transformer.h.0.attn.c_attn.weight"][1] == "conv1d"
    assert "1-D" in plan.skipped["transformer.h.0.ln_1.weight"]
    # a diffusers component folder: config.json without model_type; kernels become conv
    (bare / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel"}))
    unet = [("conv_in.weight", (8, 3, 3, 3)), ("time_embedding.linear_1.weight", (16, 8))]
    plan = lora_targets(bare, unet)
    assert plan.rule == SHAPES and "not a transformers config" in plan.source
    assert plan.targets == {
        "conv_in.weight": ("conv_in", "conv"),
        "time_embedding.linear_1.weight": ("time_embedding.linear_1", "linear"),
    }
    assert lora_targets(tmp_path / "bare" / "model.safetensors", unet).rule == SHAPES


def test_recipe_fields_narrow_or_are_refused(repos):
    shapes = _shapes(repos.base)
    plan = lora_targets(repos.base, shapes, patterns=["*.attn.c_attn"])
    assert {module for module, _ in plan.targets.values()} == {
        "transformer.h.0.attn.c_attn",
        "transformer.h.1.attn.c_attn",
    }
    assert plan.skipped["transformer.wte.weight"] == "not in the recipe's lora_targets"
    with pytest.raises(LoraTargetError, match=r"lora_targets\[1\]: '\*q_proj' matches no"):
        lora_targets(repos.base, shapes, patterns=["*.attn.*", "*q_proj"])
    with pytest.raises(LoraTargetError, match="fan_in_fan_out: the recipe says False"):
        lora_targets(repos.base, shapes, fan_in_fan_out=False)


# -- through the edit flow: each export loads with PEFT and equals the dense edit -------------


@pytest.fixture(scope="module")
def families(tmp_path_factory, prefect_harness):
    """A catalogue with a tiny GPT-2 family, a tiny Llama family, and a GPT-2 family whose
    base folder has no config (weights only)."""
    from tvsplit.flows.ingest import ingest

    root = tmp_path_factory.mktemp("lora-targets")
    gpt2 = save_model(tiny_gpt2(0), root / "gpt2")
    llama = save_model(tiny_llama(0), root / "llama")
    bare = root / "bare"
    bare.mkdir()
    shutil.copy(gpt2 / "model.safetensors", bare)
    spec = {"families": {}}
    for name, base in (("gpt2", gpt2), ("llama", llama), ("bare", bare)):
        members = {f"ft{i}": finetuned_copy(base, root / f"{name}-ft{i}", seed=i) for i in (1, 2)}
        spec["families"][name] = {
            "base": str(base),
            "members": {m: str(path) for m, path in members.items()},
        }
    spec["families"]["gpt2-matrices"] = {
        **spec["families"]["gpt2"],
        "include": ["*.attn.c_attn.weight", "*.wte.weight"],
    }
    (root / "spec.yaml").write_text(yaml.safe_dump(spec))
    url = str(root / "catalogue.zarr")
    ingest(root / "spec.yaml", url, progress=False)
    return {"root": root, "url": url, "gpt2": gpt2, "llama": llama, "bare": bare}


def _edit_with_lora(families, tmp_path, family, *, as_adapter=False, **fields):
    from tvsplit.flows.edit import edit_model

    recipe = {
        "base": str(families[family.removesuffix("-matrices")]),
        "family": family,
        "method": "task_arithmetic",
        "members": [{"name": "ft1", "weight": 0.7}, {"name": "ft2", "weight": -0.4}],
        **fields,
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return edit_model(
        str(path), output=str(tmp_path / ("adapter" if as_adapter else "out")),
        catalogue_url=families["url"], lora_rank=None if as_adapter else 64, track=False,
        show_progress=False, as_adapter=as_adapter,
    )  # fmt: skip


def _check_merge(result, base_model) -> set[str]:
    """Merge the export onto ``base_model`` with PEFT; every exported weight equals the dense
    edit's. Returns the edited weights the adapter does not carry."""
    from peft import PeftModel

    dense = load_file(result.output / "model.safetensors")
    merged = PeftModel.from_pretrained(base_model, result.lora).merge_and_unload().state_dict()
    exported = {
        name for name, (module, _) in result.lora_targets.targets.items() if name in result.edited
    }
    assert exported
    for name in exported:
        module = result.lora_targets.targets[name][0]
        assert torch.allclose(merged[f"{module}.weight"], dense[name], atol=2e-6), name
    return set(result.edited) - exported


def test_gpt2_export_merges_to_the_dense_edit(families, tmp_path):
    result = _edit_with_lora(families, tmp_path, "gpt2")
    assert result.lora_targets.rule == STRUCTURE
    config = json.loads((result.lora / "adapter_config.json").read_text())
    assert config["fan_in_fan_out"] is True
    assert "transformer.wte" in config["target_modules"]
    left = _check_merge(result, tiny_gpt2(0))
    assert left and all(name.endswith(".bias") or ".ln_" in name for name in left), (
        left
    )  # only 1-D parameters stay outside the adapter
    assert set(result.lora_skipped) == left
    card = (result.output / "README.md").read_text()
    assert "## LoRA export" in card and "LoRA targets by model structure (GPT2LMHeadModel" in card


def test_llama_export_merges_to_the_dense_edit(families, tmp_path):
    result = _edit_with_lora(families, tmp_path, "llama")
    assert (
        result.lora_targets.rule == STRUCTURE and "LlamaForCausalLM" in result.lora_targets.source
    )
    config = json.loads((result.lora / "adapter_config.json").read_text())
    assert config["fan_in_fan_out"] is False
    assert {"lm_head", "model.embed_tokens", "model.layers.0.self_attn.q_proj"} <= set(
        config["target_modules"]
    )
    left = _check_merge(result, tiny_llama(0))
    assert left and all("norm" in name for name in left), left


def test_folder_without_config_uses_shapes_and_the_recipe(families, tmp_path):
    result = _edit_with_lora(
        families, tmp_path, "bare", fan_in_fan_out=True, lora_targets=["*.attn.*", "*.mlp.*"]
    )
    assert result.lora_targets.rule == SHAPES
    assert (
        "LoRA targets by tensor shapes (no config.json" in (result.output / "README.md").read_text()
    )
    left = _check_merge(result, tiny_gpt2(0))
    assert "transformer.wte.weight" in left  # an embedding is not told by its shape
    assert result.lora_skipped["transformer.wte.weight"] == "not in the recipe's lora_targets"


def test_cli_prints_the_rule(families, tmp_path):
    from tvsplit.flows.cli import app
    from typer.testing import CliRunner

    recipe = {
        "base": str(families["llama"]), "family": "llama", "method": "task_arithmetic",
        "members": [{"name": "ft1"}], "lora_targets": ["*.q_proj"],
    }  # fmt: skip
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    outcome = CliRunner().invoke(
        app,
        ["edit", str(path), "--out", str(tmp_path / "cli"), "--lora-rank", "4",
         "--catalogue", families["url"], "--no-track"],
    )  # fmt: skip
    assert outcome.exit_code == 0, outcome.output
    assert "LoRA targets by model structure (LlamaForCausalLM" in outcome.output
    assert "2 linear" in outcome.output


def test_as_adapter_of_dense_members_takes_module_forms_from_the_structure(families, tmp_path):
    """Dense members carry no LoRA layout: the base's structure says wte is an embedding
    and c_attn a Conv1D (no name is looked at); the adapter merges to the dense edit."""
    from peft import PeftModel

    dense = load_file(
        _edit_with_lora(families, tmp_path, "gpt2-matrices").output / "model.safetensors"
    )
    result = _edit_with_lora(families, tmp_path, "gpt2-matrices", as_adapter=True)
    kinds = {module: row["kind"] for module, row in result.adapter.modules.items()}
    assert kinds["transformer.wte"] == "embedding"
    assert kinds["transformer.h.0.attn.c_attn"] == kinds["transformer.h.1.attn.c_attn"] == "conv1d"
    merged = PeftModel.from_pretrained(tiny_gpt2(0), result.output).merge_and_unload().state_dict()
    for module in kinds:
        name = f"{module}.weight"
        assert torch.allclose(merged[name], dense[name], atol=2e-6), name
