"""LoRA members kept as factors in the catalogue, and the adapter formats users have.

Every check compares against PEFT's own merge (`merge_and_unload`) of an adapter PEFT made,
and the factored catalogue against the dense ingest of the same adapter (bit for bit)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from fixtures_models import lora_adapter, merged_minus_base
from safetensors.torch import save_file
from tvsplit.storage.catalogue import Catalogue
from tvsplit.storage.errors import SourceError
from tvsplit.tasks.ingest import IngestJob, run_ingest_job
from tvsplit.tasks.task_vector import TaskVectorError


def ingest(cat_url: str, base: Path, member: Path, **kw) -> Catalogue:
    run_ingest_job(IngestJob(cat_url, "fam", None, str(base), str(base)))
    run_ingest_job(IngestJob(cat_url, "fam", "m", str(member), str(base), **kw))
    return Catalogue(cat_url)


def save_plain(model: torch.nn.Module, folder: Path) -> Path:
    """A model folder holding only model.safetensors (for modules that are not transformers)."""
    folder.mkdir(parents=True)
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def test_factored_storage_is_the_dense_ingest_bit_for_bit_and_peft_merge(repos, tmp_path) -> None:
    config = dict(
        r=4, lora_alpha=8, target_modules=["c_attn", "c_fc", "wte"], fan_in_fan_out=True,
        rank_pattern={"h.1.attn.c_attn": 2}, use_rslora=True,
    )  # fmt: skip
    peft_model = lora_adapter(repos.base_model, tmp_path / "adapter", seed=3, **config)
    merged = copy.deepcopy(peft_model).merge_and_unload().state_dict()
    base = repos.base_model.state_dict()
    factored = ingest(str(tmp_path / "f.zarr"), repos.base, tmp_path / "adapter")
    dense = ingest(str(tmp_path / "d.zarr"), repos.base, tmp_path / "adapter", lora_factors=False)
    reader, dense_reader = factored.open_entry("fam", "m"), dense.open_entry("fam", "m")
    factored_names = []
    for name in factored.parameters("fam", "m"):
        low_rank = reader.factors(name)
        got = reader.read(name)
        assert torch.equal(got, dense_reader.read(name)), name  # bit-compatible
        assert dense_reader.factors(name) is None
        if low_rank is None:
            continue
        factored_names.append(name)
        assert reader.shape(name) == tuple(base[name].shape) == tuple(got.shape)
        # PEFT adds the same ΔW to the float32 weight: bit-identical merge.
        assert torch.equal(base[name] + got, merged[name]), name
        buffer = torch.empty(reader.shape(name))
        assert torch.equal(reader.read_into(name, buffer), got)
        left, right = low_rank.factors()
        assert torch.allclose(left @ right, got.reshape(got.shape[0], -1), atol=1e-6)
        # the catalogue holds the factors, not the dense matrix
        assert reader.stored_bytes(name) == low_rank.nbytes < got.numel() * 4
    assert "transformer.wte.weight" in factored_names
    assert "transformer.h.0.mlp.c_fc.weight" in factored_names
    assert reader.factors("transformer.h.1.attn.c_attn.weight").rank == 2


def _conv_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 6, 3, padding=1), torch.nn.Conv2d(6, 4, 1), torch.nn.Linear(4, 5)
    )


def test_conv2d_lora_is_factored_and_matches_peft_merge(tmp_path) -> None:
    model = _conv_model()
    base = save_plain(model, tmp_path / "base")
    peft_model = lora_adapter(model, tmp_path / "adapter", seed=1, r=2, lora_alpha=3,
                              target_modules=["0", "1"])  # fmt: skip
    truth = merged_minus_base(peft_model, model)
    cat = ingest(str(tmp_path / "c.zarr"), base, tmp_path / "adapter")
    reader = cat.open_entry("fam", "m")
    for name in ("0.weight", "1.weight"):
        low_rank = reader.factors(name)
        assert low_rank is not None and low_rank.rank == 2
        assert low_rank.matrix_shape == (truth[name].shape[0], truth[name][0].numel())
        assert torch.allclose(reader.read(name), truth[name], atol=1e-6, rtol=0), name


def test_grouped_conv_lora_is_refused(tmp_path) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(4, 4, 3, groups=2))
    base = save_plain(model, tmp_path / "base")
    with pytest.warns(UserWarning):
        lora_adapter(model, tmp_path / "adapter", seed=1, r=2, target_modules=["0"])
    with pytest.raises(SourceError, match="grouped convolutions"):
        ingest(str(tmp_path / "c.zarr"), base, tmp_path / "adapter")


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, vocab_size=48, max_position_embeddings=32,
    )  # fmt: skip
    return LlamaForCausalLM(config).eval()


def test_peft_default_save_of_an_embedding_adapter(tmp_path) -> None:
    """PEFT stores ``embed_tokens.base_layer.weight`` beside an embedding adapter: equal to
    the base it is no change; another base is refused with a message."""
    model = _tiny_llama()
    base = tmp_path / "base"
    model.save_pretrained(base)
    peft_model = lora_adapter(model, tmp_path / "adapter", seed=2, r=2, lora_alpha=4,
                              target_modules=["embed_tokens", "q_proj"])  # fmt: skip
    from safetensors import safe_open

    with safe_open(tmp_path / "adapter" / "adapter_model.safetensors", "pt") as f:
        assert any(k.endswith("embed_tokens.base_layer.weight") for k in f.keys())  # noqa: SIM118
    truth = merged_minus_base(peft_model, model)
    cat = ingest(str(tmp_path / "c.zarr"), base, tmp_path / "adapter")
    for name, want in truth.items():
        if name == "lm_head.weight":  # tied to the embedding
            continue
        assert torch.allclose(cat.read("fam", name, member="m"), want, atol=1e-6), name
    other = _tiny_llama()
    with torch.no_grad():
        other.model.embed_tokens.weight.add_(1.0)
    other.save_pretrained(tmp_path / "other")
    with pytest.raises(TaskVectorError, match="stores a base layer"):
        ingest(str(tmp_path / "o.zarr"), tmp_path / "other", tmp_path / "adapter")


def test_bias_lora_only_is_a_dense_bias_delta(repos, tmp_path) -> None:
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(
        copy.deepcopy(repos.base_model),
        LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn"], fan_in_fan_out=True,
                   bias="lora_only", init_lora_weights=False),
    )  # fmt: skip
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "base_layer.bias" in name:
                param.add_(0.05)  # a trained bias
    peft_model.save_pretrained(tmp_path / "adapter")
    truth = merged_minus_base(peft_model, repos.base_model)
    cat = ingest(str(tmp_path / "c.zarr"), repos.base, tmp_path / "adapter")
    bias = "transformer.h.0.attn.c_attn.bias"
    assert bias in truth and cat.array_attrs("fam", bias, member="m")["kind"] == "full-delta"
    for name, want in truth.items():
        assert torch.allclose(cat.read("fam", name, member="m"), want, atol=1e-6), name


def test_alora_is_refused_with_a_message(repos, tmp_path) -> None:
    lora_adapter(repos.base_model, tmp_path / "adapter", seed=1, r=2, target_modules=["c_attn"],
                 fan_in_fan_out=True, alora_invocation_tokens=[3, 4], task_type="CAUSAL_LM")  # fmt: skip
    with pytest.raises(SourceError, match="aLoRA"):
        ingest(str(tmp_path / "c.zarr"), repos.base, tmp_path / "adapter")


@pytest.mark.parametrize("target", ["c_fc", "linear"])
def test_dora_is_an_exact_dense_delta(repos, tmp_path, target: str) -> None:
    if target == "linear":
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Linear(8, 3))
        base = save_plain(model, tmp_path / "base")
        config = dict(target_modules=["0", "1"])
    else:
        model, base = repos.base_model, repos.base
        config = dict(target_modules=["c_fc"], fan_in_fan_out=True)
    peft_model = lora_adapter(model, tmp_path / "adapter", seed=4, r=2, lora_alpha=4,
                              use_dora=True, **config)  # fmt: skip
    truth = merged_minus_base(peft_model, model)
    cat = ingest(str(tmp_path / "c.zarr"), base, tmp_path / "adapter")
    assert truth
    for name, want in truth.items():
        got = cat.read("fam", name, member="m")
        assert cat.array_attrs("fam", name, member="m")["kind"] == "dora-delta"
        assert torch.allclose(got, want, atol=2e-6, rtol=1e-5), name
