"""One decomposition job: split one parameter of a family stored in the catalogue.

The job reads the members' T slices of that parameter, reuses each member's cached basis
(computing and caching only the missing ones), splits, and writes the compact result and
its diagnostics into the run. Memory is bounded by one parameter's T slices. It runs on
the worker's device: CUDA when the worker has a GPU, else the CPU.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Any, Literal

import torch
from prefect import task
from pydantic import BaseModel, ConfigDict, Field

from storage.catalogue import Catalogue
from storage.decompositions import BasisCache, DecompositionRun
from tasks.decompose import (
    basis_from_arrays,
    basis_to_arrays,
    member_basis,
    shared_from_arrays,
    split_from_bases,
    split_to_arrays,
)


class SplitSettings(BaseModel):
    """Everything that determines a split (the arguments of ``decompose_layer``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    method: Literal["mean-projector", "projector-product", "pairwise"] = "mean-projector"
    threshold: float = Field(0.85, gt=0, le=1)
    min_tasks: int | None = Field(None, ge=1)
    rank: str = "gavish-donoho"
    max_rank_fraction: float = Field(0.25, gt=0, le=1)
    side: Literal["left", "right", "auto"] = "left"
    two_sided: bool = False
    one_d: Literal["unique", "rank1"] = "unique"
    seed: int = 0
    solver: Literal["auto", "full", "randomized"] = "auto"

    def basis_key(self) -> str:
        """Key of the settings a member basis depends on (rank rule, cap, side, seed, solver)."""
        fields = ("rank", "max_rank_fraction", "side", "seed", "solver")
        return "b-" + _digest({name: getattr(self, name) for name in fields}, 12)

    def split_kwargs(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "threshold": self.threshold,
            "min_tasks": self.min_tasks,
            "two_sided": self.two_sided,
            "one_d": self.one_d,
        }

    def basis_kwargs(self) -> dict[str, Any]:
        return {
            "rank": self.rank,
            "max_rank_fraction": self.max_rank_fraction,
            "side": self.side,
            "seed": self.seed,
            "solver": self.solver,
        }


def _digest(value: Any, length: int) -> str:
    text = json.dumps(value, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def member_fingerprint(catalogue: Catalogue, family: str, member: str) -> str:
    """A short digest of what a member's stored vector was made from (source, commit, files)."""
    info = catalogue.entry(family, member)
    if info is None:
        raise KeyError(member)
    return _digest(info.attrs.get("fingerprint", info.attrs), 16)


def run_id(
    family: str, members: Sequence[str], settings: SplitSettings, fingerprints: dict[str, str]
) -> str:
    """Deterministic run name from (family, members, settings, member revisions)."""
    payload = {
        "family": family,
        "members": list(members),
        "settings": settings.model_dump(),
        "fingerprints": [fingerprints[m] for m in members],
    }
    return f"{settings.method}-{_digest(payload, 12)}"


def pick_device(device: str = "auto") -> torch.device:
    """``auto``: CUDA when this worker has a GPU, else CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def decompose_parameter(
    catalogue_url: str,
    family: str,
    run: str,
    name: str,
    members: Sequence[str],
    fingerprints: dict[str, str],
    settings: SplitSettings,
    device: str = "auto",
) -> dict[str, Any]:
    """Split parameter ``name`` of ``family`` across ``members`` and write it into ``run``.

    Returns the diagnostics plus ``bases_computed`` (how many member bases were not cached)
    and ``device``. Idempotent: rerunning rewrites the same result.
    """
    catalogue = Catalogue(catalogue_url)
    target = pick_device(device)
    cache = BasisCache(catalogue, family, settings.basis_key())
    deltas = torch.stack([catalogue.read(family, name, member=m) for m in members]).to(target)
    bases, computed = [], 0
    for member, delta in zip(members, deltas.unbind(0), strict=True):
        cached = cache.get(member, name, fingerprints[member])
        if cached is not None:
            bases.append(
                basis_from_arrays(cached, cached["attrs"], device=target, dtype=delta.dtype)
            )
            continue
        basis = member_basis(delta, name=name, member=member, **settings.basis_kwargs())
        arrays, attrs = basis_to_arrays(basis)
        cache.put(member, name, fingerprints[member], arrays, attrs)
        bases.append(basis)
        computed += 1
    split = split_from_bases(
        deltas, bases, name=name, member_names=list(members), **settings.split_kwargs()
    )
    arrays, diagnostics = split_to_arrays(split)
    diagnostics["members"] = list(members)
    DecompositionRun(catalogue, family, run).write_parameter(name, arrays, diagnostics)
    return {**diagnostics, "name": name, "bases_computed": computed, "device": str(target)}


class BatchError(RuntimeError):
    """Parameters of a batch that failed in a way a retry may cure (I/O, a lost worker)."""


class BatchInputError(ValueError):
    """Parameters of a batch whose input is bad: retrying will not help."""


def _retryable(task, task_run, state) -> bool:
    """Retry what may pass next time (I/O, lost workers); bad input (ValueError) fails at once."""
    try:
        state.result()
    except ValueError:
        return False
    except Exception:
        return True
    return True


def plan_batches(sizes: dict[str, int], batches: int) -> list[list[str]]:
    """Group parameters into at most ``batches`` jobs of similar total size (largest first,
    each to the lightest group), keeping the given order inside each group."""
    groups: list[list[str]] = [[] for _ in range(max(1, min(batches, len(sizes))))]
    loads = [0] * len(groups)
    for name in sorted(sizes, key=lambda n: -sizes[n]):
        lightest = loads.index(min(loads))
        groups[lightest].append(name)
        loads[lightest] += sizes[name]
    order = {name: i for i, name in enumerate(sizes)}
    return [sorted(group, key=order.__getitem__) for group in groups if group]


@task(
    name="decompose-parameters",
    retries=2,
    retry_delay_seconds=[1, 5],
    retry_condition_fn=_retryable,
    task_run_name="split {names[0]} and the rest of its batch",
)
def decompose_batch_task(
    catalogue_url: str,
    family: str,
    run: str,
    names: Sequence[str],
    members: Sequence[str],
    fingerprints: dict[str, str],
    settings: SplitSettings,
    device: str = "auto",
) -> list[dict[str, Any]]:
    """Run ``decompose_parameter`` for each of ``names`` not yet complete in the run.

    Every parameter is written and marked complete on its own, so a retry (or a rerun of the
    flow) redoes only the ones still missing. Batching keeps the orchestration cost (a task
    run, a Dask submission) per batch rather than per parameter. Raises BatchError (retried)
    or BatchInputError (not retried) naming every parameter that failed, after trying all.
    """
    done = DecompositionRun(Catalogue(catalogue_url), family, run).completed()
    reports, failures, all_bad_input = [], [], True
    for name in names:
        if name in done:
            continue
        try:
            reports.append(
                decompose_parameter(
                    catalogue_url, family, run, name, members, fingerprints, settings, device
                )
            )
        except Exception as error:  # collected: the rest of the batch still runs
            failures.append(f"{name}: {type(error).__name__}: {error}")
            all_bad_input = all_bad_input and isinstance(error, ValueError)
    if failures:
        raise (BatchInputError if all_bad_input else BatchError)("; ".join(failures))
    return reports


def stored_shared_parts(
    catalogue_url: str, family: str, run: str, members: Sequence[str]
) -> dict[str, torch.Tensor]:
    """Every parameter's shared parts from a finished run, (T, *shape) in ``members`` order
    (a subset or reordering of the run's members), derived from the stored compact form and
    the members' task vectors in the catalogue."""
    catalogue = Catalogue(catalogue_url)
    store = DecompositionRun(catalogue, family, run)
    attrs = store.attrs()
    order = list(attrs["members"])
    parts = {}
    for name in attrs["parameters"]:
        stored = store.read_parameter(name)
        parts[name] = torch.stack(
            [
                shared_from_arrays(
                    stored.arrays,
                    stored.diagnostics,
                    order.index(member),
                    catalogue.read(family, name, member=member),
                )
                for member in members
            ]
        )
    return parts
