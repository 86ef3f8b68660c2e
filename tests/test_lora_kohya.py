"""Stable-Diffusion LoRA files in the kohya / A1111 layout, read through diffusers' loader,
against a small SD-style UNet2DConditionModel built from a config.

The fixture is made from a PEFT adapter with diffusers' ``convert_state_dict_to_kohya``, so
reader and fixture share no key map of ours; the truth is PEFT's merge of that adapter and,
for alphas that differ from the ranks, diffusers' own ``load_lora_adapter`` + merge."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tvsplit.storage.catalogue import Catalogue
from tvsplit.storage.errors import SourceError
from tvsplit.storage.kohya import is_kohya_file
from tvsplit.tasks.ingest import IngestJob, run_ingest_job

TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "conv1", "conv2"]
CONV = "down_blocks.0.resnets.0.conv1"


def tiny_unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(8, 16), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=12,
        attention_head_dim=2, norm_num_groups=4,
    ).eval()  # fmt: skip


def merged(model) -> dict[str, torch.Tensor]:
    """A model with LoRA layers merged, under the base's parameter names."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    model = copy.deepcopy(model)
    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            module.merge()
    return {
        k.replace(".base_layer", ""): v for k, v in model.state_dict().items() if "lora_" not in k
    }


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya
    from peft import LoraConfig, get_peft_model_state_dict

    root = tmp_path_factory.mktemp("sd")
    base = tiny_unet()
    base.save_pretrained(root / "unet")
    adapted = copy.deepcopy(base)
    adapted.add_adapter(
        LoraConfig(r=2, lora_alpha=2, target_modules=TARGETS, init_lora_weights=False)
    )
    peft_state = get_peft_model_state_dict(adapted)
    kohya = convert_state_dict_to_kohya({f"unet.{k}": v for k, v in peft_state.items()})
    (root / "lora").mkdir()
    path = root / "lora" / "style.safetensors"
    save_file({k: v.contiguous() for k, v in kohya.items()}, path)
    return {"root": root, "base": base, "adapted": adapted, "file": path}


def ingest(sd, url: str, source: Path) -> Catalogue:
    base = str(sd["root"] / "unet")
    run_ingest_job(IngestJob(url, "fam", None, base, base))
    run_ingest_job(IngestJob(url, "fam", "m", str(source), base))
    return Catalogue(url)


def test_kohya_file_is_read_through_diffusers_and_matches_peft_merge(sd, tmp_path) -> None:
    assert is_kohya_file(sd["file"])
    assert any(k.endswith(".lora_down.weight") for k in load_file(sd["file"]))
    base = sd["base"].state_dict()
    truth = {
        k: v - base[k] for k, v in merged(sd["adapted"]).items() if not torch.equal(v, base[k])
    }
    assert f"{CONV}.weight" in truth and any("to_q" in k for k in truth)
    for source in (sd["file"], sd["file"].parent):  # the file, or a folder holding only it
        catalogue = ingest(sd, str(tmp_path / f"{source.name}.zarr"), source)
        reader = catalogue.open_entry("fam", "m")
        assert catalogue.entry("fam", "m").attrs["lora"]["layout"] == "kohya"
        for name in catalogue.parameters("fam", "m"):
            want = truth.get(name, torch.zeros_like(base[name]))
            assert torch.allclose(reader.read(name), want, atol=1e-6, rtol=1e-5), name
            if name in truth and name.endswith(".weight"):
                low_rank = reader.factors(name)
                assert low_rank is not None and low_rank.rank == 2, name  # kept as factors
        assert reader.factors(f"{CONV}.weight").shape == tuple(base[f"{CONV}.weight"].shape)


def test_alphas_other_than_the_rank_scale_as_diffusers_loads_them(sd, tmp_path) -> None:
    from diffusers.loaders import StableDiffusionLoraLoaderMixin

    tensors = load_file(sd["file"])
    alpha_key = "lora_unet_" + CONV.replace(".", "_") + ".alpha"
    tensors[alpha_key] = torch.tensor(6.0)  # scale 3 on this conv, 1 elsewhere
    path = tmp_path / "alpha.safetensors"
    save_file(tensors, path)
    state, alphas = StableDiffusionLoraLoaderMixin.lora_state_dict(str(path))
    by_diffusers = copy.deepcopy(sd["base"])
    by_diffusers.load_lora_adapter(state, prefix="unet", network_alphas=alphas)
    base = sd["base"].state_dict()
    truth = {k: v - base[k] for k, v in merged(by_diffusers).items()}
    plain = {k: v - base[k] for k, v in merged(sd["adapted"]).items()}
    name = f"{CONV}.weight"
    assert torch.allclose(truth[name], 3 * plain[name], atol=1e-6)
    catalogue = ingest(sd, str(tmp_path / "a.zarr"), path)
    for param in catalogue.parameters("fam", "m"):
        got = catalogue.read("fam", param, member="m")
        assert torch.allclose(got, truth[param], atol=1e-6, rtol=1e-5), param


def test_kohya_dora_and_text_encoder_only_files_are_refused(sd, tmp_path) -> None:
    tensors = load_file(sd["file"])
    down = next(k for k in tensors if k.endswith("lora_down.weight"))
    dora = dict(tensors)
    dora[down.replace("lora_down.weight", "dora_scale")] = torch.ones(1, 8)
    save_file(dora, tmp_path / "dora.safetensors")
    with pytest.raises(SourceError, match="DoRA"):
        ingest(sd, str(tmp_path / "d.zarr"), tmp_path / "dora.safetensors")
    text = {
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.ones(2, 4),
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.ones(4, 2),
    }
    save_file(text, tmp_path / "te.safetensors")
    with pytest.raises(SourceError, match="without UNet weights"):
        ingest(sd, str(tmp_path / "t.zarr"), tmp_path / "te.safetensors")
