"""The decomposition job without Prefect: the pipelined batch, the basis packs, reading
slices into reused buffers, and the Prefect run settings."""

from __future__ import annotations

import threading

import pytest
import torch
import tvsplit.tasks.decompose_job as job
from tvsplit.storage.catalogue import Catalogue
from tvsplit.storage.decompositions import BasisCache, DecompositionRun
from tvsplit.storage.writes import ATTRS
from tvsplit.tasks.decompose import decompose_layer, split_from_arrays
from tvsplit.tasks.decompose_job import (
    SplitSettings,
    decompose_parameters,
    member_fingerprint,
    run_id,
)
from tvsplit.tasks.synthetic import planted_family

MEMBERS = ["m0", "m1", "m2", "m3"]
# Several parameters of each shape, so the job's slice buffers are reused many times.
PARAMS = {
    **{f"blocks.{b}.mlp.weight": (36, 20) for b in range(3)},
    **{f"blocks.{b}.norm.weight": (20,) for b in range(3)},
    "head.weight": (20, 44),
}


def _vectors() -> dict[str, torch.Tensor]:
    out = {}
    for index, (name, shape) in enumerate(PARAMS.items()):
        if len(shape) == 2:
            out[name] = planted_family(
                *shape, len(MEMBERS), shared_rank=2, unique_rank=2, noise=0.02, seed=index
            ).deltas
        else:
            generator = torch.Generator().manual_seed(index)
            out[name] = torch.randn(len(MEMBERS), *shape, generator=generator)
    return out


def _write_family(url: str) -> tuple[Catalogue, dict[str, torch.Tensor]]:
    cat = Catalogue(url)
    vectors = _vectors()
    for i, member in enumerate(MEMBERS):
        writer = cat.writer("fam", member, {"source": f"synthetic:{member}"})
        for name, stack in vectors.items():
            writer.write(name, stack[i], {"source": "synthetic"})
        writer.finish(list(PARAMS), {"source": f"synthetic:{member}"})
    return cat, vectors


@pytest.fixture
def family(tmp_path) -> tuple[Catalogue, dict[str, torch.Tensor]]:
    return _write_family(str(tmp_path / "catalogue.zarr"))


def _begin(cat: Catalogue, settings: SplitSettings) -> tuple[str, dict[str, str]]:
    fingerprints = {m: member_fingerprint(cat, "fam", m) for m in MEMBERS}
    run = run_id("fam", MEMBERS, settings, fingerprints)
    DecompositionRun(cat, "fam", run).begin(settings.model_dump(), MEMBERS, list(PARAMS))
    BasisCache(cat, "fam", settings.basis_key()).prepare()
    return run, fingerprints


def test_pipelined_batch_equals_the_engine_on_every_parameter(family):
    cat, vectors = family
    settings = SplitSettings(min_tasks=2)
    run, fingerprints = _begin(cat, settings)
    reports, failures = decompose_parameters(
        cat.url, "fam", run, list(PARAMS), MEMBERS, fingerprints, settings
    )
    assert failures == {}
    assert [r["name"] for r in reports] == list(PARAMS)  # written in order
    assert sum(r["bases_computed"] for r in reports) == len(PARAMS) * len(MEMBERS)
    store = DecompositionRun(cat, "fam", run)
    for name, deltas in vectors.items():
        direct = decompose_layer(deltas, min_tasks=2)
        stored = store.read_parameter(name)
        rebuilt = split_from_arrays(stored.arrays, stored.diagnostics, deltas)
        assert stored.diagnostics["k"] == direct.k, name
        assert torch.allclose(rebuilt.shared, direct.shared, atol=1e-6), name
        assert torch.allclose(rebuilt.unique, direct.unique, atol=1e-6), name


def test_a_failing_parameter_leaves_the_others_written(family, monkeypatch):
    cat, _ = family
    settings = SplitSettings()
    run, fingerprints = _begin(cat, settings)
    real = job.split_from_bases

    def broken(deltas, bases, *, name, **kwargs):
        if name == "blocks.1.mlp.weight":
            raise RuntimeError("injected")
        return real(deltas, bases, name=name, **kwargs)

    monkeypatch.setattr(job, "split_from_bases", broken)
    reports, failures = decompose_parameters(
        cat.url, "fam", run, list(PARAMS), MEMBERS, fingerprints, settings
    )
    assert list(failures) == ["blocks.1.mlp.weight"]
    assert "injected" in str(failures["blocks.1.mlp.weight"])
    done = DecompositionRun(cat, "fam", run).completed()
    assert done == set(PARAMS) - {"blocks.1.mlp.weight"}
    assert len(reports) == len(PARAMS) - 1


def test_a_failing_write_is_reported_and_the_rest_written(family, monkeypatch):
    cat, _ = family
    settings = SplitSettings()
    run, fingerprints = _begin(cat, settings)
    real = DecompositionRun.write_parameter

    def flaky(self, name, arrays, diagnostics):
        if name == "head.weight":
            raise OSError("disk full")
        return real(self, name, arrays, diagnostics)

    monkeypatch.setattr(DecompositionRun, "write_parameter", flaky)
    reports, failures = decompose_parameters(
        cat.url, "fam", run, list(PARAMS), MEMBERS, fingerprints, settings
    )
    assert list(failures) == ["head.weight"] and isinstance(failures["head.weight"], OSError)
    assert DecompositionRun(cat, "fam", run).completed() == set(PARAMS) - {"head.weight"}
    assert len(reports) == len(PARAMS) - 1


def test_a_failing_cache_write_costs_no_result(family, monkeypatch):
    cat, _ = family
    settings = SplitSettings()
    run, fingerprints = _begin(cat, settings)

    def broken(self, name, bases):
        raise OSError("read-only cache")

    monkeypatch.setattr(BasisCache, "put", broken)
    _, failures = decompose_parameters(
        cat.url, "fam", run, list(PARAMS), MEMBERS, fingerprints, settings
    )
    assert failures == {}
    assert DecompositionRun(cat, "fam", run).completed() == set(PARAMS)


def test_a_family_in_an_fsspec_store():
    cat, vectors = _write_family("memory://tvsplit-job-test/catalogue.zarr")
    settings = SplitSettings()
    run, fingerprints = _begin(cat, settings)
    _, failures = decompose_parameters(
        cat.url, "fam", run, list(PARAMS), MEMBERS, fingerprints, settings
    )
    assert failures == {}
    stored = DecompositionRun(cat, "fam", run).read_parameter("head.weight")
    rebuilt = split_from_arrays(stored.arrays, stored.diagnostics, vectors["head.weight"])
    assert torch.allclose(rebuilt.shared, decompose_layer(vectors["head.weight"]).shared, atol=1e-6)
    found = BasisCache(cat, "fam", settings.basis_key()).get("head.weight", fingerprints)
    assert sorted(found) == MEMBERS


def test_a_member_with_another_shape_is_named(family):
    cat, _ = family
    writer = cat.writer("fam", "odd", {"source": "synthetic:odd"})
    for name, shape in PARAMS.items():
        odd = (shape[0] + 1, *shape[1:]) if name == "head.weight" else shape
        writer.write(name, torch.ones(odd), {"source": "synthetic"})
    writer.finish(list(PARAMS), {"source": "synthetic:odd"})
    members = [*MEMBERS, "odd"]
    fingerprints = {m: member_fingerprint(cat, "fam", m) for m in members}
    settings = SplitSettings()
    run = run_id("fam", members, settings, fingerprints)
    DecompositionRun(cat, "fam", run).begin(settings.model_dump(), members, list(PARAMS))
    _, failures = decompose_parameters(
        cat.url, "fam", run, ["head.weight"], members, fingerprints, settings
    )
    error = failures["head.weight"]
    assert isinstance(error, ValueError)
    assert "vectors/odd" in str(error) and "(21, 44)" in str(error) and "(20, 44)" in str(error)


def test_slice_buffers_are_kept_only_for_shapes_still_to_come():
    buffers = job._Buffers(members=3)
    buffers.expect([(4, 2), (4, 2), (9,), (4, 2)])
    first = buffers.take((4, 2))
    buffers.give(first)
    again = buffers.take((4, 2))
    assert again is first and again.shape == (3, 4, 2)  # reused, not reallocated
    one_off = buffers.take((9,))
    buffers.give(one_off)
    assert buffers.take((9,)) is not one_off  # nothing of that shape was still expected
    buffers.give(again)
    last = buffers.take((4, 2))
    buffers.give(last)
    assert buffers.take((4, 2)) is not last  # all three (4, 2) parameters are done


def _basis(rows: int, cols: int, rank: int, seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        "left": torch.randn(rows, rank, generator=generator),
        "right": torch.randn(cols, rank, generator=generator),
        "sigma": torch.rand(rank + 2, generator=generator),
    }


def test_basis_packs_keep_each_members_entry_and_fingerprint(family):
    cat, _ = family
    cache = BasisCache(cat, "fam", "b-test")
    cache.prepare()
    a, b, c = _basis(6, 5, 2, 0), _basis(6, 5, 3, 1), _basis(6, 5, 0, 2)
    attrs = {"shape": [6, 5], "side": "left", "rule": "fixed", "solver": "full"}
    cache.put("p.weight", {"a": ("fa", a, attrs), "b": ("fb", b, attrs)})
    found = cache.get("p.weight", {"a": "fa", "b": "fb", "c": "fc"})
    assert sorted(found) == ["a", "b"]  # c has no entry yet
    for name, want in (("a", a), ("b", b)):
        assert torch.equal(found[name]["left"], want["left"])
        assert torch.equal(found[name]["right"], want["right"])
        assert torch.allclose(found[name]["sigma"], want["sigma"])
        assert found[name]["attrs"] == attrs
    assert cache.get("p.weight", {"a": "stale"}) == {}  # made from another revision
    cache.put("p.weight", {"c": ("fc", c, attrs)})  # a member added later: a pack of one
    found = cache.get("p.weight", {"a": "fa", "b": "fb", "c": "fc"})
    assert sorted(found) == ["a", "b", "c"] and found["c"]["left"].shape == (6, 0)
    assert cache.get("other.weight", {"a": "fa"}) == {}


def test_packs_written_at_once_for_one_new_parameter_are_both_found(family):
    cat, _ = family
    attrs = {"shape": [6, 5], "side": "left", "rule": "fixed", "solver": "full"}
    BasisCache(cat, "fam", "b-test").prepare()
    start = threading.Barrier(2)
    errors = []

    def put(member: str, seed: int) -> None:
        cache = BasisCache(Catalogue(cat.url), "fam", "b-test")  # as two jobs would
        start.wait()
        try:
            cache.put("new.weight", {member: (f"f{member}", _basis(6, 5, 2, seed), attrs)})
        except Exception as error:
            errors.append(error)

    threads = [threading.Thread(target=put, args=(m, i)) for i, m in enumerate("ab")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    found = BasisCache(cat, "fam", "b-test").get("new.weight", {"a": "fa", "b": "fb"})
    assert sorted(found) == ["a", "b"]


def test_an_unfinished_pack_is_not_used(family):
    cat, _ = family
    cache = BasisCache(cat, "fam", "b-test")
    cache.prepare()
    attrs = {"shape": [6, 5], "side": "left", "rule": "fixed", "solver": "full"}
    cache.put("p.weight", {"a": ("fa", _basis(6, 5, 2, 0), attrs)})
    group = cat.family_group("fam", "bases/b-test/p.weight")
    ((_, array),) = list(group.arrays())
    array.attrs[ATTRS] = {**dict(array.attrs[ATTRS]), "status": "partial"}  # a crash mid-write
    assert cache.get("p.weight", {"a": "fa"}) == {}


def test_read_into_fills_the_buffer_and_names_a_wrong_shape(family):
    cat, vectors = family
    entry = cat.open_entry("fam", "m2")
    buffer = torch.full((36, 20), float("nan"))
    entry.read_into("blocks.0.mlp.weight", buffer)
    assert torch.equal(buffer, vectors["blocks.0.mlp.weight"][2])
    with pytest.raises(ValueError, match=r"blocks\.0\.norm\.weight.*\(20,\).*\(36, 20\)"):
        entry.read_into("blocks.0.norm.weight", buffer)


def test_no_heartbeats_on_the_ephemeral_api_only():
    from prefect.settings import PREFECT_API_URL, get_current_settings, temporary_settings
    from tvsplit.flows.settings import prefect_run_settings

    with temporary_settings(updates={PREFECT_API_URL: None}):
        default = get_current_settings().flows.heartbeat_frequency
        with prefect_run_settings():
            assert get_current_settings().flows.heartbeat_frequency is None
        assert get_current_settings().flows.heartbeat_frequency == default
    server = {PREFECT_API_URL: "http://127.0.0.1:4200/api"}
    with temporary_settings(updates=server), prefect_run_settings():
        assert get_current_settings().flows.heartbeat_frequency == default
