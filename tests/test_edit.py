"""Edit methods (tasks/edit.py): algebraic identities, TIES by hand, dtypes, and recipes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tvsplit.flows.recipe import RecipeError, check_members, load_recipe, parse_recipe
from tvsplit.tasks.decompose import decompose_layer
from tvsplit.tasks.edit import (
    EditError,
    EditInputs,
    ScaleParams,
    apply_edit,
    available_methods,
    get_method,
    magnitude_threshold,
    register,
    ties_delta,
    trim_to_density,
)

T = 3
SHAPE = (24, 16)


def close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-5) -> bool:
    return bool(torch.allclose(a, b, rtol=tol, atol=tol * float(b.abs().max().clamp(min=1))))


@pytest.fixture(scope="module")
def family() -> dict[str, object]:
    """A base, T fine-tuned weights, their task vectors and a real split of each."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(SHAPE, generator=g)
    common = torch.randn(SHAPE[0], 2, generator=g) @ torch.randn(2, SHAPE[1], generator=g)
    vectors = [0.1 * common + 0.05 * torch.randn(SHAPE, generator=g) for _ in range(T)]
    split = decompose_layer(torch.stack(vectors))
    shared = tuple(split.shared_member(i) for i in range(T))
    unique = tuple(split.unique_member(i) for i in range(T))
    return {
        "base": base,
        "vectors": tuple(vectors),
        "finetuned": [base + v for v in vectors],
        "inputs": EditInputs(base, tuple(vectors), shared, unique, name="layer.weight"),
    }


def test_registry_lists_every_method_of_method_md() -> None:
    expected = {
        "task_arithmetic",
        "negation",
        "ties",
        "shared_augmented",
        "unique_mix",
        "unique_negation",
        "general",
    }
    assert expected <= set(available_methods())
    with pytest.raises(EditError, match="unknown edit method 'tiez'.*ties"):
        get_method("tiez")


def test_split_fixture_is_a_real_split(family) -> None:
    inputs: EditInputs = family["inputs"]
    assert inputs.shared is not None and inputs.unique is not None
    assert any(float(s.norm()) > 1e-3 for s in inputs.shared)
    for s, u, v in zip(inputs.shared, inputs.unique, inputs.vectors, strict=True):
        assert close(s + u, v)


def test_task_arithmetic_of_one_member_is_its_finetuned_weights(family) -> None:
    inputs = EditInputs(family["base"], family["vectors"][1:2])
    out = apply_edit("task_arithmetic", inputs, {"scale": 1.0})
    assert close(out, family["finetuned"][1])


def test_task_arithmetic_and_negation(family) -> None:
    base, vectors = family["base"], family["vectors"]
    inputs = EditInputs(base, vectors)
    weights = [{"weight": 1.0}, {"weight": 0.5}, {"weight": -2.0}]
    out = apply_edit("task_arithmetic", inputs, {"scale": 0.3}, weights)
    assert close(out, base + 0.3 * (vectors[0] + 0.5 * vectors[1] - 2.0 * vectors[2]))
    negated = apply_edit("negation", EditInputs(base, vectors[:1]), {"scale": 0.7})
    assert close(negated, base - 0.7 * vectors[0])


@pytest.mark.parametrize("merge", ["task_arithmetic", "ties"])
@pytest.mark.parametrize("shared_as", ["mean", "each"])
def test_shared_augmented_with_zero_shared_weight_is_the_base_merge(
    family, merge: str, shared_as: str
) -> None:
    inputs: EditInputs = family["inputs"]
    ties_params = {"density": 0.5, "normalize": True} if merge == "ties" else {}
    reference = apply_edit(merge, inputs, {"scale": 0.8, **ties_params})
    augmented = apply_edit(
        "shared_augmented",
        inputs,
        {"merge": merge, "shared_as": shared_as, "shared_weight": 0.0, "scale": 0.8} | ties_params,
    )
    assert close(augmented, reference)
    # and the shared parts do change the result when weighted in
    boosted = apply_edit(
        "shared_augmented",
        inputs,
        {"merge": merge, "shared_as": shared_as, "shared_weight": 1.0, "scale": 0.8} | ties_params,
    )
    assert not close(boosted, reference)


def test_shared_augmented_task_arithmetic_adds_the_mean_shared_part(family) -> None:
    inputs: EditInputs = family["inputs"]
    out = apply_edit("shared_augmented", inputs, {"shared_weight": 2.0, "shared_as": "mean"})
    expected = family["base"] + sum(inputs.vectors) + 2.0 * sum(inputs.shared) / T
    assert close(out, expected)
    each = apply_edit("shared_augmented", inputs, {"shared_weight": 2.0, "shared_as": "each"})
    assert close(each, family["base"] + sum(inputs.vectors) + 2.0 * sum(inputs.shared))


def test_unique_mix_with_all_unique_and_t_times_mean_shared_is_task_arithmetic(family) -> None:
    inputs: EditInputs = family["inputs"]
    mixed = apply_edit("unique_mix", inputs, {"shared_weight": float(T)})
    assert close(mixed, apply_edit("task_arithmetic", inputs))
    only_unique = apply_edit("unique_mix", inputs, {"shared_weight": 0.0})
    assert close(only_unique, family["base"] + sum(inputs.unique))


def test_unique_mix_scale_multiplies_the_unique_parts_only(family) -> None:
    inputs: EditInputs = family["inputs"]
    params = {"scale": 0.5, "shared_weight": 1.5}
    mixed = apply_edit("unique_mix", inputs, params)
    expected = family["base"] + 0.5 * sum(inputs.unique) + 1.5 * sum(inputs.shared) / T
    assert close(mixed, expected)
    # α (τ_A + τ_B + …) is unique mixing at scale α with the shared part counted T·α times
    full = apply_edit("task_arithmetic", inputs, {"scale": 0.5})
    assert close(apply_edit("unique_mix", inputs, {"scale": 0.5, "shared_weight": 0.5 * T}), full)


def test_general_recipe_with_unit_coefficients_is_task_arithmetic(family) -> None:
    inputs: EditInputs = family["inputs"]
    members = [{"shared_weight": 1.0, "unique_weight": 1.0}] * T
    assert close(apply_edit("general", inputs, {}, members), apply_edit("task_arithmetic", inputs))
    shared_only = apply_edit("general", inputs, {}, [{"unique_weight": 0.0}] * T)
    assert close(shared_only, family["base"] + sum(inputs.shared))


def test_general_recipe_with_ties_merges_each_group(family) -> None:
    inputs: EditInputs = family["inputs"]
    out = apply_edit("general", inputs, {"ties": True, "density": 0.4, "scale": 0.5})
    expected = family["base"] + 0.5 * (
        ties_delta(list(inputs.shared), [1.0] * T, density=0.4)
        + ties_delta(list(inputs.unique), [1.0] * T, density=0.4)
    )
    assert close(out, expected)


def test_unique_negation(family) -> None:
    base, vectors = family["base"], family["vectors"]
    zero_unique = EditInputs(base, vectors[:1], shared=vectors[:1])  # s = τ, so u = 0
    assert torch.equal(apply_edit("unique_negation", zero_unique, {"scale": 3.0}), base)
    inputs: EditInputs = family["inputs"]
    single = EditInputs(base, inputs.vectors[:1], inputs.shared[:1], inputs.unique[:1])
    out = apply_edit("unique_negation", single, {"scale": 1.5})
    assert close(out, base - 1.5 * inputs.unique[0])


def test_without_a_split_shared_is_zero_and_unique_is_the_vector(family) -> None:
    base, vectors = family["base"], family["vectors"]
    plain = EditInputs(base, vectors)
    assert close(apply_edit("unique_mix", plain, {"shared_weight": 5.0}), base + sum(vectors))
    assert close(apply_edit("unique_negation", plain), base - sum(vectors))
    assert torch.equal(
        apply_edit("shared_augmented", plain, {"shared_weight": 1.0}),
        apply_edit("task_arithmetic", plain),
    )


# --------------------------------------------------------------------------- TIES by hand


def test_trim_keeps_the_top_magnitudes_and_every_tie_at_the_threshold() -> None:
    v = torch.tensor([0.5, -2.0, 1.0, -1.0, 0.0, 3.0])
    # density 0.5 of 6 entries: k = 3; the 3rd largest magnitude is 1.0, tied by 1.0 and
    # -1.0, so both are kept (4 survivors).
    assert torch.equal(trim_to_density(v, 0.5), torch.tensor([0.0, -2.0, 1.0, -1.0, 0.0, 3.0]))
    # k = max(1, floor(0.1 * 6)) = 1
    assert torch.equal(trim_to_density(v, 0.1), torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 3.0]))
    assert trim_to_density(v, 1.0) is v


def test_ties_matches_a_hand_computed_example() -> None:
    # Convention: zero entries (trimmed or zero in τ) have sign 0, never agree, and count in
    # neither the sum nor the divisor; a total mass of exactly 0 elects +.
    t1 = torch.tensor([1.0, -2.0, 3.0, 0.5, 0.0])
    t2 = torch.tensor([2.0, 1.0, -1.0, 0.0, -4.0])
    t3 = torch.tensor([-0.5, -3.0, 2.0, 1.0, 0.0])
    # density 0.6 → k = 3 per vector. Trimmed:
    #   t1: |.| = 1, 2, 3, .5, 0 → keep ≥ 1:   [1, -2, 3, 0, 0]
    #   t2: |.| = 2, 1, 1, 0, 4  → keep ≥ 1 (tie 1, 1 both kept): [2, 1, -1, 0, -4]
    #   t3: |.| = .5, 3, 2, 1, 0 → keep ≥ 1:   [0, -3, 2, 1, 0]
    # mass: [3, -4, 4, 1, -4] → elected sign [+, -, +, +, -]
    # agreeing entries: col0 {1, 2} → 1.5; col1 {-2, -3} → -2.5; col2 {3, 2} → 2.5;
    #                   col3 {1} → 1; col4 {-4} → -4
    expected_mean = torch.tensor([1.5, -2.5, 2.5, 1.0, -4.0])
    expected_sum = torch.tensor([3.0, -5.0, 5.0, 1.0, -4.0])
    vectors = [t1, t2, t3]
    got = ties_delta(vectors, [1.0, 1.0, 1.0], density=0.6, normalize=True)
    assert torch.allclose(got, expected_mean)
    assert torch.allclose(
        ties_delta(vectors, [1.0] * 3, density=0.6, normalize=False), expected_sum
    )
    # weights: the mass and the mean are weighted (w = 2, 1, 1)
    #   mass [4, -6, 7, 1, -4]; col0 (2·1 + 2)/(2+1) = 4/3; col1 (-4 - 3)/3 = -7/3;
    #   col2 (6 + 2)/3 = 8/3; col3 1; col4 -4
    weighted = ties_delta(vectors, [2.0, 1.0, 1.0], density=0.6)
    assert torch.allclose(weighted, torch.tensor([4 / 3, -7 / 3, 8 / 3, 1.0, -4.0]))
    # zero mass elects +: [1] and [-1] → + wins, the mean of the agreeing entries is 1
    assert torch.equal(
        ties_delta([torch.tensor([1.0]), torch.tensor([-1.0])], [1.0, 1.0], density=1.0),
        torch.tensor([1.0]),
    )
    base = torch.tensor([10.0, 10.0, 10.0, 10.0, 10.0])
    out = apply_edit("ties", EditInputs(base, vectors), {"density": 0.6, "scale": 0.5})
    assert torch.allclose(out, base + 0.5 * expected_mean)


def test_ties_in_half_precision_matches_float32_and_leaves_inputs_alone() -> None:
    g = torch.Generator().manual_seed(4)
    vectors = [torch.randn(300, 400, generator=g).to(torch.bfloat16) for _ in range(3)]
    copies = [v.clone() for v in vectors]
    got = ties_delta(vectors, [1.0, 2.0, 0.5], density=0.3)
    expected = ties_delta([v.float() for v in vectors], [1.0, 2.0, 0.5], density=0.3)
    assert got.dtype == torch.float32 and torch.equal(got, expected)
    assert all(torch.equal(v, c) for v, c in zip(vectors, copies, strict=True))
    kept = trim_to_density(vectors[0], 0.3)
    assert kept.dtype == torch.bfloat16 and int((kept != 0).sum()) >= int(0.3 * 120_000)


def test_ties_rejects_negative_weights() -> None:
    inputs = EditInputs(torch.zeros(3), (torch.ones(3), torch.ones(3)))
    with pytest.raises(
        EditError, match=r"members\[1\]\.weight: Input should be greater than or equal to 0"
    ):
        apply_edit("ties", inputs, {"density": 0.5}, [{"weight": 1.0}, {"weight": -1.0}])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_magnitude_threshold_is_the_kth_largest(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(3)
    for n in (10, 70_000, 300_001):
        values = torch.randn(n, generator=g, dtype=dtype).abs()
        values[: n // 10] = 0.0  # many zeros
        for k in (1, n // 3, n // 2, n - n // 10 + 1, n):
            expected = torch.topk(values, k).values.min()
            assert magnitude_threshold(values, k) == expected, (n, k)


# --------------------------------------------------------------------------- dtypes, shapes


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_output_has_the_base_dtype_and_float64_is_kept(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(1)
    base = torch.randn(8, 4, generator=g).to(dtype)
    vectors = tuple(torch.randn(8, 4, generator=g).to(dtype) for _ in range(2))
    inputs = EditInputs(base, vectors)
    assert inputs.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    for method in available_methods():
        params = {"density": 0.5} if method == "ties" else {}
        out = apply_edit(method, inputs, params)
        assert out.dtype == dtype and out.shape == base.shape, method


def test_one_dimensional_parameters_work_for_every_method() -> None:
    g = torch.Generator().manual_seed(2)
    base = torch.randn(7, generator=g)
    vectors = tuple(torch.randn(7, generator=g) for _ in range(3))
    split = decompose_layer(torch.stack(vectors))  # 1-D: "unique" policy, s = 0
    inputs = EditInputs(
        base,
        vectors,
        tuple(split.shared_member(i) for i in range(3)),
        tuple(split.unique_member(i) for i in range(3)),
    )
    for method in available_methods():
        params = {"density": 0.5} if method == "ties" else {}
        out = apply_edit(method, inputs, params)
        assert out.shape == (7,) and torch.isfinite(out).all(), method
    assert close(apply_edit("unique_mix", inputs), base + sum(vectors))


def test_inputs_are_checked_and_errors_name_the_parameter() -> None:
    base = torch.zeros(4, 3)
    with pytest.raises(EditError, match=r"'h.0.w', vectors\[1\]: shape \(3, 4\)"):
        EditInputs(base, (torch.zeros(4, 3), torch.zeros(3, 4)), name="h.0.w")
    with pytest.raises(EditError, match="2 shared part"):
        EditInputs(base, (base,), shared=(base, base))
    with pytest.raises(EditError, match="not floating point"):
        EditInputs(base, (torch.zeros(4, 3, dtype=torch.int64),))
    with pytest.raises(
        EditError,
        match=r"'w', method 'ties': params.density: Input should be less than or equal to 1",
    ):
        apply_edit("ties", EditInputs(base, (base,), name="w"), {"density": 1.5})


def test_a_new_method_is_one_function_plus_one_params_class() -> None:
    class HalfParams(ScaleParams):
        pass

    @register("test_half_sum", params=HalfParams)
    def half_sum(inputs, params, members):
        return 0.5 * params.scale * sum(inputs.vector(i) for i in range(inputs.members))

    inputs = EditInputs(torch.ones(2), (torch.ones(2), torch.ones(2)))
    assert torch.equal(apply_edit("test_half_sum", inputs, {"scale": 2.0}), torch.full((2,), 3.0))
    with pytest.raises(EditError, match="already registered"):
        register("test_half_sum")(half_sum)


# --------------------------------------------------------------------------- recipes


RECIPE = """\
base: ./models/base
family: demo
decomposition: run-1
method: {method}
members:
  - name: toxic
    weight: {weight}
  - name: shakespeare
params:
  density: {density}
"""


def write(tmp_path: Path, **fields: object) -> Path:
    values = {"method": "ties", "weight": 1.0, "density": 0.5} | fields
    path = tmp_path / "recipe.yaml"
    path.write_text(RECIPE.format(**values))
    return path


def test_a_valid_recipe_loads_with_typed_parameters(tmp_path: Path) -> None:
    recipe = load_recipe(write(tmp_path, weight=0.7))
    assert recipe.member_names == ["toxic", "shakespeare"]
    assert recipe.method_params.density == 0.5
    assert [m.weight for m in recipe.member_params] == [0.7, 1.0]
    check_members(recipe, ["shakespeare", "toxic", "other"])


def test_unknown_method_is_named(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match=r"- method: unknown edit method 'tiez'.*ties"):
        load_recipe(write(tmp_path, method="tiez"))


@pytest.mark.parametrize("weight", ["-1.0", "abc", ".nan"])
def test_bad_weight_is_named(tmp_path: Path, weight: str) -> None:
    with pytest.raises(RecipeError, match=r"members\[0\]\.weight: "):
        load_recipe(write(tmp_path, weight=weight))


def test_negative_density_is_named(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match=r"params\.density: Input should be greater than 0"):
        load_recipe(write(tmp_path, density=-0.5))


def test_missing_member_is_named_with_suggestions(tmp_path: Path) -> None:
    recipe = load_recipe(write(tmp_path))
    with pytest.raises(RecipeError, match=r"members\[1\]\.name: 'shakespeare'.*did you mean"):
        check_members(recipe, ["toxic", "shakespear"])


def test_recipe_structure_errors_are_named(tmp_path: Path) -> None:
    base = {"base": "b", "family": "f", "method": "unique_negation"}
    with pytest.raises(RecipeError, match="decomposition: method 'unique_negation'"):
        parse_recipe(base | {"members": [{"name": "a"}]})
    with pytest.raises(RecipeError, match=r"members: member 'a' is listed twice \(members\[1\]\)"):
        parse_recipe(base | {"decomposition": "r", "members": [{"name": "a"}, {"name": "a"}]})
    with pytest.raises(RecipeError, match=r"members\[0\]\.colour: Extra inputs"):
        parse_recipe(base | {"decomposition": "r", "members": [{"name": "a", "colour": 1}]})
    with pytest.raises(RecipeError, match=r"members\[0\]\.name: Field required"):
        parse_recipe(base | {"decomposition": "r", "members": [{"weight": 1}]})
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("base: [unclosed\n")
    with pytest.raises(RecipeError, match="bad.yaml: not valid YAML"):
        load_recipe(bad_yaml)
