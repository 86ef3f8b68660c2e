"""The vision suite on real data, a real zoo, every merge method: on the tiny zoo in
`make test`, on the small zoo (≥ 6 tasks) under `slow` (conftest.VISION_PRESETS).

One zoo and one suite run (the generic flow, ``vision_run``) are built per session and preset;
the assertions are about what they mean: splits, fine-tuning, merging, the report (the
subspace merges' definitions are tested in test_merges.py).
"""

from __future__ import annotations

import json
import pickle

import pytest
import torch
from tvsplit.tasks.suites.vision import data
from tvsplit.tasks.suites.vision.merging import load_family
from tvsplit.tasks.suites.vision.model import load_backbone
from tvsplit.tasks.suites.vision.report import (
    bar_chart,
    markdown_table,
    results_markdown,
    table,
    verdict,
)
from tvsplit.tasks.suites.vision.zoo import ZooError, build_zoo

SIZES = data.SplitSizes(train=300, val=50, test=60)


# --------------------------------------------------------------------------- data


def test_at_least_six_tasks_without_fashion(monkeypatch, tmp_path):
    monkeypatch.setenv(data.FASHION_DIR_ENV, str(tmp_path / "missing"))
    data._fashion_pool.cache_clear()
    try:
        names = data.task_names()
        with pytest.raises(data.DataUnavailableError, match="dataset-fashion-mnist"):
            data.load_task("fashion", SIZES)
    finally:
        data._fashion_pool.cache_clear()
    assert "fashion" not in names
    assert len(names) >= 6


@pytest.mark.parametrize("name", ["mnist", "mnist_clutter", "animal", "digits"])
def test_splits_are_deterministic_disjoint_and_well_formed(name):
    first, second = data.load_task(name, SIZES, data_seed=3), data.load_task(name, SIZES, 3)
    other_seed = data.load_task(name, SIZES, data_seed=4)
    for which in data.SPLITS:
        a, b = first.split(which), second.split(which)
        assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
        assert a.images.dtype == torch.uint8 and a.images.shape[1:] == (1, 28, 28)
        assert a.labels.dtype == torch.int64
        assert int(a.labels.min()) >= 0 and int(a.labels.max()) < first.num_classes
    assert (len(first.train), len(first.val), len(first.test)) == (300, 50, 60)
    indices = [set(first.split(w).source_index.tolist()) for w in data.SPLITS]
    assert not (indices[0] & indices[1]) and not (indices[0] & indices[2])
    assert not (indices[1] & indices[2])
    assert not torch.equal(first.train.source_index, other_seed.train.source_index)


def test_tasks_from_one_source_use_disjoint_images():
    mnist_tasks = [n for n, spec in data.TASKS.items() if spec.source == "mnist"]
    seen: set[int] = set()
    for name in mnist_tasks:
        task = data.load_task(name, SIZES)
        mine = {i for w in data.SPLITS for i in task.split(w).source_index.tolist()}
        assert not (mine & seen), f"{name} reuses images of another MNIST task"
        seen |= mine
    parity = data.load_task("mnist_parity", SIZES)
    assert set(parity.train.labels.tolist()) == {0, 1}


def test_data_pickles_cannot_load_other_classes(tmp_path):
    import gzip

    path = tmp_path / "evil.gz"
    with gzip.open(path, "wb") as handle:
        pickle.dump(print, handle)
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        data._read_pickle(path)


# --------------------------------------------------------------------------- zoo + benchmark


@pytest.fixture
def zoo(vision_run):
    """The zoo the suite run built (its preset's config)."""
    return vision_run.pool.handle


@pytest.fixture(scope="module")
def result(vision_run):
    return vision_run.result


def test_zoo_is_a_set_of_loadable_model_repositories(zoo):
    from transformers import ConvNextModel

    assert zoo.manifest["status"] == "complete"
    assert zoo.tasks == zoo.config.resolved_tasks() and len(zoo.tasks) >= 3
    for folder in [zoo.base_dir, *zoo.members(0).values()]:
        assert {"config.json", "model.safetensors", "README.md"} <= {
            p.name for p in folder.iterdir()
        }
        model = ConvNextModel.from_pretrained(str(folder))
        assert 100_000 < sum(p.numel() for p in model.parameters()) < 5_000_000
    family = load_family(zoo.base_dir, zoo.members(0))
    assert not any("head" in name or "classifier" in name for name in family.base)
    for task in zoo.tasks:
        assert zoo.head_path(task).is_file()


def test_zoo_is_reused_and_guards_its_config(zoo):
    weights = zoo.member_dir(0, zoo.tasks[0]) / "model.safetensors"
    before = weights.stat().st_mtime_ns
    again = build_zoo(zoo.root, zoo.config)
    assert weights.stat().st_mtime_ns == before
    assert again.manifest["fingerprint"] == zoo.manifest["fingerprint"]
    with pytest.raises(ZooError, match="another config"):
        build_zoo(zoo.root, zoo.config.model_copy(update={"data_seed": 1}))


def test_catalogue_spec_is_a_valid_ingest_spec(zoo):
    from tvsplit.flows.ingest import parse_spec

    spec = parse_spec(zoo.catalogue_spec())
    family = spec.families[zoo.family_name(0)]
    assert list(family.members) == list(zoo.tasks)


def test_each_individual_model_beats_the_base_on_its_own_task(result):
    for seed in result.families:
        base = result.record("base", seed).test
        individual = result.record("individual", seed).test
        for task in result.metrics:
            assert individual[task] > base[task], f"{task}: {individual[task]} ≤ {base[task]}"


def test_merges_beat_the_base_on_average(result):
    for seed in result.families:
        base = result.record("base", seed).test_score
        for method in ("task_arithmetic", "ties", "tsv_m"):
            assert result.record(method, seed).test_score > base, method


def test_results_table_has_every_method_and_column(result, tmp_path):
    rows = {row["method"]: row for row in table(result)}
    expected = {
        "base",
        "individual",
        "weight_average",
        "task_arithmetic",
        "ties",
        "tsv_m",
        "iso_c",
        "iso_cts",
        *(f"{m}[{v}]" for m in ("shared_ta", "shared_ties") for v in ("one-sided", "two-sided")),
    }
    assert expected == set(rows)
    for row in rows.values():
        assert {*result.metrics, "average", "normalized", "delta_vs_ta", "wins_vs_ta"} <= set(row)
    assert rows["task_arithmetic"]["delta_vs_ta"] == (0.0, 0.0)
    assert rows["individual"]["normalized"][0] == pytest.approx(100.0)
    assert verdict(result).outcome in {"holds", "partly", "does not hold"}
    assert markdown_table(result).count("\n") == len(rows) + 1
    text = results_markdown(result)
    assert text.startswith("## Vision suite") and "### The claim" in text
    assert bar_chart(result, tmp_path / "bars.png").stat().st_size > 1000
    json.dumps(result.diagnostics)  # plain data, loggable
    assert set(result.diagnostics) == {"seed-0/one-sided", "seed-0/two-sided"}


def test_diagnostics_equal_an_independent_computation(zoo, vision_run):
    """The shared parts' pairwise cosines and shared energies the suite reports equal NumPy
    float64 ones from the model folders' task vectors and the run's stored shared parts."""
    import numpy as np
    from tvsplit.tasks.decompose_job import stored_shared_parts

    ref = vision_run.pool.families[0]
    family = load_family(zoo.base_dir, zoo.members(zoo.seeds[0]))
    catalogue = str(vision_run.results_path.parent / "catalogue.zarr")
    names = sorted(family.base)
    vectors = np.stack(
        [np.concatenate([family.vectors[n][i].double().numpy().ravel() for n in names])
         for i in range(len(family.members))]
    )  # fmt: skip
    for variant in ("one-sided", "two-sided"):
        stats = vision_run.result.diagnostics[f"{ref.label}/{variant}"]
        run = vision_run.runs[(ref.name, variant)]
        parts = stored_shared_parts(catalogue, ref.name, run, family.members)
        shared = np.stack(
            [np.concatenate([parts[n][i].double().numpy().ravel() for n in names])
             for i in range(len(family.members))]
        )  # fmt: skip
        unit = shared / np.linalg.norm(shared, axis=1, keepdims=True)
        cosine = unit @ unit.T
        for i, first in enumerate(family.members):
            for j in range(i + 1, len(family.members)):
                expected = cosine[i, j]
                found = stats["pairwise_cosine"][f"{first}|{family.members[j]}"]
                assert found == pytest.approx(expected, abs=1e-4), (variant, first, j)
            energy = float(shared[i] @ shared[i] / (vectors[i] @ vectors[i]))
            assert stats["shared_energy"][first] == pytest.approx(energy, rel=1e-4, abs=1e-6)
        upper = np.triu_indices(len(family.members), 1)
        assert stats["cosine_min"] == pytest.approx(cosine[upper].min(), abs=1e-4)
        assert stats["cosine_max"] == pytest.approx(cosine[upper].max(), abs=1e-4)
        # A family that shares nothing would give zero energy: this one shares something.
        assert 0 < stats["shared_energy_mean"] < 1, stats["shared_energy_mean"]


def test_edits_from_the_catalogue_equal_direct_sums_and_split_edits(zoo, vision_run):
    """FamilyTensors (what every suite row evaluates) gives θ0 + λ Σ τ_i from the model
    folders, and the shared-augmented merge with γ = 0 is task arithmetic."""
    from tvsplit.tasks.suites.edited import FamilyTensors

    family = load_family(zoo.base_dir, zoo.members(0))
    ref = vision_run.pool.families[0]
    tensors = FamilyTensors(str(vision_run.results_path.parent / "catalogue.zarr"), ref.name)
    merged = tensors.state("task_arithmetic", {"scale": 0.3})
    assert merged.keys() == family.base.keys()
    for name, base in family.base.items():
        expected = base + 0.3 * sum(family.vectors[name])
        torch.testing.assert_close(merged[name], expected, rtol=1e-5, atol=1e-6)
    run = vision_run.runs[(ref.name, "two-sided")]
    augmented = tensors.state(
        "shared_augmented", {"scale": 0.3, "shared_weight": 0.0, "shared_as": "each"}, run=run
    )
    for name in family.base:
        torch.testing.assert_close(augmented[name], merged[name])
    model = load_backbone(merged, load_backbone(zoo.base_dir).config)
    assert not model.training
