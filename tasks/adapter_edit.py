"""An edit of a LoRA family written as one LoRA adapter, exact, without a dense intermediate.

For the methods whose delta is, coordinate by coordinate, a fixed linear combination of the
members' shared and unique parts (task arithmetic, negation, unique mixing, unique negation,
shared-augmented task arithmetic, the general recipe without TIES), one parameter's edit is

    Δ = Σ b_i τ_i + Σ (a_i − b_i) s_i,   with τ_i = L_i R_i (factors) and s_i = S C_i,

so its factors are [b_1 L_1 | … | b_T L_T | S] and [R_1; …; R_T; Σ (a_i − b_i) C_i]: rank at
most Σ r_i + k. They are re-factored exactly (QR of both sides and an SVD of the small core)
to their numerical rank, or truncated to a requested rank with the dropped energy reported
(‖Δ − B A‖_F / ‖Δ‖_F, exact from the core's singular values). The coefficients a_i, b_i are
read off the registered method itself (``linear_coefficients``), so they always mean what
the dense edit means.

A parameter that is not factored in every member it draws on (a dense member, a DoRA or
``modules_to_save`` delta), or a method that is not linear (TIES, TSV-M), is expanded one
module at a time: the dense edit of that module, then its SVD (exact to numerical rank, or
truncated). A 1-D change (a bias) cannot be held by a LoRA adapter: it is refused with a
message naming the parameter. Math only: the readers are passed in.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from pydantic import BaseModel
from tvsplit.storage.lowrank import LowRankDelta
from tvsplit.tasks.edit import EditError, EditInputs, apply_edit
from tvsplit.tasks.ranks import numerical_rank

#: methods that are linear in (s_i, u_i) for every parameter setting, and those that are
#: linear for some (``_linear_setting``).
ALWAYS_LINEAR = frozenset({"task_arithmetic", "negation", "unique_mix", "unique_negation"})
SOMETIMES_LINEAR = frozenset({"shared_augmented", "general"})


class AdapterEditError(ValueError):
    """An edit that cannot be written as a LoRA adapter; the message names the parameter."""


def _linear_setting(method: str, params: BaseModel) -> bool:
    if method in ALWAYS_LINEAR:
        return True
    if method == "shared_augmented":
        return getattr(params, "merge", None) == "task_arithmetic"
    if method == "general":
        return not getattr(params, "ties", False)
    return False


def linear_coefficients(
    method: str, params: BaseModel, member_params: Sequence[BaseModel], members: int
) -> tuple[list[float], list[float]] | None:
    """(a, b) with the method's delta = Σ a_i s_i + Σ b_i u_i, or None when the method (with
    these parameters) is not such a combination.

    Read off the registered method by applying it to unit inputs: on 2T coordinates,
    s_i = e_i and u_i = e_{T+i}, so the delta's coordinates are the coefficients."""
    if not _linear_setting(method, params):
        return None
    size = 2 * members
    eye = torch.eye(size, dtype=torch.float64)
    shared = tuple(eye[i] for i in range(members))
    unique = tuple(eye[members + i] for i in range(members))
    vectors = tuple(s + u for s, u in zip(shared, unique, strict=True))
    inputs = EditInputs(
        base=torch.zeros(size, dtype=torch.float64),
        vectors=vectors,
        shared=shared,
        unique=unique,
        name="coefficients",
    )
    delta = apply_edit(method, inputs, params, list(member_params))
    return [float(v) for v in delta[:members]], [float(v) for v in delta[members:]]


# -- one parameter -----------------------------------------------------------------------------
@dataclass(frozen=True)
class StoredShared:
    """A parameter's stored split, enough to form s_i = shared factors (arrays and attrs of
    ``split_to_arrays``) and the position of each edit member in the run."""

    arrays: dict[str, torch.Tensor]
    diagnostics: dict
    indices: tuple[int, ...]


def shared_factors(stored: StoredShared, i: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Edit member i's shared part as (L, R), parameter matrix = L @ R (first dim × rest)."""
    arrays, index = stored.arrays, stored.indices[i]
    if "basis" in arrays:
        basis, coefficient = arrays["basis"], arrays["coefficients"][index]
        right = arrays.get("right_basis")
    else:
        basis, coefficient = arrays[f"basis.{index}"], arrays[f"coefficients.{index}"]
        right = arrays.get(f"right_basis.{index}")
    if right is not None:
        coefficient = coefficient @ right.mT
    if stored.diagnostics["side"] == "right":
        return coefficient.mT, basis.mT
    return basis, coefficient


@dataclass(frozen=True)
class ModuleEdit:
    """One module's edit as balanced LoRA factors: ΔW (as a matrix) = up @ down."""

    name: str  # the parameter (``<module>.weight``)
    shape: tuple[int, ...]
    up: torch.Tensor  # m × r
    down: torch.Tensor  # r × n
    exact_rank: int  # numerical rank of the edit
    bound: int  # Σ r_i + k for a factored edit (the rank the construction guarantees)
    relative_error: float  # of the truncation (0 when nothing was dropped)
    route: str  # "factored" or "dense"

    @property
    def rank(self) -> int:
        return int(self.up.shape[1])


def refactor(
    left: torch.Tensor, right: torch.Tensor, rank: int | None
) -> tuple[torch.Tensor, torch.Tensor, int, float]:
    """Balanced factors of left @ right at its numerical rank, or at most `rank`; also the
    numerical rank and the relative Frobenius error of the truncation."""
    q_left, r_left = torch.linalg.qr(left)
    q_right, r_right = torch.linalg.qr(right.mT)
    u, sigma, vh = torch.linalg.svd(r_left @ r_right.mT)
    return _balanced(q_left @ u, sigma, vh @ q_right.mT, left.shape[0], right.shape[1], rank)


def _balanced(u, sigma, vh, m: int, n: int, rank: int | None):
    exact = numerical_rank(sigma, m, n)
    keep = exact if rank is None else min(rank, exact)
    total = float(sigma.double().square().sum())
    dropped = float(sigma[keep:].double().square().sum())
    error = math.sqrt(dropped / total) if total > 0 else 0.0
    root = sigma[:keep].sqrt()
    return u[:, :keep] * root, root[:, None] * vh[:keep], exact, error


Member = LowRankDelta | torch.Tensor | None  # None: this member does not change the parameter


def edit_module(
    name: str,
    shape: tuple[int, ...],
    members: Sequence[Member],
    coefficients: tuple[list[float], list[float]] | None,
    stored: StoredShared | None,
    dense_edit: Callable[[], torch.Tensor],
    rank: int | None = None,
) -> ModuleEdit | None:
    """One 2-D-or-more parameter's edit as LoRA factors (None when it is exactly zero).

    ``coefficients`` (a, b) from ``linear_coefficients`` (None: not linear); ``stored`` the
    parameter's split (None without one: s_i = 0); ``dense_edit()`` the dense delta, called
    only when the factored route is not exact for this parameter."""
    m, n = shape[0], math.prod(shape[1:])
    factored = coefficients is not None and all(
        member is None or isinstance(member, LowRankDelta) for member in members
    )
    if factored:
        assert coefficients is not None
        a, b = coefficients
        lefts, rights = [], []
        bound = 0
        for member, weight in zip(members, b, strict=True):
            if member is None or weight == 0:
                continue
            left, right = member.factors()
            lefts.append(left * weight)
            rights.append(right)
            bound += member.rank
        if stored is not None:
            shared_terms = [(a_i - b_i, i) for i, (a_i, b_i) in enumerate(zip(a, b, strict=True))]
            shared_terms = [(c, i) for c, i in shared_terms if c != 0]
            if "basis" in stored.arrays and shared_terms:  # one S: Σ c_i C_i, rank k
                combined = None
                for c, i in shared_terms:
                    left, right = shared_factors(stored, i)
                    combined = right * c if combined is None else combined + right * c
                lefts.append(left)
                rights.append(combined)
                bound += left.shape[1]
            else:
                for c, i in shared_terms:
                    left, right = shared_factors(stored, i)
                    lefts.append(left)
                    rights.append(right * c)
                    bound += left.shape[1]
        if not lefts or bound == 0:
            return None
        up, down, exact, error = refactor(torch.cat(lefts, 1), torch.cat(rights, 0), rank)
        route = "factored"
    else:
        delta = dense_edit().to(torch.float32).reshape(m, n)
        u, sigma, vh = torch.linalg.svd(delta, full_matrices=False)
        up, down, exact, error = _balanced(u, sigma, vh, m, n, rank)
        bound, route = min(m, n), "dense"
    if up.shape[1] == 0:
        return None
    return ModuleEdit(name, tuple(shape), up, down, exact, bound, error, route)


def check_one_d(name: str, members: Sequence[Member], weights: Sequence[float] | None) -> None:
    """A 1-D parameter must be left unchanged by the edit: a LoRA adapter cannot hold it."""
    for i, member in enumerate(members):
        if member is None or (weights is not None and weights[i] == 0):
            continue
        dense = member.dense() if isinstance(member, LowRankDelta) else member
        if bool(torch.any(dense != 0)):
            raise AdapterEditError(
                f"{name!r}: member {i} changes this 1-D parameter (a bias or a norm), which a "
                "LoRA adapter cannot hold; write the dense model instead (without --as-adapter)"
            )


def edits(
    parameters: Sequence[tuple[str, tuple[int, ...]]],
    read: Callable[[str], tuple[list[Member], StoredShared | None]],
    dense_edit: Callable[[str], torch.Tensor],
    coefficients: tuple[list[float], list[float]] | None,
    rank: int | None = None,
) -> Iterator[ModuleEdit]:
    """``edit_module`` for every parameter (name, shape), one at a time; ``read(name)`` gives
    the members' deltas and the stored split, ``dense_edit(name)`` the dense delta."""
    for name, shape in parameters:
        members, stored = read(name)
        if len(shape) < 2:
            weights = None
            if coefficients is not None:
                a, b = coefficients
                weights = [abs(x) + abs(y) for x, y in zip(a, b, strict=True)]
            check_one_d(name, members, weights)
            continue
        try:
            module = edit_module(
                name, shape, members, coefficients, stored, lambda n=name: dense_edit(n), rank
            )
        except EditError as error:
            raise AdapterEditError(str(error)) from None
        if module is not None:
            yield module
