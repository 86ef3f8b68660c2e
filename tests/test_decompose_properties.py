"""Property tests over shapes, family sizes, dtypes and settings (hypothesis).

The engine's float32 (and bf16/fp16) results are compared with ``reference_shared``, a plain
NumPy float64 computation of METHOD.md's definitions (SVD per member, the estimator's
matrix formed explicitly and eigen- or singular-decomposed, S Sᵀ A_i (R Rᵀ)), never with the
engine run twice.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from tvsplit.tasks.decompose import decompose_layer

SHAPES = st.one_of(
    st.tuples(st.integers(2, 40)),  # 1-D: bias, norm scale
    st.tuples(st.integers(2, 24), st.integers(2, 24)),  # tall and wide 2-D
    st.tuples(st.integers(2, 8), st.integers(1, 4), st.integers(1, 3), st.integers(1, 3)),  # conv
)
DTYPES = st.sampled_from([torch.float32, torch.float64, torch.bfloat16, torch.float16])


@st.composite
def families(draw):
    shape = draw(SHAPES)
    members = draw(st.integers(2, 12))
    dtype = draw(DTYPES)
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    common = torch.randn(*shape, generator=g, dtype=torch.float64)
    weight = draw(st.floats(0.0, 2.0))
    deltas = weight * common + torch.randn(members, *shape, generator=g, dtype=torch.float64)
    return deltas.to(dtype)


# Subspaces are only defined up to round-off when the spectrum has a gap where it is cut: the
# reference is compared where the singular-value gap at each r_i and the eigenvalue distance
# from τ exceed this (relative) margin, so float32 round-off cannot move a direction across.
MARGIN = 1e-2


def _oriented(delta: np.ndarray, side: str) -> np.ndarray:
    """METHOD.md: 2-D as is, ≥3-D as (out, rest); side "right" works on the transpose."""
    matrix = delta.reshape(delta.shape[0], -1)
    return matrix.T if side == "right" else matrix


def _subspace(bases: list[np.ndarray], method: str, tau: float):
    """S (or one S_i per member for pairwise) from the members' orthonormal bases, and the
    spectrum values the cut was made on (to check the gap)."""
    m = bases[0].shape[0]
    projectors = [u @ u.T for u in bases]
    if method == "mean-projector":
        values, vectors = np.linalg.eigh(sum(projectors) / len(bases))
        return vectors[:, values >= tau], values
    if method == "projector-product":
        product = np.eye(m)
        for projector in projectors:
            product = product @ projector
        _, sigma, vt = np.linalg.svd(product)
        return vt[sigma >= tau].T, sigma
    per_member, spectrum = [], []
    for i, u in enumerate(bases):
        others = sum((p for j, p in enumerate(projectors) if j != i), np.zeros((m, m)))
        values, vectors = np.linalg.eigh(u.T @ others @ u)
        per_member.append(u @ vectors[:, values >= tau])
        spectrum.append(values)
    return per_member, np.concatenate(spectrum) if spectrum else np.zeros(0)


def reference_shared(deltas: np.ndarray, ranks, method: str, tau: float, side: str, two_sided):
    """float64 shared parts (T, *shape) for the members' ranks, and whether every cut has a
    gap of at least MARGIN (else the split is not determined by the data to round-off)."""
    oriented = [_oriented(d, side) for d in deltas]
    lefts, rights, gaps_ok = [], [], True
    for a, r in zip(oriented, ranks, strict=True):
        u, sigma, vt = np.linalg.svd(a, full_matrices=False)
        if 0 < r < len(sigma) and sigma[r - 1] - sigma[r] < MARGIN * sigma[0]:
            gaps_ok = False
        lefts.append(u[:, :r])
        rights.append(vt[:r].T)
    left, values = _subspace(lefts, method, tau)
    gaps_ok &= bool(np.all(np.abs(values - tau) >= MARGIN))
    right = None
    if two_sided:
        right, values = _subspace(rights, method, tau)
        gaps_ok &= bool(np.all(np.abs(values - tau) >= MARGIN))
    shared = []
    for i, a in enumerate(oriented):
        s = left[i] if isinstance(left, list) else left
        part = s @ (s.T @ a)
        if right is not None:
            q = right[i] if isinstance(right, list) else right
            part = (part @ q) @ q.T
        shared.append((part.T if side == "right" else part).reshape(deltas.shape[1:]))
    return np.stack(shared), gaps_ok


def _tau(method: str) -> float:
    """The cut of each estimator at its defaults (METHOD.md): 0.85, and for pairwise
    "found in at least one other member" (min_tasks 2 → eigenvalue ≥ 2 − 1.5)."""
    return 0.5 if method == "pairwise" else 0.85


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    deltas=families(),
    method=st.sampled_from(["mean-projector", "projector-product", "pairwise"]),
    two_sided=st.booleans(),
    side=st.sampled_from(["left", "right", "auto"]),
    one_d=st.sampled_from(["unique", "rank1"]),
    rank=st.sampled_from(["gavish-donoho", "energy:0.9", "fixed:2", "fraction:0.3"]),
)
def test_split_guarantees_hold_everywhere(deltas, method, two_sided, side, one_d, rank):
    split = decompose_layer(
        deltas,
        method=method,
        two_sided=two_sided,
        side=side,
        one_d=one_d,
        rank=rank,
        max_rank_fraction=0.5,
    )
    shared, unique = split.shared, split.unique
    assert shared.shape == unique.shape == deltas.shape
    assert shared.dtype == unique.dtype == deltas.dtype
    # The float32 computation, before rounding to the input dtype, is exact and orthogonal.
    work = deltas.double() if deltas.dtype == torch.float64 else deltas.float()
    reference = decompose_layer(
        work,
        method=method,
        two_sided=two_sided,
        side=side,
        one_d=one_d,
        rank=rank,
        max_rank_fraction=0.5,
    )
    s, u, d = reference.shared.double(), reference.unique.double(), work.double()
    f64 = work.dtype == torch.float64
    assert (s + u - d).norm() <= (1e-12 if f64 else 1e-6) * d.norm()
    tol = 1e-12 if f64 else 1e-5
    for i in range(d.shape[0]):
        assert abs(float((s[i] * u[i]).sum())) <= tol * float(d[i].square().sum()) + 1e-30
    # Rounding to a half dtype happens once, on return.
    assert torch.equal(shared, reference.shared.to(deltas.dtype))
    # Against the independent float64 NumPy computation on the same (rounded) inputs.
    if len(deltas.shape) == 2 and one_d == "unique":
        assert not shared.double().any()  # 1-D parameters stay whole in the unique part
    elif len(deltas.shape) > 2:
        compared = _assert_matches_reference(split, deltas, method, two_sided)
        event(f"compared with the float64 reference: {compared}")
    bases = split.basis if isinstance(split.basis, tuple) else (split.basis,)
    for basis in bases:
        gram = basis.double().T @ basis.double()
        assert torch.allclose(gram, torch.eye(gram.shape[0], dtype=torch.float64), atol=1e-5)
    param = deltas.shape[1:]
    cap = 1 if len(param) == 1 else max(1, int(0.5 * min(param[0], math.prod(param[1:]))))
    assert all(0 <= r <= cap for r in split.ranks)
    energy = split.shared_energy
    assert bool(((energy >= 0) & (energy <= 1 + 1e-5)).all())


def _assert_matches_reference(split, deltas, method, two_sided) -> bool:
    """The engine's shared parts equal ``reference_shared`` (relative error per member, at a
    tolerance set by the compute dtype) when the spectrum has gaps at its cuts."""
    d = deltas.double().numpy()
    expected, gaps_ok = reference_shared(
        d, split.ranks, method, _tau(method), split.side, two_sided
    )
    if not gaps_ok:
        return False
    half = deltas.dtype in (torch.bfloat16, torch.float16)
    tol = 2e-2 if half else 1e-3 if deltas.dtype == torch.float32 else 1e-8
    got = split.shared.double().numpy()
    for i in range(d.shape[0]):
        scale = np.linalg.norm(d[i]) + 1e-30
        assert np.linalg.norm(got[i] - expected[i]) <= tol * scale, (i, method, split.ranks)
    return True


@pytest.mark.parametrize("method", ["mean-projector", "projector-product", "pairwise"])
@pytest.mark.parametrize("two_sided", [False, True])
@pytest.mark.parametrize("side", ["left", "right"])
def test_float32_split_matches_a_float64_numpy_reference(method, two_sided, side):
    """On planted float32 families (3 shared + 2 own directions per member, well separated
    spectra) the comparison always happens: a gap is asserted, not assumed."""
    g = torch.Generator().manual_seed(7)
    members, m, n = 4, 30, 20
    common_left, common_right = torch.randn(m, 3, generator=g), torch.randn(3, n, generator=g)
    deltas = []
    for _ in range(members):
        own = torch.randn(m, 2, generator=g) @ torch.randn(2, n, generator=g)
        shared = common_left @ torch.diag(torch.tensor([6.0, 5.0, 4.0])) @ common_right
        deltas.append(shared + 0.5 * own + 0.01 * torch.randn(m, n, generator=g))
    stack = torch.stack(deltas).float()
    split = decompose_layer(stack, method=method, two_sided=two_sided, side=side, rank="fixed:5",
                            max_rank_fraction=0.5)  # fmt: skip
    assert split.ranks == (5,) * members
    assert _assert_matches_reference(split, stack, method, two_sided)
    k = split.k if isinstance(split.k, int) else min(split.k)
    assert k >= 3  # the planted shared directions were found
