"""Per-member rank selection: how many singular directions of one task vector are signal.

Rules (METHOD.md): ``gavish-donoho`` (default), ``energy:e``, ``fixed:r``, ``fraction:f``.
Every rule is capped by ``max_rank_fraction`` and by the numerical rank, so an exactly
low-rank delta (a LoRA ΔW) never picks up round-off directions.

Two solvers give the spectrum: a full thin SVD, or a seeded randomized sketch (Halko et
al.) that grows until the rule's cut-off lies inside what it has sketched. With a sketch,
Gavish–Donoho uses the known-noise threshold λ*(β)·√n·σ̂, the noise level σ̂ estimated
from the energy the sketch leaves behind, corrected for the Marchenko–Pastur quantile
that energy belongs to; so the default never needs a full SVD.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from tvsplit.tasks.rank_rule import (  # noqa: F401 (re-exported: the rules beside their use)
    RULES,
    RankRule,
    RankRuleError,
    parse_rank_rule,
)
from tvsplit.tasks.task_vector import energy

OVERSAMPLE = 10
POWER_ITERATIONS = 2
FIRST_SKETCH_RANK = 32
# Below this short side a full SVD costs a few milliseconds; above it the sketch wins.
FULL_SVD_MAX_SHORT_SIDE = 256


def gd_omega(beta: float) -> float:
    """Gavish–Donoho ω(β) for unknown noise: threshold = ω(β)·median(σ)."""
    return 0.56 * beta**3 - 0.95 * beta**2 + 1.82 * beta + 1.43


def gd_lambda_known(beta: float) -> float:
    """Gavish–Donoho λ*(β) for known noise σ: threshold = λ*(β)·√n·σ (n the long side)."""
    return math.sqrt(2 * (beta + 1) + 8 * beta / ((beta + 1) + math.sqrt(beta**2 + 14 * beta + 1)))


@lru_cache(maxsize=256)
def _mp_tables(beta_key: int) -> tuple[np.ndarray, np.ndarray]:
    """CDF and cumulative first moment of the Marchenko–Pastur law (ratio β, mean 1)."""
    beta = beta_key / 10_000
    lo, hi = (1 - math.sqrt(beta)) ** 2, (1 + math.sqrt(beta)) ** 2
    # Cosine-spaced grid: dense at the edges, where the density has square-root behaviour.
    t = np.linspace(0.0, 1.0, 8193)
    x = lo + (hi - lo) * (1 - np.cos(np.pi * t)) / 2
    x = np.maximum(x, 1e-12)
    density = np.sqrt(np.maximum((hi - x) * (x - lo), 0.0)) / (2 * np.pi * beta * x)
    dx = np.diff(x)
    mass = np.concatenate([[0.0], np.cumsum((density[1:] + density[:-1]) / 2 * dx)])
    moment = np.concatenate(
        [[0.0], np.cumsum((density[1:] * x[1:] + density[:-1] * x[:-1]) / 2 * dx)]
    )
    return mass / mass[-1], moment / moment[-1]


def mp_bottom_energy_fraction(beta: float, fraction: float) -> float:
    """Share of a pure-noise matrix's energy held by its smallest ``fraction`` of singular values."""
    if fraction <= 0:
        return 0.0
    if fraction >= 1:
        return 1.0
    cdf, moment = _mp_tables(max(1, round(min(beta, 1.0) * 10_000)))
    return float(np.interp(fraction, cdf, moment))


def numerical_rank(sigma: torch.Tensor, m: int, n: int) -> int:
    """Count of σ above eps·σ_max·max(m, n): directions that are not round-off."""
    if sigma.numel() == 0 or float(sigma[0]) <= 0:
        return 0
    tol = torch.finfo(sigma.dtype).eps * float(sigma[0]) * max(m, n)
    return int((sigma > tol).sum())


def rank_cap(m: int, n: int, max_rank_fraction: float) -> int:
    """The largest rank any rule may choose: max(1, ⌊fraction·min(m, n)⌋)."""
    return max(1, int(max_rank_fraction * min(m, n)))


@dataclass(frozen=True)
class Spectrum:
    """Top singular triplets of a matrix, from a full SVD or a sketch.

    ``complete`` is True for a full SVD. For a sketch, ``residual_energy`` is what the
    sketch left behind: ‖A‖² − ‖QᵀA‖².
    """

    left: torch.Tensor
    sigma: torch.Tensor
    right: torch.Tensor
    total_energy: float
    complete: bool
    residual_energy: float = 0.0


def full_spectrum(a: torch.Tensor) -> Spectrum:
    """Thin SVD of ``a`` (m × n)."""
    u, s, vh = torch.linalg.svd(a, full_matrices=False)
    return Spectrum(u, s, vh.mT, float(s.double().square().sum()), complete=True)


def sketched_spectrum(
    a: torch.Tensor, width: int, generator: torch.Generator, power_iterations: int
) -> Spectrum:
    """Randomized SVD (Halko, Martinsson & Tropp, alg. 4.4 + 5.1) at ``width`` columns.

    Deterministic for a given generator state. Re-orthonormalizes between power
    iterations, which keeps float32 accurate.
    """
    n = a.shape[1]
    omega = torch.randn(n, width, generator=generator, device=a.device, dtype=a.dtype)
    q, _ = torch.linalg.qr(a @ omega)
    for _ in range(power_iterations):
        z, _ = torch.linalg.qr(a.mT @ q)
        q, _ = torch.linalg.qr(a @ z)
    b = q.mT @ a
    ub, s, vh = torch.linalg.svd(b, full_matrices=False)
    total = energy(a)
    captured = energy(b)
    return Spectrum(
        q @ ub, s, vh.mT, total, complete=False, residual_energy=max(total - captured, 0.0)
    )


def rule_rank(rule: RankRule, spectrum: Spectrum, m: int, n: int) -> int:
    """Rank the rule asks for, from what the spectrum shows (before caps)."""
    sigma = spectrum.sigma
    short, long_ = min(m, n), max(m, n)
    beta = short / long_
    if rule.kind == "fixed":
        return int(rule.value)
    if rule.kind == "fraction":
        return math.ceil(rule.value * short)
    if rule.kind == "energy":
        if spectrum.total_energy <= 0:
            return 0
        cumulative = torch.cumsum(sigma.double().square(), 0) / spectrum.total_energy
        reached = (cumulative < rule.value - 1e-12).sum()
        return int(reached) + 1
    # Gavish–Donoho
    if spectrum.complete:
        threshold = gd_omega(beta) * float(sigma.median())
    else:
        remaining = short - sigma.numel()
        tail = mp_bottom_energy_fraction(beta, remaining / short)
        noise_var = spectrum.residual_energy / (short * long_ * tail) if tail > 0 else 0.0
        threshold = gd_lambda_known(beta) * math.sqrt(long_ * noise_var)
    return int((sigma > threshold).sum())


@dataclass(frozen=True)
class RankChoice:
    """The chosen rank and the spectrum it came from."""

    rank: int
    spectrum: Spectrum
    solver: str


def choose_rank(
    a: torch.Tensor,
    rule: RankRule,
    *,
    max_rank_fraction: float,
    solver: str,
    generator: torch.Generator,
) -> RankChoice:
    """Rank of ``a`` under ``rule``, capped by ``max_rank_fraction`` and the numerical rank.

    ``solver``: ``"full"``, ``"randomized"`` or ``"auto"`` (full SVD when the short side is
    at most FULL_SVD_MAX_SHORT_SIDE). A sketch starts at FIRST_SKETCH_RANK (or the rule's
    fixed rank) and doubles while the rule's cut-off reaches its edge, up to the cap.
    """
    m, n = a.shape
    short = min(m, n)
    cap = rank_cap(m, n, max_rank_fraction)
    use_full = solver == "full" or (solver == "auto" and short <= FULL_SVD_MAX_SHORT_SIDE)
    if not use_full:
        if rule.kind in ("fixed", "fraction"):
            target = min(cap, rule_rank(rule, Spectrum(a, a.new_zeros(0), a, 0.0, True), m, n))
        else:
            target = min(cap, FIRST_SKETCH_RANK)
        while True:
            width = target + OVERSAMPLE
            if 2 * width > short:
                use_full = True  # the sketch would cost about as much as the full SVD
                break
            spectrum = sketched_spectrum(a, width, generator, POWER_ITERATIONS)
            wanted = rule_rank(rule, spectrum, m, n)
            if rule.kind in ("fixed", "fraction") or wanted < target or target >= cap:
                break
            target = min(cap, 2 * target)
    if use_full:
        spectrum = full_spectrum(a)
        wanted = rule_rank(rule, spectrum, m, n)
    rank = min(wanted, cap, numerical_rank(spectrum.sigma, m, n))
    return RankChoice(rank, spectrum, "full" if spectrum.complete else "randomized")
