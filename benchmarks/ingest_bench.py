"""Ingest benchmark: throughput against the raw I/O floor, and peak memory against model size.

1. Throughput. For a synthetic GPT-2-small-width model (768 wide, vocab 50257) the member
   ingest (read fine-tuned + base tensors, subtract, check, write float32 arrays with the
   catalogue's codecs, CRC-32C and chunk manifests, sha256 the files) is timed against the
   floor measured in the same run: read the fine-tuned model's safetensors tensors (not the
   base's, which ingest reads too) and write the same bytes with plain zarr (same chunks,
   the same compressor, no checksum, no attrs). Floor and ingest alternate ``--repeat``
   times and the best of each is compared (the machine is shared: the best is the least
   disturbed). Target: ingest ≥ 0.7 × floor.
2. Bytes and reads. The ingested entry's bytes on disk against the raw float32 bytes, and
   the rate at which the catalogue reads the entry back (every parameter, checked), as
   decompose and edit read it: best of the same repeats.
3. Memory. Base + one member are ingested in a fresh subprocess for 6, 12 and 24 layers;
   peak RSS (VmHWM) must stay flat while the model grows (bounded by the largest
   tensors, the 50257 × 768 embedding, not by the number of layers).

4. ``--codecs``: only a table of candidate compressors (write and read CPU per MB, stored
   bytes) on an embedding-sized task vector from float32 and from bfloat16 weights: the
   measurements behind the catalogue's compressor (`storage.writes.BLOSC`).

Run: ``.venv/bin/python benchmarks/ingest_bench.py [--layers 6 12 24] [--repeat 3]
[--keep DIR]`` or ``... ingest_bench.py --codecs``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import zarr
from rich.console import Console
from rich.table import Table
from safetensors import safe_open
from safetensors.torch import save_file
from zarr.codecs import BloscCodec, Crc32cCodec, ZstdCodec

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gpt2_shapes import block_shapes  # noqa: E402
from tvsplit.storage.catalogue import Catalogue  # noqa: E402
from tvsplit.storage.writes import WRITE_CONFIG, compressors, row_chunks  # noqa: E402
from tvsplit.tasks.ingest import IngestJob, run_ingest_job  # noqa: E402

WIDTH, VOCAB, POSITIONS = 768, 50257, 1024


def layer_shapes(i: int) -> dict[str, tuple[int, ...]]:
    return block_shapes(f"h.{i}", WIDTH)


def write_model(folder: Path, layers: int, seed: int, base: Path | None = None) -> int:
    """A sharded safetensors model (one shard per 6 layers); returns its byte size.

    With `base`, each tensor is the base's plus small noise (a fake fine-tune).
    """
    folder.mkdir(parents=True)
    generator = torch.Generator().manual_seed(seed)
    groups = [["wte.weight", "wpe.weight", "ln_f.weight", "ln_f.bias"]]
    shapes = {"wte.weight": (VOCAB, WIDTH), "wpe.weight": (POSITIONS, WIDTH)}
    shapes |= {"ln_f.weight": (WIDTH,), "ln_f.bias": (WIDTH,)}
    for start in range(0, layers, 6):
        group: list[str] = []
        for i in range(start, min(layers, start + 6)):
            shapes |= layer_shapes(i)
            group += list(layer_shapes(i))
        groups.append(group)
    weight_map, total = {}, 0
    for index, names in enumerate(groups):
        shard = f"model-{index + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {}
        for name in names:
            if base is None:
                tensors[name] = torch.randn(shapes[name], generator=generator) * 0.02
            else:
                with safe_open(str(base / shard), "pt") as handle:
                    tensors[name] = handle.get_tensor(name) + 1e-3 * torch.randn(
                        shapes[name], generator=generator
                    )
            total += tensors[name].numel() * 4
            weight_map[name] = shard
        save_file(tensors, str(folder / shard), metadata={"format": "pt"})
        del tensors
    index_data = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index_data))
    return total


def floor(model: Path, out: Path) -> float:
    """Seconds to read every tensor of `model` and write the same float32 bytes with zarr."""
    index = json.loads((model / "model.safetensors.index.json").read_text())["weight_map"]
    group = zarr.open_group(str(out), mode="w")
    started = time.perf_counter()
    for name, shard in index.items():
        with safe_open(str(model / shard), "pt") as handle:
            data = handle.get_tensor(name).numpy()
        array = group.create_array(
            name=name,
            shape=data.shape,
            dtype="float32",
            chunks=row_chunks(data.shape),
            compressors=compressors(),
            fill_value=0.0,
        )
        array[...] = data
    return time.perf_counter() - started


def ingest_member(catalogue: Path, base: Path, member: Path) -> float:
    """Seconds to ingest `member` into a fresh `catalogue` (its base ingested first, untimed)."""
    shutil.rmtree(catalogue, ignore_errors=True)
    run_ingest_job(IngestJob(str(catalogue), "bench", None, str(base), str(base)))
    started = time.perf_counter()
    run_ingest_job(IngestJob(str(catalogue), "bench", "m", str(member), str(base)))
    return time.perf_counter() - started


def read_member(catalogue: Path) -> float:
    """Seconds for the catalogue to read every parameter of the member back (checked)."""
    entry = Catalogue(str(catalogue)).open_entry("bench", "m")
    names = Catalogue(str(catalogue)).parameters("bench", "m")
    started = time.perf_counter()
    for name in names:
        entry.read(name)
    return time.perf_counter() - started


def stored_bytes(catalogue: Path) -> int:
    """Bytes on disk of the member's entry (chunks and metadata)."""
    folder = catalogue / "families" / "bench" / "vectors" / "m"
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def cpu_seconds() -> float:
    """This process's CPU time (user + system, all threads): steadier than wall time on a
    shared machine, though it does not credit ingest for running two threads at once."""
    times = os.times()
    return times.user + times.system


def codec_table(console: Console, repeat: int) -> None:
    """Write and read CPU per MB and stored/raw bytes of candidate compressors (each followed
    by the CRC-32C every array carries) on an embedding-sized task vector: float32 weights
    plus noise (GPT-2-like; noise-like deltas barely compress) and the same from bfloat16
    weights (most current models), whose float32 deltas have few mantissa bits set."""
    generator = torch.Generator().manual_seed(0)
    base = torch.randn(VOCAB, WIDTH, generator=generator) * 0.02
    tuned = base + 1e-3 * torch.randn(VOCAB, WIDTH, generator=generator)
    deltas = {
        "float32": (tuned - base).numpy(),
        "bfloat16": (tuned.bfloat16().float() - base.bfloat16().float()).numpy(),
    }
    candidates = {
        "zstd level 1 (before)": (ZstdCodec(level=1),),
        "blosc lz4, shuffle (now)": compressors(),
        "blosc zstd level 1, shuffle": (BloscCodec(cname="zstd", clevel=1),),
        "none": (),
    }
    table = Table(title="compressors on a 50257 × 768 task vector (+ CRC-32C), best of repeats")
    for column in ("weights", "compressor", "write CPU ms/MB", "read CPU ms/MB", "stored/raw"):
        table.add_column(column, justify="right")
    with tempfile.TemporaryDirectory(prefix="tvsplit-codecs-") as folder:
        path = Path(folder) / "a.zarr"
        for kind, delta in deltas.items():
            megabytes = delta.nbytes / 1e6
            for label, compressor in candidates.items():
                write_s = read_s = float("inf")
                for _ in range(repeat):
                    shutil.rmtree(path, ignore_errors=True)
                    started = cpu_seconds()
                    array = zarr.create_array(
                        str(path), shape=delta.shape, dtype="float32", fill_value=0.0,
                        chunks=row_chunks(delta.shape), compressors=(*compressor, Crc32cCodec()),
                        config=WRITE_CONFIG,
                    )  # fmt: skip
                    array[...] = delta
                    write_s = min(write_s, cpu_seconds() - started)
                    started = cpu_seconds()
                    back = zarr.open_array(str(path), mode="r")[...]
                    read_s = min(read_s, cpu_seconds() - started)
                assert np.array_equal(back, delta)
                chunks = sum(p.stat().st_size for p in path.rglob("*") if p.name != "zarr.json")
                table.add_row(
                    kind, label, f"{1e3 * write_s / megabytes:.2f}",
                    f"{1e3 * read_s / megabytes:.2f}", f"{chunks / delta.nbytes:.3f}",
                )  # fmt: skip
    console.print(table)


def peak_rss_mib() -> float:
    """This process's peak RSS (VmHWM). Not ru_maxrss: Linux carries ru_maxrss across
    fork+exec, so a child started by a big parent would report the parent's peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(catalogue: str, base: str, member: str) -> None:
    """Subprocess body: ingest base + member, print peak RSS (MiB) as JSON."""
    before = peak_rss_mib()
    run_ingest_job(IngestJob(catalogue, "bench", None, base, base))
    run_ingest_job(IngestJob(catalogue, "bench", "m", member, base))
    print(json.dumps({"imports_mib": before, "peak_mib": peak_rss_mib()}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[6, 12, 24])
    parser.add_argument("--repeat", type=int, default=3, help="Alternated runs; best of each.")
    parser.add_argument("--keep", type=Path, default=None, help="Work folder to keep.")
    parser.add_argument(
        "--codecs", action="store_true", help="Only the table of candidate compressors."
    )
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    console = Console(width=160)
    if args.codecs:
        codec_table(console, args.repeat)
        return
    work = Path(args.keep or tempfile.mkdtemp(prefix="tvsplit-bench-"))
    rows = []
    try:
        for layers in args.layers:
            base, member = work / f"base{layers}", work / f"ft{layers}"
            size = write_model(base, layers, seed=0)
            write_model(member, layers, seed=1, base=base)
            floors, ingests, reads = [], [], []
            for _ in range(args.repeat):  # alternated: both see the same load
                floors.append(floor(member, work / f"floor{layers}.zarr"))
                shutil.rmtree(work / f"floor{layers}.zarr")
                ingests.append(ingest_member(work / f"cat{layers}.zarr", base, member))
                reads.append(read_member(work / f"cat{layers}.zarr"))
            on_disk = stored_bytes(work / f"cat{layers}.zarr")
            floor_s, ingest_s, read_s = min(floors), min(ingests), min(reads)
            proc = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--child",
                    str(work / f"rss{layers}.zarr"),
                    str(base),
                    str(member),
                ],
                capture_output=True,
                text=True,
                check=True,
            )
            rss = json.loads(proc.stdout.strip().splitlines()[-1])
            mib = size / 2**20
            rows.append(
                (
                    layers, mib, mib / floor_s, mib / ingest_s, rss["imports_mib"],
                    rss["peak_mib"], on_disk / size, mib / read_s,
                )
            )  # fmt: skip
            for path in work.glob(f"*{layers}*"):
                shutil.rmtree(path) if path.is_dir() else path.unlink()
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    table = Table(title="ingest: throughput vs raw floor, peak RSS vs model size")
    for column in (
        "layers",
        "model MiB",
        "floor MiB/s",
        "ingest MiB/s",
        "ingest/floor",
        "stored/raw bytes",
        "read MiB/s",
        "RSS after imports MiB",
        "peak RSS MiB",
        "peak − imports / model",
    ):
        table.add_column(column, justify="right")
    for layers, mib, floor_rate, ingest_rate, imports, peak, stored, read_rate in rows:
        table.add_row(
            str(layers),
            f"{mib:.0f}",
            f"{floor_rate:.0f}",
            f"{ingest_rate:.0f}",
            f"{ingest_rate / floor_rate:.2f}",
            f"{stored:.3f}",
            f"{read_rate:.0f}",
            f"{imports:.0f}",
            f"{peak:.0f}",
            f"{(peak - imports) / mib:.2f}",
        )
    console.print(table)
    ratios = [r[3] / r[2] for r in rows]
    growth = rows[-1][5] - rows[0][5]
    console.print(
        f"min ingest/floor = {min(ratios):.2f} (target ≥ 0.70); peak RSS grows by {growth:.0f} MiB "
        f"from {rows[0][0]} to {rows[-1][0]} layers while the model grows by "
        f"{rows[-1][1] - rows[0][1]:.0f} MiB"
    )


if __name__ == "__main__":
    main()
