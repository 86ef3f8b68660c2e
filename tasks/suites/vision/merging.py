"""One zoo family in memory, for checks beside the pipeline: the task vectors read from the
model folders, splits computed in memory, and how the members' shared parts agree.

A ``Family`` holds the base's tensors and every member's task vector (τ_i = θ_i − θ0) in task
order; ``split_family`` splits each parameter with ``tasks.decompose.decompose_layer`` (the
pipeline's ``SplitSettings``; the tests compare it with the stored decomposition runs);
``shared_alignment`` is the vision suite's diagnostics. Merged models are not built here:
every suite row is ``tasks.suites.edited.FamilyTensors`` through the ``tasks.edit`` registry.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from tvsplit.tasks.decompose import decompose_layer
from tvsplit.tasks.decompose_job import SplitSettings

State = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Family:
    """Base tensors and task vectors of one zoo seed. ``vectors[name]`` is a tuple of the T
    members' task vectors of parameter ``name``, in ``members`` order."""

    members: tuple[str, ...]
    base: State
    vectors: dict[str, tuple[torch.Tensor, ...]]
    finetuned: dict[str, State] = field(repr=False, default_factory=dict)


def _read_weights(folder: Path) -> State:
    return load_file(str(Path(folder) / "model.safetensors"))


def load_family(base_dir: str | Path, members: Mapping[str, str | Path]) -> Family:
    """Read the base and the members' model folders and form their task vectors."""
    base = _read_weights(Path(base_dir))
    finetuned = {name: _read_weights(Path(path)) for name, path in members.items()}
    for name, state in finetuned.items():
        if state.keys() != base.keys():
            raise ValueError(f"member {name!r}: its tensors differ from the base's")
    vectors = {
        param: tuple(finetuned[m][param].float() - tensor.float() for m in members)
        for param, tensor in base.items()
    }
    return Family(tuple(members), base, vectors, finetuned)


def split_family(family: Family, settings: SplitSettings) -> dict[str, torch.Tensor]:
    """Shared parts per parameter, (T, *shape), from ``decompose_layer`` with ``settings``
    (every parameter as stored, like the decompose flow; 1-D ones follow ``settings.one_d``)."""
    shared = {}
    for param, vectors in family.vectors.items():
        split = decompose_layer(
            torch.stack(vectors),
            name=param,
            member_names=list(family.members),
            **settings.basis_kwargs(),
            **settings.split_kwargs(),
        )
        shared[param] = split.shared
    return shared


def shared_alignment(family: Family, shared: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """How the members' shared parts agree: pairwise cosine of the whole-model shared parts
    (all parameters flattened), and each member's shared energy ‖s_i‖² / ‖τ_i‖²."""
    t = len(family.members)
    flat_shared = torch.stack(
        [torch.cat([shared[p][i].reshape(-1).double() for p in family.base]) for i in range(t)]
    )
    flat_vectors = torch.stack(
        [
            torch.cat([family.vectors[p][i].reshape(-1).double() for p in family.base])
            for i in range(t)
        ]
    )
    norms = flat_shared.norm(dim=1)
    cosines = {}
    for i in range(t):
        for j in range(i + 1, t):
            denominator = float(norms[i] * norms[j])
            value = float(flat_shared[i] @ flat_shared[j]) / denominator if denominator > 0 else 0.0
            cosines[f"{family.members[i]}|{family.members[j]}"] = value
    energy = (flat_shared.square().sum(1) / flat_vectors.square().sum(1).clamp_min(1e-300)).tolist()
    vector_norms = flat_vectors.norm(dim=1)
    vector_cos = (flat_vectors @ flat_vectors.T) / (vector_norms[:, None] * vector_norms[None, :])
    upper = torch.triu_indices(t, t, 1)
    values = list(cosines.values())
    return {
        "pairwise_cosine": cosines,
        "cosine_mean": sum(values) / len(values),
        "cosine_min": min(values),
        "cosine_max": max(values),
        "task_vector_cosine_mean": float(vector_cos[upper[0], upper[1]].mean()),
        "shared_energy": dict(zip(family.members, energy, strict=True)),
        "shared_energy_mean": sum(energy) / t,
    }
