"""Exact bases and splits from LoRA factors: the factored route agrees with the dense route
(today's, on the dense ΔW) for bases, S Sᵀ, coefficients and parts; mixed families; the
decomposition job on a catalogue holding factored members."""

from __future__ import annotations

import math

import pytest
import torch
from tvsplit.storage.catalogue import Catalogue
from tvsplit.storage.lowrank import LowRankDelta
from tvsplit.tasks.decompose import decompose_layer, member_basis, split_from_bases
from tvsplit.tasks.decompose_job import SplitSettings, decompose_parameters, run_id


def planted_family(
    shape: tuple[int, ...],
    members: int = 4,
    rank: int = 6,
    shared: int = 2,
    *,
    transposed: bool = False,
    seed: int = 0,
) -> list[LowRankDelta]:
    """LoRA members whose ΔW share `shared` planted directions of the parameter's first
    dimension (the adapter's lora_B side, or lora_A's when `transposed`)."""
    generator = torch.Generator().manual_seed(seed)
    m, n = shape[0], math.prod(shape[1:])
    common = torch.linalg.qr(torch.randn(m, shared, generator=generator))[0]
    family = []
    for i in range(members):
        own = torch.randn(m, rank - shared, generator=generator)
        left = torch.cat([common * 3.0, own], dim=1)
        right = torch.randn(rank, n, generator=generator) / math.sqrt(n)
        up, down = (right.T.contiguous(), left.T.contiguous()) if transposed else (left, right)
        family.append(LowRankDelta(up, down, 0.5 + 0.25 * i, shape, transposed))
    return family


def projector(basis: torch.Tensor) -> torch.Tensor:
    return basis @ basis.mT


CASES = {
    "linear": dict(shape=(48, 40)),
    "fan-in-fan-out": dict(shape=(40, 48), transposed=True),
    "conv": dict(shape=(40, 4, 3, 3)),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("side", ["left", "right"])
def test_factored_basis_is_the_exact_svd(case: str, side: str) -> None:
    delta = planted_family(**CASES[case], members=1)[0]
    exact = member_basis(delta, side=side, max_rank_fraction=1.0)
    dense = member_basis(delta.dense(), side=side, solver="full", max_rank_fraction=1.0)
    assert exact.solver == "factored" and exact.rank == dense.rank == 6
    assert torch.allclose(exact.singular_values, dense.singular_values, rtol=1e-5)
    assert torch.allclose(projector(exact.left), projector(dense.left), atol=1e-5)
    assert torch.allclose(projector(exact.right), projector(dense.right), atol=1e-5)
    # rank rules apply to the exact spectrum, caps as for dense members
    assert member_basis(delta, rank="fixed:3", side=side).rank == 3
    assert member_basis(delta, rank="energy:1.0", max_rank_fraction=1.0, side=side).rank == 6


def test_rank_deficient_factors_drop_numerically_zero_values() -> None:
    generator = torch.Generator().manual_seed(1)
    up = torch.randn(64, 3, generator=generator) @ torch.randn(3, 8, generator=generator)
    delta = LowRankDelta(up, torch.randn(8, 50, generator=generator), 1.0, (64, 50))
    basis = member_basis(delta)
    assert basis.rank == 3 and basis.spectrum.numel() == 8


@pytest.mark.parametrize("case", list(CASES))
def test_factored_split_equals_dense_split(case: str) -> None:
    family = planted_family(**CASES[case])
    dense = torch.stack([d.dense() for d in family])
    kwargs = dict(min_tasks=3, max_rank_fraction=1.0, solver="full")
    factored_split = decompose_layer(family, **kwargs)
    dense_split = decompose_layer(dense, **kwargs)
    assert factored_split.k == dense_split.k == 2  # the planted directions
    assert torch.allclose(projector(factored_split.basis), projector(dense_split.basis), atol=1e-5)
    assert torch.allclose(factored_split.shared, dense_split.shared, atol=1e-5)
    assert torch.allclose(factored_split.unique, dense_split.unique, atol=1e-5)
    assert torch.allclose(factored_split.shared_energy, dense_split.shared_energy, atol=1e-5)
    # the parts add up to the member's ΔW; shared ⟂ unique
    total = factored_split.shared + factored_split.unique
    assert torch.allclose(total, dense, atol=1e-6 * dense.abs().max())
    inner = (factored_split.shared * factored_split.unique).sum(dim=tuple(range(1, dense.ndim)))
    assert inner.abs().max() <= 1e-5 * dense.square().sum() / len(family)


def test_mixed_family_equals_all_dense() -> None:
    family = planted_family((48, 40))
    dense = [d.dense() for d in family]
    mixed = [family[0], dense[1], family[2], dense[3]]
    bases = [member_basis(d, max_rank_fraction=1.0, solver="full") for d in mixed]
    split = split_from_bases(mixed, bases, min_tasks=3)
    reference = decompose_layer(torch.stack(dense), min_tasks=3, max_rank_fraction=1.0)
    assert {b.solver for b in bases} == {"factored", "full"}
    assert torch.allclose(projector(split.basis), projector(reference.basis), atol=1e-5)
    # the shared parts S C_i, not C itself: a basis is defined up to the signs of its columns
    assert torch.allclose(
        split.basis @ split.coefficients, reference.basis @ reference.coefficients, atol=1e-5
    )
    for i in range(4):
        assert torch.allclose(split.unique_member(i), reference.unique_member(i), atol=1e-5)


def _write_family(url: str, family: list[LowRankDelta], factored: set[int]) -> Catalogue:
    catalogue = Catalogue(url)
    base = catalogue.writer("fam", None, {"source": "base"})
    base.write("w", torch.zeros(family[0].shape), {"kind": "weights"})
    base.write("b", torch.zeros(family[0].shape[0]), {"kind": "weights"})
    base.finish(["w", "b"], {})
    for i, delta in enumerate(family):
        writer = catalogue.writer("fam", f"m{i}", {"source": f"m{i}"})
        if i in factored:
            writer.write_factors("w", delta, {"kind": "lora-delta"})
        else:
            writer.write("w", delta.dense(), {"kind": "lora-delta"})
        writer.write("b", torch.full((family[0].shape[0],), float(i)), {"kind": "delta"})
        writer.finish(["w", "b"], {})
    return catalogue


def test_decompose_job_reads_factored_members_as_factors(tmp_path) -> None:
    family = planted_family((48, 40))
    members = [f"m{i}" for i in range(4)]
    settings = SplitSettings(min_tasks=3, max_rank_fraction=1.0)
    results = {}
    for label, factored in (("factored", {0, 1, 2, 3}), ("mixed", {1, 3}), ("dense", set())):
        url = str(tmp_path / f"{label}.zarr")
        catalogue = _write_family(url, family, factored)
        fingerprints = {m: m for m in members}
        run = run_id("fam", members, settings, fingerprints)
        reports, failures = decompose_parameters(
            url, "fam", run, ["w", "b"], members, fingerprints, settings
        )
        assert not failures and len(reports) == 2
        from tvsplit.storage.decompositions import DecompositionRun

        results[label] = DecompositionRun(catalogue, "fam", run).read_parameter("w")
        solvers = {r["name"]: r for r in reports}
        assert solvers["w"]["k"] == 2
    for label in ("factored", "mixed"):
        got, want = results[label].arrays, results["dense"].arrays
        assert torch.allclose(projector(got["basis"]), projector(want["basis"]), atol=1e-5)
        assert torch.allclose(  # shared parts: a basis is defined up to column signs
            got["basis"] @ got["coefficients"], want["basis"] @ want["coefficients"], atol=1e-5
        )
