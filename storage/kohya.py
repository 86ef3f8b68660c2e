"""Stable-Diffusion LoRA files in the kohya / A1111 layout, read with diffusers' own loader.

A kohya file is one ``.safetensors`` whose keys all start with ``lora_unet_`` or
``lora_te[12]_`` (``<module>.lora_down.weight``, ``<module>.lora_up.weight``,
``<module>.alpha``). It is converted exactly as diffusers converts it when a pipeline loads
it: ``StableDiffusionLoraLoaderMixin.lora_state_dict`` (kohya → diffusers names and network
alphas), then ``convert_unet_state_dict_to_peft`` (→ PEFT's ``lora_A``/``lora_B`` names) and
``get_peft_kwargs`` (ranks and alphas → the ``LoraConfig`` diffusers builds, with its
rank/alpha patterns), so ΔW = alpha/r · up·down per module, with no key map of our own.

The UNet's modules are read (the family's base is the UNet); text-encoder LoRA weights in
the same file belong to another model and are listed in `KohyaFile.other_components`
(recorded in the entry's provenance), not ingested. A file with DoRA scales (``dora_scale``)
is refused: diffusers' loader drops them, which would silently turn DoRA into plain LoRA.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tvsplit.storage.errors import SourceError

KOHYA_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")
UNET = "unet"


def is_kohya_file(path: Path) -> bool:
    """Whether `path` is a safetensors file in the kohya / A1111 LoRA layout (header only)."""
    if path.suffix != ".safetensors" or not path.is_file():
        return False
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            keys = list(handle.keys())
    except Exception:
        return False
    return bool(keys) and all(key.startswith(KOHYA_PREFIXES) for key in keys)


class Tensors(Mapping[str, torch.Tensor]):
    """Tensors held in memory with the `Checkpoint` interface (``header``, ``label``)."""

    def __init__(self, tensors: Mapping[str, torch.Tensor], label: str) -> None:
        self._tensors = dict(tensors)
        self.label = label

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._tensors[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)

    def header(self, name: str) -> tuple[tuple[int, ...], str]:
        tensor = self._tensors[name]
        return tuple(tensor.shape), str(tensor.dtype).removeprefix("torch.")


@dataclass(frozen=True)
class KohyaFile:
    """A kohya file's UNet LoRA in PEFT form: the config diffusers builds and the weights."""

    config: Any  # peft.LoraConfig
    weights: Tensors
    other_components: tuple[str, ...]  # e.g. ("text_encoder",): present, not ingested


def read_kohya(path: Path) -> KohyaFile:
    """Convert a kohya / A1111 LoRA file with diffusers' loader (see the module docstring);
    SourceError naming the file when diffusers cannot read it, it holds DoRA scales, or it
    has no UNet LoRA."""
    from diffusers.loaders import StableDiffusionLoraLoaderMixin
    from diffusers.utils.peft_utils import get_peft_kwargs
    from diffusers.utils.state_dict_utils import convert_unet_state_dict_to_peft
    from peft import LoraConfig
    from safetensors.torch import load_file

    raw = load_file(str(path))
    if any("dora_scale" in key for key in raw):
        raise SourceError(
            f"{path}: a kohya DoRA file (dora_scale keys); diffusers' loader drops the DoRA "
            "scales, so it cannot be read exactly; convert it to a PEFT adapter folder"
        )
    try:
        state, alphas = StableDiffusionLoraLoaderMixin.lora_state_dict(raw)
    except (ValueError, KeyError) as error:
        raise SourceError(f"{path}: diffusers cannot read this kohya LoRA file ({error})") from None
    prefix = f"{UNET}."
    others = sorted({key.split(".", 1)[0] for key in state if not key.startswith(prefix)})
    unet = {key.removeprefix(prefix): v for key, v in state.items() if key.startswith(prefix)}
    if not unet:
        raise SourceError(
            f"{path}: a kohya LoRA file without UNet weights (only {', '.join(others)}); "
            "text-encoder LoRA files are not supported"
        )
    # as diffusers' `load_lora_adapter` does for a UNet: PEFT names, ranks, alphas, config
    peft_state = convert_unet_state_dict_to_peft(unet)
    ranks = {f"^{k}": v.shape[1] for k, v in peft_state.items() if "lora_B" in k and v.ndim > 1}
    unet_alphas = {
        key.removeprefix(prefix): value
        for key, value in (alphas or {}).items()
        if key.startswith(prefix)
    }
    kwargs = get_peft_kwargs(ranks, unet_alphas, peft_state, is_unet=True)
    try:
        config = LoraConfig(**kwargs)
    except (TypeError, ValueError) as error:
        raise SourceError(f"{path}: no LoRA config can be built from this file ({error})") from None
    return KohyaFile(config, Tensors(peft_state, str(path)), tuple(others))
