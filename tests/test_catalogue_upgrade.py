"""Catalogue format versions: a catalogue written by the pre-change code (commit bf13aae,
tests/fixtures/legacy_catalogue, made by its make.py) reads with one warning naming the
upgrade; `tvsplit catalogue upgrade` rewrites it in place, stoppable at any write, after
which verify passes and its edits equal those of a fresh catalogue of the same sources."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import pytest
import torch
import yaml
import zarr
from interrupts import Killed
from safetensors.torch import load_file
from tvsplit.flows.cli import app
from tvsplit.storage.catalogue import Catalogue
from tvsplit.storage.decompositions import DecompositionRun, list_runs
from tvsplit.storage.errors import CatalogueError
from tvsplit.storage.integrity import IntegrityWarning
from tvsplit.storage.upgrade import upgrade_catalogue
from tvsplit.storage.verify import OK, verify_catalogue
from tvsplit.storage.writes import FORMAT_VERSION, LEGACY_FORMAT, format_version, mark_format
from typer.testing import CliRunner

FIXTURE = Path(__file__).parent / "fixtures" / "legacy_catalogue"
PARAM = "transformer.h.0.mlp.c_fc.weight"


@pytest.fixture
def legacy(tmp_path) -> Path:
    """A copy of the legacy fixture (the upgrade changes it in place)."""
    target = tmp_path / "legacy"
    shutil.copytree(FIXTURE, target)
    return target


def _values(url: str) -> dict[str, torch.Tensor]:
    """Every stored value of the catalogue: entries' parameters and runs' arrays."""
    cat = Catalogue(url)
    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", IntegrityWarning)
        for family in cat.families():
            for member in [None, *cat.members(family)]:
                for name in cat.parameters(family, member):
                    out[f"{family}/{member}/{name}"] = cat.read(family, name, member=member)
            for run, _ in list_runs(cat, family):
                stored = DecompositionRun(cat, family, run)
                for name in stored.attrs()["parameters"]:
                    for key, array in stored.read_parameter(name).arrays.items():
                        out[f"{family}/{run}/{name}/{key}"] = array
    return out


def test_the_fixture_is_small_and_of_the_legacy_format(legacy):
    size = sum(p.stat().st_size for p in FIXTURE.rglob("*") if p.is_file())
    assert size < 1_000_000, size
    root = zarr.open_group(str(legacy / "catalogue.zarr"), mode="r")
    assert format_version(root) is None
    assert Catalogue(str(legacy / "catalogue.zarr")).format_version() == LEGACY_FORMAT


def test_current_reader_reads_it_with_one_warning_naming_the_upgrade(legacy):
    url = str(legacy / "catalogue.zarr")
    cat = Catalogue(url)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = cat.read("tiny", PARAM, member="ft1")
        cat.read("tiny", PARAM, member="ft2")
        cat.read("tiny", PARAM)
    assert [w.category for w in caught] == [IntegrityWarning]
    assert f"tvsplit catalogue upgrade {url}" in str(caught[0].message)
    ft1 = load_file(legacy / "sources" / "ft1" / "model.safetensors")[PARAM]
    base = load_file(legacy / "sources" / "base" / "model.safetensors")[PARAM]
    assert torch.allclose(first, ft1 - base, atol=1e-7)


def test_upgrade_keeps_every_value_and_verify_passes(legacy):
    url = str(legacy / "catalogue.zarr")
    before = _values(url)
    runner = CliRunner()
    outcome = runner.invoke(app, ["catalogue", "upgrade", url])
    assert outcome.exit_code == 0, outcome.output
    assert f"format {LEGACY_FORMAT} → {FORMAT_VERSION}" in " ".join(outcome.output.split())
    assert Catalogue(url).format_version() == FORMAT_VERSION
    after = _values(url)
    assert before.keys() == after.keys() and len(before) > 50
    assert all(torch.equal(before[key], after[key]) for key in before)
    rows = verify_catalogue(Catalogue(url))
    assert rows and {row.status for row in rows} == {OK}
    checked = runner.invoke(app, ["catalogue", "verify", "--catalogue", url])
    assert checked.exit_code == 0 and "0 damaged, 0 written before checks" in checked.output
    with warnings.catch_warnings():
        warnings.simplefilter("error", IntegrityWarning)  # no warning once upgraded
        Catalogue(url).read("tiny", PARAM, member="ft1")
    again = runner.invoke(app, ["catalogue", "upgrade", url])
    assert again.exit_code == 0 and "nothing to do" in again.output


@pytest.mark.parametrize("stop_at", [1, 3, 17, 40, 70])
def test_an_upgrade_stopped_at_any_write_leaves_a_readable_catalogue(legacy, monkeypatch, stop_at):
    """Stop the upgrade inside its n-th node write (data written, not yet marked complete):
    the catalogue still reads, every value unchanged; a rerun finishes the upgrade."""
    import tvsplit.storage.writes as writes

    url = str(legacy / "catalogue.zarr")
    before = _values(url)
    real, calls = writes.stored_manifest, []

    async def stopping(array):
        calls.append(array)
        if len(calls) == stop_at:
            raise Killed  # on zarr's event loop, where the write runs: reaches the caller
        return await real(array)

    monkeypatch.setattr(writes, "stored_manifest", stopping)
    with pytest.raises(Killed), warnings.catch_warnings():
        warnings.simplefilter("ignore", IntegrityWarning)
        upgrade_catalogue(Catalogue(url))
    monkeypatch.setattr(writes, "stored_manifest", real)
    stopped = _values(url)
    assert stopped.keys() == before.keys()
    assert all(torch.equal(before[key], stopped[key]) for key in before)
    assert Catalogue(url).format_version() == LEGACY_FORMAT  # marked only at the end
    assert all(row.status != "damaged" for row in verify_catalogue(Catalogue(url)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", IntegrityWarning)
        upgrade_catalogue(Catalogue(url))
    assert {row.status for row in verify_catalogue(Catalogue(url))} == {OK}
    finished = _values(url)
    assert all(torch.equal(before[key], finished[key]) for key in before)


def test_a_newer_format_is_refused_with_one_message(tmp_path):
    url = str(tmp_path / "new.zarr")
    cat = Catalogue(url)
    cat.writer("fam", None, {"source": "x"}).finish([], {})
    root = zarr.open_group(url, mode="a")
    assert format_version(root) == FORMAT_VERSION  # written with every new catalogue
    mark_format(root, FORMAT_VERSION + 1)
    with pytest.raises(CatalogueError, match=r"format 3 was written by a newer tvsplit.*upgrade"):
        Catalogue(url).families()
    with pytest.raises(CatalogueError, match="newer tvsplit"):
        upgrade_catalogue(Catalogue(url))


def test_an_edit_from_the_upgraded_catalogue_equals_one_from_a_fresh_catalogue(
    legacy, tmp_path, prefect_harness
):
    from tvsplit.flows.decompose import run_decompose
    from tvsplit.flows.edit import edit_model
    from tvsplit.flows.ingest import ingest
    from tvsplit.tasks.split_settings import SplitSettings

    old_url = str(legacy / "catalogue.zarr")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", IntegrityWarning)
        upgrade_catalogue(Catalogue(old_url))
    old_run = (legacy / "run.txt").read_text().strip()
    sources = legacy / "sources"
    spec = {
        "families": {
            "tiny": {
                "base": str(sources / "base"),
                "members": {m: str(sources / m) for m in ("ft1", "ft2", "ft3")},
            }
        }
    }
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    fresh_url = str(tmp_path / "fresh.zarr")
    ingest(tmp_path / "spec.yaml", fresh_url, progress=False)
    fresh_run = run_decompose(
        "tiny", settings=SplitSettings(min_tasks=2), catalogue_url=fresh_url, track=False,
        workers=1, show_progress=False,
    ).run  # fmt: skip

    def edit(url: str, run: str, out: str, method: str, params: dict) -> dict:
        recipe = {
            "base": str(sources / "base"), "family": "tiny", "method": method,
            "decomposition": run, "members": [{"name": "ft1", "weight": 0.8}, {"name": "ft3"}],
            "params": params,
        }  # fmt: skip
        path = tmp_path / f"{out}.yaml"
        path.write_text(yaml.safe_dump(recipe))
        result = edit_model(
            str(path), output=str(tmp_path / out), catalogue_url=url, track=False,
            show_progress=False,
        )  # fmt: skip
        return load_file(result.output / "model.safetensors")

    for method, params in (("task_arithmetic", {}), ("unique_mix", {"shared_weight": 0.5})):
        old = edit(old_url, old_run, f"old-{method}", method, params)
        new = edit(fresh_url, fresh_run, f"new-{method}", method, params)
        assert old.keys() == new.keys()
        for name in old:
            assert torch.allclose(old[name], new[name], atol=1e-6), (method, name)
