"""Rank rules, chance levels, and inputs that must be refused with errors naming the problem."""

from __future__ import annotations

import math
import typing

import pytest
import torch
from tvsplit.tasks.decompose import (
    DecompositionError,
    decompose_layer,
    member_basis,
    split_from_bases,
)
from tvsplit.tasks.ranks import RankRuleError, mp_bottom_energy_fraction, parse_rank_rule
from tvsplit.tasks.subspaces import mean_projector, mean_projector_chance
from tvsplit.tasks.task_vector import TaskVectorError, task_vector


def _low_rank(m: int, n: int, r: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, r, generator=g) @ torch.randn(r, n, generator=g) / math.sqrt(r)


@pytest.mark.parametrize("solver", ["full", "randomized"])
@pytest.mark.parametrize(("m", "n"), [(256, 512), (768, 768)])
def test_exactly_low_rank_delta_keeps_its_rank(solver, m, n):
    """A LoRA-like ΔW (rank 8, float32): Gavish–Donoho alone would pick round-off directions."""
    basis = member_basis(_low_rank(m, n, 8), solver=solver)
    assert basis.rank == 8
    assert basis.solver == solver


@pytest.mark.parametrize("solver", ["full", "randomized"])
def test_pure_noise_has_no_signal_directions(solver):
    noise = torch.randn(600, 700, generator=torch.Generator().manual_seed(1))
    assert member_basis(noise, solver=solver).rank <= 2


def test_rank_rules_and_cap():
    delta = torch.randn(100, 80, generator=torch.Generator().manual_seed(0))
    assert member_basis(delta, rank="fixed:7").rank == 7
    assert member_basis(delta, rank="fraction:0.1").rank == 8
    assert member_basis(delta, rank="fixed:70").rank == 20  # capped at 0.25 · 80
    assert member_basis(delta, rank="fixed:70", max_rank_fraction=1.0).rank == 70
    basis = member_basis(delta, rank="energy:0.5", max_rank_fraction=1.0)
    sigma = torch.linalg.svdvals(delta.double())
    share = sigma.square().cumsum(0) / sigma.square().sum()
    assert share[basis.rank - 1] >= 0.5 > share[basis.rank - 2]


def test_randomized_energy_rule_grows_its_sketch():
    delta = _low_rank(600, 600, 60) + 1e-3 * torch.randn(
        600, 600, generator=torch.Generator().manual_seed(3)
    )
    full = member_basis(delta, rank="energy:0.95", solver="full")
    sketched = member_basis(delta, rank="energy:0.95", solver="randomized")
    assert sketched.solver == "randomized" and abs(sketched.rank - full.rank) <= 1
    assert full.rank > 32  # more than the first sketch holds


@pytest.mark.parametrize(
    "bad", ["median", "energy", "energy:1.5", "fixed:0", "fixed:2.5", "fraction:x"]
)
def test_bad_rank_rules_are_named(bad):
    with pytest.raises(RankRuleError, match="rank rule|unknown rank rule"):
        parse_rank_rule(bad)


@pytest.mark.parametrize(
    ("fraction", "expected"), [(0.03, 0.26), (0.17, 0.49), (0.33, 0.69), (0.5, 0.83)]
)
def test_chance_level_matches_random_subspaces(fraction, expected):
    """METHOD.md: the top eigenvalue of M for T = 8 random subspaces of rank r in m dims."""
    m = 768
    r = round(fraction * m)
    assert mean_projector_chance([r] * 8, m) == pytest.approx(expected, abs=0.02)
    g = torch.Generator().manual_seed(0)
    bases = [
        torch.linalg.qr(torch.randn(m, r, generator=g, dtype=torch.float64))[0] for _ in range(8)
    ]
    _, eigenvalues = mean_projector(bases, 0.85)
    assert float(eigenvalues[0]) == pytest.approx(mean_projector_chance([r] * 8, m), abs=0.03)


def test_marchenko_pastur_tail_energy():
    assert mp_bottom_energy_fraction(1.0, 1.0) == 1.0 and mp_bottom_energy_fraction(0.5, 0.0) == 0.0
    g = torch.Generator().manual_seed(0)
    sigma = torch.linalg.svdvals(torch.randn(400, 800, generator=g, dtype=torch.float64))
    energy = sigma.square().flip(0).cumsum(0) / sigma.square().sum()
    for fraction in (0.25, 0.5, 0.75):
        measured = float(energy[int(fraction * 400) - 1])
        assert mp_bottom_energy_fraction(0.5, fraction) == pytest.approx(measured, abs=0.01)


def _family(members=3, shape=(6, 5)):
    return torch.randn(members, *shape, generator=torch.Generator().manual_seed(0))


def test_fewer_than_two_members():
    with pytest.raises(DecompositionError, match=r"'blocks.0.w'.*at least 2 members, got 1"):
        decompose_layer(_family(1), name="blocks.0.w")


def test_mismatched_shapes_name_the_member():
    deltas = [torch.randn(6, 5), torch.randn(6, 5), torch.randn(5, 6)]
    with pytest.raises(DecompositionError, match=r"'w'.*member 'sql'.*shape \(5, 6\) differs"):
        decompose_layer(deltas, name="w", member_names=["math", "code", "sql"])


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nan_and_inf_name_parameter_and_member(bad):
    deltas = _family()
    deltas[1, 2, 3] = bad
    with pytest.raises(DecompositionError, match=r"parameter 'mlp.up', member 'code'.*NaN or Inf"):
        decompose_layer(deltas, name="mlp.up", member_names=["math", "code", "sql"])


def test_empty_and_non_float_tensors():
    with pytest.raises(DecompositionError, match="empty"):
        decompose_layer(torch.zeros(3, 0, 4))
    with pytest.raises(DecompositionError, match="not floating point"):
        decompose_layer(torch.ones(3, 4, 4, dtype=torch.int64))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"method": "svd"}, "unknown split method .svd.; known methods: mean-projector"),
        ({"threshold": 1.5}, "threshold: Input should be less than or equal to 1"),
        ({"min_tasks": 4}, "min_tasks must be between 1 and 3"),
        ({"method": "projector-product", "min_tasks": 2}, "needs mean-projector or pairwise"),
        ({"side": "top"}, "side must be one of"),
        ({"one_d": "drop"}, "one_d must be one of"),
        ({"max_rank_fraction": 0.0}, "max_rank_fraction must be in"),
        ({"solver": "lanczos"}, "solver must be one of"),
    ],
)
def test_bad_settings(kwargs, message):
    with pytest.raises(DecompositionError, match=message):
        decompose_layer(_family(), **kwargs)


def test_bases_that_do_not_fit_the_deltas():
    deltas = _family()
    bases = [member_basis(d) for d in deltas]
    with pytest.raises(DecompositionError, match="2 bases for 3 deltas"):
        split_from_bases(deltas, bases[:2])
    other = [member_basis(d.T.contiguous()) for d in deltas]
    with pytest.raises(DecompositionError, match="basis was made for shape"):
        split_from_bases(deltas, other)


def test_task_vector_is_lazy_and_checked():
    base = {"a": torch.zeros(2, 3), "b": torch.ones(4)}
    tuned = {"a": torch.full((2, 3), 0.5), "b": torch.full((4,), 3.0)}
    vector = dict(task_vector(base, tuned))
    assert torch.equal(vector["a"], torch.full((2, 3), 0.5)) and torch.equal(
        vector["b"], torch.full((4,), 2.0)
    )

    class Loud(dict):
        reads: typing.ClassVar[list[str]] = []

        def __getitem__(self, key):
            self.reads.append(key)
            return super().__getitem__(key)

    lazy = Loud(tuned)
    stream = task_vector(base, lazy)
    assert lazy.reads == []
    next(stream)
    assert lazy.reads == ["a"]
    with pytest.raises(TaskVectorError, match="'b' is missing from the fine-tuned"):
        dict(task_vector(base, {"a": tuned["a"]}, keys=["a", "b"]))
    with pytest.raises(TaskVectorError, match=r"'a': base has shape \(2, 3\).*\(3, 2\)"):
        dict(task_vector(base, {"a": torch.zeros(3, 2), "b": tuned["b"]}))
    with pytest.raises(TaskVectorError, match="parameter's|lacks"):
        dict(task_vector(base, {**tuned, "c": torch.zeros(1)}))
    with pytest.raises(TaskVectorError, match="'b'.*NaN or Inf"):
        dict(task_vector(base, {"a": tuned["a"], "b": torch.full((4,), float("nan"))}))
    with pytest.raises(TaskVectorError, match="floating-point"):
        dict(
            task_vector(
                {"i": torch.zeros(2, dtype=torch.int64)}, {"i": torch.ones(2, dtype=torch.int64)}
            )
        )


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_all_finite_agrees_with_an_element_by_element_check(dtype):
    """The sum-first check says what ``isfinite().all()`` says: a NaN or ±Inf anywhere is
    found, and finite values whose sum overflows are not taken for an Inf."""
    from tvsplit.tasks.task_vector import all_finite

    generator = torch.Generator().manual_seed(0)
    top = torch.finfo(dtype).max
    for trial in range(40):
        tensor = torch.randn(257, 33, generator=generator).to(dtype)
        where = tuple(int(i) for i in torch.randint(0, 33, (2,), generator=generator))
        case = trial % 5
        if case == 1:
            tensor[where] = float("nan")
        elif case == 2:
            tensor[where] = float("inf") if trial % 2 else -float("inf")
        elif case == 3:
            tensor[0, :2] = torch.tensor([float("inf"), -float("inf")], dtype=dtype)
        elif case == 4:
            tensor[:4] = top  # finite, but the sum overflows
        want = bool(torch.isfinite(tensor).all())
        assert all_finite(tensor) == want, (dtype, case)
        assert want == (case in (0, 4))
