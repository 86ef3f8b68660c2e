"""Synthetic families with planted shared and unique structure, and how well a split
recovers it. Used by the demo, the tests and the benchmarks (pure math, no I/O)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PlantedFamily:
    """T members Δ_i = S D_i V_iᵀ + U_i E_i W_iᵀ + N_i of one (m × n) parameter.

    ``common`` is S (m × s): directions every member uses, each with its own right vectors
    (members share output directions, not an update). ``own[i]`` is U_i (m × u).
    ``unique_signal[i]`` is U_i E_i W_iᵀ. Signal singular values are drawn in [1, 2]; noise
    entries are N(0, σ²/n), so ‖N_i‖₂ ≈ σ(1 + √(m/n)) (≈ 2σ for a square matrix).
    """

    deltas: torch.Tensor
    common: torch.Tensor
    own: tuple[torch.Tensor, ...]
    unique_signal: torch.Tensor


def _orthonormal(
    rows: int, cols: int, generator: torch.Generator, dtype: torch.dtype
) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(rows, cols, generator=generator, dtype=torch.float64))
    return q.to(dtype)


def planted_family(
    m: int,
    n: int,
    members: int,
    *,
    shared_rank: int = 8,
    unique_rank: int = 16,
    noise: float = 0.1,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> PlantedFamily:
    """A family whose members share ``shared_rank`` left directions and each own
    ``unique_rank`` more, plus Gaussian noise of level ``noise``."""
    needed = shared_rank + members * unique_rank
    if needed > m:
        raise ValueError(
            f"a planted family needs m >= shared_rank + members * unique_rank = {needed}, got m = {m}"
        )
    g = torch.Generator().manual_seed(seed)
    directions = _orthonormal(m, shared_rank + members * unique_rank, g, torch.float64)
    common = directions[:, :shared_rank]
    own, deltas, unique = [], [], []
    for i in range(members):
        start = shared_rank + i * unique_rank
        u = directions[:, start : start + unique_rank]
        v = _orthonormal(n, shared_rank, g, torch.float64)
        w = _orthonormal(n, unique_rank, g, torch.float64)
        d = 1 + torch.rand(shared_rank, generator=g, dtype=torch.float64)
        e = 1 + torch.rand(unique_rank, generator=g, dtype=torch.float64)
        unique_part = (u * e) @ w.T
        noise_part = torch.randn(m, n, generator=g, dtype=torch.float64) * (noise / math.sqrt(n))
        deltas.append((common * d) @ v.T + unique_part + noise_part)
        own.append(u.to(dtype))
        unique.append(unique_part)
    return PlantedFamily(
        deltas=torch.stack(deltas).to(dtype),
        common=common.to(dtype),
        own=tuple(own),
        unique_signal=torch.stack(unique).to(dtype),
    )


def principal_angles_deg(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Principal angles (degrees, ascending) between the column spans of ``a`` and ``b``."""
    if a.shape[1] == 0 or b.shape[1] == 0:
        return torch.zeros(0, dtype=torch.float64)
    qa, _ = torch.linalg.qr(a.double())
    qb, _ = torch.linalg.qr(b.double())
    cosines = torch.linalg.svdvals(qa.T @ qb).clamp(-1.0, 1.0)
    return torch.rad2deg(torch.arccos(cosines))


@dataclass(frozen=True)
class Recovery:
    """How a shared basis S compares with a planted family's truth."""

    found: int
    planted: int
    max_angle_deg: float
    leak: float

    @property
    def all_found(self) -> bool:
        return self.found == self.planted


def recovery(basis: torch.Tensor, family: PlantedFamily) -> Recovery:
    """Directions found, the largest principal angle between S and the planted common
    directions (over min(k, s) angles; 90° if none found), and the leak: the largest share
    of a member's planted unique signal that falls inside span S."""
    angles = principal_angles_deg(basis, family.common)
    s = basis.double()
    leaks = [
        float((s @ (s.T @ part.double())).square().sum() / part.double().square().sum())
        for part in family.unique_signal
    ]
    return Recovery(
        found=basis.shape[1],
        planted=family.common.shape[1],
        max_angle_deg=float(angles.max()) if angles.numel() else 90.0,
        leak=max(leaks) if basis.shape[1] else 0.0,
    )
