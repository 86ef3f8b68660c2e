"""PEFT LoRA adapters read as per-module weight deltas ΔW (see METHOD.md, "Objects").

For every adapted module, ΔW = s · B·A with s = alpha/r (rsLoRA: alpha/√r), transposed
when ``fan_in_fan_out``; r and alpha follow ``rank_pattern``/``alpha_pattern`` exactly as
PEFT matches them (`peft.utils.other.get_pattern_key`). Embedding adapters give
(B·A)ᵀ·s, a trained LoRA bias gives Δb = s·b_B. ΔW is formed per module, in float32,
before any other arithmetic. Modules in ``modules_to_save`` come back as full weights
(`full_weights`): their delta is saved − base, computed by the caller.

The configuration is read with PEFT's own config classes, never by re-parsing JSON.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from tvsplit.storage.checkpoint import PICKLE_SUFFIXES, Checkpoint
from tvsplit.storage.errors import SourceError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_model.bin")
_WRAPPER = "base_model.model."
_PARTS = {
    ".lora_A.weight": "A",
    ".lora_B.weight": "B",
    ".lora_B.bias": "bias",
    ".lora_embedding_A": "emb_A",
    ".lora_embedding_B": "emb_B",
}


@dataclass
class _Module:
    parts: dict[str, str]  # role (A, B, bias, emb_A, emb_B) → key in the adapter file

    @property
    def embedding(self) -> bool:
        return "emb_A" in self.parts


class LoraAdapter:
    """A PEFT LoRA adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``).

    `deltas` maps each target parameter name (``<module>.weight``, ``<module>.bias``) as
    the base model names it to the module that produces it; `delta(name)` computes it.
    """

    def __init__(self, folder: Path, *, allow_pickle: bool = False) -> None:
        from peft import PeftConfig, PeftType  # imported here: peft pulls in transformers

        self.folder = Path(folder)
        try:
            config = PeftConfig.from_pretrained(str(self.folder))
        except Exception as error:
            raise SourceError(
                f"{self.folder / ADAPTER_CONFIG}: not a PEFT config ({error})"
            ) from None
        if config.peft_type != PeftType.LORA:
            raise SourceError(
                f"{self.folder / ADAPTER_CONFIG}: PEFT type {config.peft_type} is not supported "
                "(only LoRA adapters can be turned into task vectors)"
            )
        self.config = config
        self._refuse_unsupported()
        weights_file = next(
            (self.folder / f for f in ADAPTER_FILES if (self.folder / f).is_file()), None
        )
        if weights_file is None:
            raise SourceError(
                f"{self.folder}: adapter_config.json but no adapter_model.safetensors"
            )
        self.weights = Checkpoint.from_file(weights_file, allow_pickle=allow_pickle)
        self.weights_file = weights_file
        self._modules: dict[str, _Module] = {}
        self.full_weights: dict[str, str] = {}  # module_to_save parameter name → adapter key
        for key in self.weights:
            name = key.removeprefix(_WRAPPER)
            for suffix, role in _PARTS.items():
                if name.endswith(suffix):
                    module = name[: -len(suffix)]
                    self._modules.setdefault(module, _Module({})).parts[role] = key
                    break
            else:
                if "lora_" in name or "magnitude" in name:
                    raise SourceError(f"{weights_file}: unsupported adapter tensor {key!r}")
                self.full_weights[name] = key
        self.deltas: dict[str, tuple[str, str]] = {}  # parameter → (module, "weight"|"bias")
        for module, parts in self._modules.items():
            needed = ("emb_A", "emb_B") if parts.embedding else ("A", "B")
            missing = [role for role in needed if role not in parts.parts]
            if missing:
                raise SourceError(f"{weights_file}: module {module!r} lacks lora {missing[0]}")
            self.deltas[f"{module}.weight"] = (module, "weight")
            if "bias" in parts.parts:
                self.deltas[f"{module}.bias"] = (module, "bias")

    def _refuse_unsupported(self) -> None:
        config = self.config
        where = self.folder / ADAPTER_CONFIG
        if getattr(config, "use_dora", False):
            raise SourceError(f"{where}: DoRA adapters (use_dora) are not supported")
        if getattr(config, "trainable_token_indices", None):
            raise SourceError(f"{where}: trainable_token_indices is not supported")
        if getattr(config, "target_parameters", None):
            raise SourceError(
                f"{where}: target_parameters (LoRA on raw parameters) is not supported"
            )
        if getattr(config, "layer_replication", None):
            raise SourceError(f"{where}: layer_replication is not supported")

    @property
    def files(self) -> list[Path]:
        """The adapter's files: its config and its weights."""
        return [self.folder / ADAPTER_CONFIG, self.weights_file]

    @property
    def pickled(self) -> bool:
        return self.weights_file.suffix in PICKLE_SUFFIXES

    def scaling(self, module: str) -> tuple[int, float, float]:
        """`(r, alpha, s)` for `module`, with PEFT's own pattern matching."""
        from peft.utils.other import get_pattern_key

        config = self.config
        rank_key = get_pattern_key(list(config.rank_pattern or {}), module)
        alpha_key = get_pattern_key(list(config.alpha_pattern or {}), module)
        r = int((config.rank_pattern or {}).get(rank_key, config.r))
        alpha = float((config.alpha_pattern or {}).get(alpha_key, config.lora_alpha))
        s = alpha / math.sqrt(r) if config.use_rslora else alpha / r
        return r, alpha, s

    def source_dtype(self, name: str) -> str:
        """dtype of the stored factors that produce target parameter `name`."""
        module, what = self.deltas[name]
        parts = self._modules[module].parts
        key = parts["bias"] if what == "bias" else parts.get("A") or parts["emb_A"]
        return self.weights.header(key)[1]

    def delta(self, name: str) -> torch.Tensor:
        """ΔW (or Δb) for one target parameter, float32, formed from this module's A and B."""
        module, what = self.deltas[name]
        parts = self._modules[module].parts
        r, _, s = self.scaling(module)
        if what == "bias":
            return self.weights[parts["bias"]].to(torch.float32) * s
        if parts.get("emb_A"):
            a = self.weights[parts["emb_A"]].to(torch.float32)
            b = self.weights[parts["emb_B"]].to(torch.float32)
            transpose = True
        else:
            a = self.weights[parts["A"]].to(torch.float32)
            b = self.weights[parts["B"]].to(torch.float32)
            transpose = bool(self.config.fan_in_fan_out)
        if a.ndim != 2 or b.ndim != 2:
            raise SourceError(
                f"{self.weights_file}: module {module!r} has {a.ndim}-D LoRA factors "
                "(convolution adapters are not supported)"
            )
        if a.shape[0] != r or b.shape[1] != r:
            raise SourceError(
                f"{self.weights_file}: module {module!r} has rank {a.shape[0]} factors but the "
                f"config gives r={r} (rank_pattern/r disagree with the weights)"
            )
        product = (b @ a) * s
        return product.T.contiguous() if transpose else product
