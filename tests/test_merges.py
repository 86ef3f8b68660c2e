"""TSV-M, Iso-C and Iso-CTS as registered edit methods, against independent float64 numpy
implementations of the published algorithms (written here from the papers and their code:
Gargiulo et al. 2025 for TSV-M, Marczak et al. 2025 for Iso-C and Iso-CTS, with
FusionBench's zero-padded block layout and common-subspace size rule).

The references share nothing with ``tasks.merges``: numpy instead of torch, padded blocks
placed by index instead of concatenation, the polar factor from numpy's SVD, and the
common size computed inline.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tvsplit.tasks.edit import EditError, EditInputs, apply_edit, available_methods, get_method
from tvsplit.tasks.merges import common_subspace_size, iso_c, iso_cts, orthogonalize, tsv_merge

# --------------------------------------------------------------------------- references


def _polar(a: np.ndarray) -> np.ndarray:
    u, _, vt = np.linalg.svd(a, full_matrices=False)
    return u @ vt


def _as_matrix(delta: np.ndarray) -> np.ndarray:
    return delta.reshape(delta.shape[0], -1)


def _matrix_like(delta: np.ndarray) -> bool:
    return delta.ndim >= 2 and delta.shape[0] > 1 and delta[0].size > 1


def reference_tsv_m(deltas: list[np.ndarray]) -> np.ndarray:
    """TSV-M: block i of an (m × r) U, an r-vector S and an (r × n) Vᵀ holds task i's top
    int(r / T) triplets; ΔW = polar(U) diag(S) polar(Vᵀ)."""
    if not _matrix_like(deltas[0]):
        return np.mean(deltas, axis=0)
    t = len(deltas)
    mats = [_as_matrix(d) for d in deltas]
    m, n = mats[0].shape
    r = min(m, n)
    keep = int(r * (1.0 / t))
    big_u, big_s, big_vt = np.zeros((m, r)), np.zeros(r), np.zeros((r, n))
    for i, a in enumerate(mats):
        u, s, vt = np.linalg.svd(a, full_matrices=False)
        big_u[:, i * keep : (i + 1) * keep] = u[:, :keep]
        big_s[i * keep : (i + 1) * keep] = s[:keep]
        big_vt[i * keep : (i + 1) * keep] = vt[:keep]
    used = t * keep  # zero columns beyond the blocks carry zero singular values
    merged = _polar(big_u[:, :used]) @ np.diag(big_s[:used]) @ _polar(big_vt[:used].T).T
    return merged.reshape(deltas[0].shape)


def reference_iso_c(deltas: list[np.ndarray]) -> np.ndarray:
    """Iso-C: the sum's singular vectors with every singular value set to their mean."""
    if not _matrix_like(deltas[0]):
        return np.mean(deltas, axis=0)
    u, s, vt = np.linalg.svd(_as_matrix(sum(deltas)), full_matrices=False)
    return (u @ np.diag(np.full_like(s, s.mean())) @ vt).reshape(deltas[0].shape)


def reference_iso_cts(deltas: list[np.ndarray], fraction: float = 0.8) -> np.ndarray:
    """Iso-CTS with the published common size: k = r − T·round((r − int(f·r))/T); task i
    fills columns [i·d, (i+1)·d) with d = (r − k)/T, the common part the last k; one
    isotropic value, the mean of all r singular values placed."""
    if not _matrix_like(deltas[0]):
        return np.mean(deltas, axis=0)
    t = len(deltas)
    mats = [_as_matrix(d) for d in deltas]
    m, n = mats[0].shape
    r = min(m, n)
    k = r - round((r - int(r * fraction)) / t) * t
    d = (r - k) // t
    u, s, vt = np.linalg.svd(sum(mats), full_matrices=False)
    big_u, big_s, big_vt = np.zeros((m, r)), np.zeros(r), np.zeros((r, n))
    for i, a in enumerate(mats):
        residual = a - u[:, :k] @ (u[:, :k].T @ a)
        ut, st, vtt = np.linalg.svd(residual, full_matrices=False)
        big_u[:, i * d : (i + 1) * d] = ut[:, :d]
        big_s[i * d : (i + 1) * d] = st[:d]
        big_vt[i * d : (i + 1) * d] = vtt[:d]
    big_u[:, t * d :], big_s[t * d :], big_vt[t * d :] = u[:, :k], s[:k], vt[:k]
    merged = big_s.mean() * _polar(big_u) @ _polar(big_vt.T).T
    return merged.reshape(deltas[0].shape)


def _family(shape, tasks: int, seed: int, shared_rank: int = 2) -> list[np.ndarray]:
    """Task vectors with a common low-rank part plus their own (something to merge)."""
    rng = np.random.default_rng(seed)
    m, n = shape[0], int(np.prod(shape[1:]))
    common = rng.standard_normal((m, shared_rank)) @ rng.standard_normal((shared_rank, n))
    return [
        (common + rng.standard_normal((m, 3)) @ rng.standard_normal((3, n))).reshape(shape)
        + 0.1 * rng.standard_normal(shape)
        for _ in range(tasks)
    ]


def _edit(method: str, deltas: list[np.ndarray], base: np.ndarray, **params) -> np.ndarray:
    inputs = EditInputs(
        torch.from_numpy(base), tuple(torch.from_numpy(d) for d in deltas), name="w"
    )
    return apply_edit(method, inputs, params).numpy()


# shapes: wide, tall, a conv kernel viewed (out, rest), T that does / does not divide r,
# and one (r = 16, T = 7) where the published k (9) differs from floor(f·r) = 12
CASES = [((12, 20), 3), ((30, 8), 4), ((8, 2, 3, 3), 3), ((16, 40), 7), ((25, 25), 6)]


@pytest.mark.parametrize(("shape", "tasks"), CASES)
def test_registered_merges_equal_the_published_algorithms(shape, tasks):
    deltas = _family(shape, tasks, seed=sum(shape) + tasks)
    base = np.random.default_rng(0).standard_normal(shape)
    for method, reference in (
        ("tsv_m", reference_tsv_m),
        ("iso_c", reference_iso_c),
        ("iso_cts", reference_iso_cts),
    ):
        got = _edit(method, deltas, base, scale=0.7)
        np.testing.assert_allclose(got, base + 0.7 * reference(deltas), rtol=0, atol=1e-10)


def test_iso_cts_fraction_and_one_d_parameters():
    deltas = _family((20, 30), 4, seed=5)
    zero = np.zeros((20, 30))
    for fraction in (0.0, 0.5, 0.95):
        got = _edit("iso_cts", deltas, zero, common_fraction=fraction)
        np.testing.assert_allclose(got, reference_iso_cts(deltas, fraction), atol=1e-10)
    vectors = [np.arange(5.0) * i for i in range(4)]
    for method in ("tsv_m", "iso_c", "iso_cts"):
        got = _edit(method, vectors, np.ones(5), scale=2.0)
        np.testing.assert_allclose(got, 1 + 2 * np.mean(vectors, axis=0), atol=1e-12)


def test_published_common_size_fills_the_rank():
    # r = 16, T = 7, f = 0.8: floor gives k = 12 and no task-specific direction at all;
    # the published rule enlarges the task part to 7 = T · round(4 / 7) and k = 9
    assert common_subspace_size(16, 7, 0.8) == (9, 1)
    assert common_subspace_size(16, 7, 0.8, "floor") == (12, 0)
    assert common_subspace_size(64, 7, 0.8) == (50, 2)  # round(13 / 7) = 2: k shrinks to fit
    for rank in range(1, 40):
        for tasks in range(1, 9):
            for fraction in (0.0, 0.3, 0.8, 1.0):
                k, per_task = common_subspace_size(rank, tasks, fraction)
                assert 0 <= k <= rank and k + tasks * per_task <= rank
                specific = round((rank - int(fraction * rank)) / tasks) * tasks
                if specific <= rank:
                    assert k + tasks * per_task == rank
                k_floor, per_floor = common_subspace_size(rank, tasks, fraction, "floor")
                assert k_floor == int(fraction * rank) and k_floor + tasks * per_floor <= rank


def test_floor_rule_is_kept_as_an_option():
    deltas = [torch.from_numpy(d) for d in _family((16, 40), 7, seed=1)]
    published, floor = iso_cts(deltas), iso_cts(deltas, common_size="floor")
    assert not torch.allclose(published, floor)
    # floor with k = 12 and no task directions: the isotropic top-12 subspace of the sum
    u, s, vh = torch.linalg.svd(sum(deltas), full_matrices=False)
    expected = s[:12].mean() * u[:, :12] @ vh[:12]
    torch.testing.assert_close(floor, expected)


def test_member_weights_scale_the_task_vectors():
    deltas = _family((10, 14), 3, seed=2)
    weights = [0.5, 2.0, 1.0]
    inputs = EditInputs(
        torch.zeros(10, 14, dtype=torch.float64), tuple(torch.from_numpy(d) for d in deltas)
    )
    got = apply_edit("tsv_m", inputs, {}, [{"weight": w} for w in weights]).numpy()
    expected = reference_tsv_m([w * d for w, d in zip(weights, deltas, strict=True)])
    np.testing.assert_allclose(got, expected, atol=1e-10)


def test_properties_of_the_merges():
    # three tasks in disjoint row and column blocks: mutually orthogonal singular spaces, and
    # keep = 12 // 3 = 4 triplets keeps each whole, so TSV-M is the plain sum
    tasks = []
    for i in range(3):
        block = torch.zeros(12, 12, dtype=torch.float64)
        block[4 * i : 4 * i + 4, 4 * i : 4 * i + 4] = torch.randn(
            4, 4, generator=torch.Generator().manual_seed(i), dtype=torch.float64
        )
        tasks.append(block)
    torch.testing.assert_close(tsv_merge(tasks), sum(tasks), rtol=1e-10, atol=1e-10)
    q = orthogonalize(torch.randn(12, 5, dtype=torch.float64))
    torch.testing.assert_close(q.T @ q, torch.eye(5, dtype=torch.float64))
    overlapping = [torch.from_numpy(d) for d in _family((12, 12), 4, seed=3)]
    merged = iso_c(overlapping)
    s_total = torch.linalg.svdvals(sum(overlapping))
    s_merged = torch.linalg.svdvals(merged)
    torch.testing.assert_close(s_merged, torch.full_like(s_merged, float(s_total.mean())))
    torch.testing.assert_close(iso_cts(overlapping, common_fraction=1.0), merged)
    assert tsv_merge([torch.zeros(3, 3, dtype=torch.float32)]).dtype == torch.float32


def test_registry_lists_them_with_typed_parameters():
    assert {"tsv_m", "iso_c", "iso_cts", "task_arithmetic", "ties"} <= set(available_methods())
    method = get_method("iso_cts")
    assert not method.needs_split
    assert method.parse_params({}).common_size == "published"
    inputs = EditInputs(torch.zeros(4, 4), (torch.ones(4, 4),))
    with pytest.raises(EditError, match=r"params\.common_size"):
        apply_edit("iso_cts", inputs, {"common_size": "ceil"})
    with pytest.raises(EditError, match=r"params\.common_fraction"):
        apply_edit("iso_cts", inputs, {"common_fraction": 1.5})
    with pytest.raises(EditError, match="density"):
        apply_edit("tsv_m", inputs, {"density": 0.5})  # TSV-M has no density


def test_tvsplit_edit_lists_them():
    from tvsplit.flows.cli import app
    from typer.testing import CliRunner

    listing = CliRunner().invoke(app, ["edit", "--methods"], env={"COLUMNS": "200"})
    assert listing.exit_code == 0, listing.output
    for name in ("tsv_m", "iso_c", "iso_cts", "common_size", "task_arithmetic", "ties"):
        assert name in listing.output
    help_text = CliRunner().invoke(app, ["edit", "--help"], env={"COLUMNS": "200"}).output
    assert "--methods" in help_text and "tsv_m" in help_text


def test_an_installed_package_registers_an_edit_method(tmp_path, monkeypatch):
    """The ``tvsplit.edit_methods`` entry point group: a module that calls ``register``."""
    import textwrap

    from tvsplit.plugins import forget_loaded

    (tmp_path / "halving_plugin.py").write_text(
        textwrap.dedent(
            """
            from tvsplit.tasks.edit import register

            @register("halved_sum")
            def halved_sum(inputs, params, members):
                '''θ0 + ½ Σ w_i τ_i.'''
                return 0.5 * sum(m.weight * inputs.vector(i) for i, m in enumerate(members))
            """
        )
    )
    dist = tmp_path / "halving_plugin-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: halving-plugin\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[tvsplit.edit_methods]\nhalved = halving_plugin\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    forget_loaded("tvsplit.edit_methods")
    try:
        assert "halved_sum" in available_methods()
        inputs = EditInputs(torch.zeros(2), (torch.ones(2), torch.full((2,), 3.0)))
        torch.testing.assert_close(apply_edit("halved_sum", inputs), torch.full((2,), 2.0))
    finally:
        from tvsplit.tasks import edit

        edit._REGISTRY.pop("halved_sum", None)
        forget_loaded("tvsplit.edit_methods")
