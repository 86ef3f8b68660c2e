"""The Zarr catalogue: layout, chunking, provenance, visibility, resume, delete."""

from __future__ import annotations

import math

import pytest
import torch
import zarr
from interrupts import Killed
from tvsplit.storage.catalogue import Catalogue
from tvsplit.storage.errors import CatalogueError
from tvsplit.storage.names import param_key, param_name
from tvsplit.storage.writes import CHUNK_MAX, row_chunks

FP = {"source": "test", "commit": None}


@pytest.mark.parametrize(
    "name",
    ["h.0.attn.c_attn.weight", "__init__", ".", "..", "a/b", "ü~x", "layer 3%", "~7E", "x" * 300],
)
def test_param_keys_are_reversible_and_zarr_safe(name: str) -> None:
    key = param_key(name)
    assert param_name(key) == name
    assert "/" not in key and not key.startswith("__") and key not in {".", ".."}
    assert all(c.isascii() and (c.isalnum() or c in "._-~") for c in key)


@pytest.mark.parametrize(
    "shape",
    [(50257, 768), (768, 3072), (3072,), (10_000_000,), (3, 6_000_000), (64, 3, 7, 7), ()],
)
def test_row_chunks_hold_whole_rows_of_at_most_16_mib(shape: tuple[int, ...]) -> None:
    chunks = row_chunks(shape)
    assert len(chunks) == len(shape)
    size = math.prod(chunks) * 4
    assert size <= CHUNK_MAX
    if math.prod(shape) * 4 > CHUNK_MAX:
        assert size >= 4 << 20  # big arrays get 4–16 MiB chunks
    if len(shape) >= 2 and math.prod(shape[1:]) * 4 <= CHUNK_MAX:
        assert chunks[1:] == shape[1:]  # whole rows


def test_write_read_roundtrip_with_provenance_and_row_slices(tmp_path) -> None:
    cat = Catalogue(str(tmp_path / "cat.zarr"))
    assert cat.families() == []  # reading creates nothing
    assert not (tmp_path / "cat.zarr").exists()
    big = torch.randn(5000, 1024)  # 20 MiB: more than one chunk
    half = torch.randn(5, 7).to(torch.bfloat16)
    writer = cat.writer("fam", None, FP)
    writer.write("h.0.attn.c_attn.weight", big, {"dtype": "float32", "file": "m.safetensors"})
    writer.write("ln.weight", half, {"dtype": "bfloat16"})
    writer.write("zero.weight", None, {"dtype": "float32", "shape": [4, 4]})
    assert cat.families() == ["fam"] and not cat.has_base("fam")
    with pytest.raises(CatalogueError, match="incomplete"):
        cat.read("fam", "ln.weight")
    writer.finish(["h.0.attn.c_attn.weight", "ln.weight", "zero.weight"], {"source": "test"})

    assert cat.has_base("fam")
    assert cat.parameters("fam") == ["h.0.attn.c_attn.weight", "ln.weight", "zero.weight"]
    assert torch.equal(cat.read("fam", "h.0.attn.c_attn.weight"), big)
    assert torch.equal(
        cat.read("fam", "h.0.attn.c_attn.weight", rows=slice(100, 203)), big[100:203]
    )
    restored = cat.read("fam", "ln.weight")
    assert restored.dtype == torch.float32 and torch.equal(restored, half.float())
    assert torch.equal(cat.read("fam", "zero.weight"), torch.zeros(4, 4))
    attrs = cat.array_attrs("fam", "ln.weight")
    assert (
        attrs["dtype"] == "bfloat16" and attrs["shape"] == [5, 7] and attrs["name"] == "ln.weight"
    )
    assert attrs["status"] == "complete" and attrs["created"] and attrs["tvsplit_version"]
    entry = cat.entry("fam")
    assert entry is not None and entry.attrs["completed"] and entry.attrs["fingerprint"] == FP

    array = zarr.open_group(str(tmp_path / "cat.zarr"), mode="r")["families/fam/base"][
        param_key("h.0.attn.c_attn.weight")
    ]
    assert array.dtype == "float32" and array.chunks == (2048, 1024)  # 8 MiB of whole rows
    blosc = array.compressors[0]
    assert type(blosc).__name__ == "BloscCodec" and blosc.cname.value == "lz4"
    assert blosc.typesize == 4 and blosc.shuffle.value == "shuffle"  # float32 bytes shuffled


def test_partial_entries_are_invisible_and_resume_keeps_complete_arrays(tmp_path) -> None:
    cat = Catalogue(str(tmp_path / "cat.zarr"))
    base = cat.writer("fam", None, FP)
    base.write("w", torch.ones(2, 2), {})
    base.finish(["w"], {})
    first = cat.writer("fam", "m1", FP)
    first.write("a", torch.ones(3), {})
    assert cat.members("fam") == [] and cat.members("fam", include_partial=True) == ["m1"]
    with pytest.raises(CatalogueError, match="cannot mark complete.*'b'"):
        first.finish(["a", "b"], {})

    again = Catalogue(str(tmp_path / "cat.zarr")).writer("fam", "m1", FP)
    assert again.completed() == {"a"}  # same fingerprint: resumed
    other = Catalogue(str(tmp_path / "cat.zarr")).writer("fam", "m1", {**FP, "commit": "x"})
    assert other.completed() == set()  # another source: started afresh
    other.write("a", torch.zeros(3), {})
    other.finish(["a"], {"source": "elsewhere"})
    assert cat.members("fam") == ["m1"]
    with pytest.raises(CatalogueError, match="already complete"):
        cat.writer("fam", "m1", FP)

    assert cat.delete("fam", "m1") and cat.members("fam", include_partial=True) == []
    assert not cat.delete("fam", "m1")
    assert cat.has_base("fam")


@pytest.mark.parametrize("url", ["local", "memory"])
def test_an_array_write_cut_short_leaves_no_node_and_the_rewrite_replaces_it(
    tmp_path, monkeypatch, url
) -> None:
    """The chunks are written before the array's one metadata write: stopped in between,
    the chunks are there but no array is (nothing to take for complete, no warning when the
    group is listed); the next write of the name removes them and writes the array whole."""
    import uuid
    import warnings

    import tvsplit.storage.writes as writes

    url = str(tmp_path / "cat.zarr") if url == "local" else f"memory://{uuid.uuid4().hex}/c.zarr"
    cat = Catalogue(url)
    writer = cat.writer("fam", None, FP)
    writer.write("a", torch.ones(3), {})
    real = writes.stored_manifest

    async def cut(array):
        raise Killed

    monkeypatch.setattr(writes, "stored_manifest", cut)
    with pytest.raises(Killed):
        writer.write("b", torch.full((600, 700), 2.0), {})
    monkeypatch.setattr(writes, "stored_manifest", real)
    group = zarr.open_group(url, mode="r", path="families/fam/base")
    stored = zarr.storage.StorePath(group.store, group.path)
    chunks = [key for key in zarr.core.sync.sync(_keys(stored)) if key.startswith("b/")]
    assert chunks and "b/zarr.json" not in chunks  # the data, without metadata
    with warnings.catch_warnings(record=True) as shown:  # the filters as a user has them
        assert [key for key, _ in group.arrays()] == ["a"]
        again = Catalogue(url).writer("fam", None, FP)
        assert again.completed() == {"a"}
    assert [str(w.message) for w in shown] == []
    again.write("b", torch.full((600, 700), 3.0), {})
    again.finish(["a", "b"], {})
    assert torch.equal(cat.read("fam", "b"), torch.full((600, 700), 3.0))
    left = [key for key in zarr.core.sync.sync(_keys(stored)) if key.startswith("b/")]
    assert sorted(left) == sorted({"b/zarr.json", *chunks})  # same keys, rewritten


def test_a_chunk_removed_by_another_writer_mid_write_is_refused(tmp_path, monkeypatch) -> None:
    """A chunk gone between the data and the metadata (another process replacing the same
    node) fails the write: the array is not marked complete with a manifest that has a
    hole, which would read the lost rows back as zeros."""
    import tvsplit.storage.writes as writes
    from tvsplit.storage.integrity import IntegrityError

    url = str(tmp_path / "cat.zarr")
    writer = Catalogue(url).writer("fam", None, FP)
    real = writes.stored_manifest

    async def racing(array):
        (key, *_) = [k async for k in array.store_path.store.list_prefix(array.store_path.path)]
        await array.store_path.store.delete(key)  # what the other writer's overwrite does
        return await real(array)

    monkeypatch.setattr(writes, "stored_manifest", racing)
    with pytest.raises(IntegrityError, match="vanished while the array was written"):
        writer.write("w", torch.ones(5, 4), {})
    monkeypatch.setattr(writes, "stored_manifest", real)
    assert Catalogue(url).writer("fam", None, FP).completed() == set()


async def _keys(store_path) -> list[str]:
    prefix = store_path.path + "/"
    return [key.removeprefix(prefix) async for key in store_path.store.list_prefix(prefix)]


def test_bad_names_are_rejected(tmp_path) -> None:
    cat = Catalogue(str(tmp_path / "cat.zarr"))
    with pytest.raises(ValueError, match="family name"):
        cat.writer("../x", None, FP)
    with pytest.raises(CatalogueError, match="no entry"):
        cat.read("fam", "w")


def test_arrays_of_the_previous_codec_read_and_verify_beside_new_ones(tmp_path, monkeypatch):
    """Catalogues written with zstd (tvsplit before the Blosc compressor) stay readable and
    checked: zarr records each array's codecs, so old and new arrays live side by side."""
    import tvsplit.storage.writes as writes
    from tvsplit.storage.integrity import IntegrityError
    from tvsplit.storage.verify import OK, verify_catalogue
    from zarr.codecs import ZstdCodec

    url = str(tmp_path / "cat.zarr")
    cat = Catalogue(url)
    data = {name: torch.randn(300, 70) for name in ("old", "new")}
    with monkeypatch.context() as patch:
        patch.setattr(writes, "compressors", lambda: (ZstdCodec(level=1),))
        writer = cat.writer("fam", None, FP)
        writer.write("w", data["old"], {"kind": "weights"})
        writer.finish(["w"], {"role": "base"})
    writer = cat.writer("fam", "m", FP)
    writer.write("w", data["new"], {"kind": "delta"})
    writer.finish(["w"], {"role": "vector"})

    root = zarr.open_group(url, mode="r")
    old = root[f"families/fam/base/{param_key('w')}"]
    new = root[f"families/fam/vectors/m/{param_key('w')}"]
    assert [type(c).__name__ for c in old.compressors] == ["ZstdCodec", "Crc32cCodec"]
    assert [type(c).__name__ for c in new.compressors] == ["BloscCodec", "Crc32cCodec"]
    assert torch.equal(Catalogue(url).read("fam", "w"), data["old"])
    assert torch.equal(Catalogue(url).read("fam", "w", member="m"), data["new"])
    assert [row.status for row in verify_catalogue(Catalogue(url))] == [OK, OK]

    base = tmp_path / "cat.zarr" / "families" / "fam" / "base"
    chunks = sorted(f for f in base.rglob("*") if f.is_file() and f.name != "zarr.json")
    assert len(chunks) == 1
    chunk = chunks[0]
    raw = bytearray(chunk.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # a flipped byte in an old-codec chunk is still caught
    chunk.write_bytes(bytes(raw))
    with pytest.raises(IntegrityError, match="fam.*'w'.*corrupt"):
        Catalogue(url).read("fam", "w")
