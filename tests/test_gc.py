"""`tvsplit catalogue gc` (storage/gc.py): what goes, what stays, on local disk and memory://,
with the leftovers of a killed process (a partial entry, a partial run and its lease)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest
import torch
from interrupts import Killed
from tvsplit.flows.cli import app
from tvsplit.storage.catalogue import Catalogue
from tvsplit.storage.decompositions import BasisCache, DecompositionRun, list_runs
from tvsplit.storage.gc import KEEP, REMOVE, collect, remove
from tvsplit.storage.lease import catalogue_leases, run_key
from tvsplit.storage.writes import mark_complete, node_attrs
from tvsplit.tasks.decompose_job import member_fingerprint
from typer.testing import CliRunner

W = "blocks.0.mlp.weight"
DAY = 24 * 3600


def _entry(cat: Catalogue, member: str | None, source: str, *, staged: bool = False) -> None:
    writer = cat.writer("fam", member, {"source": source}, staged=staged)
    writer.write(W, torch.randn(8, 4), {"source": source})
    writer.finish([W], {"source": source})


def _run(cat: Catalogue, name: str, members: list[str], settings: dict, *, finish=True) -> None:
    store = DecompositionRun(cat, "fam", name)
    store.begin(settings, members, [W, "other"] if not finish else [W])
    store.write_parameter(W, {"basis": torch.randn(8, 2)}, {"k": 2})
    if finish:
        store.finish({})
        group = cat.decomposition_group("fam", name)  # distinct completion times, in order
        _run.count = getattr(_run, "count", 0) + 1
        mark_complete(
            group, {**node_attrs(group), "completed": f"2026-01-01T00:00:{_run.count:02d}"}
        )


def _pack(cat: Catalogue, key: str, prints: dict[str, str]) -> None:
    arrays = {"left": torch.randn(8, 1), "right": torch.randn(4, 1), "sigma": torch.ones(1)}
    BasisCache(cat, "fam", key).put(W, {m: (fp, arrays, {}) for m, fp in prints.items()})


def _build(cat: Catalogue) -> None:
    """A family with every kind of node gc distinguishes (the comments say which stay)."""
    for member in (None, "m0", "m1", "gone"):
        _entry(cat, member, f"synthetic:{member}")
    _entry(cat, "m1", "synthetic:m1-new", staged=True)  # complete staged: stays (a swap)
    prints = {m: member_fingerprint(cat, "fam", m) for m in ("m0", "m1", "gone")}
    _run(cat, "r-gone", ["gone", "m0"], {"s": 1})  # member removed below: goes
    _run(cat, "r-old", ["m0", "m1"], {"s": 1})  # superseded: goes with --superseded
    _run(cat, "r-named", ["m0", "m1"], {"s": 1})  # superseded, but a model card names it
    _run(cat, "r-new", ["m0", "m1"], {"s": 1})  # the newest of its settings: stays
    _run(cat, "r-other", ["m0", "m1"], {"s": 2})  # the only one of its settings: stays
    _pack(cat, "b2-aaa", {"m0": prints["m0"], "m1": prints["m1"]})  # current: stays
    _pack(cat, "b2-aaa", {"m0": "0ld", "gone": prints["gone"]})  # superseded: goes
    _pack(cat, "b2-bbb", {"gone": prints["gone"]})  # the whole settings folder goes
    old = cat.family_group("fam", "bases/b-legacy/w", create=True)  # old layout: goes
    old.create_array("m0", shape=(4,), dtype="float32")[...] = 1.0
    cat.delete("fam", "gone")
    partial = cat.writer("fam", "m0", {"source": "synthetic:m0-v2"}, staged=True)
    partial.write(W, torch.ones(8, 4), {"source": "x"})  # partial staged: goes when idle


# Killed while ingesting a member and while splitting a run (holding its lease).
_KILLED = textwrap.dedent(
    """
    import os, signal, sys, torch
    from tvsplit.storage.catalogue import Catalogue
    from tvsplit.storage.decompositions import DecompositionRun
    from tvsplit.storage.lease import run_lease
    cat = Catalogue(sys.argv[1])
    writer = cat.writer("fam", "half", {"source": "synthetic:half"})
    writer.write("blocks.0.mlp.weight", torch.ones(8, 4), {"source": "x"})
    run_lease(cat, "fam", "r-killed").acquire()
    store = DecompositionRun(cat, "fam", "r-killed")
    store.begin({"s": 3}, ["m0", "m1"], ["blocks.0.mlp.weight", "b"])
    store.write_parameter("blocks.0.mlp.weight", {"basis": torch.ones(8, 2)}, {"k": 2})
    os.kill(os.getpid(), signal.SIGKILL)
    """
)


def _paths(findings, action=REMOVE) -> set[str]:
    return {f.path for f in findings if f.action == action}


def _gc(cat: Catalogue, **kwargs):
    return collect(cat, fingerprint=member_fingerprint, **kwargs)


def _days_after_last_write(cat: Catalogue, days: float) -> float:
    """A clock ``days`` after the catalogue's newest file was written, as gc reads files'
    times (no wall clock: what is idle depends only on what the test wrote)."""
    from tvsplit.storage.gc import _Files

    _, newest = _Files(cat).usage("")
    return newest + days * DAY


def _age(root: Path, seconds: float) -> None:
    """Make every file of the catalogue `seconds` older (as if written that long ago)."""
    for path in root.rglob("*"):
        info = path.stat()
        os.utime(path, (info.st_atime - seconds, info.st_mtime - seconds))


def test_gc_removes_exactly_the_garbage_of_a_local_catalogue(tmp_path):
    url = str(tmp_path / "catalogue.zarr")
    cat = Catalogue(url)
    _build(cat)
    killed = subprocess.run([sys.executable, "-c", _KILLED, url], check=False)
    assert killed.returncode == -9
    leases = catalogue_leases(cat)
    assert leases.read(run_key("fam", "r-killed")) is not None  # the dead holder's lease

    young = _gc(cat)  # nothing is idle yet: partial nodes stay, so does the dead run
    packs = [f for f in young if f.path.startswith(f"families/fam/bases/b2-aaa/{W}/")]
    assert len(packs) == 1 and "superseded" in packs[0].reason
    always = {
        "families/fam/decompositions/r-gone",
        "families/fam/bases/b2-bbb",
        "families/fam/bases/b-legacy",
        packs[0].path,
        "fam/decompositions/r-killed.json",
    }
    assert _paths(young) == always
    _age(Path(url), 2 * DAY)  # two days later
    findings = _gc(cat, superseded=True, referenced={"r-named"})
    assert _paths(findings) == always | {
        "families/fam/decompositions/r-killed",
        "families/fam/decompositions/r-old",
        "families/fam/vectors/half",
        "families/fam/staging/vectors/m0",
    }
    assert _paths(findings, KEEP) == {"families/fam/decompositions/r-named"}
    assert all(f.nbytes > 0 for f in findings)

    freed = remove(cat, findings)
    assert freed == sum(f.nbytes for f in findings if f.action == REMOVE) > 0
    fresh = Catalogue(url)
    assert [name for name, _ in list_runs(fresh, "fam")] == ["r-named", "r-new", "r-other"]
    assert fresh.members("fam", include_partial=True) == ["m0", "m1"]
    assert fresh.has_base("fam")
    assert fresh.recover_staged("fam", "m1")  # the complete staged entry was kept
    assert not (Path(url) / "families/fam/staging/vectors/m0").exists()
    assert sorted(p.name for p in (Path(url) / "families/fam/bases").iterdir()) == [
        "b2-aaa",
        "zarr.json",
    ]
    kept = BasisCache(fresh, "fam", "b2-aaa").get(
        W, {m: member_fingerprint(fresh, "fam", m) for m in ("m0",)}
    )
    assert list(kept) == ["m0"]  # the current pack reads as before
    assert leases.keys("fam/") == []
    assert [
        f for f in _gc(fresh, superseded=True, referenced={"r-named"}) if f.action == REMOVE
    ] == []


def test_gc_on_a_memory_catalogue():
    cat = Catalogue(f"memory://gc-{uuid.uuid4().hex[:8]}/catalogue.zarr")
    _build(cat)
    later = _days_after_last_write(cat, 2)
    findings = _gc(cat, now=later)
    assert {
        "families/fam/decompositions/r-gone",
        "families/fam/staging/vectors/m0",
        "families/fam/bases/b2-bbb",
        "families/fam/bases/b-legacy",
    } <= _paths(findings)
    assert not any("r-old" in f.path for f in findings)  # only with --superseded
    remove(cat, findings)
    assert [f for f in _gc(cat, now=later) if f.action == REMOVE] == []
    assert [n for n, _ in list_runs(cat, "fam")] == ["r-named", "r-new", "r-old", "r-other"]


def test_a_running_decompose_keeps_its_run(tmp_path):
    cat = Catalogue(str(tmp_path / "catalogue.zarr"))
    _entry(cat, None, "b")
    from tvsplit.storage.lease import run_lease

    lease = run_lease(cat, "fam", "r-busy").acquire()
    _run(cat, "r-busy", ["m0"], {"s": 1}, finish=False)
    later = _days_after_last_write(cat, 2)
    assert _gc(cat, now=later) == []
    lease.release()
    assert _paths(_gc(cat, now=later)) == {"families/fam/decompositions/r-busy"}


def test_cli_gc_dry_run_then_superseded(tmp_path, monkeypatch):
    url = str(tmp_path / "data" / "catalogue.zarr")
    monkeypatch.setenv("TVSPLIT_DATA", str(tmp_path / "data"))
    monkeypatch.delenv("TVSPLIT_CATALOGUE", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cat = Catalogue(url)
    _build(cat)
    card = tmp_path / "data" / "models" / "fam-ties" / "README.md"
    card.parent.mkdir(parents=True)
    card.write_text("Made by tvsplit ..., decomposition run `r-named`.\n")
    before = sorted(str(p) for p in Path(url).rglob("*"))
    runner = CliRunner()
    dry = runner.invoke(app, ["catalogue", "gc", "--dry-run", "--superseded"])
    assert dry.exit_code == 0, dry.output
    assert "would remove" in dry.output and "r-old" in dry.output and "keep" in dry.output
    assert sorted(str(p) for p in Path(url).rglob("*")) == before  # nothing changed
    done = runner.invoke(app, ["catalogue", "gc", "--superseded", "--grace", "0"])
    assert done.exit_code == 0, done.output
    assert "MB freed" in done.output
    assert [n for n, _ in list_runs(Catalogue(url), "fam")] == ["r-named", "r-new", "r-other"]
    assert not (Path(url) / "families/fam/staging/vectors/m0").exists()


@pytest.mark.parametrize("grace", ["-1", "x"])
def test_cli_gc_bad_grace_is_one_line(grace, tmp_path, monkeypatch):
    monkeypatch.setenv("TVSPLIT_DATA", str(tmp_path))
    result = CliRunner().invoke(app, ["catalogue", "gc", "--grace", grace])
    assert result.exit_code == 2 and "--grace" in result.output


def test_a_pack_cut_short_before_its_metadata_goes_once_idle(tmp_path, monkeypatch):
    """A pack whose chunks were written but not its metadata is no node (readers and the
    cache never see it); gc removes its folder once idle, and only it."""
    import tvsplit.storage.writes as writes
    from tvsplit.storage.names import param_key

    url = str(tmp_path / "catalogue.zarr")
    cat = Catalogue(url)
    for member in (None, "m0"):
        _entry(cat, member, f"synthetic:{member}")
    prints = {"m0": member_fingerprint(cat, "fam", "m0")}
    _pack(cat, "b2-aaa", prints)  # current: stays

    async def cut(array):
        raise Killed

    monkeypatch.setattr(writes, "stored_manifest", cut)
    with pytest.raises(Killed):
        _pack(cat, "b2-aaa", {"m0": "another"})
    monkeypatch.undo()
    folder = Path(url) / f"families/fam/bases/b2-aaa/{param_key(W)}"
    cut_short = [p for p in folder.iterdir() if p.is_dir() and not (p / "zarr.json").exists()]
    assert len(cut_short) == 1 and any(p.is_file() for p in cut_short[0].rglob("*"))
    assert list(BasisCache(cat, "fam", "b2-aaa").get(W, prints)) == ["m0"]
    assert _paths(_gc(cat)) == set()  # not idle yet: it could be a write under way
    _age(Path(url), 2 * DAY)
    findings = _gc(cat)
    expected = f"families/fam/bases/b2-aaa/{param_key(W)}/{cut_short[0].name}"
    assert _paths(findings) == {expected}
    assert "no metadata" in findings[0].reason and findings[0].nbytes > 0
    remove(cat, findings)
    assert not cut_short[0].exists()
    assert list(BasisCache(Catalogue(url), "fam", "b2-aaa").get(W, prints)) == ["m0"]
