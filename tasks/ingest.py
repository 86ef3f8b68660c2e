"""Ingest one source into the catalogue: a family's base weights or one member's task vector.

A job reads tensors from a source one at a time (`storage.sources`), turns a member into
its task vector with `tasks.task_vector` (model − base, tensor by tensor; LoRA ΔW per
module; ready task vectors checked against the base), and writes each result to the
catalogue (`storage.catalogue`) while the next one is read and checked (`tasks.pipeline`,
one reader thread one parameter ahead, nothing more queued), so at most two parameters are
in flight and peak memory is bounded by the largest parameters, not by the model.

A base may be kept by reference to its source's safetensors files instead of copied
(``base_by_reference``): only headers are read at ingest (no finiteness check of data that
is not read), and readers read the files in place (`storage.catalogue`); a 7B base costs
nothing in the catalogue, which a family of adapters (whose ingest and split never read the
base's data) needs.

Guarantees: every problem with the inputs (missing or unexpected parameters, shape
mismatches, non-float tensors, NaN/Inf, pickle refused) raises before or instead of
marking anything complete, with a message naming the file and the parameter; a rerun of
an interrupted job keeps the arrays already complete and writes the rest; a complete
entry from the same source is skipped.
"""

from __future__ import annotations

import fnmatch
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.states import Failed
from prefect.tasks import exponential_backoff
from tvsplit.storage.base_identity import IDENTITY, identity_record
from tvsplit.storage.catalogue import Catalogue, entry_label
from tvsplit.storage.checkpoint import Checkpoint
from tvsplit.storage.errors import CatalogueError, SourceError, StorageError
from tvsplit.storage.keymatch import PREFIXES, match_names
from tvsplit.storage.lowrank import LowRankDelta
from tvsplit.storage.sources import OpenedSource, open_source
from tvsplit.tasks.pipeline import pipelined
from tvsplit.tasks.task_vector import TaskVectorError, all_finite, parameter_delta, task_vector

SKIPPED, INGESTED, RESUMED, FAILED = "skipped", "ingested", "resumed", "failed"
USER_ERRORS = (StorageError, TaskVectorError)


@dataclass(frozen=True)
class IngestJob:
    """One source to ingest: a family's base (`member=None`) or one member."""

    catalogue: str
    family: str
    member: str | None
    source: str
    base_source: str
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    allow_pickle: bool = False
    lora_factors: bool = True  # LoRA weights kept as factors (False: dense ΔW, as before)
    # A complete entry made from something else is rebuilt beside it and swapped in only once
    # complete (a changed source under `tvsplit sync`); False: such an entry is an error.
    replace: bool = False
    base_by_reference: bool = False  # the base kept by reference to its files, not copied

    @property
    def label(self) -> str:
        return entry_label(self.family, self.member)


@dataclass
class IngestResult:
    """What a job did (one row of the ingest report)."""

    entry: str
    source: str
    status: str
    commit: str | None = None
    parameters: int = 0
    written: int = 0
    megabytes: float = 0.0
    seconds: float = 0.0
    reason: str = ""

    def row(self) -> dict[str, Any]:
        return asdict(self)


class IngestProgress(Protocol):
    """Progress reporting for one job (the flow supplies a rich implementation)."""

    def start(self, label: str, total: int, done: int) -> None: ...

    def advance(self, name: str, nbytes: int) -> None: ...

    def stop(self) -> None: ...


@dataclass
class _Plan:
    """The parameters of one job and how to produce each of them."""

    names: list[str]
    produce: Any  # Callable[[Sequence[str]], Iterator[tuple[str, torch.Tensor | None, dict]]]
    attrs: dict[str, Any] = field(default_factory=dict)


# -- selection and checks --------------------------------------------------------------------
def select_parameters(
    names: Iterable[str], include: Sequence[str] = (), exclude: Sequence[str] = ()
) -> list[str]:
    """Names matching any `include` glob (all when empty) and no `exclude` glob, in order."""
    return [
        name
        for name in names
        if (not include or any(fnmatch.fnmatchcase(name, p) for p in include))
        and not any(fnmatch.fnmatchcase(name, p) for p in exclude)
    ]


def _excluded(name: str, include: Sequence[str], exclude: Sequence[str]) -> bool:
    """Whether a name (or its prefix-stripped forms) is filtered out by include/exclude."""
    forms = [name] + [name[len(p) :] for p in PREFIXES if name.startswith(p)]
    return any(not select_parameters([form], include, exclude) for form in forms)


def checked_weights(name: str, tensor: torch.Tensor, where: str) -> torch.Tensor:
    """`tensor` if it is floating point and finite; TaskVectorError naming `where` otherwise."""
    if not tensor.is_floating_point():
        raise TaskVectorError(
            f"{where}: parameter {name!r} has dtype {str(tensor.dtype).removeprefix('torch.')}; "
            "only floating-point weights can be catalogued (exclude it in the spec)"
        )
    if not all_finite(tensor):
        raise TaskVectorError(f"{where}: parameter {name!r} contains NaN or Inf")
    return tensor


def _check_shape(
    name: str, shape: tuple[int, ...], base_shape: tuple[int, ...], where: str
) -> None:
    if tuple(shape) != tuple(base_shape):
        raise TaskVectorError(
            f"{where}: parameter {name!r} has shape {tuple(shape)} but the base has "
            f"{tuple(base_shape)} (exclude it in the spec if it is meant to differ)"
        )


def _dtype(tensor: torch.Tensor) -> str:
    return str(tensor.dtype).removeprefix("torch.")


# -- plans per source kind ------------------------------------------------------------------
def _file_attrs(source: OpenedSource, checkpoint: Checkpoint, name: str, prefix: str = "") -> dict:
    path = checkpoint.file_of(name)
    checksums = source.checksums()
    rel = source.relative(path)
    return {
        f"{prefix}source": source.text,
        f"{prefix}commit": source.commit,
        f"{prefix}file": rel,
        f"{prefix}file_sha256": checksums.get(rel),
    }


@dataclass(frozen=True)
class _Reference:
    """A base parameter kept by reference: tensor `key` of safetensors `file`."""

    file: Path
    key: str
    shape: tuple[int, ...]


def _base_plan(base: OpenedSource, job: IngestJob) -> _Plan:
    checkpoint = _model_checkpoint(base, "base")
    names = select_parameters(checkpoint, job.include, job.exclude)
    if not names:
        raise SourceError(f"{base.text}: no parameters left after include/exclude")
    if job.base_by_reference:
        pickled = [p for p in checkpoint.files if p.suffix != ".safetensors"]
        if pickled:
            raise SourceError(
                f"{pickled[0]}: a base kept by reference must be safetensors (it is read in "
                "place later); ingest this base as a copy"
            )

    def produce(todo: Sequence[str]) -> Iterator[tuple[str, Any, dict]]:
        if job.base_by_reference:  # headers only: the data stays in the source's files
            for name in todo:
                shape, dtype = checkpoint.header(name)
                if not dtype.startswith(("float", "bfloat")):
                    raise TaskVectorError(
                        f"{checkpoint.file_of(name)}: parameter {name!r} has dtype {dtype}; "
                        "only floating-point weights can be catalogued (exclude it in the spec)"
                    )
                attrs = {"kind": "weights", "dtype": dtype}
                reference = _Reference(checkpoint.file_of(name), name, tuple(shape))
                yield name, reference, {**attrs, **_file_attrs(base, checkpoint, name)}
            return
        for name in todo:
            where = str(checkpoint.file_of(name))
            tensor = checked_weights(name, checkpoint[name], where)
            attrs = {"kind": "weights", "dtype": _dtype(tensor)}
            yield name, tensor, {**attrs, **_file_attrs(base, checkpoint, name)}

    return _Plan(names, produce)


def _model_checkpoint(source: OpenedSource, role: str) -> Checkpoint:
    if source.kind != "model" or source.checkpoint is None:
        raise SourceError(f"{source.text}: the {role} must be a full model, not a {source.kind}")
    return source.checkpoint


def _member_names(
    member_names: Iterable[str], names: list[str], job: IngestJob, where: str
) -> dict[str, str]:
    """Base name → member name for every selected base name; errors name `where`."""
    try:
        matched, unmatched = match_names(member_names, names)
    except ValueError as error:
        raise SourceError(f"{where}: {error}") from None
    unexpected = [n for n in unmatched if not _excluded(n, job.include, job.exclude)]
    if unexpected:
        # Names of excluded base parameters are fine; anything else must exist in the base.
        raise TaskVectorError(
            f"{where}: parameter {unexpected[0]!r} has no counterpart in the base "
            f"{job.base_source} ({len(unexpected)} such); exclude it in the spec if intended"
        )
    return matched


def _model_member_plan(base: OpenedSource, member: OpenedSource, job: IngestJob) -> _Plan:
    base_ckpt = _model_checkpoint(base, "base")
    names = select_parameters(base_ckpt, job.include, job.exclude)
    checkpoint = member.checkpoint
    assert checkpoint is not None
    matched = _member_names(checkpoint, names, job, checkpoint.label)
    missing = [name for name in names if name not in matched]
    if missing and member.kind == "model":
        raise TaskVectorError(
            f"{checkpoint.label}: parameter {missing[0]!r} of the base is missing from the "
            f"fine-tuned model ({len(missing)} missing)"
        )
    if missing:
        raise TaskVectorError(
            f"{checkpoint.label}: the task vector lacks parameter {missing[0]!r} "
            f"({len(missing)} missing)"
        )
    for name in names:
        shape, _ = checkpoint.header(matched[name])
        base_shape, _ = base_ckpt.header(name)
        _check_shape(name, shape, base_shape, str(checkpoint.file_of(matched[name])))
    renamed = {name: matched[name] for name in names}

    def produce(todo: Sequence[str]) -> Iterator[tuple[str, torch.Tensor | None, dict]]:
        view = _Renamed(checkpoint, renamed)
        if member.kind == "delta":
            for name in todo:
                where = str(checkpoint.file_of(renamed[name]))
                tensor = checked_weights(name, view[name], where)
                attrs = {"kind": "delta", "dtype": _dtype(tensor)}
                yield name, tensor, {**attrs, **_file_attrs(member, checkpoint, renamed[name])}
            return
        pairs = task_vector(base_ckpt, view, keys=todo)
        for name in todo:
            try:
                _, delta = next(pairs)
            except TaskVectorError as error:
                raise TaskVectorError(
                    f"{error} (base file {base_ckpt.file_of(name)}, fine-tuned file "
                    f"{checkpoint.file_of(renamed[name])})"
                ) from None
            header_dtype = checkpoint.header(renamed[name])[1]
            attrs = {"kind": "delta", "dtype": header_dtype}
            yield (
                name,
                delta,
                {
                    **attrs,
                    **_file_attrs(member, checkpoint, renamed[name]),
                    **_file_attrs(base, base_ckpt, name, prefix="base_"),
                },
            )

    return _Plan(names, produce)


def _check_target_modules(config: Any, base: Checkpoint, where: Path, job: IngestJob) -> None:
    """A LoRA config's ``target_modules`` (a list) names modules of the base: an adapter
    made for another model is refused, naming the module, not ingested as a partial delta."""
    targets = getattr(config, "target_modules", None)
    if isinstance(targets, str) or not targets:
        return  # a regex or "all-linear": matched by PEFT, nothing to check by name
    modules = {name.rpartition(".")[0] for name in base}
    for target in sorted(targets):
        if not any(m == target or m.endswith("." + target) for m in modules):
            raise SourceError(
                f"{where}: target_modules names {target!r}, which is no module of the base "
                f"{job.base_source}; is the adapter made for another model?"
            )


def _lora_plan(base: OpenedSource, member: OpenedSource, job: IngestJob) -> _Plan:
    base_ckpt = _model_checkpoint(base, "base")
    adapter = member.adapter
    assert adapter is not None
    names = select_parameters(base_ckpt, job.include, job.exclude)
    where = str(adapter.weights_file)
    deltas = _member_names(adapter.deltas, names, job, where)
    full = _member_names(adapter.full_weights, names, job, where)
    both = set(deltas) & set(full)
    if both:
        raise SourceError(f"{where}: {sorted(both)[0]!r} is both LoRA-adapted and saved whole")
    config = adapter.config
    _check_target_modules(config, base_ckpt, adapter.folder / "adapter_config.json", job)

    def produce(todo: Sequence[str]) -> Iterator[tuple[str, torch.Tensor | None, dict]]:
        common = {
            "source": member.text,
            "commit": member.commit,
            "file": member.relative(adapter.weights_file),
            "file_sha256": member.checksums().get(member.relative(adapter.weights_file)),
        }
        for name in todo:
            base_shape, base_dtype = base_ckpt.header(name)
            if name in deltas:
                key = deltas[name]
                module, what = adapter.deltas[key]
                r, alpha, scaling = adapter.scaling(module)
                attrs = {
                    "kind": "lora-delta",
                    "dtype": adapter.source_dtype(key),
                    "module": module,
                    "r": r,
                    "alpha": alpha,
                    "scaling": scaling,
                    "use_rslora": bool(config.use_rslora),
                    "fan_in_fan_out": bool(config.fan_in_fan_out),
                }
                if what == "weight":
                    attrs["module_kind"] = adapter.module_kind(key)
                if key in adapter.stored_base:
                    _check_stored_base(name, base_ckpt[name], adapter, key, where)
                if what == "weight" and adapter.dora:
                    delta = adapter.dora_delta(key, base_ckpt[name])
                    attrs["kind"] = "dora-delta"
                elif what == "weight" and job.lora_factors:
                    factors = adapter.factors(key)
                    _check_shape(name, factors.shape, base_shape, where)
                    checked_weights(name, factors.up, where)
                    checked_weights(name, factors.down, where)
                    yield name, factors, {**common, **attrs}
                    continue
                else:
                    delta = adapter.delta(key)
                _check_shape(name, tuple(delta.shape), base_shape, where)
                checked_weights(name, delta, where)
                yield name, delta, {**common, **attrs}
            elif name in full:
                key = adapter.full_weights[full[name]]
                try:
                    delta = parameter_delta(name, base_ckpt[name], adapter.weights[key])
                except TaskVectorError as error:
                    raise TaskVectorError(f"{error} (adapter file {where})") from None
                attrs = {"kind": "full-delta", "dtype": adapter.weights.header(key)[1]}
                yield (
                    name,
                    delta,
                    {**common, **attrs, **_file_attrs(base, base_ckpt, name, prefix="base_")},
                )
            else:
                if not base_dtype.startswith(("float", "bfloat")):
                    raise TaskVectorError(
                        f"{base_ckpt.file_of(name)}: parameter {name!r} has dtype {base_dtype}; "
                        "only floating-point weights can be catalogued (exclude it in the spec)"
                    )
                attrs = {"kind": "zero", "dtype": base_dtype, "shape": list(base_shape)}
                yield name, None, {**common, **attrs, "note": "not adapted by the LoRA adapter"}

    lora: dict[str, Any] = {
        "r": config.r,
        "lora_alpha": config.lora_alpha,
        "layout": adapter.layout,
    }
    if adapter.other_components:  # e.g. a kohya file's text-encoder LoRA: another model's
        lora["not_ingested"] = list(adapter.other_components)
    return _Plan(names, produce, {"lora": lora})


def _check_stored_base(name: str, base: torch.Tensor, adapter: Any, key: str, where: str) -> None:
    """A copy of an adapted layer's base weight saved beside its adapter (PEFT does so for
    embeddings) must be the base's: the adapter was trained on it."""
    stored = adapter.weights[adapter.stored_base[key]]
    if tuple(stored.shape) != tuple(base.shape) or not torch.equal(
        stored.to(torch.float32), base.to(torch.float32)
    ):
        raise TaskVectorError(
            f"{where}: the adapter stores a base layer for {name!r} that differs from the "
            "family's base (was the adapter trained on another base, or with resized "
            "embeddings?); ingest it against its own base"
        )


class _Renamed(Mapping[str, torch.Tensor]):
    """A checkpoint seen under the base's parameter names."""

    def __init__(self, checkpoint: Checkpoint, names: Mapping[str, str]) -> None:
        self._checkpoint = checkpoint
        self._names = names

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._checkpoint[self._names[name]]

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


# -- the job ----------------------------------------------------------------------------------
def _same(item: Any) -> Any:
    return item


def run_ingest_job(job: IngestJob, progress: IngestProgress | None = None) -> IngestResult:
    """Ingest one source into the catalogue (see the module docstring for guarantees)."""
    started = time.perf_counter()
    catalogue = Catalogue(job.catalogue)
    if job.replace:
        catalogue.recover_staged(job.family, job.member)
    existing = catalogue.entry(job.family, job.member)
    if existing is not None and existing.complete and not job.replace:
        if existing.attrs.get("source") != job.source:
            raise CatalogueError(
                f"{catalogue.url}: entry {job.label} already holds {existing.attrs.get('source')!r}, "
                f"not {job.source!r}; delete it first (tvsplit catalogue rm)"
            )
        return IngestResult(
            job.label,
            job.source,
            SKIPPED,
            commit=existing.attrs.get("commit"),
            parameters=len(existing.attrs.get("parameters", [])),
            reason="already complete",
        )
    base = open_source(job.base_source, allow_pickle=job.allow_pickle)
    if job.member is None:
        source = base
        plan = _base_plan(base, job)
    else:
        source = open_source(job.source, allow_pickle=job.allow_pickle)
        plan = (
            _lora_plan(base, source, job)
            if source.kind == "lora"
            else _model_member_plan(base, source, job)
        )
    fingerprint: dict[str, Any] = {
        **source.provenance(),
        "include": list(job.include),
        "exclude": list(job.exclude),
    }
    if job.member is not None:
        fingerprint["base"] = base.provenance()
    elif job.base_by_reference:
        fingerprint["by_reference"] = True
    staged = existing is not None and existing.complete
    if staged and existing.attrs.get("fingerprint") == fingerprint:
        return IngestResult(
            job.label, job.source, SKIPPED, commit=existing.attrs.get("commit"),
            parameters=len(existing.attrs.get("parameters", [])), reason="unchanged",
        )  # fmt: skip
    writer = catalogue.writer(job.family, job.member, fingerprint, staged=staged)
    done = writer.completed() & set(plan.names)
    todo = [name for name in plan.names if name not in done]
    if progress is not None:
        progress.start(job.label, len(plan.names), len(done))
    produced = plan.produce(todo)

    def produce(name: str) -> tuple[str, Any, dict]:  # on the reader thread, in order
        got, tensor, attrs = next(produced)
        assert got == name, (got, name)
        return got, tensor, attrs

    def store(item: tuple[str, Any, dict]) -> int:
        name, tensor, attrs = item
        if isinstance(tensor, LowRankDelta):
            nbytes = writer.write_factors(name, tensor, attrs)
        elif isinstance(tensor, _Reference):
            nbytes = writer.write_reference(name, tensor.file, tensor.key, tensor.shape, attrs)
        else:
            nbytes = writer.write(name, tensor, attrs)
        if progress is not None:
            progress.advance(name, nbytes)
        return nbytes

    try:
        # The next parameter is read and checked while this one is written; one of each at
        # a time (read_ahead=1, nothing queued for the writer): two tensors in flight.
        written_bytes = sum(
            pipelined(todo, produce, _same, store, read_ahead=1, writes_in_flight=0)
        )
    finally:
        produced.close()
        if progress is not None:
            progress.stop()
    identity = {IDENTITY: identity_record(source)} if job.member is None else {}
    writer.finish(
        plan.names,
        {
            **fingerprint,
            "role": "base" if job.member is None else "vector",
            **plan.attrs,
            **identity,
        },
    )
    if staged:  # the old entry was readable until now; it goes only as the new one comes
        catalogue.promote(job.family, job.member)
    return IngestResult(
        job.label,
        job.source,
        RESUMED if done else INGESTED,
        commit=source.commit,
        parameters=len(plan.names),
        written=len(todo),
        megabytes=round(written_bytes / 2**20, 3),
        seconds=round(time.perf_counter() - started, 3),
        reason=f"kept {len(done)} complete parameter(s)" if done else "",
    )


# -- Prefect wrapper ----------------------------------------------------------------------------
def _network_error(task: Any, task_run: Any, state: Any) -> bool:
    """Retry only when the failure was a network error (a ConnectionError), never bad input."""
    error = state.data if isinstance(state.data, BaseException) else None
    if error is None:
        try:
            error = state.result(raise_on_failure=False)
        except Exception:
            return False
    return isinstance(error, ConnectionError)


@task(
    name="ingest-source",
    task_run_name="ingest {job.label}",
    retries=3,
    retry_delay_seconds=exponential_backoff(backoff_factor=5),
    retry_jitter_factor=0.5,
    retry_condition_fn=_network_error,
    cache_policy=NO_CACHE,
)
def ingest_source(job: IngestJob, progress: IngestProgress | None = None) -> Any:
    """Prefect task for one source: retried on network errors; a user error (bad input)
    ends the run Failed with its message and no traceback."""
    try:
        return run_ingest_job(job, progress)
    except USER_ERRORS as error:
        return Failed(message=str(error))
