"""The decomposition flow against its floors, measured side by side in one run.

A GPT-2-small-shaped family (12 blocks: c_attn 768 × 2304, attn c_proj 768², mlp c_fc
768 × 3072, mlp c_proj 3072 × 768, plus 1-D parameters; T = 8 synthetic members with planted
structure) is written into a fresh catalogue. Then, in the same run:

- (a) I/O floor: read every member slice once and write every output array once (zarr);
- (b) a plain in-memory loop over `decompose_layer` (inputs already in memory);
- the flow on a threaded LocalCluster with 1 and with 2 workers (Prefect's ephemeral API,
  started once beforehand and reported apart);
- adding a ninth member (cached bases reused) against a full rerun of nine;
- peak RSS above the start while the flow runs, against the family's size.

Target: the flow within 1.5× of the slower of (a) and (b). The embedding matrices are left
out (a vocab × 768 embedding splits with side="auto" like any other matrix).

    .venv/bin/python benchmarks/pipeline_bench.py [--blocks 12] [--members 8]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")

import logging

import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from decompose_bench import PeakRSS

from flows.decompose import run_decompose
from storage.catalogue import Catalogue
from storage.decompositions import DecompositionRun
from tasks.decompose import decompose_layer, split_to_arrays
from tasks.decompose_job import SplitSettings
from tasks.synthetic import planted_family

logging.getLogger("distributed").setLevel(logging.WARNING)


def gpt2_block_shapes(blocks: int) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}
    for b in range(blocks):
        p = f"h.{b}."
        shapes |= {
            p + "ln_1.weight": (768,),
            p + "attn.c_attn.weight": (768, 2304),
            p + "attn.c_attn.bias": (2304,),
            p + "attn.c_proj.weight": (768, 768),
            p + "ln_2.weight": (768,),
            p + "mlp.c_fc.weight": (768, 3072),
            p + "mlp.c_proj.weight": (3072, 768),
        }
    return shapes


def build_family(
    url: str, shapes: dict[str, tuple[int, ...]], members: int
) -> dict[str, torch.Tensor]:
    """Write base (zeros) and `members` planted members; return the deltas kept in memory."""
    catalogue = Catalogue(url)
    deltas: dict[str, torch.Tensor] = {}
    for index, (name, shape) in enumerate(shapes.items()):
        if len(shape) == 2:
            deltas[name] = planted_family(*shape, members, noise=0.1, seed=index).deltas
        else:
            deltas[name] = 0.01 * torch.randn(
                members, *shape, generator=torch.Generator().manual_seed(index)
            )
    for member in [None, *range(members)]:
        label = None if member is None else f"m{member}"
        writer = catalogue.writer("gpt2", label, {"source": f"synthetic:{label}"})
        for name, shape in shapes.items():
            writer.write(
                name,
                torch.zeros(shape) if member is None else deltas[name][member],
                {"source": "synthetic"},
            )
        writer.finish(list(shapes), {"source": f"synthetic:{label}"})
    return deltas


def io_floor(url: str, shapes, members: list[str], deltas) -> float:
    """Read every member slice once and write outputs of the default split's size once."""
    catalogue = Catalogue(url)
    outputs = {}
    for name, stack in deltas.items():  # output sizes: what the split writes
        arrays, diagnostics = split_to_arrays(decompose_layer(stack[:2]))
        outputs[name] = ({k: torch.zeros_like(v) for k, v in arrays.items()}, diagnostics)
    store = DecompositionRun(catalogue, "gpt2", "floor")
    store.begin({}, members, list(shapes))
    started = time.perf_counter()
    entries = [catalogue.open_entry("gpt2", member) for member in members]
    for name in shapes:
        for entry in entries:
            entry.read(name).sum()
        arrays, diagnostics = outputs[name]
        store.write_parameter(name, arrays, diagnostics)
    return time.perf_counter() - started


def memory_loop(deltas) -> float:
    started = time.perf_counter()
    for stack in deltas.values():
        split = decompose_layer(stack)
        split_to_arrays(split)
    return time.perf_counter() - started


def flow_run(
    url: str, members: list[str], workers: int, settings: SplitSettings
) -> tuple[float, float, int]:
    with PeakRSS() as rss:
        started = time.perf_counter()
        result = run_decompose(
            "gpt2", members=members, settings=settings, catalogue_url=url, workers=workers,
            track=False, show_progress=False,
        )  # fmt: skip
        elapsed = time.perf_counter() - started
    return elapsed, rss.above_start_mb, result.bases_computed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=12)
    parser.add_argument("--members", type=int, default=8)
    args = parser.parse_args()
    console = Console(width=160) if not Console().is_terminal else Console()
    shapes = gpt2_block_shapes(args.blocks)
    workdir = Path(tempfile.mkdtemp(prefix="tvsplit-pipeline-bench-"))
    try:
        url = str(workdir / "catalogue.zarr")
        console.print(f"building the family ({args.blocks} blocks, {args.members + 1} members) …")
        deltas = build_family(url, shapes, args.members + 1)
        family_mb = sum(t[: args.members].numel() * 4 for t in deltas.values()) / 2**20
        members = [f"m{i}" for i in range(args.members)]
        first = {k: v[: args.members] for k, v in deltas.items()}

        started = time.perf_counter()
        from prefect import flow

        flow(lambda: None, name="warm-up")()  # start the ephemeral API once
        startup = time.perf_counter() - started

        floor = io_floor(url, shapes, members, first)
        loop = memory_loop(first)
        rows = []
        for workers, seed in ((1, 1), (2, 2)):  # a new seed: nothing cached, a full run each
            settings = SplitSettings(seed=seed)
            rows.append((f"flow, {workers} worker(s)", *flow_run(url, members, workers, settings)))
        settings = SplitSettings(seed=2)
        nine = [*members, f"m{args.members}"]
        add_time, add_rss, add_bases = flow_run(url, nine, 2, settings)
        full_time, full_rss, full_bases = flow_run(url, nine, 2, SplitSettings(seed=3))

        slower = max(floor, loop)
        table = Table(
            title=f"decomposition flow, {len(shapes)} parameters, T = {args.members}, {family_mb:.0f} MB of task vectors"
        )
        for column in (
            "work",
            "time",
            "÷ max(floor, loop)",
            "bases computed",
            "peak RSS above start",
        ):
            table.add_column(column, justify="right")
        table.add_row(
            "(a) I/O floor: read slices, write outputs",
            f"{floor:.1f} s",
            f"{floor / slower:.2f}",
            "",
            "",
        )
        table.add_row(
            "(b) in-memory loop over decompose_layer",
            f"{loop:.1f} s",
            f"{loop / slower:.2f}",
            "",
            "",
        )
        for label, elapsed, rss, bases in rows:
            table.add_row(
                label, f"{elapsed:.1f} s", f"{elapsed / slower:.2f}", str(bases), f"{rss:.0f} MB"
            )
        table.add_row(
            f"add a member ({args.members} → {args.members + 1}), cached bases",
            f"{add_time:.1f} s",
            f"{add_time / slower:.2f}",
            str(add_bases),
            f"{add_rss:.0f} MB",
        )
        table.add_row(
            f"full run of {args.members + 1} members",
            f"{full_time:.1f} s",
            f"{full_time / slower:.2f}",
            str(full_bases),
            f"{full_rss:.0f} MB",
        )
        console.print(table)
        console.print(
            f"[dim]Prefect ephemeral API start-up (once per process, not counted above): {startup:.1f} s. "
            f"Adding a member costs {add_time / full_time:.2f}× a full rerun. Target: flow ≤ 1.5× max(floor, loop).[/]"
        )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
