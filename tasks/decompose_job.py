"""One decomposition job: split one parameter of a family stored in the catalogue.

The job reads the members' T slices of that parameter, reuses each member's cached basis
(computing and caching only the missing ones), splits, and writes the compact result and
its diagnostics into the run. A batch of parameters is pipelined (read ahead, split, write
behind), so memory is bounded by a few parameters' T slices. It runs on the worker's device:
CUDA when the worker has a GPU, else the CPU.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from prefect import task
from tvsplit.storage.catalogue import Catalogue
from tvsplit.storage.decompositions import BasisCache, DecompositionRun
from tvsplit.storage.lowrank import LowRankDelta
from tvsplit.tasks.decompose import (
    basis_from_arrays,
    basis_to_arrays,
    member_basis,
    shared_from_arrays,
    split_from_bases,
    split_to_arrays,
)
from tvsplit.tasks.pipeline import pipelined
from tvsplit.tasks.split_settings import SplitSettings, digest
from tvsplit.tasks.worker_threads import share_cores

_log = logging.getLogger(__name__)


_digest = digest


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


@dataclass
class _Inputs:
    """What one parameter's split reads: the members' slices and their cached bases."""

    name: str
    deltas: torch.Tensor | list[LowRankDelta | torch.Tensor]  # a list: factored members
    cached: dict[str, dict[str, Any]]


@dataclass
class _Outputs:
    """What one parameter's split writes: the compact result and the new member bases."""

    name: str
    arrays: dict[str, torch.Tensor]
    diagnostics: dict[str, Any]
    new_bases: dict[str, tuple[str, dict[str, torch.Tensor], dict[str, Any]]]
    device: str


class _Buffers:
    """(T, *shape) float32 buffers for a parameter's slices, reused for the next parameters
    of the same shape (a shape recurs every block, and a reused buffer spares the page faults
    of a fresh one). A buffer is kept only while a parameter of its shape is still expected
    (``expect``), at most two per shape, so a one-off shape such as an embedding is freed at
    once and the kept memory does not grow with the number of parameters."""

    KEEP = 2

    def __init__(self, members: int) -> None:
        self._members = members
        self._expected: Counter[tuple[int, ...]] = Counter()
        self._free: dict[tuple[int, ...], list[torch.Tensor]] = {}
        self._lock = threading.Lock()

    def expect(self, shapes: Sequence[tuple[int, ...]]) -> None:
        with self._lock:
            self._expected.update(shapes)

    def take(self, shape: tuple[int, ...]) -> torch.Tensor:
        with self._lock:
            self._expected[shape] -= 1
            free = self._free.get(shape)
            if free:
                return free.pop()
        return torch.empty((self._members, *shape))

    def give(self, buffer: torch.Tensor | list) -> None:
        if not isinstance(buffer, torch.Tensor):  # factored members' list: no buffer
            return
        shape = tuple(buffer.shape[1:])
        with self._lock:
            free = self._free.setdefault(shape, [])
            if self._expected[shape] > 0 and len(free) < self.KEEP:
                free.append(buffer)


class _Job:
    """One worker's view of a run: the members' entries opened once, the cache, the store."""

    def __init__(
        self,
        catalogue_url: str,
        family: str,
        run: str,
        members: Sequence[str],
        fingerprints: dict[str, str],
        settings: SplitSettings,
        device: str,
    ) -> None:
        catalogue = Catalogue(catalogue_url)
        self.members = list(members)
        self.fingerprints = {m: fingerprints[m] for m in members}
        self.settings = settings
        self.target = pick_device(device)
        self.entries = [catalogue.open_entry(family, m) for m in members]
        self.cache = BasisCache(catalogue, family, settings.basis_key())
        self.store = DecompositionRun(catalogue, family, run)
        self.buffers = _Buffers(len(members))

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entries[0].shape(name)

    def nbytes(self, name: str) -> int:
        """What reading `name` costs in memory, from the first member's stored layout."""
        return len(self.members) * self.entries[0].stored_bytes(name)

    def load(self, name: str, shape: tuple[int, ...] | None = None) -> _Inputs:
        """The members' slices of `name`, decoded into one (T, *shape) buffer (give it back
        with ``buffers.give`` once split); when a member is stored as LoRA factors, a list of
        the members' deltas instead, factors kept as factors."""
        factored = [entry.factors(name) for entry in self.entries]
        if any(f is not None for f in factored):
            deltas = [
                f if f is not None else entry.read(name)
                for f, entry in zip(factored, self.entries, strict=True)
            ]
            return _Inputs(name, deltas, self.cache.get(name, self.fingerprints))
        deltas = self.buffers.take(shape or self.shape(name))
        try:
            for entry, row in zip(self.entries, deltas.unbind(0), strict=True):
                entry.read_into(name, row)
            return _Inputs(name, deltas, self.cache.get(name, self.fingerprints))
        except BaseException:
            self.buffers.give(deltas)
            raise

    def split(self, inputs: _Inputs) -> _Outputs:
        """The math: member bases (cached ones reused), then the split. No I/O."""
        name = inputs.name
        if isinstance(inputs.deltas, torch.Tensor):
            deltas = inputs.deltas.to(self.target)
            members = list(deltas.unbind(0))
        else:
            deltas = members = [_to_device(delta, self.target) for delta in inputs.deltas]
        bases, new_bases = [], {}
        for member, delta in zip(self.members, members, strict=True):
            cached = inputs.cached.get(member)
            if cached is not None:
                dtype = torch.float64 if delta.dtype == torch.float64 else torch.float32
                bases.append(
                    basis_from_arrays(cached, cached["attrs"], device=self.target, dtype=dtype)
                )
                continue
            basis = member_basis(delta, name=name, member=member, **self.settings.basis_kwargs())
            new_bases[member] = (self.fingerprints[member], *basis_to_arrays(basis))
            bases.append(basis)
        split = split_from_bases(
            deltas, bases, name=name, member_names=self.members, **self.settings.split_kwargs()
        )
        arrays, diagnostics = split_to_arrays(split)
        arrays = {key: _own_memory(value, inputs.deltas) for key, value in arrays.items()}
        diagnostics["members"] = list(self.members)
        return _Outputs(name, arrays, diagnostics, new_bases, str(self.target))

    def write(self, outputs: _Outputs) -> dict[str, Any]:
        """Cache the new bases, then store the result (marked complete last); the report.
        A cache write that fails is logged and skipped: it costs a recomputation later,
        never a result."""
        try:
            self.cache.put(outputs.name, outputs.new_bases)
        except Exception as error:
            _log.warning(
                "%s: member bases not cached (%s: %s)", outputs.name, type(error).__name__, error
            )
        self.store.write_parameter(outputs.name, outputs.arrays, outputs.diagnostics)
        return {
            **outputs.diagnostics,
            "name": outputs.name,
            "bases_computed": len(outputs.new_bases),
            "device": outputs.device,
        }


def _to_device(delta: LowRankDelta | torch.Tensor, device: torch.device):
    if isinstance(delta, LowRankDelta):
        return delta.to(delta.dtype, device)
    return delta.to(device)


def _own_memory(tensor: torch.Tensor, buffer: torch.Tensor | list) -> torch.Tensor:
    """`tensor`, copied if it is a view of `buffer` (which will be reused)."""
    if not isinstance(buffer, torch.Tensor):
        return tensor
    if tensor.untyped_storage().data_ptr() == buffer.untyped_storage().data_ptr():
        return tensor.clone()
    return tensor


def decompose_parameters(
    catalogue_url: str,
    family: str,
    run: str,
    names: Sequence[str],
    members: Sequence[str],
    fingerprints: dict[str, str],
    settings: SplitSettings,
    device: str = "auto",
) -> tuple[list[dict[str, Any]], dict[str, Exception]]:
    """Split each of ``names`` and write it into ``run``, pipelined (`tasks.pipeline`): while
    one parameter is split, the next ones are read (one reader thread) and the previous
    results written (one writer thread, in order).

    Returns the reports of the parameters written and the error of each that failed (the
    others go on). Memory is bounded whatever the number of parameters: the slices of the
    parameter being split and of the next one, whatever their size; more read ahead (up to
    ``READ_AHEAD`` parameters) only while the reads in flight stay within
    ``READ_AHEAD_BYTES``; a reusable buffer or two per recurring shape; and
    ``WRITES_IN_FLIGHT`` compact results.
    """
    failures: dict[str, Exception] = {}
    if not names:
        return [], failures
    job = _Job(catalogue_url, family, run, members, fingerprints, settings, device)
    shapes = {}
    for name in names:
        try:
            shapes[name] = job.shape(name)
        except Exception as error:  # a parameter missing from the first member
            failures[name] = error
    job.buffers.expect(list(shapes.values()))
    size = {name: job.nbytes(name) for name in shapes}
    reports = pipelined(
        [name for name in names if name in shapes],
        lambda name: job.load(name, shapes[name]),
        job.split,
        job.write,
        nbytes=size.__getitem__,
        release=lambda inputs: job.buffers.give(inputs.deltas),
        failures=failures,
    )
    return reports, failures


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
    """Run ``decompose_parameters`` on those of ``names`` not yet complete in the run.

    Every parameter is written and marked complete on its own, so a retry (or a rerun of the
    flow) redoes only the ones still missing. Batching keeps the orchestration cost (a task
    run, a Dask submission) per batch rather than per parameter. Raises BatchError (retried)
    or BatchInputError (not retried) naming every parameter that failed, after trying all.
    """
    share_cores()  # a process worker: its share of the host's cores, not one per core
    done = DecompositionRun(Catalogue(catalogue_url), family, run).completed()
    reports, failures = decompose_parameters(
        catalogue_url,
        family,
        run,
        [name for name in names if name not in done],
        members,
        fingerprints,
        settings,
        device,
    )
    if failures:
        bad_input = all(isinstance(error, ValueError) for error in failures.values())
        raise (BatchInputError if bad_input else BatchError)(
            "; ".join(f"{name}: {type(e).__name__}: {e}" for name, e in failures.items())
        )
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
