"""Shared-subspace estimators over the members' orthonormal bases U_i (m × r_i).

- ``mean_projector``: eigenvectors of M = (1/T) Σ U_i U_iᵀ with eigenvalue ≥ τ, from the
  thin SVD of B = [U_1 … U_T] (eigenvalue = s²/T); never forms an m × m matrix and does not
  depend on member order.
- ``projector_product``: right singular vectors of P_1⋯P_T (restricted to span B, where the
  product lives) with singular value ≥ τ; 1 means "in every subspace".
- ``pairwise``: per member i, eigenvectors V of U_iᵀ(Σ_{l≠i} P_l)U_i with eigenvalue ≥ j − 1.5
  ("found in at least j − 1 other members"); S_i = U_i V.

Chance levels say how high the top eigenvalue gets for random subspaces of the same ranks:
in closed form (free probability) for the mean projector, by one seeded draw otherwise.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import numpy as np
import torch


def _stack(bases: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.cat(list(bases), dim=1)


def mean_projector(
    bases: Sequence[torch.Tensor], threshold: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """S (m × k, orthonormal) and the nonzero eigenvalues of M (descending, in [0, 1])."""
    stacked = _stack(bases)
    if stacked.shape[1] == 0:
        return stacked[:, :0], stacked.new_zeros(0)
    w, s, _ = torch.linalg.svd(stacked, full_matrices=False)
    eigenvalues = (s.square() / len(bases)).clamp(0.0, 1.0)
    k = int((eigenvalues >= threshold).sum())
    return w[:, :k], eigenvalues


def _span(stacked: torch.Tensor) -> torch.Tensor:
    """Orthonormal basis of the column span of ``stacked`` (numerically nonzero directions)."""
    w, s, _ = torch.linalg.svd(stacked, full_matrices=False)
    if s.numel() == 0 or float(s[0]) == 0.0:
        return w[:, :0]
    tol = torch.finfo(s.dtype).eps * float(s[0]) * max(stacked.shape)
    return w[:, : int((s > tol).sum())]


def projector_product(
    bases: Sequence[torch.Tensor], threshold: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """S (m × k, orthonormal) and the singular values of P_1⋯P_T on span B (descending)."""
    if any(b.shape[1] == 0 for b in bases):
        empty = bases[0][:, :0]
        return empty, empty.new_zeros(0)
    span = _span(_stack(bases))
    image = span
    for u in reversed(bases):  # P_T acts first
        image = u @ (u.mT @ image)
    _, sv, vh = torch.linalg.svd(image, full_matrices=False)
    sv = sv.clamp(0.0, 1.0)
    k = int((sv >= threshold).sum())
    return span @ vh[:k].mT, sv


def pairwise(
    bases: Sequence[torch.Tensor], min_tasks: int
) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
    """Per member: S_i (m × k_i, orthonormal, inside span U_i) and its eigenvalues (descending).

    Eigenvalues count, for a direction of U_i, in how many other members it lies (each
    contributes cos² of its angle), so ``min_tasks=j`` keeps those ≥ j − 1 − ½.
    """
    return pairwise_cut(bases, min_tasks - 1.5)


def pairwise_cut(
    bases: Sequence[torch.Tensor], cut: float
) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
    """``pairwise`` keeping the directions whose eigenvalue is ≥ ``cut``."""
    shared, spectra = [], []
    for i, u in enumerate(bases):
        gram = u.new_zeros(u.shape[1], u.shape[1])
        for j, other in enumerate(bases):
            if j != i:
                overlap = u.mT @ other
                gram += overlap @ overlap.mT
        values, vectors = torch.linalg.eigh(gram)
        values, vectors = values.flip(0), vectors.flip(1)
        k = int((values >= cut).sum())
        shared.append(u @ vectors[:, :k])
        spectra.append(values.clamp_min(0.0))
    return tuple(shared), tuple(spectra)


def _bernoulli_r_transform(g: np.ndarray, c: float) -> np.ndarray:
    """R-transform of (1 − c)·δ_0 + c·δ_1, the spectrum of a projector of relative rank c."""
    return ((g - 1) + np.sqrt((g + 1) ** 2 - 4 * g * (1 - c))) / (2 * g)


@lru_cache(maxsize=4096)
def _free_edge(fractions: tuple[float, ...]) -> float:
    t = len(fractions)
    g = np.geomspace(1e-5, 1e5, 40001)
    k = sum(_bernoulli_r_transform(g / t, c) for c in fractions) / t + 1 / g
    return float(np.clip(k.min(), 0.0, 1.0))


def mean_projector_chance(ranks: Sequence[int], dim: int) -> float:
    """Top eigenvalue of (1/T) Σ P_i for random subspaces of these ranks in ``dim`` dimensions.

    The upper edge of the free additive convolution of the projectors' spectra (asymptotic
    in ``dim``; within 0.01–0.03 of a simulation at dim = 100–768). Directions that any T
    subspaces must share because their ranks add up past the dimension raise it to 1.
    """
    if dim <= 0 or not any(ranks):
        return 0.0
    if sum(ranks) - (len(ranks) - 1) * dim > 0:
        return 1.0
    return _free_edge(tuple(round(r / dim, 4) for r in ranks))


def mean_projector_chance_like(ranks: Sequence[int], dim: int, like: torch.Tensor) -> float:
    """``mean_projector_chance`` with the signature of the other chance levels."""
    return mean_projector_chance(ranks, dim)


def _random_bases(
    ranks: Sequence[int], dim: int, like: torch.Tensor, seed: int
) -> list[torch.Tensor]:
    generator = torch.Generator(device=like.device).manual_seed(seed)
    return [
        torch.linalg.qr(
            torch.randn(dim, r, generator=generator, device=like.device, dtype=like.dtype)
        )[0]
        for r in ranks
    ]


def projector_product_chance(
    ranks: Sequence[int], dim: int, like: torch.Tensor, seed: int = 0
) -> float:
    """Top singular value of P_1⋯P_T for one seeded draw of random subspaces of these ranks."""
    if dim <= 0 or not all(ranks):
        return 0.0
    _, sv = projector_product(_random_bases(ranks, dim, like, seed), threshold=2.0)
    return float(sv[0]) if sv.numel() else 0.0


def pairwise_chance(
    ranks: Sequence[int], dim: int, like: torch.Tensor, seed: int = 0
) -> tuple[float, ...]:
    """Per member, the top pairwise eigenvalue for one seeded draw of random subspaces."""
    if dim <= 0:
        return tuple(0.0 for _ in ranks)
    _, spectra = pairwise(_random_bases(ranks, dim, like, seed), min_tasks=10**9)
    return tuple(float(s[0]) if s.numel() else 0.0 for s in spectra)
