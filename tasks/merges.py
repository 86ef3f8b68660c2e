"""Subspace merges from the literature as edit methods of ``tasks.edit``'s one registry.

Registered here (``tasks.edit`` imports this module, so its registry always holds them)::

    tsv_m     θ0 + λ · TSV-M(w_1 τ_1 … w_T τ_T)
    iso_c     θ0 + λ · Iso-C(w_1 τ_1 … w_T τ_T)
    iso_cts   θ0 + λ · Iso-CTS(w_1 τ_1 … w_T τ_T)

λ is ``scale`` (default 1) and w_i each member's ``weight`` (default 1: the published
algorithms exactly). Pure torch, one parameter at a time, no I/O. Matrices are 2-D
parameters and ≥ 3-D ones viewed as (out, rest) (a conv kernel is a matrix here; FusionBench
merges only 2-D tensors); every other parameter (biases, norm scales, anything 1-D, a single
row or column) is the mean of the task vectors, as in both papers' code. Computed in float32
(float64 when an input is float64).

- ``tsv_merge``: TSV-M (Gargiulo et al., CVPR 2025, "Task Singular Vectors: Reducing Task
  Interference in Model Merging"). Per task keep the top ⌊r/T⌋ singular triplets
  (r = min(m, n); at least one), concatenate U = [U_1 … U_T], S = diag(S_1 … S_T),
  V = [V_1 … V_T], replace U and V by their polar factors (U = P Σ Qᵀ → P Qᵀ, the nearest
  matrix with orthonormal columns), merged ΔW = U⊥ S V⊥ᵀ. When the kept singular spaces are
  mutually orthogonal the result is the sum of the truncated task vectors.
- ``iso_c``: Iso-C (Marczak et al., ICML 2025, "No Task Left Behind: Isotropic Model Merging
  with Common and Task-Specific Subspaces"): Σ Δ_i = U S Vᵀ with its singular values
  flattened to their mean, ΔW = mean(S) · U Vᵀ.
- ``iso_cts``: Iso-CTS (same paper): the top k directions of Σ Δ_i (the common subspace)
  plus, per task, the top (r − k)/T directions of its delta projected off the common left
  subspace; the sets are concatenated, orthogonalized as in TSV-M and given one isotropic
  singular value, the mean of the r singular values they came with. The common size k
  (``common_size``):

  * ``"published"`` (default; the paper's code and FusionBench 0.2.33): start from
    k₀ = ⌊f·r⌋ and set k = r − T · round((r − k₀)/T), so that the T task-specific blocks
    fill min(m, n) exactly (Python's round: halves go to even). When that would make k < 0
    (few dimensions, many tasks) the task-specific total is T · ⌊(r − k₀)/T⌋ instead.
  * ``"floor"``: k = ⌊f·r⌋ and ⌊(r − k)/T⌋ directions per task (leaves up to T − 1 of the
    r dimensions unused; this package's rule before it followed the published one).

  f is ``common_fraction`` (default 0.8, the paper's).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

from pydantic import Field
from tvsplit.storage.lazy import lazy_module
from tvsplit.tasks.edit import EditError, EditInputs, MemberParams, ScaleParams, register

if TYPE_CHECKING:
    import torch
else:
    torch = lazy_module("torch")  # imported on first use (storage/lazy.py)

__all__ = [
    "IsoCtsParams",
    "common_subspace_size",
    "iso_c",
    "iso_cts",
    "orthogonalize",
    "tsv_merge",
]


class IsoCtsParams(ScaleParams):
    """Iso-CTS settings: the common subspace's fraction and its size rule."""

    common_fraction: float = Field(
        0.8, ge=0, le=1, description="f: the common subspace's share of min(m, n), in [0, 1]."
    )
    common_size: Literal["published", "floor"] = Field(
        "published",
        description="k rule: 'published' fills min(m, n) exactly (paper, FusionBench); "
        "'floor' keeps k = floor(f·r).",
    )


# --------------------------------------------------------------------------- pure functions


def _stack(deltas: Sequence[torch.Tensor]) -> torch.Tensor:
    if len(deltas) < 1:
        raise EditError("a merge needs at least one task vector")
    shape = deltas[0].shape
    for i, delta in enumerate(deltas):
        if delta.shape != shape:
            raise EditError(
                f"task vector {i}: shape {tuple(delta.shape)} differs from {tuple(shape)}"
            )
    compute = torch.float64 if any(d.dtype == torch.float64 for d in deltas) else torch.float32
    return torch.stack([d.to(compute) for d in deltas])


def _as_matrices(deltas: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The task vectors stacked (T, *shape), and viewed as (T, out, rest) when a parameter
    is a matrix (≥ 2-D, more than one row and column), else None (it is averaged)."""
    stack = _stack(deltas)
    shape = stack.shape[1:]
    if not (len(shape) >= 2 and shape[0] > 1 and shape[1:].numel() > 1):
        return stack, None
    return stack, stack.reshape(stack.shape[0], shape[0], -1)


def orthogonalize(basis: torch.Tensor) -> torch.Tensor:
    """The polar factor P Qᵀ of ``basis`` = P Σ Qᵀ: the matrix with orthonormal columns
    closest to it in Frobenius norm (columns must not outnumber rows)."""
    p, _, qh = torch.linalg.svd(basis, full_matrices=False)
    return p @ qh


def _top_triplets(matrix: torch.Tensor, count: int) -> tuple[torch.Tensor, ...]:
    """The top ``count`` singular triplets of ``matrix``: U (m × c), S (c), V (n × c)."""
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    return u[:, :count], s[:count], vh[:count].mT


def tsv_merge(deltas: Sequence[torch.Tensor]) -> torch.Tensor:
    """TSV-M merged delta of one parameter (module docstring), unscaled, compute dtype."""
    stack, matrices = _as_matrices(deltas)
    if matrices is None:
        return stack.mean(0)
    shape = stack.shape[1:]
    t, m, n = matrices.shape
    keep = max(1, min(m, n) // t)
    us, ss, vs = zip(*(_top_triplets(a, keep) for a in matrices.unbind(0)), strict=True)
    u_cat, s_cat, v_cat = torch.cat(us, 1), torch.cat(ss), torch.cat(vs, 1)
    merged = orthogonalize(u_cat) @ torch.diag(s_cat) @ orthogonalize(v_cat).mT
    return merged.reshape(shape)


def iso_c(deltas: Sequence[torch.Tensor]) -> torch.Tensor:
    """Iso-C merged delta of one parameter: mean singular value · U Vᵀ of Σ Δ_i."""
    stack, matrices = _as_matrices(deltas)
    if matrices is None:
        return stack.mean(0)
    shape = stack.shape[1:]
    total = matrices.sum(0)
    u, s, vh = torch.linalg.svd(total, full_matrices=False)
    return (s.mean() * (u @ vh)).reshape(shape)


def common_subspace_size(
    rank: int,
    tasks: int,
    common_fraction: float,
    rule: Literal["published", "floor"] = "published",
) -> tuple[int, int]:
    """Iso-CTS's (k, directions per task) for r = ``rank`` and T = ``tasks`` (module
    docstring). Guarantees 0 ≤ k ≤ r and k + T · per_task ≤ r, with equality for
    ``"published"`` whenever T · round((r − ⌊f·r⌋)/T) ≤ r."""
    if not 0 <= common_fraction <= 1:
        raise EditError(f"common_fraction must be in [0, 1], not {common_fraction}")
    k = int(common_fraction * rank)
    if rule == "floor":
        return k, (rank - k) // tasks
    if rule != "published":
        raise EditError(f"common_size must be 'published' or 'floor', not {rule!r}")
    specific = round((rank - k) / tasks) * tasks
    if specific > rank:
        specific = (rank - k) // tasks * tasks
    return rank - specific, specific // tasks


def iso_cts(
    deltas: Sequence[torch.Tensor],
    common_fraction: float = 0.8,
    common_size: Literal["published", "floor"] = "published",
) -> torch.Tensor:
    """Iso-CTS merged delta of one parameter (module docstring), unscaled, compute dtype."""
    stack, matrices = _as_matrices(deltas)
    if matrices is None:
        return stack.mean(0)
    shape = stack.shape[1:]
    t, m, n = matrices.shape
    u, s, vh = torch.linalg.svd(matrices.sum(0), full_matrices=False)
    k, per_task = common_subspace_size(min(m, n), t, common_fraction, common_size)
    if k == 0 and per_task == 0:
        return (s.mean() * (u @ vh)).reshape(shape)
    us, vs, sigmas = [u[:, :k]], [vh[:k].mT], [s[:k]]
    if per_task > 0:
        common = u[:, :k]
        for a in matrices.unbind(0):
            ut, st, vt = _top_triplets(a - common @ (common.mT @ a), per_task)
            us.append(ut)
            vs.append(vt)
            sigmas.append(st)
    sigma = torch.cat(sigmas).mean()
    merged = sigma * orthogonalize(torch.cat(us, 1)) @ orthogonalize(torch.cat(vs, 1)).mT
    return merged.reshape(shape)


# --------------------------------------------------------------------------- registered


def _weighted(inputs: EditInputs, members: Sequence[MemberParams]) -> list[torch.Tensor]:
    vectors = []
    for i, member in enumerate(members):
        vector = inputs.vector(i)
        vectors.append(vector if member.weight == 1 else vector * member.weight)
    return vectors


@register("tsv_m", params=ScaleParams)
def tsv_m(inputs: EditInputs, params: ScaleParams, members: Sequence[MemberParams]) -> torch.Tensor:
    """θ0 + λ · TSV-M(w_i τ_i): per-task top singular triplets, orthogonalized (Gargiulo 2025)."""
    return params.scale * tsv_merge(_weighted(inputs, members))


@register("iso_c", params=ScaleParams)
def iso_c_method(
    inputs: EditInputs, params: ScaleParams, members: Sequence[MemberParams]
) -> torch.Tensor:
    """θ0 + λ · Iso-C(w_i τ_i): Σ w_i τ_i with a flat spectrum (Marczak 2025)."""
    return params.scale * iso_c(_weighted(inputs, members))


@register("iso_cts", params=IsoCtsParams)
def iso_cts_method(
    inputs: EditInputs, params: IsoCtsParams, members: Sequence[MemberParams]
) -> torch.Tensor:
    """θ0 + λ · Iso-CTS(w_i τ_i): common plus task-specific subspaces, isotropic (Marczak 2025)."""
    merged = iso_cts(_weighted(inputs, members), params.common_fraction, params.common_size)
    return params.scale * merged
