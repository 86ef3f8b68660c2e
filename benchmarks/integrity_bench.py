"""What the integrity checks cost a decomposition: the same job with and without them.

A GPT-2-shaped family (``--blocks`` blocks of pipeline_bench's shapes, ``--members``
planted members) is written into a fresh catalogue twice per round: once as tvsplit writes
it (CRC-32C per chunk, a chunk manifest per array), once without (the compressor only, no
checksum or manifest: how catalogues were written before; reads are then unchecked). The
decomposition job (``decompose_parameters``, every parameter, one worker, without Prefect,
so the ratio is the storage work's share at its largest) runs on each; rounds are
interleaved and the best of ``--rounds`` is compared. Target: with ≤ 1.10 × without. Timings are noisy on a shared
machine; the ratio of one run is what counts.

    .venv/bin/python benchmarks/integrity_bench.py [--blocks 4] [--members 8] [--rounds 3]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import tvsplit.storage.writes as writes
from pipeline_bench import build_family, gpt2_block_shapes
from rich.console import Console
from rich.table import Table
from tvsplit.storage.catalogue import Catalogue
from tvsplit.storage.decompositions import BasisCache, DecompositionRun
from tvsplit.storage.integrity import IntegrityWarning
from tvsplit.tasks.decompose_job import (
    SplitSettings,
    decompose_parameters,
    member_fingerprint,
    run_id,
)


@contextmanager
def without_checks():
    """Write as before manifests: the compressor only, no checksum and so no manifest (reads
    are then unchecked too)."""
    codecs = writes.codecs
    writes.codecs = writes.compressors  # no checksum codec: no manifest either
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", IntegrityWarning)
            yield
    finally:
        writes.codecs = codecs


def one_round(root: Path, shapes, members: int) -> tuple[float, float]:
    """(seconds to write the family, seconds to decompose it) in a fresh catalogue."""
    url = str(root / "catalogue.zarr")
    started = time.perf_counter()
    build_family(url, shapes, members)
    written = time.perf_counter() - started
    catalogue = Catalogue(url)
    names = [f"m{i}" for i in range(members)]
    settings = SplitSettings()
    fingerprints = {m: member_fingerprint(catalogue, "gpt2", m) for m in names}
    run = run_id("gpt2", names, settings, fingerprints)
    DecompositionRun(catalogue, "gpt2", run).begin(settings.model_dump(), names, list(shapes))
    BasisCache(catalogue, "gpt2", settings.basis_key()).prepare()
    started = time.perf_counter()
    _, failures = decompose_parameters(
        url, "gpt2", run, list(shapes), names, fingerprints, settings, device="cpu"
    )
    seconds = time.perf_counter() - started
    assert not failures, failures
    shutil.rmtree(url)
    return written, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--blocks", type=int, default=4)
    parser.add_argument("--members", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    shapes = gpt2_block_shapes(args.blocks)
    results: dict[str, list[tuple[float, float]]] = {"with checks": [], "without": []}
    with tempfile.TemporaryDirectory(prefix="tvsplit-integrity-") as tmp:
        for _ in range(args.rounds):
            results["with checks"].append(one_round(Path(tmp), shapes, args.members))
            with without_checks():
                results["without"].append(one_round(Path(tmp), shapes, args.members))
    best = {mode: (min(w for w, _ in r), min(d for _, d in r)) for mode, r in results.items()}
    table = Table(title=f"integrity checks: {args.blocks} blocks, {args.members} members")
    for column in ("", "write family s", "decompose s", "decompose ratio"):
        table.add_column(column)
    for mode, (written, seconds) in best.items():
        ratio = seconds / best["without"][1]
        table.add_row(mode, f"{written:.2f}", f"{seconds:.2f}", f"{ratio:.3f}")
    Console().print(table)
    ratio = best["with checks"][1] / best["without"][1]
    print(f"decompose with checks / without = {ratio:.3f} (target ≤ 1.10; best of {args.rounds})")


if __name__ == "__main__":
    main()
