"""The adapter edit job: a recipe's edit of a LoRA family written as one PEFT LoRA adapter.

Reads each family parameter's members from the catalogue (factors stay factors), its split
from the recipe's decomposition run, forms the edit with ``tasks.adapter_edit`` and writes
the adapter with ``tasks.lora_export.write_module_adapter``, one module at a time: memory is
bounded by one module (its dense matrix only for a module that needs the dense route).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tvsplit.storage.catalogue import Catalogue, EntryReader
from tvsplit.storage.decompositions import DecompositionRun
from tvsplit.storage.writes import node_attrs
from tvsplit.tasks.adapter_edit import (
    AdapterEditError,
    Member,
    ModuleEdit,
    StoredShared,
    edits,
    linear_coefficients,
)
from tvsplit.tasks.edit import apply_edit
from tvsplit.tasks.edit_job import EditPlan, edit_inputs
from tvsplit.tasks.lora_export import write_module_adapter
from tvsplit.tasks.lora_targets import STRUCTURE, lora_targets


@dataclass
class AdapterEditReport:
    """What was written: each module's rank, numerical rank, bound, error and route."""

    path: Path
    modules: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def max_relative_error(self) -> float:
        return max((m["relative_error"] for m in self.modules.values()), default=0.0)

    @property
    def total_rank(self) -> int:
        return sum(m["rank"] for m in self.modules.values())

    def routes(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for module in self.modules.values():
            counts[module["route"]] = counts.get(module["route"], 0) + 1
        return counts


def _member(reader: EntryReader, name: str) -> tuple[Member, dict[str, Any]]:
    attrs = node_attrs(reader.array(name))
    if attrs.get("kind") == "zero":
        return None, attrs
    factors = reader.factors(name)
    return (factors if factors is not None else reader.read(name)), attrs


def _kind(
    name: str,
    shape: tuple[int, ...],
    kinds: list[str],
    fan_in_fan_out: bool,
    structural: dict[str, tuple[str, str]],
) -> str:
    """The module's PEFT form: as its LoRA members stored it, else from the base's structure
    (`tasks.lora_targets`), else from its shape (a kernel is a convolution; a matrix is
    Conv1D when the members were, else linear)."""
    if kinds:
        return kinds[0]
    if name in structural:
        return structural[name][1]
    if len(shape) > 2:
        return "conv"
    return "conv1d" if fan_in_fan_out else "linear"


def write_edit_adapter(
    plan: EditPlan,
    target: str | Path,
    *,
    rank: int | None = None,
    base_model_name_or_path: str | None = None,
    overwrite: bool = False,
    base_folder: str | Path | None = None,
) -> AdapterEditReport:
    """Write the edit `plan` describes as one PEFT LoRA adapter folder at `target`.

    A module's PEFT form comes from its members' stored LoRA layout; for parameters whose
    members carry none (dense members), from the structure of the base at `base_folder`
    when it has a transformers config (`tasks.lora_targets`), else from shapes.

    Exact (to float32 round-off) unless `rank` truncates a module, whose relative error is
    then reported; AdapterEditError names a parameter the adapter cannot hold."""
    catalogue = Catalogue(plan.catalogue_url)
    readers = [catalogue.open_entry(plan.family, member) for member in plan.members]
    store = DecompositionRun(catalogue, plan.family, plan.run) if plan.run else None
    indices = tuple(plan.run_members.index(m) for m in plan.members) if store else ()
    coefficients = linear_coefficients(
        plan.method, plan.method_params, plan.member_params, len(plan.members)
    )
    names = [n for n in catalogue.parameters(plan.family) if n in plan.family_parameters]
    shapes = {name: readers[0].shape(name) for name in names}
    kinds: dict[str, list[str]] = {}
    fan_in_fan_out = False
    structural: dict[str, tuple[str, str]] = {}
    if base_folder is not None:
        planned = lora_targets(base_folder, [(n, shapes[n]) for n in names])
        structural = planned.targets if planned.rule == STRUCTURE else {}

    def read(name: str) -> tuple[list[Member], StoredShared | None]:
        nonlocal fan_in_fan_out
        members, found = [], []
        for reader in readers:
            member, attrs = _member(reader, name)
            members.append(member)
            if "module_kind" in attrs:
                found.append(str(attrs["module_kind"]))
            fan_in_fan_out |= bool(attrs.get("fan_in_fan_out"))
        kinds[name] = found
        stored = None
        if store is not None:
            split = store.read_parameter(name)
            stored = StoredShared(split.arrays, split.diagnostics, indices)
        return members, stored

    def dense_edit(name: str) -> torch.Tensor:
        zeros = torch.zeros(shapes[name])
        inputs = edit_inputs(plan, catalogue, name, zeros)
        return apply_edit(plan.method, inputs, plan.method_params, list(plan.member_params))

    report = AdapterEditReport(Path(target))

    def modules():
        for module in edits([(n, shapes[n]) for n in names], read, dense_edit, coefficients, rank):
            if not module.name.endswith(".weight"):
                raise AdapterEditError(
                    f"{module.name!r} is not a module's weight; a LoRA adapter cannot change it"
                )
            kind = _kind(
                module.name, module.shape, kinds.get(module.name, []), fan_in_fan_out, structural
            )
            path = module.name.removesuffix(".weight")
            if not kinds.get(module.name) and module.name in structural:
                path = structural[module.name][0]  # the model's own module path
            report.modules[path] = _row(module, kind)
            yield path, kind, module.up, module.down, module.shape

    write_module_adapter(
        target, modules(), base_model_name_or_path=base_model_name_or_path, overwrite=overwrite
    )
    report.path = Path(target).absolute()
    return report


def _row(module: ModuleEdit, kind: str) -> dict[str, Any]:
    return {
        "kind": kind,
        "rank": module.rank,
        "exact_rank": module.exact_rank,
        "bound": module.bound,
        "relative_error": module.relative_error,
        "route": module.route,
    }
