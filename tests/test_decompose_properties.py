"""Property tests over shapes, family sizes, dtypes and settings (hypothesis)."""

from __future__ import annotations

import math

import torch
from hypothesis import HealthCheck, given, settings
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
    bases = split.basis if isinstance(split.basis, tuple) else (split.basis,)
    for basis in bases:
        gram = basis.double().T @ basis.double()
        assert torch.allclose(gram, torch.eye(gram.shape[0], dtype=torch.float64), atol=1e-5)
    param = deltas.shape[1:]
    cap = 1 if len(param) == 1 else max(1, int(0.5 * min(param[0], math.prod(param[1:]))))
    assert all(0 <= r <= cap for r in split.ranks)
    energy = split.shared_energy
    assert bool(((energy >= 0) & (energy <= 1 + 1e-5)).all())
