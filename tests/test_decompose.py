"""The guarantees of METHOD.md for the decomposition engine, on small and planted families."""

from __future__ import annotations

import pytest
import torch
from tvsplit.tasks.decompose import (
    decompose_layer,
    member_basis,
    split_from_bases,
)
from tvsplit.tasks.synthetic import planted_family, principal_angles_deg, recovery

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _projector(basis: torch.Tensor) -> torch.Tensor:
    return basis.double() @ basis.double().T


def assert_exact_split(split, deltas: torch.Tensor, cross: bool = True) -> None:
    """shared + unique = delta, Frobenius orthogonality within (and across) members."""
    shared, unique = split.shared.double(), split.unique.double()
    d = deltas.double()
    f64 = deltas.dtype == torch.float64
    rel = (shared + unique - d).norm() / d.norm()
    assert rel <= (1e-12 if f64 else 1e-6)
    tol = 1e-12 if f64 else 1e-5
    for i in range(d.shape[0]):
        energy = float(d[i].square().sum())
        assert abs(float((shared[i] * unique[i]).sum())) <= tol * energy
        if cross:
            for j in range(d.shape[0]):
                other = float(d[j].square().sum())
                assert abs(float((shared[i] * unique[j]).sum())) <= tol * max(energy, other)


@pytest.fixture(scope="module")
def family():
    return planted_family(96, 128, 6, shared_rank=4, unique_rank=5, noise=0.05, seed=3)


@pytest.mark.parametrize("method", ["mean-projector", "projector-product", "pairwise"])
@pytest.mark.parametrize("two_sided", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("device", DEVICES)
def test_split_is_exact_and_orthogonal(family, method, two_sided, dtype, device):
    deltas = family.deltas.to(device=device, dtype=dtype)
    split = decompose_layer(deltas, method=method, two_sided=two_sided, min_tasks=None)
    assert split.shared.shape == deltas.shape and split.shared.dtype == dtype
    assert split.shared.device.type == device
    assert_exact_split(split, deltas, cross=method != "pairwise")
    bases = split.basis if isinstance(split.basis, tuple) else (split.basis,)
    for s in bases:
        eye = torch.eye(s.shape[1], dtype=torch.float64, device=device)
        assert torch.allclose(s.double().T @ s.double(), eye, atol=1e-5)
    assert split.k and (split.right_basis is not None) == two_sided


def test_shared_parts_come_from_the_compact_form(family):
    split = decompose_layer(family.deltas, two_sided=True)
    s, r = split.basis, split.right_basis
    for i in range(family.deltas.shape[0]):
        c = s.T @ family.deltas[i] @ r
        assert torch.allclose(split.coefficients[i], c, atol=1e-5)
        assert torch.allclose(split.shared_member(i), s @ c @ r.T, atol=1e-5)
        assert torch.allclose(split.unique_member(i), family.deltas[i] - s @ c @ r.T, atol=1e-5)
    energy = split.shared_energy
    expected = split.shared.double().square().sum((1, 2)) / family.deltas.double().square().sum(
        (1, 2)
    )
    assert torch.allclose(energy, expected, atol=1e-6)


@pytest.mark.parametrize("solver", ["randomized", "full"])
def test_deterministic_for_a_seed(solver):
    fam = planted_family(320, 300, 4, shared_rank=4, unique_rank=6, noise=0.1, seed=5)
    first = decompose_layer(fam.deltas, solver=solver, seed=7)
    second = decompose_layer(fam.deltas, solver=solver, seed=7)
    assert torch.equal(_projector(first.basis), _projector(second.basis))
    assert torch.equal(first.shared, second.shared)


def test_mean_projector_does_not_depend_on_member_order(family):
    order = torch.tensor([3, 0, 5, 1, 4, 2])
    split = decompose_layer(family.deltas)
    permuted = decompose_layer(family.deltas[order])
    assert split.k == permuted.k
    assert torch.allclose(_projector(split.basis), _projector(permuted.basis), atol=1e-5)
    assert torch.allclose(split.shared[order], permuted.shared, atol=1e-5)


@pytest.mark.parametrize("method", ["mean-projector", "projector-product", "pairwise"])
def test_decompose_layer_is_member_basis_then_split(family, method):
    kwargs = dict(rank="gavish-donoho", max_rank_fraction=0.25, side="left", seed=1)
    bases = [member_basis(d, **kwargs) for d in family.deltas]
    direct = decompose_layer(family.deltas, method=method, two_sided=True, **kwargs)
    composed = split_from_bases(family.deltas, bases, method=method, two_sided=True)
    assert direct.ranks == composed.ranks
    assert torch.equal(direct.shared, composed.shared)
    assert torch.equal(direct.unique, composed.unique)


# Planted recovery at the scale METHOD.md reports (m = n = 768, T = 8, 8 common + 16 own).
PROTOTYPE_ANGLE = {0.05: 1.0, 0.1: 3.0, 0.2: 6.0}


@pytest.fixture(scope="module", params=[0.05, 0.1, 0.2])
def planted(request):
    return request.param, planted_family(768, 768, 8, noise=request.param, seed=11)


def test_mean_projector_recovers_planted_shared_directions(planted):
    noise, fam = planted
    split = decompose_layer(fam.deltas)
    found = recovery(split.basis, fam)
    assert found.all_found, found
    assert found.max_angle_deg <= PROTOTYPE_ANGLE[noise]
    assert found.leak <= 0.02
    assert split.ranks == (24,) * 8
    eig = split.eigenvalues
    assert float(eig[7]) >= 0.95 and float(eig[8]) <= 0.23  # prototype gap: 0.98 vs 0.23
    assert split.chance == pytest.approx(0.26, abs=0.02)
    assert_exact_split(split, fam.deltas)


def test_projector_product_recovers_at_low_noise(planted):
    noise, fam = planted
    split = decompose_layer(fam.deltas, method="projector-product")
    found = recovery(split.basis, fam)
    if noise <= 0.1:  # prototype: 8/8 at 5°–11° for σ ≤ 0.1, 0/8 at σ = 0.2
        assert found.all_found and found.max_angle_deg <= 11.0, found
    else:
        assert found.found <= 8 and found.leak <= 0.02
    assert float(split.eigenvalues[0]) <= 1.0 and split.chance < 0.1


def test_pairwise_finds_the_common_directions_in_every_member(planted):
    noise, fam = planted
    split = decompose_layer(fam.deltas, method="pairwise")
    assert split.threshold_used == 0.5
    for i, s in enumerate(split.basis):
        assert s.shape[1] == 8
        # S_i lies inside one member's estimate U_i: no averaging over members, so looser.
        assert float(principal_angles_deg(s, fam.common).max()) <= 3 * PROTOTYPE_ANGLE[noise]
        own = fam.own[i]
        assert float(principal_angles_deg(s, own).min()) >= 60.0  # nothing of its own inside


def _concept_family():
    """8 members: concept a in all, b in members 0-3, c in members 0-1, two own directions each."""
    g = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(64, 3 + 16, generator=g, dtype=torch.float64))
    a, b, c = q[:, 0:1], q[:, 1:2], q[:, 2:3]
    deltas = []
    for i in range(8):
        cols = [a] + ([b] if i < 4 else []) + ([c] if i < 2 else []) + [q[:, 3 + 2 * i : 5 + 2 * i]]
        u = torch.cat(cols, 1)
        v, _ = torch.linalg.qr(torch.randn(48, u.shape[1], generator=g, dtype=torch.float64))
        deltas.append(u @ torch.diag(torch.linspace(1, 2, u.shape[1], dtype=torch.float64)) @ v.T)
    return torch.stack(deltas), a, b, c


@pytest.mark.parametrize(
    ("method", "min_tasks", "expected"),
    [
        ("mean-projector", None, "a"),
        ("mean-projector", 4, "ab"),
        ("mean-projector", 2, "abc"),
        ("projector-product", None, "a"),
    ],
)
def test_concepts_shared_by_all_half_and_two(method, min_tasks, expected):
    deltas, a, b, c = _concept_family()
    split = decompose_layer(deltas, method=method, min_tasks=min_tasks, max_rank_fraction=1.0)
    concepts = {"a": a, "b": b, "c": c}
    truth = torch.cat([concepts[x] for x in expected], 1)
    assert split.k == len(expected)
    assert torch.allclose(_projector(split.basis), truth @ truth.T, atol=1e-8)
    if method == "mean-projector":  # a direction in exactly j of 8 members has eigenvalue j/8
        assert torch.allclose(
            split.eigenvalues[:3], torch.tensor([1.0, 0.5, 0.25], dtype=torch.float64), atol=1e-10
        )


@pytest.mark.parametrize(
    ("min_tasks", "member_concepts"),
    [
        (2, ["abc", "abc", "ab", "ab", "a", "a", "a", "a"]),
        (4, ["ab"] * 4 + ["a"] * 4),
        (5, ["a"] * 8),
    ],
)
def test_pairwise_concepts_per_member(min_tasks, member_concepts):
    deltas, a, b, c = _concept_family()
    split = decompose_layer(deltas, method="pairwise", min_tasks=min_tasks, max_rank_fraction=1.0)
    concepts = {"a": a, "b": b, "c": c}
    for s, expected in zip(split.basis, member_concepts, strict=True):
        truth = torch.cat([concepts[x] for x in expected], 1)
        assert torch.allclose(_projector(s), truth @ truth.T, atol=1e-8)


def test_all_zero_member_has_zero_parts(family):
    deltas = family.deltas.clone()
    deltas[2] = 0
    split = decompose_layer(deltas)
    assert split.ranks[2] == 0
    assert torch.count_nonzero(split.shared[2]) == 0 and torch.count_nonzero(split.unique[2]) == 0
    assert float(split.shared_energy[2]) == 0.0
    assert_exact_split(split, deltas)


def test_all_zero_family_is_all_zero():
    split = decompose_layer(torch.zeros(3, 10, 12))
    assert split.k == 0 and split.ranks == (0, 0, 0) and split.chance == 0.0
    assert torch.count_nonzero(split.shared) == 0 and torch.count_nonzero(split.unique) == 0


@pytest.mark.parametrize("policy", ["unique", "rank1"])
def test_one_d_parameters(policy):
    g = torch.Generator().manual_seed(0)
    base = torch.randn(40, generator=g)
    collinear = torch.stack([base * s for s in (1.0, 2.0, -0.5)]) + 1e-4 * torch.randn(
        3, 40, generator=g
    )
    split = decompose_layer(collinear, one_d=policy)
    assert_exact_split(split, collinear)
    if policy == "unique":
        assert split.k == 0 and torch.count_nonzero(split.shared) == 0
    else:
        assert split.k == 1 and float(split.shared_energy.min()) > 0.99
    scattered = torch.randn(3, 40, generator=g)
    assert decompose_layer(scattered, one_d="rank1").k == 0  # not collinear: nothing shared


def test_sides_are_transposes_of_each_other(family):
    left = decompose_layer(family.deltas.mT.contiguous(), side="left")
    right = decompose_layer(family.deltas, side="right")
    assert right.side == "right" and right.basis.shape[0] == family.deltas.shape[2]
    assert torch.allclose(left.shared.mT, right.shared, atol=1e-5)
    wide = decompose_layer(torch.randn(3, 8, 50), side="auto")
    tall = decompose_layer(torch.randn(3, 50, 8), side="auto")
    assert wide.side == "left" and tall.side == "right"
    assert wide.basis.shape[0] == 8 and tall.basis.shape[0] == 8


def test_convolution_is_split_as_out_by_rest():
    g = torch.Generator().manual_seed(2)
    common = torch.randn(16, 1, generator=g)
    deltas = torch.stack(
        [
            common @ torch.randn(1, 8 * 9, generator=g) + 0.01 * torch.randn(16, 72, generator=g)
            for _ in range(4)
        ]
    )
    conv = deltas.reshape(4, 16, 8, 3, 3)
    split = decompose_layer(conv)
    assert split.shared.shape == conv.shape and split.basis.shape == (16, 1)
    flat = decompose_layer(deltas)
    assert torch.allclose(split.shared.reshape(4, 16, 72), flat.shared)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_is_computed_in_float32(family, dtype):
    deltas = family.deltas.to(dtype)
    split = decompose_layer(deltas)
    reference = decompose_layer(deltas.float())
    assert split.shared.dtype == dtype and split.unique.dtype == dtype
    assert torch.equal(split.shared, reference.shared.to(dtype))
    assert torch.equal(split.unique, reference.unique.to(dtype))
