"""Edits of one parameter from task vectors and their shared/unique split (METHOD.md "Edits").

Pure functions over torch tensors: no I/O, one parameter at a time, so a flow can stream a
model tensor by tensor. Every method is registered by name with a pydantic model for its
global parameters and one for its per-member parameters (like mergekit's registry)::

    @register("my_method", params=MyParams, member_params=MemberParams)
    def my_method(inputs: EditInputs, params: MyParams, members: Sequence[MemberParams]):
        return delta  # added to the base by ``apply_edit``

Guarantees (tested): computation in float32 (float64 stays float64, if any input is float64);
``apply_edit`` returns ``base + delta`` cast to the base's dtype and shape; 1-D parameters and
parameters without a split (s_i = 0, u_i = τ_i) work for every method.

Methods (``w_i`` is member i's ``weight``, default 1):

- ``task_arithmetic``: θ0 + λ Σ w_i τ_i.
- ``negation``: θ0 − λ Σ w_i τ_i (one member: θ0 − λ τ_i).
- ``ties``: θ0 + λ · TIES({w_i τ_i}) (see ``ties_delta`` for the exact conventions).
- ``shared_augmented``: the base merge (task arithmetic or TIES) over {τ_1…τ_T} plus the shared
  parts as extra task vectors with weight γ: one extra vector mean_i(s_i)
  (``shared_as="mean"``) or T extra vectors s_i (``shared_as="each"``). γ = 0 gives the
  base merge exactly.
- ``unique_mix``: θ0 + α Σ w_i u_i + β · mean_i(s_i) (α = ``scale``, default 1).
- ``unique_negation``: θ0 − λ Σ w_i u_i.
- ``general``: θ0 + λ (Σ a_i s_i + Σ b_i u_i), with a_i = ``shared_weight`` and
  b_i = ``unique_weight`` (both default to ``weight``); with ``ties=True`` each group is
  merged by TIES instead of summed.
- ``tsv_m``, ``iso_c``, ``iso_cts``: the subspace merges of the literature (TSV-M, Iso-C,
  Iso-CTS), θ0 + λ · merge(w_i τ_i), registered by ``tasks.merges`` (imported at the end of
  this module, so the registry always holds them).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from tvsplit.storage.errors import format_validation_error
from tvsplit.storage.lazy import lazy_module

if TYPE_CHECKING:
    import torch
else:
    torch = lazy_module("torch")  # imported on first use (storage/lazy.py)

__all__ = [
    "EditError",
    "EditInputs",
    "EditMethod",
    "GeneralMemberParams",
    "GeneralParams",
    "MemberParams",
    "NonNegativeMemberParams",
    "ScaleParams",
    "SharedAugmentedParams",
    "TiesParams",
    "UniqueMixParams",
    "apply_edit",
    "available_methods",
    "compute_dtype",
    "edit_delta",
    "get_method",
    "magnitude_threshold",
    "register",
    "ties_delta",
    "trim_to_density",
]


class EditError(ValueError):
    """Inputs or parameters an edit cannot use; the message names the parameter and member."""


# --------------------------------------------------------------------------- inputs


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 if any tensor is float64, else float32 (bf16/fp16 are computed in float32)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


@dataclass(frozen=True)
class EditInputs:
    """One parameter's inputs: the base tensor and the edit members' parts, in member order.

    ``vectors`` are the task vectors τ_i. ``shared`` (s_i) and ``unique`` (u_i) come from a
    decomposition run, with s_i + u_i = τ_i: give both, or ``shared`` alone (u_i is then
    τ_i − s_i), or neither for a parameter without a split (s_i = 0, u_i = τ_i). All tensors
    must have the base's shape and a floating-point dtype.
    """

    base: torch.Tensor
    vectors: tuple[torch.Tensor, ...]
    shared: tuple[torch.Tensor, ...] | None = None
    unique: tuple[torch.Tensor, ...] | None = None
    name: str = "parameter"

    def __post_init__(self) -> None:
        object.__setattr__(self, "vectors", tuple(self.vectors))
        if not self.vectors:
            raise EditError(f"{self.name!r}: an edit needs at least one member's task vector")
        if self.unique is not None and self.shared is None:
            raise EditError(
                f"{self.name!r}: unique parts given without shared parts; give both, "
                "shared alone, or neither"
            )
        self._check("base", 0, self.base)
        for role, group in (
            ("vectors", self.vectors),
            ("shared", self.shared),
            ("unique", self.unique),
        ):
            if group is None:
                continue
            group = tuple(group)
            object.__setattr__(self, role, group)
            if len(group) != len(self.vectors):
                raise EditError(
                    f"{self.name!r}: {len(group)} {role} part(s) for {len(self.vectors)} members"
                )
            for i, tensor in enumerate(group):
                self._check(role, i, tensor)

    def _check(self, role: str, member: int, tensor: torch.Tensor) -> None:
        where = f"{self.name!r}, {role}" + ("" if role == "base" else f"[{member}]")
        if not isinstance(tensor, torch.Tensor):
            raise EditError(f"{where}: expected a torch.Tensor, got {type(tensor).__name__}")
        if not tensor.is_floating_point():
            raise EditError(f"{where}: dtype {tensor.dtype} is not floating point")
        if tensor.shape != self.base.shape:
            raise EditError(
                f"{where}: shape {tuple(tensor.shape)} differs from the base's "
                f"{tuple(self.base.shape)}"
            )

    @property
    def members(self) -> int:
        return len(self.vectors)

    @property
    def has_split(self) -> bool:
        return self.shared is not None

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype of this parameter (see ``compute_dtype``)."""
        tensors = [self.base, *self.vectors, *(self.shared or ()), *(self.unique or ())]
        return compute_dtype(*tensors)

    def vector(self, i: int) -> torch.Tensor:
        """τ_i in the compute dtype."""
        return self.vectors[i].to(self.dtype)

    def shared_part(self, i: int) -> torch.Tensor:
        """s_i in the compute dtype (zeros without a split)."""
        if self.shared is None:
            return torch.zeros_like(self.base, dtype=self.dtype)
        return self.shared[i].to(self.dtype)

    def unique_part(self, i: int) -> torch.Tensor:
        """u_i in the compute dtype (τ_i − s_i when not given; τ_i without a split)."""
        if self.unique is not None:
            return self.unique[i].to(self.dtype)
        if self.shared is None:
            return self.vector(i)
        return self.vector(i) - self.shared[i].to(self.dtype)

    def mean_shared(self) -> torch.Tensor:
        """mean_i(s_i) in the compute dtype (zeros without a split)."""
        total = torch.zeros_like(self.base, dtype=self.dtype)
        if self.shared is not None:
            for s in self.shared:
                total += s.to(self.dtype)
        return total / self.members


# --------------------------------------------------------------------------- TIES pieces


def _radix_bits(dtype: torch.dtype) -> tuple[torch.dtype, int]:
    return (torch.int64, 48) if dtype == torch.float64 else (torch.int32, 16)


def magnitude_threshold(magnitudes: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th largest value of a flat, non-negative, finite float32/float64 tensor.

    Exact, without a sort: a non-negative IEEE float orders like its bit pattern read as an
    integer, so one ``bincount`` over the top 16 bits finds the bucket holding the k-th
    largest value and ``torch.kthvalue`` finishes inside that bucket (small tensors go to
    ``kthvalue`` directly). Returns a 0-d tensor of the input's dtype.
    """
    n = magnitudes.numel()
    if not 1 <= k <= n:
        raise EditError(f"k must be in [1, {n}], not {k}")
    int_dtype, shift = _radix_bits(magnitudes.dtype)
    bits = magnitudes.reshape(-1).view(int_dtype)
    rank = n - k + 1  # 1-based rank from the smallest
    if n < 1 << 16:
        return torch.kthvalue(bits, rank).values.view(magnitudes.dtype)
    buckets = bits >> shift  # sign bit is 0: 0 ≤ bucket < 2**15
    counts = torch.bincount(buckets, minlength=1 << 15)
    cumulative = counts.cumsum(0)
    bucket = int(torch.searchsorted(cumulative, rank))
    below = int(cumulative[bucket - 1]) if bucket > 0 else 0
    candidates = bits[buckets == bucket]
    return torch.kthvalue(candidates, rank - below).values.view(magnitudes.dtype)


def trim_to_density(vector: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the top ``density`` fraction of entries by magnitude, zero the rest.

    k = max(1, floor(density · numel)) (mergekit's count, which asserts k > 0). The threshold
    t is the k-th largest |entry|; every entry with |entry| ≥ t is kept, so entries tied with
    t are all kept (more than k survive only on exact ties; the result does not depend on
    the order of entries). Zero entries stay zero. ``density >= 1`` returns the input.
    """
    if not density > 0.0:
        raise EditError(f"density must be in (0, 1], not {density}")
    if density >= 1.0:
        return vector
    magnitudes = vector.abs()
    if magnitudes.dtype not in (torch.float32, torch.float64):
        magnitudes = magnitudes.float()  # bf16/fp16: the bit trick needs a 32/64-bit float
    k = max(1, int(density * vector.numel()))
    threshold = magnitude_threshold(magnitudes, k)
    return torch.where(magnitudes >= threshold, vector, torch.zeros((), dtype=vector.dtype))


def ties_delta(
    vectors: Sequence[torch.Tensor],
    weights: Sequence[float],
    *,
    density: float,
    normalize: bool = True,
    trim: Sequence[bool] | None = None,
) -> torch.Tensor:
    """TIES-merging (Yadav et al. 2023) of task vectors, unscaled, in the compute dtype
    (float32; float64 if any vector is float64). Inputs must be finite; they are not modified.

    1. Trim: each τ_i keeps its top-``density`` magnitudes (``trim_to_density``); ``trim[i]``
       False leaves τ_i whole.
    2. Elect: the sign of each entry is the sign of the total mass Σ_i w_i τ̂_i; a total of
       exactly 0 elects +.
    3. Disjoint merge: an entry of member i agrees when sign(w_i τ̂_i) equals the elected
       sign. A zero entry (trimmed, zero in τ_i, or w_i = 0) has sign 0 and never agrees, so
       it counts in neither the sum nor the divisor. With ``normalize`` the result is
       Σ_agree w_i τ̂_i / Σ_agree w_i (the disjoint mean; equal weights give the plain mean
       of the agreeing entries); where no member agrees the result is 0. Without
       ``normalize`` it is the disjoint sum Σ_agree w_i τ̂_i.

    These are mergekit 0.1.5's conventions for ``ties`` (``consensus_method: sum``), but for
    magnitudes tied at the trim threshold: mergekit keeps k of them in its unstable
    ``argsort``'s order, we keep all (benchmarks/mergekit_crosscheck.py checks the rest).
    Weights must be ≥ 0 (a negative weight would flip the member's sign vote).
    """
    if len(vectors) != len(weights):
        raise EditError(f"{len(vectors)} task vectors but {len(weights)} weights")
    for i, weight in enumerate(weights):
        if not weight >= 0:
            raise EditError(f"member {i}: TIES needs a weight ≥ 0, got {weight}")
    trim = [True] * len(vectors) if trim is None else list(trim)
    dtype = compute_dtype(*vectors)
    weighted = []
    for vector, weight, keep in zip(vectors, weights, trim, strict=True):
        work = vector.to(dtype)
        kept = trim_to_density(work, density) if keep else work
        # scale in place unless ``kept`` is still the caller's tensor
        weighted.append(kept * weight if kept is vector else kept.mul_(weight))
    total = torch.zeros_like(weighted[0])
    for t in weighted:
        total += t
    elected = (total >= 0).to(total.dtype).mul_(2).sub_(1)  # +1 / -1, a zero total gives +1
    del total
    # t · elected > 0 exactly when t is non-zero and has the elected sign, so
    # clamp(t · elected, min=0) is |t| on agreeing entries and 0 elsewhere.
    magnitude = torch.zeros_like(elected)
    divisor = torch.zeros_like(elected) if normalize else None
    for t, weight in zip(weighted, weights, strict=True):
        aligned = t.mul_(elected).clamp_(min=0)  # t is ours (a copy): reuse its memory
        magnitude += aligned
        if divisor is not None and weight != 0:
            divisor.add_(aligned.sign_(), alpha=weight)
    merged = magnitude.mul_(elected)
    if divisor is not None:
        merged /= divisor.masked_fill_(divisor == 0, 1.0)
    return merged


# --------------------------------------------------------------------------- registry


class MemberParams(BaseModel):
    """Per-member parameters every method accepts: the member's coefficient."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    weight: float = Field(1.0, allow_inf_nan=False, description="The member's coefficient.")


class NonNegativeMemberParams(MemberParams):
    """Per-member parameters for methods that need weights ≥ 0 (TIES sign election)."""

    weight: float = Field(1.0, ge=0, allow_inf_nan=False, description="Coefficient, ≥ 0.")


class NoParams(BaseModel):
    """A method without global parameters."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class ScaleParams(NoParams):
    """A global scaling coefficient λ."""

    scale: float = Field(1.0, allow_inf_nan=False, description="λ, multiplies the edit.")


class TiesParams(ScaleParams):
    """TIES settings (see ``ties_delta``)."""

    density: float = Field(
        ..., gt=0, le=1, description="Fraction of each task vector's entries kept, in (0, 1]."
    )
    normalize: bool = Field(True, description="Disjoint mean (True) or disjoint sum (False).")


class SharedAugmentedParams(ScaleParams):
    """The base merge over task vectors plus shared parts as extra task vectors."""

    merge: Literal["task_arithmetic", "ties"] = "task_arithmetic"
    shared_as: Literal["mean", "each"] = "mean"
    shared_weight: float = Field(
        1.0, ge=0, allow_inf_nan=False, description="γ, the extra vectors' weight."
    )
    density: float | None = Field(
        None, gt=0, le=1, description="TIES density (required with merge='ties')."
    )
    normalize: bool = True
    trim_shared: bool = Field(True, description="Trim the extra vectors too (TIES).")

    @model_validator(mode="after")
    def _density_for_ties(self) -> SharedAugmentedParams:
        if self.merge == "ties" and self.density is None:
            raise ValueError("density is required when merge is 'ties'")
        return self


class UniqueMixParams(NoParams):
    """Unique mixing: α, the scale of the unique parts, and β, the coefficient of the mean
    shared part."""

    scale: float = Field(1.0, allow_inf_nan=False, description="α, times every unique part.")
    shared_weight: float = Field(0.0, allow_inf_nan=False, description="β.")


class GeneralMemberParams(MemberParams):
    """Per-member a_i (shared) and b_i (unique); each defaults to ``weight``."""

    shared_weight: float | None = Field(None, allow_inf_nan=False, description="a_i.")
    unique_weight: float | None = Field(None, allow_inf_nan=False, description="b_i.")

    @property
    def a(self) -> float:
        return self.weight if self.shared_weight is None else self.shared_weight

    @property
    def b(self) -> float:
        return self.weight if self.unique_weight is None else self.unique_weight


class GeneralParams(ScaleParams):
    """General recipe; ``ties=True`` merges each group (shared, unique) by TIES."""

    ties: bool = False
    density: float = Field(1.0, gt=0, le=1, description="TIES density within each group.")
    normalize: bool = True


EditFunction = Callable[[EditInputs, Any, Sequence[Any]], "torch.Tensor"]


@dataclass(frozen=True)
class EditMethod:
    """A registered edit: ``function(inputs, params, members) -> delta`` (compute dtype)."""

    name: str
    function: EditFunction
    params: type[BaseModel]
    member_params: type[MemberParams]
    needs_split: bool
    summary: str

    def parse_params(self, params: BaseModel | Mapping[str, Any] | None) -> BaseModel:
        """Validate global parameters; raises pydantic's ValidationError naming the field."""
        if isinstance(params, self.params):
            return params
        raw = params.model_dump() if isinstance(params, BaseModel) else dict(params or {})
        return self.params.model_validate(raw)

    def parse_members(
        self, members: Sequence[BaseModel | Mapping[str, Any]] | None, count: int
    ) -> list[MemberParams]:
        """Validate per-member parameters (default: weight 1 for each of ``count`` members)."""
        if members is None:
            return [self.member_params() for _ in range(count)]
        parsed = []
        for item in members:
            if isinstance(item, self.member_params):
                parsed.append(item)
            else:
                raw = item.model_dump() if isinstance(item, BaseModel) else dict(item)
                parsed.append(self.member_params.model_validate(raw))
        return parsed


_REGISTRY: dict[str, EditMethod] = {}


def register(
    name: str,
    *,
    params: type[BaseModel] = NoParams,
    member_params: type[MemberParams] = MemberParams,
    needs_split: bool = False,
) -> Callable[[EditFunction], EditFunction]:
    """Register ``function(inputs, params, members) -> delta`` as edit method ``name``.

    The function returns the change to the base in the compute dtype (``inputs.dtype``);
    ``apply_edit`` adds it to the base and casts. ``needs_split`` says the method reads the
    shared/unique parts (a recipe must then name a decomposition run).
    """

    def decorator(function: EditFunction) -> EditFunction:
        if name in _REGISTRY:
            raise EditError(f"edit method {name!r} is already registered")
        summary = (function.__doc__ or "").strip().splitlines()[0] if function.__doc__ else ""
        _REGISTRY[name] = EditMethod(name, function, params, member_params, needs_split, summary)
        return function

    return decorator


def _load_plugins() -> None:
    """Import the modules other installed packages name in the ``tvsplit.edit_methods``
    entry point group (once per process): importing one calls ``register``."""
    from tvsplit.plugins import load_entry_points

    load_entry_points("tvsplit.edit_methods")


def available_methods() -> tuple[str, ...]:
    """Names of the registered edit methods (built-in and plugins), sorted."""
    _load_plugins()
    return tuple(sorted(_REGISTRY))


def get_method(name: str) -> EditMethod:
    """The registered method ``name``; EditError lists the known names otherwise."""
    if name not in _REGISTRY:
        _load_plugins()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise EditError(
            f"unknown edit method {name!r}; known methods: {', '.join(available_methods())}"
        ) from None


def apply_edit(
    method: str,
    inputs: EditInputs,
    params: BaseModel | Mapping[str, Any] | None = None,
    members: Sequence[BaseModel | Mapping[str, Any]] | None = None,
) -> torch.Tensor:
    """The edited parameter: base + the method's delta, in the base's dtype and shape.

    ``params`` and ``members`` may be the method's pydantic models or plain dicts (validated
    here; an invalid value raises EditError naming the parameter, the member and the field).
    ``members`` defaults to weight 1 for every member.
    """
    delta = edit_delta(method, inputs, params, members)
    result = inputs.base.to(inputs.dtype) + delta
    return result.to(inputs.base.dtype)


def edit_delta(
    method: str,
    inputs: EditInputs,
    params: BaseModel | Mapping[str, Any] | None = None,
    members: Sequence[BaseModel | Mapping[str, Any]] | None = None,
) -> torch.Tensor:
    """The method's change to the base (``apply_edit`` without the addition), in the compute
    dtype (``inputs.dtype``), validated as ``apply_edit`` validates. For a method whose delta
    is λ times an unscaled merge, a caller trying many λ computes the delta once at λ = 1."""
    edit = get_method(method)
    try:
        parsed_params = edit.parse_params(params)
    except ValidationError as error:
        raise EditError(
            f"{inputs.name!r}, method {method!r}: {format_validation_error(error, prefix=('params',))}"
        ) from None
    parsed_members = []
    for i, item in enumerate([{}] * inputs.members if members is None else members):
        try:
            parsed_members += edit.parse_members([item], 1)
        except ValidationError as error:
            where = format_validation_error(error, prefix=("members", i))
            raise EditError(f"{inputs.name!r}, method {method!r}: {where}") from None
    if len(parsed_members) != inputs.members:
        raise EditError(
            f"{inputs.name!r}: {len(parsed_members)} member parameter sets for "
            f"{inputs.members} members"
        )
    try:
        delta = edit.function(inputs, parsed_params, parsed_members)
    except EditError as error:
        raise EditError(f"{inputs.name!r}, method {method!r}: {error}") from None
    return delta


# --------------------------------------------------------------------------- methods


def _weighted_sum(parts: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    total = torch.zeros_like(parts[0])
    for part, weight in zip(parts, weights, strict=True):
        if weight != 0:
            total.add_(part, alpha=weight)
    return total


def _vectors(inputs: EditInputs) -> list[torch.Tensor]:
    return [inputs.vector(i) for i in range(inputs.members)]


@register("task_arithmetic", params=ScaleParams)
def task_arithmetic(
    inputs: EditInputs, params: ScaleParams, members: Sequence[MemberParams]
) -> torch.Tensor:
    """θ0 + λ Σ w_i τ_i."""
    return params.scale * _weighted_sum(_vectors(inputs), [m.weight for m in members])


@register("negation", params=ScaleParams)
def negation(
    inputs: EditInputs, params: ScaleParams, members: Sequence[MemberParams]
) -> torch.Tensor:
    """θ0 − λ Σ w_i τ_i."""
    return -params.scale * _weighted_sum(_vectors(inputs), [m.weight for m in members])


@register("ties", params=TiesParams, member_params=NonNegativeMemberParams)
def ties(inputs: EditInputs, params: TiesParams, members: Sequence[MemberParams]) -> torch.Tensor:
    """θ0 + λ · TIES(w_i τ_i): trim, elect sign by mass, disjoint mean."""
    weights = [m.weight for m in members]
    merged = ties_delta(
        _vectors(inputs), weights, density=params.density, normalize=params.normalize
    )
    return params.scale * merged


@register(
    "shared_augmented",
    params=SharedAugmentedParams,
    member_params=NonNegativeMemberParams,
    needs_split=True,
)
def shared_augmented(
    inputs: EditInputs, params: SharedAugmentedParams, members: Sequence[MemberParams]
) -> torch.Tensor:
    """Base merge over τ_1…τ_T plus the shared parts as extra task vectors (weight γ)."""
    vectors = _vectors(inputs)
    weights = [m.weight for m in members]
    if params.shared_as == "mean":
        extras = [inputs.mean_shared()]
    else:
        extras = [inputs.shared_part(i) for i in range(inputs.members)]
    vectors += extras
    weights += [params.shared_weight] * len(extras)
    if params.merge == "task_arithmetic":
        return params.scale * _weighted_sum(vectors, weights)
    assert params.density is not None  # checked by SharedAugmentedParams
    trim = [True] * inputs.members + [params.trim_shared] * len(extras)
    merged = ties_delta(
        vectors, weights, density=params.density, normalize=params.normalize, trim=trim
    )
    return params.scale * merged


@register("unique_mix", params=UniqueMixParams, needs_split=True)
def unique_mix(
    inputs: EditInputs, params: UniqueMixParams, members: Sequence[MemberParams]
) -> torch.Tensor:
    """θ0 + α Σ w_i u_i + β · mean_i(s_i)."""
    uniques = [inputs.unique_part(i) for i in range(inputs.members)]
    delta = _weighted_sum(uniques, [params.scale * m.weight for m in members])
    if params.shared_weight != 0:
        delta.add_(inputs.mean_shared(), alpha=params.shared_weight)
    return delta


@register("unique_negation", params=ScaleParams, needs_split=True)
def unique_negation(
    inputs: EditInputs, params: ScaleParams, members: Sequence[MemberParams]
) -> torch.Tensor:
    """θ0 − λ Σ w_i u_i."""
    uniques = [inputs.unique_part(i) for i in range(inputs.members)]
    return -params.scale * _weighted_sum(uniques, [m.weight for m in members])


@register("general", params=GeneralParams, member_params=GeneralMemberParams, needs_split=True)
def general(
    inputs: EditInputs, params: GeneralParams, members: Sequence[GeneralMemberParams]
) -> torch.Tensor:
    """θ0 + λ (Σ a_i s_i + Σ b_i u_i), each group optionally merged by TIES."""
    shared = [inputs.shared_part(i) for i in range(inputs.members)]
    unique = [inputs.unique_part(i) for i in range(inputs.members)]
    a = [m.a for m in members]
    b = [m.b for m in members]
    if params.ties:
        for label, coefficients in (("shared_weight", a), ("unique_weight", b)):
            for i, value in enumerate(coefficients):
                if value < 0:
                    raise EditError(f"member {i}: TIES needs {label} ≥ 0, got {value}")
        delta = ties_delta(shared, a, density=params.density, normalize=params.normalize)
        delta += ties_delta(unique, b, density=params.density, normalize=params.normalize)
    else:
        delta = _weighted_sum(shared, a) + _weighted_sum(unique, b)
    return params.scale * delta


# The subspace merges (TSV-M, Iso-C, Iso-CTS) register themselves into this registry.
from tvsplit.tasks import merges as _merges  # noqa: E402, F401
