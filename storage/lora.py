"""PEFT LoRA adapters read as per-module weight deltas ΔW (see METHOD.md, "Objects").

For every adapted module, ΔW = s · B·A with s = alpha/r (rsLoRA: alpha/√r), transposed
when ``fan_in_fan_out``; r and alpha follow ``rank_pattern``/``alpha_pattern`` exactly as
PEFT matches them (`peft.utils.other.get_pattern_key`). `factors(name)` gives ΔW as its
factors (`storage.lowrank.LowRankDelta`, never dense); `delta(name)` the dense ΔW, float32,
from the same factors by the one formula PEFT uses. Embedding adapters give (B·A)ᵀ·s,
convolution adapters (Conv1d/2d/3d, PEFT's lora_A kernel and 1×1 lora_B) ΔW viewed as
out × (in·k…), a trained LoRA bias gives Δb = s·b_B. Modules in ``modules_to_save`` come back as
full weights (`full_weights`): their delta is saved − base, computed by the caller, and so
do the base layers PEFT stores beside an adapter (``<module>.base_layer.<param>``: an
embedding's weight under the default save, the adapted layers' biases with
``bias="lora_only"``), named as the base names them (`stored_base` lists those of adapted
weights, which must equal the base). DoRA adapters are not low-rank: `dora_delta` gives
their dense ΔW exactly as PEFT merges them. Activated LoRA (aLoRA) is refused: PEFT
cannot merge it into a weight.

The configuration is read with PEFT's own config classes, never by re-parsing JSON.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tvsplit.storage.checkpoint import PICKLE_SUFFIXES, Checkpoint
from tvsplit.storage.errors import SourceError
from tvsplit.storage.kohya import read_kohya
from tvsplit.storage.lowrank import LowRankDelta

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_model.bin")
_WRAPPER = "base_model.model."
_PARTS = {
    ".lora_A.weight": "A",
    ".lora_B.weight": "B",
    ".lora_B.bias": "bias",
    ".lora_embedding_A": "emb_A",
    ".lora_embedding_B": "emb_B",
    ".lora_magnitude_vector": "magnitude",
}
_BASE_LAYER = ".base_layer."


@dataclass
class _Module:
    parts: dict[str, str]  # role (A, B, bias, emb_A, emb_B) → key in the adapter file

    @property
    def embedding(self) -> bool:
        return "emb_A" in self.parts


class LoraAdapter:
    """A PEFT LoRA adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``),
    or a kohya / A1111 file converted by diffusers (`from_kohya`; ``layout`` says which).

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
        self.layout = "peft"
        self.other_components: tuple[str, ...] = ()
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
        weights = Checkpoint.from_file(weights_file, allow_pickle=allow_pickle)
        self._index(weights, weights_file, [self.folder / ADAPTER_CONFIG, weights_file])

    @classmethod
    def from_kohya(cls, path: Path) -> LoraAdapter:
        """A Stable-Diffusion LoRA file in the kohya / A1111 layout, converted by diffusers'
        own loader (`storage.kohya`); its UNet modules, read like a PEFT adapter's."""
        kohya = read_kohya(Path(path))
        adapter = cls.__new__(cls)
        adapter.folder = Path(path).parent
        adapter.config = kohya.config
        adapter.layout = "kohya"
        adapter.other_components = kohya.other_components
        adapter._refuse_unsupported()
        adapter._index(kohya.weights, Path(path), [Path(path)])
        return adapter

    def _index(self, weights: Any, weights_file: Path, files: list[Path]) -> None:
        """Sort the adapter's tensors into modules, whole weights and stored base layers."""
        self.weights = weights
        self.weights_file = weights_file
        self._files = files
        self._modules: dict[str, _Module] = {}
        self.full_weights: dict[str, str] = {}  # module_to_save parameter name → adapter key
        self.stored_base: dict[str, str] = {}  # adapted weight → its stored base-layer copy
        base_layers: dict[str, str] = {}
        for key in self.weights:
            name = key.removeprefix(_WRAPPER)
            if _BASE_LAYER in name:
                base_layers[name.replace(_BASE_LAYER, ".", 1)] = key
                continue
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
        for name, key in base_layers.items():
            if name in self.deltas and name.endswith(".weight"):
                self.stored_base[name] = key  # a copy of the base: checked equal at ingest
            elif name in self.deltas or name in self.full_weights:
                raise SourceError(f"{weights_file}: {key!r} and a LoRA bias both change {name!r}")
            else:
                self.full_weights[name] = key  # e.g. a bias trained with bias="lora_only"

    @property
    def dora(self) -> bool:
        return bool(getattr(self.config, "use_dora", False))

    def _refuse_unsupported(self) -> None:
        config = self.config
        where = self.folder / ADAPTER_CONFIG
        if getattr(config, "alora_invocation_tokens", None) is not None:
            raise SourceError(
                f"{where}: an activated LoRA (aLoRA, alora_invocation_tokens) changes the model "
                "only after its invocation tokens, so it is no weight delta (PEFT cannot merge "
                "it either); use a plain LoRA"
            )
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
        return list(self._files)

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

    def module_kind(self, name: str) -> str:
        """How weight `name` relates to lora_A/lora_B: ``linear``, ``conv1d``
        (fan_in_fan_out), ``embedding`` or ``conv`` (`tasks.lora_export.peft_factors`)."""
        module, _ = self.deltas[name]
        parts = self._modules[module].parts
        if parts.get("emb_A"):
            return "embedding"
        if len(self.weights.header(parts["A"])[0]) > 2:
            return "conv"
        return "conv1d" if self.config.fan_in_fan_out else "linear"

    def factors(self, name: str) -> LowRankDelta:
        """ΔW of weight `name` as its factors (float32), with the scale and orientation."""
        module, what = self.deltas[name]
        if what != "weight":
            raise KeyError(f"{name!r} is a LoRA bias, not a factored weight")
        parts = self._modules[module].parts
        r, _, s = self.scaling(module)
        if parts.get("emb_A"):
            a = self.weights[parts["emb_A"]].to(torch.float32)
            b = self.weights[parts["emb_B"]].to(torch.float32)
            transposed, kernel = True, ()
        else:
            a = self.weights[parts["A"]].to(torch.float32)
            b = self.weights[parts["B"]].to(torch.float32)
            transposed, kernel = bool(self.config.fan_in_fan_out), tuple(a.shape[2:])
            grouped = a.ndim > 2 and b.ndim == a.ndim and b.shape[1] != a.shape[0]
            if grouped or a.ndim != b.ndim or a.ndim == 1 or any(k != 1 for k in b.shape[2:]):
                raise SourceError(
                    f"{self.weights_file}: module {module!r} has LoRA factors of shapes "
                    f"{tuple(a.shape)} and {tuple(b.shape)}; expected (r × in[, kernel]) and "
                    "(out × r[, 1…]) (grouped convolutions are not supported)"
                )
            if a.ndim > 2:  # a convolution: ΔW viewed as out × (in·kh·kw)
                a, b = a.reshape(a.shape[0], -1), b.reshape(b.shape[0], b.shape[1])
        if a.shape[0] != r or b.shape[1] != r:
            raise SourceError(
                f"{self.weights_file}: module {module!r} has rank {a.shape[0]} factors but the "
                f"config gives r={r} (rank_pattern/r disagree with the weights)"
            )
        if kernel:
            shape = (b.shape[0], a.shape[1] // math.prod(kernel), *kernel)
        else:
            shape = (a.shape[1], b.shape[0]) if transposed else (b.shape[0], a.shape[1])
        return LowRankDelta(b, a, s, shape, transposed)

    def delta(self, name: str) -> torch.Tensor:
        """ΔW (or Δb) for one target parameter, float32, formed from this module's A and B
        (`LowRankDelta.dense`: PEFT's formula)."""
        module, what = self.deltas[name]
        if what == "bias":
            _, _, s = self.scaling(module)
            return self.weights[self._modules[module].parts["bias"]].to(torch.float32) * s
        return self.factors(name).dense()

    def dora_delta(self, name: str, base: torch.Tensor) -> torch.Tensor:
        """The dense ΔW of a DoRA-adapted linear weight, as PEFT merges it: with
        V = W + s·B·A (W in out × in), merged = (m / ‖V‖ per output row) · V, ΔW = merged − W;
        float32, in the base's stored orientation."""
        module, what = self.deltas[name]
        parts = self._modules[module].parts
        if what != "weight" or "magnitude" not in parts or parts.get("emb_A"):
            raise SourceError(
                f"{self.weights_file}: module {module!r}: DoRA is supported on linear layers "
                "only (no magnitude vector, or an embedding/convolution)"
            )
        low_rank = self.factors(name)
        if len(low_rank.shape) != 2:
            raise SourceError(
                f"{self.weights_file}: module {module!r}: DoRA on convolutions is not supported"
            )
        weight = base.to(torch.float32)
        delta = low_rank.dense()
        if low_rank.transposed:  # fan_in_fan_out: work in out × in as PEFT does
            weight, delta = weight.T, delta.T
        magnitude = self.weights[parts["magnitude"]].to(torch.float32)
        combined = weight + delta
        norm = torch.linalg.norm(combined, dim=1)
        merged = (magnitude / norm).view(-1, 1) * combined
        change = merged - weight
        return change.T.contiguous() if low_rank.transposed else change
