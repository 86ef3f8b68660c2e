"""Subspace merging baselines from the literature, one parameter at a time (pure torch).

Each function takes the T task vectors of one parameter and returns the merged delta
(unscaled: the merged model is θ0 + α · delta, α chosen on validation). Matrices are 2-D
parameters and ≥3-D ones viewed as (out, rest); every other parameter (biases, norm scales,
anything 1-D) is averaged, as in both papers' code.

- ``tsv_merge``: TSV-M (Gargiulo et al., CVPR 2025, "Task Singular Vectors: Reducing Task
  Interference in Model Merging"). Per task keep the top ⌊r/T⌋ singular triplets
  (r = min(m, n)), concatenate U = [U_1 … U_T], S = diag(S_1 … S_T), V = [V_1 … V_T],
  orthogonalize U and V by their polar factors (U = P Σ Qᵀ → U⊥ = P Qᵀ, the nearest matrix
  with orthonormal columns), merged ΔW = U⊥ S V⊥ᵀ. When the tasks' kept singular spaces
  are already mutually orthogonal, U⊥ = U and V⊥ = V, and the result is the sum of the
  truncated task vectors.
- ``iso_c``: Iso-C (Marczak et al., ICML 2025, "No Task Left Behind: Isotropic Model Merging
  with Common and Task-Specific Subspaces"): the summed task matrix Σ Δ_i = U S Vᵀ with its
  singular values flattened to their mean, ΔW = mean(S) · U Vᵀ.
- ``iso_cts``: Iso-CTS (same paper): the top k = ⌊f·r⌋ directions of Σ Δ_i (common
  subspace, f = ``common_fraction``, default 0.8) plus, per task, the top ⌊(r − k)/T⌋
  directions of its delta projected off the common left subspace; both sets are
  concatenated, orthogonalized as in TSV-M, and given one isotropic singular value (the
  mean of the singular values they came with).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["iso_c", "iso_cts", "orthogonalize", "tsv_merge"]


def _stack(deltas: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Size, torch.dtype]:
    if len(deltas) < 1:
        raise ValueError("a merge needs at least one task vector")
    shape, dtype = deltas[0].shape, deltas[0].dtype
    for i, d in enumerate(deltas):
        if d.shape != shape:
            raise ValueError(f"task vector {i}: shape {tuple(d.shape)} differs from {tuple(shape)}")
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    return torch.stack([d.to(compute) for d in deltas]), shape, dtype


def _is_matrix(shape: torch.Size) -> bool:
    return len(shape) >= 2 and shape[0] > 1 and shape[1:].numel() > 1


def _mean(stack: torch.Tensor, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
    return stack.mean(0).reshape(shape).to(dtype)


def orthogonalize(basis: torch.Tensor) -> torch.Tensor:
    """The polar factor P Qᵀ of ``basis`` = P Σ Qᵀ: the matrix with orthonormal columns
    closest to it in Frobenius norm (columns must not outnumber rows)."""
    p, _, qh = torch.linalg.svd(basis, full_matrices=False)
    return p @ qh


def tsv_merge(deltas: Sequence[torch.Tensor]) -> torch.Tensor:
    """TSV-M merged delta of one parameter (see the module docstring)."""
    stack, shape, dtype = _stack(deltas)
    if not _is_matrix(shape):
        return _mean(stack, shape, dtype)
    matrices = stack.reshape(stack.shape[0], shape[0], -1)
    t, m, n = matrices.shape
    keep = max(1, min(m, n) // t)
    us, ss, vs = [], [], []
    for a in matrices.unbind(0):
        u, s, vh = torch.linalg.svd(a, full_matrices=False)
        us.append(u[:, :keep])
        ss.append(s[:keep])
        vs.append(vh[:keep].mT)
    u_cat, s_cat, v_cat = torch.cat(us, 1), torch.cat(ss), torch.cat(vs, 1)
    merged = orthogonalize(u_cat) @ torch.diag(s_cat) @ orthogonalize(v_cat).mT
    return merged.reshape(shape).to(dtype)


def iso_c(deltas: Sequence[torch.Tensor]) -> torch.Tensor:
    """Iso-C merged delta of one parameter: mean singular value · U Vᵀ of Σ Δ_i."""
    stack, shape, dtype = _stack(deltas)
    if not _is_matrix(shape):
        return _mean(stack, shape, dtype)
    total = stack.sum(0).reshape(shape[0], -1)
    u, s, vh = torch.linalg.svd(total, full_matrices=False)
    return (s.mean() * (u @ vh)).reshape(shape).to(dtype)


def iso_cts(deltas: Sequence[torch.Tensor], common_fraction: float = 0.8) -> torch.Tensor:
    """Iso-CTS merged delta of one parameter (see the module docstring)."""
    if not 0 <= common_fraction <= 1:
        raise ValueError(f"common_fraction must be in [0, 1], not {common_fraction}")
    stack, shape, dtype = _stack(deltas)
    if not _is_matrix(shape):
        return _mean(stack, shape, dtype)
    matrices = stack.reshape(stack.shape[0], shape[0], -1)
    t, m, n = matrices.shape
    r = min(m, n)
    u, s, vh = torch.linalg.svd(matrices.sum(0), full_matrices=False)
    k = int(common_fraction * r)
    per_task = (r - k) // t
    if k == 0 and per_task == 0:
        return (s.mean() * (u @ vh)).reshape(shape).to(dtype)
    us, vs, sigmas = [u[:, :k]], [vh[:k].mT], [s[:k]]
    if per_task > 0:
        common = u[:, :k]
        for a in matrices.unbind(0):
            residual = a - common @ (common.mT @ a)
            ut, st, vht = torch.linalg.svd(residual, full_matrices=False)
            us.append(ut[:, :per_task])
            vs.append(vht[:per_task].mT)
            sigmas.append(st[:per_task])
    sigma = torch.cat(sigmas).mean()
    merged = sigma * orthogonalize(torch.cat(us, 1)) @ orthogonalize(torch.cat(vs, 1)).mT
    return merged.reshape(shape).to(dtype)
