"""Which edited weights a LoRA export carries, and in which PEFT form: decided from the
base model's structure, or, without a structure to read, from tensor shapes and the recipe.

**Structure** (a base folder whose ``config.json`` is a transformers config): the model
class its config names (``architectures``, else ``AutoModel``) is built on the meta device
(no weights are allocated or read), and every weight is classified by the module that owns
it, as PEFT's LoRA dispatch does: ``nn.Linear`` → ``linear``, transformers' ``Conv1D`` →
``conv1d`` (stored in × out: PEFT's ``fan_in_fan_out``), ``nn.Embedding`` → ``embedding``,
``nn.Conv1d/2d/3d`` → ``conv``. Weights of other modules (norms, biases, positional
tables that are plain parameters) are not targets, and the report says why.

**Shapes** (no config to build from: a diffusers UNet folder, a bare safetensors file):
every edited ``*.weight`` with two dimensions is taken as a linear layer, or as a Conv1D
when the recipe says ``fan_in_fan_out: true``, and one with 3-5 dimensions as a
convolution; 1-D tensors are not targets. An embedding cannot be told from a linear layer
by its shape, so a recipe for such a base names its targets with ``lora_targets``.

In both rules ``lora_targets`` (shell patterns over module names, ``*.attn.*``) narrows the
targets, and a pattern that matches no edited weight is an error. Guarantees: the result
names the rule it used (``LoraTargets.rule`` and ``describe()``, printed by the edit command
and written into the model card); a weight is either a target with its PEFT kind or skipped
with its reason; an adapter never mixes ``linear`` and ``conv1d`` targets (PEFT's
``fan_in_fan_out`` is one flag per adapter: the kind with fewer modules is skipped, named).
"""

from __future__ import annotations

import fnmatch
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["LoraTargetError", "LoraTargets", "ModelStructure", "lora_targets", "model_structure"]

STRUCTURE = "structure"
SHAPES = "shapes"


class LoraTargetError(ValueError):
    """A recipe's LoRA target fields that cannot be honoured; the message names the field."""


@dataclass(frozen=True)
class LoraTargets:
    """The export plan: weight name → (module path in the adapter, PEFT kind); skipped
    weights with their reason; the rule used and what it was built from."""

    rule: str  # STRUCTURE or SHAPES
    source: str  # what the rule read: "GPT2LMHeadModel (config.json, meta device)", ...
    targets: dict[str, tuple[str, str]] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)

    @property
    def fan_in_fan_out(self) -> bool:
        return any(kind == "conv1d" for _, kind in self.targets.values())

    def kind_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for _, kind in self.targets.values():
            counts[kind] = counts.get(kind, 0) + 1
        return dict(sorted(counts.items()))

    def describe(self) -> str:
        """One line: the rule, its source, and the targets by kind."""
        kinds = ", ".join(f"{n} {kind}" for kind, n in self.kind_counts().items()) or "none"
        how = "model structure" if self.rule == STRUCTURE else "tensor shapes"
        return f"LoRA targets by {how} ({self.source}): {kinds}; {len(self.skipped)} skipped"


@dataclass(frozen=True)
class ModelStructure:
    """A model's weights by owning module: {weight name: PEFT kind, or the module's class
    name when PEFT's LoRA does not adapt it}, with the model class and its base prefix."""

    model_class: str
    prefix: str
    kinds: dict[str, str]

    def own_name(self, name: str) -> str | None:
        """The model's name for checkpoint weight ``name``, which may lack or carry the base
        model prefix (``h.0.attn.c_attn.weight`` saved by a ``GPT2Model``); None if absent."""
        candidates = [name]
        if self.prefix:
            candidates.append(f"{self.prefix}.{name}")
            if name.startswith(self.prefix + "."):
                candidates.append(name[len(self.prefix) + 1 :])
        return next((c for c in candidates if c in self.kinds), None)


def model_structure(folder: str | Path) -> ModelStructure | None:
    """The structure of the transformers model whose ``config.json`` is in ``folder``, built
    on the meta device (nothing allocated, no weight read); None when the folder has no
    transformers config (a diffusers component, another library's config)."""
    config_path = Path(folder) / "config.json"
    if not config_path.is_file():
        return None
    try:
        raw = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(raw, dict) or "model_type" not in raw:
        return None  # diffusers and other libraries' configs carry no model_type
    import torch
    import transformers
    from transformers import AutoConfig, AutoModel
    from transformers.pytorch_utils import Conv1D

    try:
        config = AutoConfig.from_pretrained(str(folder))
    except (ValueError, KeyError, OSError):
        return None  # a model_type this transformers does not know
    model_class = None
    for name in config.architectures or ():
        model_class = getattr(transformers, name, None)
        if model_class is not None:
            break
    with torch.device("meta"):
        if model_class is None:
            model = AutoModel.from_config(config)
        else:
            model = model_class._from_config(config)
    kinds: dict[str, str] = {}
    conv = (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)
    for path, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.nn.Parameter) or "weight" not in module._parameters:
            continue
        if isinstance(module, Conv1D):
            kind = "conv1d"
        elif isinstance(module, torch.nn.Linear):
            kind = "linear"
        elif isinstance(module, torch.nn.Embedding):
            kind = "embedding"
        elif isinstance(module, conv):
            kind = "conv"
        else:
            kind = type(module).__name__
        kinds[f"{path}.weight" if path else "weight"] = kind
    prefix = str(getattr(model, "base_model_prefix", "") or "")
    return ModelStructure(type(model).__name__, prefix, kinds)


_PEFT_KINDS = ("linear", "conv1d", "embedding", "conv")


def lora_targets(
    base_folder: str | Path | None,
    weights: Iterable[tuple[str, Sequence[int]]],
    *,
    patterns: Sequence[str] | None = None,
    fan_in_fan_out: bool | None = None,
) -> LoraTargets:
    """The LoRA export plan for the edited ``weights`` (name, shape) of the base at
    ``base_folder`` (a folder, a file, or None), narrowed by ``patterns`` (the recipe's
    ``lora_targets``); ``fan_in_fan_out`` (the recipe's) is used by the shape rule only.
    Raises LoraTargetError for a pattern that matches no edited weight, or a recipe
    ``fan_in_fan_out`` that contradicts the structure."""
    weights = [(name, tuple(int(s) for s in shape)) for name, shape in weights]
    folder = Path(base_folder) if base_folder is not None else None
    structure = model_structure(folder) if folder is not None and folder.is_dir() else None
    targets: dict[str, tuple[str, str]] = {}
    skipped: dict[str, str] = {}
    if structure is not None:
        model_name, kinds = structure.model_class, structure.kinds
        rule, source = STRUCTURE, f"{model_name} built from config.json on the meta device"
        for name, _shape in weights:
            own = structure.own_name(name) if name.endswith(".weight") else None
            if not name.endswith(".weight"):
                skipped[name] = "not a module's weight"
            elif own is None:
                skipped[name] = f"not a weight of a {model_name} module"
            elif kinds[own] not in _PEFT_KINDS:
                skipped[name] = f"weight of a {kinds[own]}, which PEFT's LoRA does not adapt"
            else:
                targets[name] = (own.removesuffix(".weight"), kinds[own])
        if fan_in_fan_out is not None and targets:
            structural = any(kind == "conv1d" for _, kind in targets.values())
            if fan_in_fan_out != structural:
                raise LoraTargetError(
                    f"fan_in_fan_out: the recipe says {fan_in_fan_out}, but {model_name}'s "
                    f"weights are {'Conv1D (in × out)' if structural else 'nn.Linear'}; "
                    "remove the field (the structure decides)"
                )
    else:
        has_config = folder is not None and folder.is_dir() and (folder / "config.json").is_file()
        why = "config.json is not a transformers config" if has_config else "no config.json"
        flag = " and recipe fan_in_fan_out" if fan_in_fan_out else ""
        rule, source = SHAPES, f"{why}: shapes{flag}"
        linear = "conv1d" if fan_in_fan_out else "linear"
        for name, shape in weights:
            if not name.endswith(".weight"):
                skipped[name] = "not a module's weight"
            elif len(shape) == 2:
                targets[name] = (name.removesuffix(".weight"), linear)
            elif 3 <= len(shape) <= 5:
                targets[name] = (name.removesuffix(".weight"), "conv")
            else:
                skipped[name] = f"{len(shape)}-D: no LoRA form"
    if patterns:
        matched = set()
        for i, pattern in enumerate(patterns):
            hits = {n for n, (module, _) in targets.items() if fnmatch.fnmatchcase(module, pattern)}
            if not hits and not any(
                fnmatch.fnmatchcase(n.removesuffix(".weight"), pattern) for n, _ in weights
            ):
                raise LoraTargetError(
                    f"lora_targets[{i}]: {pattern!r} matches no edited module "
                    f"(modules look like {next(iter(targets.values()), ('h.0.attn',))[0]!r})"
                )
            matched |= hits
        for name in list(targets):
            if name not in matched:
                del targets[name]
                skipped[name] = "not in the recipe's lora_targets"
    counts = {"linear": 0, "conv1d": 0}
    for _, kind in targets.values():
        if kind in counts:
            counts[kind] += 1
    if counts["linear"] and counts["conv1d"]:
        drop = "linear" if counts["conv1d"] >= counts["linear"] else "conv1d"
        for name in [n for n, (_, kind) in targets.items() if kind == drop]:
            del targets[name]
            skipped[name] = (
                f"{drop} beside {'Conv1D' if drop == 'linear' else 'linear'} modules: PEFT's "
                "fan_in_fan_out is one flag per adapter"
            )
    return LoraTargets(rule, source, targets, skipped)
