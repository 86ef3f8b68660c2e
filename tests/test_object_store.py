"""Object storage as a catalogue location: storage options, and a driver that sees what
other processes wrote (against a real S3 endpoint, moto_server, on 127.0.0.1)."""

from __future__ import annotations

import pytest
import torch
import zarr
from servers import moto_s3
from tvsplit.storage.catalogue import Catalogue
from tvsplit.storage.decompositions import DecompositionRun
from tvsplit.storage.object_store import ENV, StorageOptionsError, storage_options


def test_storage_options_layering(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    assert storage_options("/local/cat.zarr") is None
    assert storage_options("memory://x/cat.zarr") == {}
    assert storage_options("s3://b/cat.zarr") == {"use_listings_cache": False}
    monkeypatch.setenv(ENV, '{"anon": false, "use_listings_cache": true}')
    assert storage_options("s3://b/c", {"anon": True}) == {"use_listings_cache": True, "anon": True}
    monkeypatch.setenv(ENV, "[1]")
    with pytest.raises(StorageOptionsError, match="JSON object"):
        storage_options("s3://b/c")
    monkeypatch.setenv(ENV, "{nope")
    with pytest.raises(StorageOptionsError, match="not valid JSON"):
        storage_options("s3://b/c")


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    with moto_s3(tmp_path_factory.mktemp("moto-logs")) as (server, env):
        yield server, env


@pytest.fixture
def s3_env(s3, monkeypatch):
    import s3fs

    _, env = s3
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv(ENV, raising=False)
    s3fs.S3FileSystem.clear_instance_cache()
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    bucket = f"cat-{len(fs.ls(''))}"
    fs.mkdir(bucket)
    return f"s3://{bucket}/catalogue.zarr"


def test_a_driver_sees_the_writes_of_other_processes(s3_env):
    url = s3_env
    driver = Catalogue(url)
    writer = driver.writer("fam", "m1", {"source": "synthetic"})
    writer.write("w", torch.ones(3, 2), {"source": "synthetic"})
    writer.finish(["w"], {"source": "synthetic"})
    run = DecompositionRun(driver, "fam", "r1")
    run.begin({"method": "x"}, ["m1"], ["w", "v"])
    assert run.completed() == set()  # the driver lists the run group while it is empty

    # Another process (its own filesystem instance, no shared cache) writes both parameters.
    other = Catalogue(url, storage_options={"skip_instance_cache": True})
    remote = DecompositionRun(other, "fam", "r1")
    for name in ("w", "v"):
        remote.write_parameter(name, {"basis": torch.eye(2)}, {"k": 1})

    assert run.completed() == {"w", "v"}  # current, not the listing seen before
    assert driver.members("fam") == ["m1"]

    # A plain zarr reader (no tvsplit) reads the task vector from the bucket.
    root = zarr.open_group(url, mode="r", zarr_format=3)
    vector = root["families/fam/vectors/m1"]
    (key,) = list(vector.array_keys())
    assert vector[key][...].tolist() == [[1.0, 1.0]] * 3
