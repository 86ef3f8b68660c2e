"""A complete entry is replaced only once its replacement is complete (storage.staging)."""

from __future__ import annotations

import pytest
import torch
import zarr
from tvsplit.storage.catalogue import Catalogue
from tvsplit.storage.staging import staged_path

FP = {"source": "old", "commit": "a"}
NEW = {"source": "old", "commit": "b"}


def _complete(cat: Catalogue, fingerprint: dict, value: float, *, staged: bool = False) -> None:
    writer = cat.writer("fam", "m", fingerprint, staged=staged)
    writer.write("w", torch.full((64, 8), value), {})
    writer.write("b", torch.full((8,), value), {})
    writer.finish(["w", "b"], {"source": fingerprint["source"]})


def _family(url: str) -> Catalogue:
    cat = Catalogue(url)
    base = cat.writer("fam", None, FP)
    base.write("w", torch.zeros(64, 8), {})
    base.finish(["w"], {})
    _complete(cat, FP, 1.0)
    return cat


@pytest.fixture(params=["local", "memory"])
def url(request, tmp_path) -> str:
    if request.param == "local":
        return str(tmp_path / "cat.zarr")
    return f"memory://staged-{tmp_path.name}/cat.zarr"


def test_a_staged_replacement_is_invisible_until_promoted(url) -> None:
    cat = _family(url)
    writer = cat.writer("fam", "m", NEW, staged=True)
    writer.write("w", torch.full((64, 8), 2.0), {})
    # half-written: the old entry is still the one read, complete and whole
    assert cat.members("fam") == ["m"] and cat.entry("fam", "m").attrs["fingerprint"] == FP
    assert torch.equal(cat.read("fam", "w", member="m"), torch.ones(64, 8))
    with pytest.raises(Exception, match="not complete"):
        cat.promote("fam", "m")
    assert torch.equal(cat.read("fam", "b", member="m"), torch.ones(8))

    writer.write("b", torch.full((8,), 2.0), {})
    writer.finish(["w", "b"], {"source": "old"})
    assert torch.equal(cat.read("fam", "w", member="m"), torch.ones(64, 8))  # not yet
    cat.promote("fam", "m")
    fresh = Catalogue(url)
    assert fresh.entry("fam", "m").attrs["fingerprint"] == NEW
    assert torch.equal(fresh.read("fam", "w", member="m"), torch.full((64, 8), 2.0))
    assert torch.equal(fresh.read("fam", "b", member="m"), torch.full((8,), 2.0))
    assert fresh.members("fam") == ["m"] and not fresh.recover_staged("fam", "m")


def test_a_swap_killed_after_the_old_entry_went_is_finished_at_the_next_start(url) -> None:
    cat = _family(url)
    _complete(cat, NEW, 3.0, staged=True)
    root = zarr.open_group(store=url, mode="a", zarr_format=3)
    del root["families/fam/vectors/m"]  # as a kill between removing the old and copying in
    assert Catalogue(url).members("fam") == []  # nothing half-there is taken as complete
    again = Catalogue(url)
    assert again.recover_staged("fam", "m")
    assert torch.equal(again.read("fam", "w", member="m"), torch.full((64, 8), 3.0))
    assert staged_path("families/fam/vectors/m") not in zarr.open_group(store=url, mode="r")


def test_a_resumed_staged_write_keeps_its_complete_arrays(url) -> None:
    cat = _family(url)
    first = cat.writer("fam", "m", NEW, staged=True)
    first.write("w", torch.full((64, 8), 2.0), {})
    again = Catalogue(url).writer("fam", "m", NEW, staged=True)
    assert again.completed() == {"w"}
    assert not Catalogue(url).recover_staged("fam", "m")  # incomplete: left to resume
    assert torch.equal(Catalogue(url).read("fam", "w", member="m"), torch.ones(64, 8))
