"""A family's base kept by reference to its source files instead of a copy: nothing of it is
written to the catalogue, reads come from the files (whole, by rows, into a buffer), the
members ingest and split as with a copied base, and a file changed since is refused."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch
from fixtures_models import lora_adapter
from safetensors.torch import load_file, save_file
from tvsplit.flows.ingest import parse_spec
from tvsplit.storage.catalogue import Catalogue
from tvsplit.storage.errors import CatalogueError
from tvsplit.tasks.ingest import IngestJob, run_ingest_job


def test_base_by_reference_reads_the_source_files(repos, tmp_path) -> None:
    base = tmp_path / "base"
    shutil.copytree(repos.sharded, base)  # sharded: references into several files
    url = str(tmp_path / "c.zarr")
    run_ingest_job(IngestJob(url, "fam", None, str(base), str(base), base_by_reference=True))
    lora_adapter(repos.base_model, tmp_path / "lora", seed=1, r=2, target_modules=["c_attn"],
                 fan_in_fan_out=True)  # fmt: skip
    run_ingest_job(IngestJob(url, "fam", "m", str(tmp_path / "lora"), str(base)))
    copied = str(tmp_path / "copy.zarr")
    run_ingest_job(IngestJob(copied, "fam", None, str(base), str(base)))
    catalogue, reference = Catalogue(url), Catalogue(copied)
    reader, want = catalogue.open_entry("fam"), reference.open_entry("fam")
    names = catalogue.parameters("fam")
    assert names == reference.parameters("fam")
    for name in names:
        assert reader.stored_bytes(name) == 0  # nothing copied
        assert reader.shape(name) == want.shape(name)
        assert torch.equal(reader.read(name), want.read(name)), name
        assert torch.equal(reader.read_into(name, torch.empty(want.shape(name))), want.read(name))
    name = "transformer.h.0.attn.c_attn.weight"
    assert torch.equal(reader.read(name, rows=slice(3, 7)), want.read(name, rows=slice(3, 7)))
    assert torch.equal(reader.read(name, rows=5), want.read(name, rows=5))
    assert catalogue.read("fam", name, member="m").abs().sum() > 0  # the member ingested

    first = names[0]
    shard = Path(catalogue.array_attrs("fam", first)["ref_file"])
    assert len({catalogue.array_attrs("fam", n)["ref_file"] for n in names}) > 1
    stat = shard.stat()
    os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # touched, same bytes
    assert torch.equal(catalogue.read("fam", first), reference.read("fam", first))
    tensors = load_file(shard)
    tensors[first] = tensors[first] + 1.0  # changed since the ingest
    save_file(tensors, shard, metadata={"format": "pt"})
    with pytest.raises(CatalogueError, match="changed since it was ingested"):
        catalogue.read("fam", first)
    shard.unlink()
    with pytest.raises(CatalogueError, match="which is gone"):
        catalogue.read("fam", first)


def test_spec_field_base_by_reference(repos) -> None:
    spec = parse_spec({"families": {"f": {"base": str(repos.base), "base_by_reference": True}}})
    assert spec.families["f"].base_by_reference
    assert (
        not parse_spec({"families": {"f": {"base": str(repos.base)}}})
        .families["f"]
        .base_by_reference
    )
