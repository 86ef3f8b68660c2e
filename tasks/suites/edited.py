"""Edited models in memory, from the catalogue: the one helper every suite uses.

``FamilyTensors`` reads one family's base and its members' task vectors from the catalogue
once, and each decomposition run's shared parts once; ``state(method, params, …)`` is then
θ0 + the registered ``tasks.edit`` method applied to every parameter of the family. Each
tensor is computed exactly as the edit job computes it for ``tvsplit edit`` (same
``EditInputs``: τ_i from the catalogue, s_i from the run, u_i = τ_i − s_i), so the model
folder the edit flow writes for the same recipe holds the same tensors.

The state dict holds the family's parameters only (what the catalogue stores), in the base's
source dtype; an evaluation that needs other tensors (parameters the family excluded) takes
them from its base model. Memory: the base plus one task vector per member (plus the shared
parts of the runs read), held for the life of the object.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from tvsplit.storage.catalogue import Catalogue
from tvsplit.storage.lora import ADAPTER_CONFIG
from tvsplit.tasks.edit import EditInputs, apply_edit, get_method

State = dict[str, torch.Tensor]


def _dtype(name: str | None) -> torch.dtype:
    value = getattr(torch, name or "float32", None)
    return value if isinstance(value, torch.dtype) and value.is_floating_point else torch.float32


class FamilyTensors:
    """One family of the catalogue in memory: base, task vectors, shared parts per run."""

    def __init__(self, catalogue_url: str, family: str, members: Sequence[str] | None = None):
        self.catalogue = Catalogue(catalogue_url)
        self.family = family
        self.members = tuple(members or self.catalogue.members(family))
        reader = self.catalogue.open_entry(family)
        self.parameters = tuple(self.catalogue.parameters(family))
        self.base: State = {}
        for name in self.parameters:
            dtype = _dtype(reader.array(name).attrs.get("tvsplit", {}).get("dtype"))
            self.base[name] = reader.read(name).to(dtype)
        self.vectors: dict[str, State] = {}
        for member in self.members:
            entry = self.catalogue.open_entry(family, member)
            self.vectors[member] = {name: entry.read(name) for name in self.parameters}
        self._shared: dict[str, dict[str, tuple[torch.Tensor, ...]]] = {}

    def shared(self, run: str) -> dict[str, tuple[torch.Tensor, ...]]:
        """Parameter → every member's shared part s_i from decomposition ``run`` (cached)."""
        if run not in self._shared:
            from tvsplit.tasks.decompose_job import stored_shared_parts

            parts = stored_shared_parts(self.catalogue.url, self.family, run, self.members)
            self._shared[run] = {name: tuple(p.unbind(0)) for name, p in parts.items()}
        return self._shared[run]

    def inputs(
        self, name: str, members: Sequence[str] | None = None, run: str | None = None
    ) -> EditInputs:
        """One parameter's ``EditInputs`` for ``members`` (default all), split by ``run``."""
        chosen = tuple(members or self.members)
        vectors = tuple(self.vectors[m][name] for m in chosen)
        shared = None
        if run is not None:
            parts = self.shared(run).get(name)
            if parts is not None:
                shared = tuple(parts[self.members.index(m)] for m in chosen)
        return EditInputs(self.base[name], vectors, shared=shared, name=name)

    def state(
        self,
        method: str,
        params: Mapping[str, Any] | None = None,
        *,
        members: Sequence[str] | None = None,
        member_params: Mapping[str, Mapping[str, Any]] | None = None,
        run: str | None = None,
    ) -> State:
        """θ0 + ``method`` (a registered edit) with ``params`` on every family parameter.
        ``member_params``: per-member parameters by name (others get the defaults); ``run``:
        the decomposition run whose shared parts the method reads."""
        edit = get_method(method)
        chosen = tuple(members or self.members)
        parsed = edit.parse_params(dict(params or {}))
        per_member = [dict((member_params or {}).get(m, {})) for m in chosen]
        if edit.needs_split and run is None:
            raise ValueError(f"edit method {method!r} needs a decomposition run")
        return {
            name: apply_edit(method, self.inputs(name, chosen, run), parsed, per_member)
            for name in self.parameters
        }

    def member_state(self, member: str) -> State:
        """θ0 + τ_member (a member's own model, as the catalogue holds it)."""
        return self.state("task_arithmetic", {"scale": 1.0}, members=[member])


def member_model(tensors: FamilyTensors, source: str, member: str) -> State | Path:
    """A member's own model for evaluation: its source folder when it is a local model
    folder (bit-exact), else θ0 + τ from the catalogue (hub ids, task vectors, and adapters:
    θ0 + ΔW is what PEFT's merge computes)."""
    path = Path(source)
    if path.is_dir() and not (path / ADAPTER_CONFIG).is_file():
        return path
    return tensors.member_state(member)
