"""An independent float64 NumPy implementation of the default split, compared with the engine."""

from __future__ import annotations

import numpy as np
import pytest
from tvsplit.tasks.decompose import decompose_layer
from tvsplit.tasks.synthetic import planted_family


def reference_split(deltas: np.ndarray, threshold: float, max_rank_fraction: float):
    """Gavish–Donoho ranks (full SVD), mean projector by eigendecomposition of M (m × m),
    one-sided split. Deliberately the plain textbook route: forms M explicitly."""
    t, m, n = deltas.shape
    beta = min(m, n) / max(m, n)
    omega = 0.56 * beta**3 - 0.95 * beta**2 + 1.82 * beta + 1.43
    cap = max(1, int(max_rank_fraction * min(m, n)))
    projector_sum = np.zeros((m, m))
    ranks = []
    for delta in deltas:
        u, s, _ = np.linalg.svd(delta, full_matrices=False)
        numerical = int((s > np.finfo(np.float64).eps * s[0] * max(m, n)).sum())
        r = min(int((s > omega * np.median(s)).sum()), cap, numerical)
        ranks.append(r)
        projector_sum += u[:, :r] @ u[:, :r].T
    values, vectors = np.linalg.eigh(projector_sum / t)
    basis = vectors[:, values >= threshold]
    shared = np.einsum("ij,tjk->tik", basis @ basis.T, deltas)
    return ranks, np.sort(values)[::-1], basis, shared


@pytest.mark.parametrize(
    ("m", "n", "members", "noise"), [(40, 60, 3, 0.05), (64, 32, 5, 0.2), (50, 50, 8, 0.1)]
)
def test_engine_matches_numpy_reference(m, n, members, noise):
    fam = planted_family(m, n, members, shared_rank=3, unique_rank=2, noise=noise, seed=m + n)
    deltas = fam.deltas.double()
    split = decompose_layer(deltas, solver="full")
    ranks, eigenvalues, basis, shared = reference_split(deltas.numpy(), 0.85, 0.25)
    assert list(split.ranks) == ranks
    assert split.k == basis.shape[1] == 3
    np.testing.assert_allclose(
        split.eigenvalues.numpy(), eigenvalues[: split.eigenvalues.numel()], atol=1e-10
    )
    np.testing.assert_allclose(split.shared.numpy(), shared, atol=1e-10)
    np.testing.assert_allclose(split.unique.numpy(), deltas.numpy() - shared, atol=1e-10)
