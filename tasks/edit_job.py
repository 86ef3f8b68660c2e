"""The edit job: stream an edited model, one tensor at a time, from the base source, the
catalogue's task vectors and (for methods that need it) a decomposition run.

For every tensor of the base checkpoint, in its order:

- a parameter of the family: the recipe's method applied to (base, τ_i, s_i, u_i) of the
  recipe's members, in the base's dtype;
- any other tensor (a parameter the family excluded, such as per-member heads): copied from
  the base, or from the member the recipe names in ``excluded_from``.

Reading, computing and writing overlap (`edited_tensors`); the catalogue entries are
opened once per edit. Memory is bounded by a few parameters' inputs, never the model.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel
from tvsplit.storage.catalogue import Catalogue
from tvsplit.storage.decompositions import DecompositionRun
from tvsplit.storage.errors import CatalogueError
from tvsplit.storage.lazy import lazy_module
from tvsplit.tasks.edit import EditInputs, apply_edit
from tvsplit.tasks.pipeline import computed_ahead

if TYPE_CHECKING:
    import torch
    from tvsplit.storage.checkpoint import Checkpoint
else:
    torch = lazy_module("torch")  # imported on first use (storage/lazy.py)


class EditPlanError(ValueError):
    """A recipe that does not fit the catalogue or the base; the message says what and where."""


@dataclass(frozen=True)
class EditPlan:
    """Everything an edit needs, checked against the catalogue before any tensor is read."""

    catalogue_url: str
    family: str
    method: str
    members: tuple[str, ...]
    method_params: BaseModel
    member_params: tuple[BaseModel, ...]
    run: str | None
    run_members: tuple[str, ...]
    family_parameters: frozenset[str]


def plan_edit(
    catalogue: Catalogue,
    family: str,
    method: str,
    members: Sequence[str],
    method_params: BaseModel,
    member_params: Sequence[BaseModel],
    run: str | None,
    needs_split: bool,
) -> EditPlan:
    """Check the family, members and run; raise EditPlanError naming what is missing."""
    if family not in catalogue.families():
        raise EditPlanError(f"family: no family {family!r} in catalogue {catalogue.url}")
    available = catalogue.members(family)
    for i, member in enumerate(members):
        if member not in available:
            raise EditPlanError(
                f"members[{i}].name: family {family!r} has no member {member!r} "
                f"(members: {', '.join(available)})"
            )
    run_members: tuple[str, ...] = ()
    if run is not None:
        store = DecompositionRun(catalogue, family, run)
        try:
            attrs = store.attrs()
        except CatalogueError:
            raise EditPlanError(f"decomposition: family {family!r} has no run {run!r}") from None
        if attrs.get("status") != "complete":
            raise EditPlanError(
                f"decomposition: run {run!r} is not complete; rerun `tvsplit decompose`"
            )
        run_members = tuple(attrs.get("members", []))
        outside = [m for m in members if m not in run_members]
        if outside:
            raise EditPlanError(
                f"decomposition: run {run!r} split {', '.join(run_members)}, not {outside[0]!r}"
            )
    elif needs_split:
        raise EditPlanError(f"decomposition: method {method!r} needs a decomposition run")
    return EditPlan(
        catalogue_url=catalogue.url,
        family=family,
        method=method,
        members=tuple(members),
        method_params=method_params,
        member_params=tuple(member_params),
        run=run,
        run_members=run_members,
        family_parameters=frozenset(catalogue.parameters(family)),
    )


class _Readers:
    """The catalogue entries and the decomposition run of a plan, opened once for all the
    parameters an edit reads (each entry checked complete when opened)."""

    def __init__(self, plan: EditPlan, catalogue: Catalogue) -> None:
        self.vectors = [catalogue.open_entry(plan.family, m) for m in plan.members]
        self.run = None if plan.run is None else DecompositionRun(catalogue, plan.family, plan.run)

    def nbytes(self, name: str) -> int:
        """What reading parameter `name` holds in memory: the base and the members' vectors
        (0 when it cannot be told: reading it then raises the real error, in its turn)."""
        try:
            return (1 + len(self.vectors)) * self.vectors[0].stored_bytes(name)
        except (CatalogueError, IndexError):
            return 0


def edit_inputs(
    plan: EditPlan,
    catalogue: Catalogue,
    name: str,
    base: torch.Tensor,
    readers: _Readers | None = None,
) -> EditInputs:
    """One parameter's inputs: τ_i from the catalogue, and s_i, u_i from the run if any."""
    readers = readers or _Readers(plan, catalogue)
    vectors = [entry.read(name) for entry in readers.vectors]
    for member, vector in zip(plan.members, vectors, strict=True):
        if vector.shape != base.shape:
            raise EditPlanError(
                f"{name!r}: member {member!r} has shape {tuple(vector.shape)} in the catalogue "
                f"but the base has {tuple(base.shape)}; is `base` the family's base?"
            )
    if readers.run is None:
        return EditInputs(base=base, vectors=tuple(vectors), name=name)
    from tvsplit.tasks.decompose import shared_from_arrays  # torch: only for a run's parts

    stored = readers.run.read_parameter(name)
    shared = tuple(
        shared_from_arrays(stored.arrays, stored.diagnostics, plan.run_members.index(m), v)
        for m, v in zip(plan.members, vectors, strict=True)
    )
    return EditInputs(base=base, vectors=tuple(vectors), shared=shared, name=name)


def edited_tensors(
    plan: EditPlan,
    base: Mapping[str, torch.Tensor],
    fallback: Mapping[str, torch.Tensor] | None = None,
) -> Iterator[tuple[str, torch.Tensor, str]]:
    """Yield ``(name, tensor, how)`` for every tensor of ``base``, in its order: ``how`` is
    ``"edited"`` for family parameters, else ``"base"`` or ``"member"`` (taken from
    ``fallback``).

    Pipelined (`tasks.pipeline.computed_ahead`): the next tensors' inputs are read on a
    reader thread and the edits computed on a compute thread while the caller writes the
    previous ones, so an edit costs about what its reading and writing cost. Memory: the
    parameter computed, the next one's inputs (more only within the read-ahead budget) and
    a few results waiting for the caller. The first error is raised to the caller; stopping
    early stops the threads."""
    catalogue = Catalogue(plan.catalogue_url)
    readers = _Readers(plan, catalogue)
    names = list(base)

    def edited(name: str) -> bool:
        return name in plan.family_parameters

    def read(name: str) -> tuple[str, Any, str]:
        tensor = base[name]
        if edited(name) and tensor.is_floating_point():
            return name, edit_inputs(plan, catalogue, name, tensor, readers), "edited"
        if fallback is not None and name in fallback:
            return name, fallback[name].to(tensor.dtype), "member"
        return name, tensor, "base"

    def compute(item: tuple[str, Any, str]) -> tuple[str, torch.Tensor, str]:
        name, value, how = item
        if how != "edited":
            return item
        members = list(plan.member_params)
        return name, apply_edit(plan.method, value, plan.method_params, members), how

    def nbytes(name: str) -> int:
        return readers.nbytes(name) if edited(name) else 0

    yield from computed_ahead(names, read, compute, nbytes=nbytes)


def written_layout(
    plan: EditPlan, base: Checkpoint, fallback: Checkpoint | None = None
) -> dict[str, tuple[tuple[int, ...], str]]:
    """(shape, dtype) of every tensor ``edited_tensors`` yields, in its order, from the
    checkpoints' headers alone: the model folder's write plan. Edited tensors keep the
    base's shape and dtype (``apply_edit``); a tensor taken from ``fallback`` keeps its own
    shape in the base's dtype."""
    own = fallback.headers() if fallback is not None else {}
    layout = {}
    for name, (shape, dtype) in base.headers().items():
        floating = getattr(torch, dtype, torch.int64).is_floating_point
        if not (name in plan.family_parameters and floating) and name in own:
            shape = own[name][0]
        layout[name] = (shape, dtype)
    return layout


def _entry_source(info) -> dict[str, Any]:
    fingerprint = dict(info.attrs.get("fingerprint", {})) if info else {}
    return {
        "source": fingerprint.get("source") or (info.attrs.get("source") if info else None),
        "commit": fingerprint.get("commit"),
        "files": fingerprint.get("files"),
    }


def member_source(catalogue: Catalogue, family: str, member: str) -> str:
    """The source string a member was ingested from (to read its own, non-family weights)."""
    info = catalogue.entry(family, member)
    source = _entry_source(info)["source"] if info is not None and info.complete else None
    if not source:
        raise EditPlanError(f"excluded_from: family {family!r} has no complete member {member!r}")
    return str(source)


def lineage(catalogue: Catalogue, plan: EditPlan) -> dict[str, Any]:
    """Source, commit and checksums of the base and every member the edit used."""
    result = {"base": _entry_source(catalogue.entry(plan.family))}
    result |= {m: _entry_source(catalogue.entry(plan.family, m)) for m in plan.members}
    return result
