"""Export dense weight changes ΔW as a PEFT LoRA adapter, by truncated SVD.

For a module with ``nn.Linear`` layout (weight ``out × in``) the pair is
``lora_A`` (r × in) and ``lora_B`` (out × r) with B A ≈ ΔW, and ``lora_alpha = r`` so PEFT's
scale alpha / r is 1. For transformers' ``Conv1D`` (GPT-2: weight stored ``in × out``) pass
``fan_in_fan_out=True``: ΔW is given as stored, the pair keeps PEFT's shapes
(A: r × in, B: out × r) and B A ≈ ΔWᵀ, as PEFT applies it.

Guarantees (tested): B A is the best rank-r approximation of ΔW in Frobenius norm
(Eckart–Young; singular values split evenly, A = √Σ Vᵀ, B = U √Σ), and
``relative_error`` = ‖ΔW − B A‖_F / ‖ΔW‖_F (0 for a zero ΔW). The adapter written by
``write_lora_adapter`` loads with ``peft.PeftModel.from_pretrained`` onto the base and
reproduces base + ΔW up to that error. Supported modules: linear layers, Conv1D,
embeddings and convolutions (``MODULE_KINDS``; which module is which is decided by
``tasks.lora_targets``); 1-D parameters are refused with an error naming the module.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file
from tvsplit.storage.model_folder import FolderReplacement, atomic_folder
from tvsplit.tasks.task_vector import all_finite

__all__ = [
    "MODULE_KINDS",
    "LoraExport",
    "LoraExportError",
    "LoraExportReport",
    "LoraPair",
    "lora_from_delta",
    "peft_factors",
    "write_lora_adapter",
    "write_module_adapter",
]

ADAPTER_WEIGHTS = "adapter_model.safetensors"


class LoraExportError(ValueError):
    """A ΔW that cannot be exported as LoRA; the message names the module."""


@dataclass(frozen=True)
class LoraPair:
    """One module's LoRA factors (PEFT shapes) and the truncation's relative error."""

    lora_A: torch.Tensor
    lora_B: torch.Tensor
    rank: int
    relative_error: float

    def delta(self, *, fan_in_fan_out: bool = False) -> torch.Tensor:
        """B A in the stored layout of the module's weight (transposed for Conv1D)."""
        product = self.lora_B @ self.lora_A
        return product.T if fan_in_fan_out else product


def lora_from_delta(
    delta: torch.Tensor,
    rank: int,
    *,
    fan_in_fan_out: bool = False,
    module: str = "module",
    dtype: torch.dtype | None = None,
) -> LoraPair:
    """Truncated SVD of one module's ΔW at ``rank`` (clamped to min(out, in)).

    Computed in float32 (float64 stays float64); the factors are cast to ``dtype``
    (default: ΔW's dtype). Raises LoraExportError naming ``module`` for a ΔW that is not
    2-D, not floating point, or not finite, or a rank < 1.
    """
    if delta.ndim != 2:
        raise LoraExportError(
            f"{module}: LoRA needs a 2-D weight, got shape {tuple(delta.shape)} "
            "(1-D and convolution kernels are not exported)"
        )
    if not delta.is_floating_point():
        raise LoraExportError(f"{module}: dtype {delta.dtype} is not floating point")
    if rank < 1:
        raise LoraExportError(f"{module}: rank must be ≥ 1, got {rank}")
    work = delta.to(torch.float64 if delta.dtype == torch.float64 else torch.float32)
    if not all_finite(work):
        raise LoraExportError(f"{module}: ΔW contains NaN or Inf")
    matrix = work.T if fan_in_fan_out else work  # (out, in), as PEFT's B @ A
    r = min(rank, *matrix.shape)
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    root = s[:r].sqrt()
    lora_b = u[:, :r] * root
    lora_a = root[:, None] * vh[:r]
    total = float(s.double().square().sum())
    dropped = float(s[r:].double().square().sum())
    error = math.sqrt(dropped / total) if total > 0 else 0.0
    out_dtype = dtype or delta.dtype
    return LoraPair(
        lora_A=lora_a.to(out_dtype).contiguous(),
        lora_B=lora_b.to(out_dtype).contiguous(),
        rank=r,
        relative_error=error,
    )


@dataclass(frozen=True)
class LoraExportReport:
    """What was written: the folder, the rank, and each module's rank and relative error."""

    path: Path
    rank: int
    ranks: dict[str, int] = field(default_factory=dict)
    relative_errors: dict[str, float] = field(default_factory=dict)

    @property
    def max_relative_error(self) -> float:
        return max(self.relative_errors.values(), default=0.0)


def write_lora_adapter(
    target: str | Path,
    deltas: Iterable[tuple[str, torch.Tensor]],
    *,
    rank: int,
    fan_in_fan_out: bool = False,
    kinds: Mapping[str, str] | None = None,
    base_model_name_or_path: str | None = None,
    dtype: torch.dtype = torch.float32,
    overwrite: bool = False,
    replacement: FolderReplacement | None = None,
) -> LoraExportReport:
    """Write a PEFT LoRA adapter folder from ``(module name, ΔW)`` pairs, consumed one at a
    time (only the factors are kept).

    Module names are the base model's module paths (``transformer.h.0.attn.c_attn``), used
    as ``target_modules``. ``kinds`` gives a module's PEFT form (``MODULE_KINDS``, decided by
    ``tasks.lora_targets``); a module it does not name is ``conv1d`` with ``fan_in_fan_out``,
    else ``linear``. ΔW is given as stored (Conv1D: in × out; embedding: vocabulary × dim;
    convolution: out × in × k…) and factored at ``rank`` as a matrix (first dimension × the
    rest) by ``lora_from_delta``; the factors are saved under PEFT's keys for the kind
    (``peft_factors``). A module whose smaller dimension is below ``rank`` gets that rank
    through ``rank_pattern``/``alpha_pattern`` (scale stays 1). The folder appears at
    ``target`` only when complete; with ``replacement`` it is staged there and appears when
    the caller commits it (together with the model it belongs to).
    """
    export = LoraExport(rank, fan_in_fan_out=fan_in_fan_out, kinds=kinds, dtype=dtype)
    for module, delta in deltas:
        export.add(module, delta)
    return export.write(
        target, base_model_name_or_path=base_model_name_or_path, overwrite=overwrite,
        replacement=replacement,
    )  # fmt: skip


class LoraExport:
    """A LoRA adapter collected one module at a time while an edit streams: each ΔW is
    factored when it is added and only its factors are kept (memory: the factors, not the
    deltas). ``write`` saves the folder; ``write_lora_adapter`` documents the layout."""

    def __init__(
        self,
        rank: int,
        *,
        fan_in_fan_out: bool = False,
        kinds: Mapping[str, str] | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.rank = rank
        self._default = "conv1d" if fan_in_fan_out else "linear"
        self._fan_in_fan_out = fan_in_fan_out
        self._kinds = dict(kinds or {})
        self._dtype = dtype
        self._tensors: dict[str, torch.Tensor] = {}
        self.ranks: dict[str, int] = {}
        self.errors: dict[str, float] = {}
        self._used: set[str] = set()

    def add(self, module: str, delta: torch.Tensor, kind: str | None = None) -> None:
        """Factor one module's ΔW (as stored) at the rank; ``kind`` overrides ``kinds``."""
        if module in self.ranks:
            raise LoraExportError(f"{module}: ΔW given twice")
        kind = kind or self._kinds.get(module, self._default)
        shape = tuple(delta.shape)
        if kind == "conv" and delta.ndim < 3:
            raise LoraExportError(f"{module}: a convolution's ΔW has 3-5 dimensions, got {shape}")
        matrix = delta.reshape(shape[0], -1) if kind == "conv" else delta
        pair = lora_from_delta(matrix, self.rank, module=module, dtype=self._dtype)  # ≈ B @ A
        for key, tensor in peft_factors(module, kind, pair.lora_B, pair.lora_A, shape).items():
            self._tensors[f"base_model.model.{module}.{key}"] = tensor
        self.ranks[module] = pair.rank
        self.errors[module] = pair.relative_error
        self._used.add(kind)

    def add_edit(
        self, module: str, edited: torch.Tensor, base: torch.Tensor, kind: str | None = None
    ) -> None:
        """``add`` the change an edit made to a module's weight: ΔW = edited − base (float32)."""
        self.add(module, edited.float() - base.float(), kind)

    def write(
        self,
        target: str | Path,
        *,
        base_model_name_or_path: str | None = None,
        overwrite: bool = False,
        replacement: FolderReplacement | None = None,
    ) -> LoraExportReport:
        """Save the adapter folder (complete or not at all; staged in ``replacement``)."""
        if not self.ranks:
            raise LoraExportError(f"{target}: no modules to export")
        if {"linear", "conv1d"} <= self._used:
            raise LoraExportError(_MIXED.format(target=target))
        _save_adapter(
            target, self._tensors, self.ranks, self.rank,
            fan_in_fan_out="conv1d" in self._used or self._fan_in_fan_out,
            base_model_name_or_path=base_model_name_or_path, overwrite=overwrite,
            replacement=replacement,
        )  # fmt: skip
        return LoraExportReport(
            path=Path(target).absolute(), rank=self.rank, ranks=dict(self.ranks),
            relative_errors=dict(self.errors),
        )  # fmt: skip


_MIXED = (
    "{target}: the modules mix Conv1D (fan_in_fan_out) and linear layers; PEFT's "
    "fan_in_fan_out is one flag per adapter"
)


def _save_adapter(
    target: str | Path,
    tensors: dict[str, torch.Tensor],
    ranks: Mapping[str, int],
    rank: int,
    *,
    fan_in_fan_out: bool,
    base_model_name_or_path: str | None,
    overwrite: bool,
    replacement: FolderReplacement | None = None,
) -> None:
    """adapter_config.json (r = ``rank``, alpha = r, per-module ranks through the patterns)
    and the weights, in a folder that appears only when complete (or staged in
    ``replacement``)."""
    from peft import LoraConfig  # heavy import, only when writing

    pattern = {module: r for module, r in ranks.items() if r != rank}
    config = LoraConfig(
        r=rank,
        lora_alpha=rank,
        target_modules=sorted(ranks),
        fan_in_fan_out=fan_in_fan_out,
        lora_dropout=0.0,
        bias="none",
        rank_pattern=pattern,
        alpha_pattern=dict(pattern),
        base_model_name_or_path=base_model_name_or_path,
        inference_mode=True,
    )
    context = (
        atomic_folder(target, overwrite=overwrite)
        if replacement is None
        else nullcontext(replacement.stage(target))
    )
    with context as folder:
        config.save_pretrained(str(folder))
        save_file(tensors, str(folder / ADAPTER_WEIGHTS), metadata={"format": "pt"})


#: how a module's weight relates to PEFT's lora_A / lora_B (see ``peft_factors``)
MODULE_KINDS = ("linear", "conv1d", "embedding", "conv")


def peft_factors(
    module: str, kind: str, up: torch.Tensor, down: torch.Tensor, shape: tuple[int, ...]
) -> dict[str, torch.Tensor]:
    """PEFT's adapter tensors (keys without the ``base_model.model.<module>`` prefix) for a
    module whose weight change, as a matrix (first dimension × the rest), is up @ down.

    ``linear``: lora_B = up, lora_A = down. ``conv1d`` (fan_in_fan_out: weight in × out) and
    ``embedding`` (PEFT applies (B A)ᵀ): B = downᵀ, A = upᵀ. ``conv``: lora_B = up as an
    (out, r, 1, …) kernel, lora_A = down as (r, in, k…)."""
    r = up.shape[1]
    if kind == "linear":
        a, b = down, up
    elif kind in ("conv1d", "embedding"):
        a, b = up.T, down.T
    elif kind == "conv":
        a = down.reshape(r, *shape[1:])
        b = up.reshape(shape[0], r, *([1] * (len(shape) - 2)))
    else:
        raise LoraExportError(f"{module}: unknown module kind {kind!r} (one of {MODULE_KINDS})")
    if kind == "embedding":
        return {"lora_embedding_A": a.contiguous(), "lora_embedding_B": b.contiguous()}
    return {"lora_A.weight": a.contiguous(), "lora_B.weight": b.contiguous()}


def write_module_adapter(
    target: str | Path,
    modules: Iterable[tuple[str, str, torch.Tensor, torch.Tensor, tuple[int, ...]]],
    *,
    base_model_name_or_path: str | None = None,
    dtype: torch.dtype = torch.float32,
    overwrite: bool = False,
) -> dict[str, int]:
    """Write a PEFT LoRA adapter folder from ``(module, kind, up, down, weight shape)`` with
    ΔW (as a matrix) = up @ down, consumed one module at a time; returns each module's rank.

    Each module keeps its own rank (``rank_pattern``, with ``alpha_pattern`` equal so PEFT's
    scale is 1); ``fan_in_fan_out`` is set when the modules are Conv1D (a mix of Conv1D and
    plain linear modules is refused: PEFT has one flag). The folder appears only when
    complete."""
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    kinds: set[str] = set()
    for module, kind, up, down, shape in modules:
        if module in ranks:
            raise LoraExportError(f"{module}: given twice")
        for key, tensor in peft_factors(module, kind, up, down, shape).items():
            tensors[f"base_model.model.{module}.{key}"] = tensor.to(dtype)
        ranks[module] = int(up.shape[1])
        kinds.add(kind)
    if not ranks:
        raise LoraExportError(f"{target}: the edit changes no weight matrix; nothing to export")
    if {"linear", "conv1d"} <= kinds:
        raise LoraExportError(_MIXED.format(target=target))
    _save_adapter(
        target, tensors, ranks, max(ranks.values()), fan_in_fan_out="conv1d" in kinds,
        base_model_name_or_path=base_model_name_or_path, overwrite=overwrite,
    )  # fmt: skip
    return ranks
