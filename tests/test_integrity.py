"""Integrity (storage/integrity.py, storage/verify.py): a deleted, truncated or byte-flipped
chunk of a task vector or of a decomposition's basis is caught by the decomposition job, by
the edit job and by `verify`; catalogues written before manifests read with one warning."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from test_decompose_job import MEMBERS, PARAMS, _begin, _write_family
from tvsplit.storage.catalogue import Catalogue
from tvsplit.storage.decompositions import DecompositionRun
from tvsplit.storage.integrity import IntegrityError, IntegrityWarning
from tvsplit.storage.verify import DAMAGED, OK, UNCHECKED, verify_catalogue
from tvsplit.storage.writes import ATTRS, COMPLETE
from tvsplit.tasks.decompose_job import SplitSettings, decompose_parameters
from tvsplit.tasks.edit import get_method
from tvsplit.tasks.edit_job import edited_tensors, plan_edit

PARAM = "head.weight"
PARAM_KEY = PARAM  # storage.names.param_key keeps dots


def _chunks(folder: Path) -> list[Path]:
    found = sorted(p for p in (folder / "c").rglob("*") if p.is_file())
    assert found, f"no chunks under {folder}"
    return found


def delete(chunk: Path) -> None:
    chunk.unlink()


def truncate(chunk: Path) -> None:
    data = chunk.read_bytes()
    chunk.write_bytes(data[: len(data) // 2])


def flip(chunk: Path) -> None:
    data = bytearray(chunk.read_bytes())
    for offset in (len(data) // 3, len(data) // 2):  # inside the data, not the trailing CRC
        data[offset] ^= 0x5A
    chunk.write_bytes(bytes(data))


DAMAGE = [delete, truncate, flip]


@pytest.fixture
def decomposed(tmp_path):
    """A 4-member family, decomposed (a complete run); returns (catalogue, run)."""
    cat, _ = _write_family(str(tmp_path / "catalogue.zarr"))
    writer = cat.writer("fam", None, {"source": "synthetic:base"})
    for name, shape in PARAMS.items():
        writer.write(name, torch.zeros(shape), {"source": "synthetic"})
    writer.finish(list(PARAMS), {"source": "synthetic:base"})
    settings = SplitSettings(min_tasks=2)
    run, fingerprints = _begin(cat, settings)
    _, failures = decompose_parameters(
        cat.url, "fam", run, list(PARAMS), MEMBERS, fingerprints, settings
    )
    assert not failures
    DecompositionRun(cat, "fam", run).finish({})
    return cat, run, fingerprints, settings


def _member_param(cat: Catalogue, member: str) -> Path:
    from tvsplit.storage.names import param_key

    return Path(cat.url) / "families" / "fam" / "vectors" / member / param_key(PARAM)


def _run_basis(cat: Catalogue, run: str) -> Path:
    from tvsplit.storage.names import param_key

    return Path(cat.url) / "families" / "fam" / "decompositions" / run / param_key(PARAM) / "basis"


def _edit(cat: Catalogue, run: str) -> None:
    method = get_method("unique_negation")
    params = method.parse_params({"scale": 1.0})
    members = method.parse_members([{"weight": 1.0}], 1)
    plan = plan_edit(cat, "fam", "unique_negation", ["m1"], params, members, run, True)
    base = {name: torch.zeros(shape) for name, shape in PARAMS.items()}
    for _ in edited_tensors(plan, base):
        pass


def test_intact_catalogue_verifies_ok(decomposed):
    cat, run, *_ = decomposed
    rows = verify_catalogue(cat)
    assert rows and {row.status for row in rows} == {OK}
    kinds = {row.node.split("/")[1] for row in rows}
    assert kinds >= {"vectors", "decompositions", "bases"}
    _edit(cat, run)  # reads cleanly


@pytest.mark.parametrize("damage", DAMAGE, ids=lambda f: f.__name__)
def test_damaged_task_vector_is_caught_by_decompose_edit_and_verify(decomposed, damage):
    cat, run, fingerprints, _ = decomposed
    damage(_chunks(_member_param(cat, "m2"))[0])
    with pytest.raises(IntegrityError, match=r"fam/vectors/m2: parameter 'head.weight'"):
        cat.read("fam", PARAM, member="m2")
    # decompose: a new run (other settings) must read the vector and names it
    other = SplitSettings(min_tasks=2, seed=1)
    new_run, _ = _begin(cat, other)
    _, failures = decompose_parameters(
        cat.url, "fam", new_run, [PARAM], MEMBERS, fingerprints, other
    )
    assert isinstance(failures.get(PARAM), IntegrityError), failures
    assert "m2" in str(failures[PARAM]) and "re-ingest" in str(failures[PARAM])
    with pytest.raises(IntegrityError, match="m2"):
        _edit_member(cat, run, "m2")
    rows = [row for row in verify_catalogue(cat, "fam") if row.status == DAMAGED]
    assert [row.node for row in rows] == ["fam/vectors/m2"], rows
    assert "head.weight" in rows[0].detail


def _edit_member(cat: Catalogue, run: str, member: str) -> None:
    method = get_method("task_arithmetic")
    params = method.parse_params({})
    members = method.parse_members([{"weight": 1.0}], 1)
    plan = plan_edit(cat, "fam", "task_arithmetic", [member], params, members, None, False)
    base = {name: torch.zeros(shape) for name, shape in PARAMS.items()}
    for _ in edited_tensors(plan, base):
        pass


@pytest.mark.parametrize("damage", DAMAGE, ids=lambda f: f.__name__)
def test_damaged_basis_is_caught_by_edit_verify_and_decompose(decomposed, damage):
    cat, run, fingerprints, settings = decomposed
    damage(_chunks(_run_basis(cat, run))[0])
    with pytest.raises(IntegrityError, match=rf"decompositions/{run}: parameter 'head.weight'"):
        _edit(cat, run)
    rows = [row for row in verify_catalogue(cat, "fam") if row.status == DAMAGED]
    assert [row.node for row in rows] == [f"fam/decompositions/{run}/{PARAM_KEY}"]
    assert "rerun the decomposition" in rows[0].detail
    store = DecompositionRun(cat, "fam", run)
    if damage is flip:  # the stored CRC is intact: only a decode (edit, verify) sees it
        assert PARAM in store.completed()
        return
    # deleted / truncated: a rerun sees the parameter as not done and redoes it
    assert PARAM not in store.completed()
    _, failures = decompose_parameters(
        cat.url, "fam", run, [PARAM], MEMBERS, fingerprints, settings
    )
    assert not failures
    _edit(cat, run)
    assert {row.status for row in verify_catalogue(cat, "fam")} == {OK}


def test_damaged_basis_cache_is_a_miss_not_a_wrong_result(decomposed, caplog):
    cat, _, fingerprints, settings = decomposed
    packs = Path(cat.url) / "families" / "fam" / "bases" / settings.basis_key()
    pack = next(p for p in (packs / PARAM_KEY).iterdir() if p.is_dir())
    flip(_chunks(pack)[0])
    from tvsplit.storage.decompositions import BasisCache

    with caplog.at_level("WARNING"):
        assert BasisCache(cat, "fam", settings.basis_key()).get(PARAM, fingerprints) == {}
    assert "checksum" in caplog.text and "recomputing" in caplog.text
    assert any(row.status == DAMAGED and "bases" in row.node for row in verify_catalogue(cat))


def test_a_catalogue_written_before_manifests_reads_with_one_warning(tmp_path):
    """An entry whose arrays have no checksum codec and no manifest (as written before)."""
    url = str(tmp_path / "old.zarr")
    root = zarr.open_group(url, mode="w", zarr_format=3)
    entry = root.create_group("families/fam/vectors/m0")
    for name in ("a", "b"):
        array = entry.create_array(name, shape=(4, 3), chunks=(2, 3), dtype="float32")
        array[...] = np.arange(12, dtype="float32").reshape(4, 3)
        array.attrs[ATTRS] = {"status": COMPLETE, "name": name, "shape": [4, 3]}
    entry.attrs[ATTRS] = {"status": COMPLETE, "parameters": ["a", "b"]}
    cat = Catalogue(url)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = cat.read("fam", "a", member="m0")
        cat.read("fam", "b", member="m0")
    assert torch.equal(first, torch.arange(12.0).reshape(4, 3))
    assert [w.category for w in caught] == [IntegrityWarning]
    assert "verify" in str(caught[0].message)
    assert [row.status for row in verify_catalogue(cat)] == [UNCHECKED]
