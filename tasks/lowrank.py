"""Exact linear algebra on deltas kept as factors (ΔW = L @ R, L m × r, R r × n).

Nothing here forms an m × n matrix: the thin SVD comes from a QR of L and of Rᵀ and an
r × r core SVD, in O((m + n) r²); projections, energies and inner products go through r × r
or k × r products. No I/O.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tvsplit.storage.lowrank import LowRankDelta
from tvsplit.tasks.ranks import Spectrum


@dataclass(frozen=True)
class Factors:
    """An oriented delta A = left @ right (m × n), never formed unless ``dense`` is called."""

    left: torch.Tensor
    right: torch.Tensor

    @classmethod
    def of(cls, delta: LowRankDelta, side: str, dtype: torch.dtype) -> Factors:
        """The delta's matrix (first dimension × the rest), transposed for ``side="right"``."""
        left, right = delta.factors()
        left, right = left.to(dtype), right.to(dtype)
        return cls(left, right) if side == "left" else cls(right.mT, left.mT)

    @property
    def shape(self) -> tuple[int, int]:
        return self.left.shape[0], self.right.shape[1]

    @property
    def dtype(self) -> torch.dtype:
        return self.left.dtype

    @property
    def device(self) -> torch.device:
        return self.left.device

    def dense(self) -> torch.Tensor:
        return self.left @ self.right

    def project(self, basis: torch.Tensor) -> torch.Tensor:
        """basisᵀ A (k × n) as (basisᵀ L) R."""
        return (basis.mT @ self.left) @ self.right

    def energy(self) -> float:
        """‖A‖_F² = Σ (LᵀL) ∘ (R Rᵀ), in float64."""
        left, right = self.left.double(), self.right.double()
        return float(((left.mT @ left) * (right @ right.mT)).sum())


def factored_spectrum(factors: Factors) -> Spectrum:
    """The exact thin SVD of A = L R: QR of L and of Rᵀ, SVD of the r × r core.

    Returns every singular triplet (r of them; those of a rank-deficient pair are at
    round-off level and the caller drops them with the numerical-rank rule)."""
    q_left, r_left = torch.linalg.qr(factors.left)
    q_right, r_right = torch.linalg.qr(factors.right.mT)
    u, sigma, vh = torch.linalg.svd(r_left @ r_right.mT)
    return Spectrum(
        q_left @ u,
        sigma,
        q_right @ vh.mT,
        float(sigma.double().square().sum()),
        complete=True,
    )
