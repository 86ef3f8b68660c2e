"""Split the task vectors of one parameter into a part shared across the family and a part
unique to each member (METHOD.md).

Public API:

- ``member_basis(delta, ...)``: one member's signal subspace U_i (cacheable per member);
- ``split_from_bases(deltas, bases, ...)``: the shared subspace and the split, from bases;
- ``decompose_layer(deltas, ...)``: the two in sequence;
- ``SplitSettings``: every setting of a split in one typed model (`tasks.split_settings`);
  the estimators are registered in `tasks.estimators`.

Guarantees (tested): shared + unique = delta (relative error ≤ 1e-6 in float32, ≤ 1e-12 in
float64); ⟨shared_i, unique_i⟩_F = 0, and with one S for the family also
⟨shared_i, unique_j⟩_F = 0 for every pair; S orthonormal; S Sᵀ deterministic for a seed;
``mean-projector`` independent of member order. bf16/fp16 are computed in float32 and
rounded on return. Computation runs on the input's device.

Orientation: a parameter is viewed as a matrix A (m × n): 2-D as stored, ≥3-D as
(out, rest), 1-D as a column (n × 1). ``side="left"`` works in the space of the first stored
dimension; ``"right"`` on the transpose; ``"auto"`` picks the smaller dimension. Bases,
coefficients and eigenvalues refer to the oriented matrix.

Factored members: a member's delta may be a ``LowRankDelta`` (a LoRA ΔW kept as factors).
Its basis is the exact thin SVD from the factors (``tasks.lowrank``: QR of L and Rᵀ, an
r × r core SVD; solver ``"factored"``), with no sketch; Gavish–Donoho keeps every
numerically non-zero singular value (the noise of an exact product is zero), the other
rules apply to its exact spectrum, and the caps apply as for dense members. Splits take
any mix of dense and factored members; a factored member's coefficients C_i = (Sᵀ L_i) R_i
are computed without its dense ΔW, and its parts are formed only when asked for.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from pydantic import ValidationError
from tvsplit.storage.errors import format_validation_error
from tvsplit.storage.lowrank import LowRankDelta
from tvsplit.tasks.estimators import Estimator, EstimatorError, get_estimator
from tvsplit.tasks.lowrank import Factors, factored_spectrum
from tvsplit.tasks.ranks import (
    RankChoice,
    RankRule,
    choose_rank,
    numerical_rank,
    parse_rank_rule,
    rank_cap,
    rule_rank,
)
from tvsplit.tasks.split_settings import SplitSettings
from tvsplit.tasks.task_vector import all_finite, energy

SIDES = ("left", "right", "auto")
ONE_D_POLICIES = ("unique", "rank1")
SOLVERS = ("auto", "full", "randomized")


class DecompositionError(ValueError):
    """Input that cannot be split; the message names the parameter and the member."""


def _where(name: str | None, member: int | str | None = None) -> str:
    place = f"parameter {name!r}" if name else "parameter"
    return place if member is None else f"{place}, member {member!r}"


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _resolve_side(shape: torch.Size, side: str) -> str:
    if side not in SIDES:
        raise DecompositionError(f"side must be one of {SIDES}, not {side!r}")
    if len(shape) == 1:
        return "left"
    m, n = shape[0], math.prod(shape[1:])
    if side == "auto":
        return "left" if m <= n else "right"
    return side


def _orient_stack(stack: torch.Tensor, side: str) -> torch.Tensor:
    """View a stack of deltas (T, *shape) as the oriented matrices A (T, m, n) in their
    compute dtype: a view when no dtype change is needed (no copy of the family's deltas);
    a 1-D parameter is a column."""
    matrices = stack.reshape(stack.shape[0], stack.shape[1], -1).to(_compute_dtype(stack.dtype))
    return matrices if side == "left" else matrices.mT


def _orient(delta: torch.Tensor, side: str) -> torch.Tensor:
    """``_orient_stack`` of one member's delta."""
    return _orient_stack(delta[None], side)[0]


def _restore(
    matrices: torch.Tensor, shape: torch.Size, side: str, dtype: torch.dtype
) -> torch.Tensor:
    """Inverse of ``_orient`` over a stack (T, m, n) → (T, *shape) in ``dtype``."""
    if side == "right":
        matrices = matrices.mT
    return matrices.reshape(matrices.shape[0], *shape).to(dtype)


Delta = torch.Tensor | LowRankDelta


def _check_member(delta: Delta, name: str | None, member: int | str) -> None:
    if isinstance(delta, LowRankDelta):
        for factor in (delta.up, delta.down):
            _check_member(factor, name, member)
        return
    if not isinstance(delta, torch.Tensor):
        raise DecompositionError(
            f"{_where(name, member)}: expected a torch.Tensor, got {type(delta).__name__}"
        )
    if not delta.is_floating_point():
        raise DecompositionError(
            f"{_where(name, member)}: dtype {delta.dtype} is not floating point"
        )
    if delta.numel() == 0:
        raise DecompositionError(
            f"{_where(name, member)}: the tensor is empty (shape {tuple(delta.shape)})"
        )
    if not all_finite(delta):
        raise DecompositionError(f"{_where(name, member)}: contains NaN or Inf")


@dataclass(frozen=True)
class MemberBasis:
    """One member's signal subspace for one parameter.

    ``left`` (m × r) and ``right`` (n × r) are orthonormal singular vectors of the oriented
    matrix, ``singular_values`` their r singular values, ``spectrum`` every singular value the
    solver computed (all of them for a full SVD, the sketch's otherwise). Depends only on
    this member's delta and the settings, so it can be cached and reused when the family
    grows.
    """

    left: torch.Tensor
    right: torch.Tensor
    singular_values: torch.Tensor
    spectrum: torch.Tensor
    shape: torch.Size
    side: str
    rule: str
    solver: str

    @property
    def rank(self) -> int:
        return self.left.shape[1]


def member_basis(
    delta: Delta,
    *,
    rank: str = "gavish-donoho",
    max_rank_fraction: float = 0.25,
    side: str = "left",
    seed: int = 0,
    solver: str = "auto",
    name: str | None = None,
    member: int | str | None = None,
) -> MemberBasis:
    """The top-r_i singular subspace of one member's delta, r_i chosen by ``rank``.

    ``rank``: ``"gavish-donoho"``, ``"energy:E"``, ``"fixed:R"`` or ``"fraction:F"``, always
    capped by ``max_rank_fraction`` of the short side and by the numerical rank. ``solver``:
    ``"auto"`` (randomized sketch for large matrices), ``"full"`` or ``"randomized"``; the
    sketch is seeded by ``seed``, so the result is deterministic. A 1-D delta gives its unit
    vector (r = 1). An all-zero delta gives r = 0. ``name``/``member`` only label errors.
    """
    _check_member(delta, name, 0 if member is None else member)
    if not 0 < max_rank_fraction <= 1:
        raise DecompositionError(
            f"{_where(name)}: max_rank_fraction must be in (0, 1], not {max_rank_fraction}"
        )
    if solver not in SOLVERS:
        raise DecompositionError(f"solver must be one of {SOLVERS}, not {solver!r}")
    rule: RankRule = parse_rank_rule(rank)
    if isinstance(delta, LowRankDelta):
        return _factored_basis(delta, rule, max_rank_fraction, side)
    resolved = _resolve_side(delta.shape, side)
    a = _orient(delta, resolved)
    if delta.ndim == 1:
        rule = RankRule("fixed", 1)
    generator = torch.Generator(device=a.device).manual_seed(seed)
    choice = choose_rank(
        a,
        rule,
        max_rank_fraction=1.0 if delta.ndim == 1 else max_rank_fraction,
        solver=solver,
        generator=generator,
    )
    spectrum, r = choice.spectrum, choice.rank
    return MemberBasis(
        left=spectrum.left[:, :r].contiguous(),
        right=spectrum.right[:, :r].contiguous(),
        singular_values=spectrum.sigma[:r],
        spectrum=spectrum.sigma,
        shape=delta.shape,
        side=resolved,
        rule=str(rule),
        solver=choice.solver,
    )


def _factored_basis(
    delta: LowRankDelta, rule: RankRule, max_rank_fraction: float, side: str
) -> MemberBasis:
    """``member_basis`` of a factored delta: the exact thin SVD from its factors."""
    shape = torch.Size(delta.shape)
    resolved = _resolve_side(shape, side)
    factors = Factors.of(delta, resolved, _compute_dtype(delta.dtype))
    spectrum = factored_spectrum(factors)
    m, n = factors.shape
    # Gavish–Donoho's noise level is zero for an exact product: every non-round-off value.
    wanted = (
        spectrum.sigma.numel() if rule.kind == "gavish-donoho" else rule_rank(rule, spectrum, m, n)
    )
    r = min(wanted, rank_cap(m, n, max_rank_fraction), numerical_rank(spectrum.sigma, m, n))
    choice = RankChoice(r, spectrum, "factored")
    return MemberBasis(
        left=spectrum.left[:, : choice.rank].contiguous(),
        right=spectrum.right[:, : choice.rank].contiguous(),
        singular_values=spectrum.sigma[: choice.rank],
        spectrum=spectrum.sigma,
        shape=shape,
        side=resolved,
        rule=str(rule),
        solver=choice.solver,
    )


Oriented = torch.Tensor | Factors  # one member's oriented matrix, dense or factored


def _dense(member: Oriented) -> torch.Tensor:
    return member.dense() if isinstance(member, Factors) else member


def _project(basis: torch.Tensor, member: Oriented) -> torch.Tensor:
    """basisᵀ A without forming A when it is factored."""
    return member.project(basis) if isinstance(member, Factors) else basis.mT @ member


def _energy(member: Oriented) -> float:
    return member.energy() if isinstance(member, Factors) else energy(member)


@dataclass
class LayerSplit:
    """The split of one parameter across T members, kept compact; parts derived on access.

    ``basis`` is S (m × k, orthonormal) of the oriented matrix; for ``"pairwise"`` a tuple of
    per-member bases. ``right_basis`` is R for two-sided splits, else None. ``coefficients``
    are C_i = Sᵀ A_i (k × n), or Sᵀ A_i R (k × k') two-sided, so shared_i = S C_i (or
    S C_i Rᵀ) and unique_i = A_i − shared_i. ``shared`` and ``unique`` have shape
    (T, *param_shape) and the input dtype.

    ``oriented`` is a view of the deltas the split was made from (float32 or float64 input
    is not copied): change them in place and the derived ``unique`` changes with them. With
    factored members it is a tuple, one entry per member: a dense oriented matrix or its
    ``Factors`` (formed densely only by ``unique``/``unique_member``).
    """

    method: str
    side: str
    param_shape: torch.Size
    dtype: torch.dtype
    basis: torch.Tensor | tuple[torch.Tensor, ...]
    right_basis: torch.Tensor | tuple[torch.Tensor, ...] | None
    coefficients: torch.Tensor | tuple[torch.Tensor, ...]
    eigenvalues: torch.Tensor | tuple[torch.Tensor, ...]
    ranks: tuple[int, ...]
    chance: float | tuple[float, ...]
    threshold_used: float
    oriented: torch.Tensor | tuple[Oriented, ...] = field(repr=False)

    @property
    def members(self) -> int:
        return len(self.oriented)

    @property
    def k(self) -> int | tuple[int, ...]:
        """Dimension of the shared subspace (per member for ``"pairwise"``)."""
        if isinstance(self.basis, tuple):
            return tuple(b.shape[1] for b in self.basis)
        return self.basis.shape[1]

    def _left(self, i: int) -> torch.Tensor:
        return self.basis[i] if isinstance(self.basis, tuple) else self.basis

    def _right(self, i: int) -> torch.Tensor | None:
        if isinstance(self.right_basis, tuple):
            return self.right_basis[i]
        return self.right_basis

    def _coefficient(self, i: int) -> torch.Tensor:
        return self.coefficients[i]

    def _shared_oriented(self, i: int) -> torch.Tensor:
        shared = self._left(i) @ self._coefficient(i)
        right = self._right(i)
        return shared if right is None else shared @ right.mT

    def shared_member(self, i: int) -> torch.Tensor:
        """Member i's shared part, shape ``param_shape``, input dtype."""
        return _restore(self._shared_oriented(i)[None], self.param_shape, self.side, self.dtype)[0]

    def unique_member(self, i: int) -> torch.Tensor:
        """Member i's unique part: its delta minus its shared part."""
        unique = _dense(self.oriented[i]) - self._shared_oriented(i)
        return _restore(unique[None], self.param_shape, self.side, self.dtype)[0]

    @property
    def shared(self) -> torch.Tensor:
        parts = torch.stack([self._shared_oriented(i) for i in range(self.members)])
        return _restore(parts, self.param_shape, self.side, self.dtype)

    @property
    def unique(self) -> torch.Tensor:
        parts = torch.stack(
            [_dense(self.oriented[i]) - self._shared_oriented(i) for i in range(self.members)]
        )
        return _restore(parts, self.param_shape, self.side, self.dtype)

    @property
    def shared_energy(self) -> torch.Tensor:
        """‖shared_i‖² / ‖delta_i‖² per member (0 for an all-zero delta)."""
        energies = []
        for i in range(self.members):
            total = _energy(self.oriented[i])
            kept = energy(self._coefficient(i))
            energies.append(kept / total if total > 0 else 0.0)
        return torch.tensor(energies, dtype=torch.float64)

    @property
    def gap(self) -> float | tuple[float, ...]:
        """Eigenvalue just kept minus the one just dropped at the threshold (0 if none kept)."""
        if isinstance(self.eigenvalues, tuple):
            return tuple(_gap(e, k) for e, k in zip(self.eigenvalues, self.k, strict=True))
        return _gap(self.eigenvalues, self.k)


def _gap(eigenvalues: torch.Tensor, k: int) -> float:
    if k == 0 or eigenvalues.numel() == 0:
        return 0.0
    below = float(eigenvalues[k]) if k < eigenvalues.numel() else 0.0
    return float(eigenvalues[k - 1]) - below


def _as_stack(
    deltas: torch.Tensor | Sequence[Delta],
    name: str | None,
    member_names: Sequence[str] | None,
) -> torch.Tensor | list[Delta]:
    """Validate the family's deltas: stacked (T, *shape) when all are dense, else the list
    (factored members in it)."""
    members = list(deltas.unbind(0)) if isinstance(deltas, torch.Tensor) else list(deltas)
    labels = list(member_names) if member_names is not None else list(range(len(members)))
    if len(members) < 2:
        raise DecompositionError(
            f"{_where(name)}: a split needs at least 2 members, got {len(members)}"
        )
    if len(labels) != len(members):
        raise DecompositionError(
            f"{_where(name)}: {len(labels)} member names for {len(members)} deltas"
        )
    for label, delta in zip(labels, members, strict=True):
        _check_member(delta, name, label)
    factored = any(isinstance(delta, LowRankDelta) for delta in members)
    shape = torch.Size(members[0].shape)
    dtype, device = _member_dtype(members[0]), _member_device(members[0])
    for label, delta in zip(labels, members, strict=True):
        if torch.Size(delta.shape) != shape:
            raise DecompositionError(
                f"{_where(name, label)}: shape {tuple(delta.shape)} differs from member "
                f"{labels[0]!r}'s {tuple(shape)}"
            )
        delta_dtype, delta_device = _member_dtype(delta), _member_device(delta)
        if (not factored and delta_dtype != dtype) or delta_device != device:
            raise DecompositionError(
                f"{_where(name, label)}: dtype/device {delta_dtype}/{delta_device} differs "
                f"from member {labels[0]!r}'s {dtype}/{device}"
            )
    if factored:
        return members
    return deltas if isinstance(deltas, torch.Tensor) else torch.stack(members)


def _member_dtype(delta: Delta) -> torch.dtype:
    return delta.up.dtype if isinstance(delta, LowRankDelta) else delta.dtype


def _member_device(delta: Delta) -> torch.device:
    return delta.up.device if isinstance(delta, LowRankDelta) else delta.device


def _orient_members(
    members: torch.Tensor | list[Delta], side: str
) -> tuple[torch.Tensor | tuple[Oriented, ...], torch.Size, torch.dtype]:
    """The oriented members, the parameter shape and the dtype parts are returned in: a
    dense stack as a view (``_orient_stack``); with factored members a tuple (float32, or
    float64 when every dense member is float64)."""
    if isinstance(members, torch.Tensor):
        return _orient_stack(members, side), members.shape[1:], members.dtype
    dense = [m for m in members if not isinstance(m, LowRankDelta)]
    dtype = (
        torch.float64 if dense and all(m.dtype == torch.float64 for m in dense) else torch.float32
    )
    oriented = tuple(
        Factors.of(m, side, dtype) if isinstance(m, LowRankDelta) else _orient(m, side).to(dtype)
        for m in members
    )
    return oriented, torch.Size(members[0].shape), dtype


def _resolve_threshold(
    estimator: Estimator, params: Mapping[str, Any], members: int, name: str | None
) -> tuple[Any, float]:
    """The estimator's validated parameters and its cut for a family of `members`."""
    try:
        parsed = estimator.parse(params)
        return parsed, estimator.threshold(parsed, members)
    except ValidationError as error:
        raise DecompositionError(f"{_where(name)}: {format_validation_error(error)}") from None
    except ValueError as error:
        raise DecompositionError(f"{_where(name)}: {error}") from None


def split_from_bases(
    deltas: torch.Tensor | Sequence[Delta],
    bases: Sequence[MemberBasis],
    *,
    method: str = "mean-projector",
    threshold: float = 0.85,
    min_tasks: int | None = None,
    two_sided: bool = False,
    one_d: str = "unique",
    name: str | None = None,
    member_names: Sequence[str] | None = None,
    **params: Any,
) -> LayerSplit:
    """Estimate the shared subspace from the members' bases and split every member.

    ``method``: a registered split estimator (`tasks.estimators`): ``"mean-projector"``
    (default), ``"projector-product"``, ``"pairwise"`` or a plugin's; ``params`` are the
    estimator's own parameters beyond ``threshold`` and ``min_tasks``.
    ``min_tasks=j`` means "shared by at least j members" and overrides ``threshold``
    (mean-projector: τ = (j − ½)/T; pairwise: found in ≥ j − 1 others, default j = 2,
    ``threshold`` unused). ``two_sided`` also projects on the right with R built the same
    way from the right singular vectors. 1-D parameters follow ``one_d``: ``"unique"``
    keeps them whole in the unique part, ``"rank1"`` uses the rank-1 bases (shared only
    when members are nearly collinear); they are always one-sided. ``deltas`` may mix dense
    and factored (``LowRankDelta``) members.
    """
    try:
        estimator = get_estimator(method)
    except EstimatorError as error:
        raise DecompositionError(str(error)) from None
    # The arguments the estimator declares (a pairwise split has no τ): the rest are unused.
    given = {"threshold": threshold, "min_tasks": min_tasks, **params}
    declared = {key: value for key, value in given.items() if key in estimator.fields()}
    unknown = sorted(set(params) - set(estimator.fields()))
    if unknown:
        raise DecompositionError(
            f"{_where(name)}: {method} has no parameter {unknown[0]!r} "
            f"(its parameters: {', '.join(estimator.fields()) or 'none'})"
        )
    stack = _as_stack(deltas, name, member_names)
    members = len(stack)
    if len(bases) != members:
        raise DecompositionError(f"{_where(name)}: {len(bases)} bases for {members} deltas")
    if one_d not in ONE_D_POLICIES:
        raise DecompositionError(f"one_d must be one of {ONE_D_POLICIES}, not {one_d!r}")
    labels = list(member_names) if member_names is not None else list(range(members))
    side = bases[0].side
    param_shape = torch.Size(stack[0].shape)
    for label, basis in zip(labels, bases, strict=True):
        if basis.shape != param_shape or basis.side != side:
            raise DecompositionError(
                f"{_where(name, label)}: basis was made for shape {tuple(basis.shape)} side "
                f"{basis.side!r}, but the deltas have shape {tuple(param_shape)} side {side!r}"
            )
    _, tau = _resolve_threshold(estimator, declared, members, name)
    oriented, param_shape, dtype = _orient_members(stack, side)
    compute = oriented.dtype if isinstance(oriented, torch.Tensor) else dtype
    ranks = tuple(b.rank for b in bases)
    one_dimensional = len(param_shape) == 1
    if one_dimensional:
        two_sided = False
    if one_dimensional and one_d == "unique":
        left = [b.left[:, :0] for b in bases]
        ranks = tuple(0 for _ in bases)
    else:
        left = [b.left.to(compute) for b in bases]
    basis, eigenvalues = estimator.estimate(left, tau)
    right_basis = None
    if two_sided:
        right_basis, _ = estimator.estimate([b.right.to(compute) for b in bases], tau)
    coefficients = _coefficients(oriented, basis, right_basis)
    like = left[0]
    return LayerSplit(
        method=method,
        side=side,
        param_shape=param_shape,
        dtype=dtype,
        basis=basis,
        right_basis=right_basis,
        coefficients=coefficients,
        eigenvalues=eigenvalues,
        ranks=ranks,
        chance=estimator.chance(list(ranks), like.shape[0], like),
        threshold_used=tau,
        oriented=oriented,
    )


def _coefficients(oriented, basis, right_basis):
    """C_i = S_iᵀ A_i (R_i): stacked when S is common, a tuple for per-member bases; a
    factored member's as (S_iᵀ L_i) R_i."""
    per_member = isinstance(basis, tuple)
    result = []
    for i, a in enumerate(oriented):
        s = basis[i] if per_member else basis
        c = _project(s, a)
        if right_basis is not None:
            c = c @ (right_basis[i] if per_member else right_basis)
        result.append(c)
    return tuple(result) if per_member else torch.stack(result)


def decompose_layer(
    deltas: torch.Tensor | Sequence[Delta],
    *,
    method: str = "mean-projector",
    threshold: float = 0.85,
    min_tasks: int | None = None,
    rank: str = "gavish-donoho",
    max_rank_fraction: float = 0.25,
    side: str = "left",
    two_sided: bool = False,
    one_d: str = "unique",
    seed: int = 0,
    solver: str = "auto",
    name: str | None = None,
    member_names: Sequence[str] | None = None,
    settings: SplitSettings | None = None,
    **params: Any,
) -> LayerSplit:
    """Split one parameter of a family: ``member_basis`` for each member, then
    ``split_from_bases``. Same arguments, same guarantees; ``settings`` (a `SplitSettings`)
    replaces the split arguments when given."""
    if settings is not None:
        return decompose_layer(
            deltas,
            **settings.basis_kwargs(),
            **settings.split_kwargs(),
            name=name,
            member_names=member_names,
        )
    stack = _as_stack(deltas, name, member_names)
    labels = list(member_names) if member_names is not None else list(range(len(stack)))
    bases = [
        member_basis(
            delta,
            rank=rank,
            max_rank_fraction=max_rank_fraction,
            side=side,
            seed=seed,
            solver=solver,
            name=name,
            member=label,
        )
        for label, delta in zip(labels, list(stack), strict=True)
    ]
    return split_from_bases(
        stack,
        bases,
        method=method,
        threshold=threshold,
        min_tasks=min_tasks,
        two_sided=two_sided,
        one_d=one_d,
        name=name,
        member_names=member_names,
        **params,
    )


def basis_to_arrays(basis: MemberBasis) -> tuple[dict[str, torch.Tensor], dict[str, object]]:
    """A member basis as arrays and JSON-able attrs (for a cache); inverse: ``basis_from_arrays``."""
    arrays = {"left": basis.left, "right": basis.right, "sigma": basis.spectrum}
    attrs = {
        "shape": list(basis.shape),
        "side": basis.side,
        "rule": basis.rule,
        "solver": basis.solver,
    }
    return arrays, attrs


def basis_from_arrays(
    arrays: dict[str, torch.Tensor],
    attrs: dict,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> MemberBasis:
    """Rebuild a cached member basis on ``device`` in ``dtype``."""
    left = arrays["left"].to(device=device, dtype=dtype)
    spectrum = arrays["sigma"].to(device=device, dtype=dtype)
    return MemberBasis(
        left=left,
        right=arrays["right"].to(device=device, dtype=dtype),
        singular_values=spectrum[: left.shape[1]],
        spectrum=spectrum,
        shape=torch.Size(attrs["shape"]),
        side=str(attrs["side"]),
        rule=str(attrs["rule"]),
        solver=str(attrs["solver"]),
    )


def _as_list(value) -> list:
    if isinstance(value, torch.Tensor):
        return [float(v) for v in value.flatten()]
    if isinstance(value, tuple):
        return [_as_list(v) if isinstance(v, torch.Tensor | tuple) else v for v in value]
    return value


def split_to_arrays(
    split: LayerSplit, *, top_eigenvalues: int = 64
) -> tuple[dict[str, torch.Tensor], dict[str, object]]:
    """The compact form of a split (S, R, C; per member for "pairwise") and its diagnostics.

    Diagnostics are JSON-able: method, side, shape, dtype, k, ranks, the top eigenvalues,
    chance, threshold used, gap and each member's shared energy fraction.
    ``split_from_arrays`` with the same deltas gives back an equal split.
    """
    arrays: dict[str, torch.Tensor] = {}
    if isinstance(split.basis, tuple):
        for i in range(split.members):
            arrays[f"basis.{i}"] = split.basis[i]
            arrays[f"coefficients.{i}"] = split.coefficients[i]
            if split.right_basis is not None:
                arrays[f"right_basis.{i}"] = split.right_basis[i]
        eigenvalues = [_as_list(e[:top_eigenvalues]) for e in split.eigenvalues]
    else:
        arrays["basis"] = split.basis
        arrays["coefficients"] = split.coefficients
        if split.right_basis is not None:
            arrays["right_basis"] = split.right_basis
        eigenvalues = _as_list(split.eigenvalues[:top_eigenvalues])
    diagnostics = {
        "method": split.method,
        "side": split.side,
        "param_shape": list(split.param_shape),
        "dtype": str(split.dtype).removeprefix("torch."),
        "k": _as_list(split.k) if isinstance(split.k, tuple) else split.k,
        "ranks": list(split.ranks),
        "eigenvalues": eigenvalues,
        "chance": _as_list(split.chance) if isinstance(split.chance, tuple) else split.chance,
        "threshold_used": split.threshold_used,
        "gap": _as_list(split.gap) if isinstance(split.gap, tuple) else split.gap,
        "shared_energy": _as_list(split.shared_energy),
        "two_sided": split.right_basis is not None,
    }
    return arrays, diagnostics


def split_from_arrays(
    arrays: dict[str, torch.Tensor],
    diagnostics: dict,
    deltas: torch.Tensor | Sequence[torch.Tensor],
) -> LayerSplit:
    """Rebuild a split from its compact form and the members' deltas (same member order).

    Arrays are moved to the deltas' device and compute dtype.
    """
    stack = deltas if isinstance(deltas, torch.Tensor) else torch.stack(list(deltas))
    side = str(diagnostics["side"])
    oriented = _orient_stack(stack, side)

    def get(key: str) -> torch.Tensor:
        return arrays[key].to(device=oriented.device, dtype=oriented.dtype)

    def eig(values) -> torch.Tensor:
        return torch.tensor(values, dtype=oriented.dtype)

    per_member = "basis" not in arrays
    two_sided = bool(diagnostics.get("two_sided"))
    members = stack.shape[0]
    if per_member:
        basis = tuple(get(f"basis.{i}") for i in range(members))
        coefficients = tuple(get(f"coefficients.{i}") for i in range(members))
        right = tuple(get(f"right_basis.{i}") for i in range(members)) if two_sided else None
        eigenvalues = tuple(eig(e) for e in diagnostics["eigenvalues"])
        chance = tuple(diagnostics["chance"])
    else:
        basis, coefficients = get("basis"), get("coefficients")
        right = get("right_basis") if two_sided else None
        eigenvalues, chance = eig(diagnostics["eigenvalues"]), float(diagnostics["chance"])
    return LayerSplit(
        method=str(diagnostics["method"]),
        side=side,
        param_shape=stack.shape[1:],
        dtype=stack.dtype,
        basis=basis,
        right_basis=right,
        coefficients=coefficients,
        eigenvalues=eigenvalues,
        ranks=tuple(int(r) for r in diagnostics["ranks"]),
        chance=chance,
        threshold_used=float(diagnostics["threshold_used"]),
        oriented=oriented,
    )


def shared_from_arrays(
    arrays: dict[str, torch.Tensor], diagnostics: dict, index: int, like: torch.Tensor
) -> torch.Tensor:
    """Member ``index``'s shared part from a stored compact split, shaped and typed like
    ``like`` (its delta): S C_i, or S C_i Rᵀ two-sided, oriented back. The unique part is
    ``like - shared``."""
    side = str(diagnostics["side"])
    dtype = _compute_dtype(like.dtype)

    def get(key: str) -> torch.Tensor:
        return arrays[key].to(device=like.device, dtype=dtype)

    if "basis" in arrays:
        basis, coefficient = get("basis"), get("coefficients")[index]
        right = get("right_basis") if "right_basis" in arrays else None
    else:
        basis, coefficient = get(f"basis.{index}"), get(f"coefficients.{index}")
        key = f"right_basis.{index}"
        right = get(key) if key in arrays else None
    shared = basis @ coefficient
    if right is not None:
        shared = shared @ right.mT
    return _restore(shared[None], like.shape, side, like.dtype)[0]
