"""The decomposition flow against its floors, measured side by side in one run.

A GPT-2-small-shaped family (12 blocks: c_attn 768 × 2304, attn c_proj 768², mlp c_fc
768 × 3072, mlp c_proj 3072 × 768, plus 1-D parameters; T = 8 synthetic members with planted
structure) is written into a fresh catalogue. Then, in the same run:

- (a) I/O floor: read every member slice once and write every output array once (zarr),
  each the fastest way the catalogue offers;
- (b) a plain in-memory loop over `decompose_layer` (inputs already in memory);
- the flow on a threaded LocalCluster with 1 and with 2 workers (Prefect's ephemeral API,
  started once beforehand and reported apart);
- adding a ninth member (cached bases reused) against a full rerun of nine;
- peak RSS above the start while the flow runs, against the family's size;
- with ``--processes``: the flow on a real ``dask scheduler`` with 2 ``dask worker``
  processes (``--nthreads 1``) on 127.0.0.1, beside the embedded 2-worker run (process
  workers give torch their share of the cores: tasks/worker_threads.py).

Every measurement is repeated (``--rounds``, default 3, interleaved) and the best is
compared, as the peers' figures in PERFORMANCE.md are. Target: the flow within 1.5× of the
slower of (a) and (b). The embedding matrices are left
out (a vocab × 768 embedding splits with side="auto" like any other matrix).

    .venv/bin/python benchmarks/pipeline_bench.py [--blocks 12] [--members 8] [--rounds 3]
        [--processes]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
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
from tvsplit.flows.decompose import run_decompose
from tvsplit.storage.catalogue import Catalogue
from tvsplit.storage.decompositions import DecompositionRun
from tvsplit.tasks.decompose import decompose_layer, split_to_arrays
from tvsplit.tasks.decompose_job import SplitSettings
from tvsplit.tasks.synthetic import planted_family

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


def floor_outputs(deltas) -> dict[str, tuple[dict[str, torch.Tensor], dict]]:
    """Arrays of the sizes a split writes (from a split of two members), for the floor."""
    outputs = {}
    for name, stack in deltas.items():
        arrays, diagnostics = split_to_arrays(decompose_layer(stack[:2]))
        outputs[name] = ({k: torch.zeros_like(v) for k, v in arrays.items()}, diagnostics)
    return outputs


def io_floor(url: str, shapes, members: list[str], outputs) -> float:
    """Read every member slice once (the fastest way the catalogue offers: decoded straight
    into one reused buffer per shape) and write every output array once."""
    catalogue = Catalogue(url)
    store = DecompositionRun(catalogue, "gpt2", "floor")
    store.begin({}, members, list(shapes))
    buffers = {shape: torch.empty(len(members), *shape) for shape in set(shapes.values())}
    started = time.perf_counter()
    entries = [catalogue.open_entry("gpt2", member) for member in members]
    for name, shape in shapes.items():
        for entry, row in zip(entries, buffers[shape].unbind(0), strict=True):
            entry.read_into(name, row)
        arrays, diagnostics = outputs[name]
        store.write_parameter(name, arrays, diagnostics)
    return time.perf_counter() - started


def memory_loop(deltas) -> float:
    started = time.perf_counter()
    for stack in deltas.values():
        split = decompose_layer(stack)
        split_to_arrays(split)
    return time.perf_counter() - started


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


@dataclass
class Measured:
    """One kind of work, measured once per round."""

    label: str
    times: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    rss: list[float] = field(default_factory=list)
    bases: int | None = None

    def run(self, work, *args) -> None:
        """`work(*args)` returns its wall time, or (wall time, peak RSS MB, bases computed)."""
        before = cpu_seconds()
        with PeakRSS() as peak:
            result = work(*args)
        self.cpu.append(cpu_seconds() - before)
        if isinstance(result, tuple):
            self.times.append(result[0])
            self.bases = result[2]
        else:
            self.times.append(result)
        self.rss.append(peak.above_start_mb)

    @property
    def best(self) -> float:
        return min(self.times)


def flow_run(
    url: str, members: list[str], workers: int, settings: SplitSettings, scheduler=None
) -> tuple[float, float, int]:
    with PeakRSS() as rss:
        started = time.perf_counter()
        result = run_decompose(
            "gpt2", members=members, settings=settings, catalogue_url=url, workers=workers,
            track=False, show_progress=False, scheduler=scheduler,
        )  # fmt: skip
        elapsed = time.perf_counter() - started
    return elapsed, rss.above_start_mb, result.bases_computed


@contextlib.contextmanager
def process_cluster(workdir: Path, workers: int = 2):
    """A real `dask scheduler` and `workers` `dask worker` processes on 127.0.0.1, stopped
    by process id on exit; yields the scheduler address."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    address = f"tcp://127.0.0.1:{port}"
    dask = str(Path(sys.executable).with_name("dask"))
    log = open(workdir / "dask.log", "w")  # noqa: SIM115 - closed below
    procs = [subprocess.Popen(
        [dask, "scheduler", "--host", "127.0.0.1", "--port", str(port),
         "--dashboard-address", "127.0.0.1:0"], stdout=log, stderr=log,
    )]  # fmt: skip
    for i in range(workers):
        procs.append(subprocess.Popen(
            [dask, "worker", address, "--nthreads", "1", "--nworkers", "1",
             "--host", "127.0.0.1", "--dashboard-address", "127.0.0.1:0", "--name", f"w{i}"],
            stdout=log, stderr=log,
        ))  # fmt: skip
    try:
        from distributed import Client

        with Client(address, timeout=120) as client:
            client.wait_for_workers(workers, timeout=180)
        yield address
    finally:
        for proc in reversed(procs):
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
        log.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=12)
    parser.add_argument("--members", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3, help="rounds of floor, loop and flows")
    parser.add_argument(
        "--processes", action="store_true",
        help="also run on a real scheduler with 2 worker processes",
    )  # fmt: skip
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

        outputs = floor_outputs(first)
        floor = Measured("(a) I/O floor: read slices, write outputs")
        loop = Measured("(b) in-memory loop over decompose_layer")
        flows = {w: Measured(f"flow, {w} worker(s)") for w in (1, 2)}
        seeds = iter(range(1, 1000))  # a new seed each run: nothing cached, a full run
        with contextlib.ExitStack() as stack:
            scheduler = stack.enter_context(process_cluster(workdir)) if args.processes else None
            processes = Measured("flow, scheduler + 2 worker processes")
            for round_ in range(args.rounds):
                console.print(f"round {round_ + 1} of {args.rounds} …")
                floor.run(io_floor, url, shapes, members, outputs)
                loop.run(memory_loop, first)
                for workers, measured in flows.items():
                    settings = SplitSettings(seed=next(seeds))
                    measured.run(flow_run, url, members, workers, settings)
                if scheduler is not None:
                    settings = SplitSettings(seed=next(seeds))
                    processes.run(flow_run, url, members, 2, settings, scheduler)
        if args.processes:
            flows["processes"] = processes
        nine = [*members, f"m{args.members}"]
        added = Measured(f"add a member ({args.members} → {args.members + 1}), cached bases")
        settings = SplitSettings(seed=next(seeds))
        flow_run(url, members, 2, settings)  # the bases of the first eight, cached
        added.run(flow_run, url, nine, 2, settings)
        full = Measured(f"full run of {args.members + 1} members")
        full.run(flow_run, url, nine, 2, SplitSettings(seed=next(seeds)))

        slower = max(floor.best, loop.best)
        table = Table(
            title=f"decomposition flow, {len(shapes)} parameters, T = {args.members}, "
            f"{family_mb:.0f} MB of task vectors; best of {args.rounds} rounds"
        )
        for column in (
            "work",
            "time (best)",
            "every run",
            "÷ max(floor, loop)",
            "CPU s (best run)",
            "bases computed",
            "peak RSS above start",
        ):
            table.add_column(column, justify="right")
        for measured in (floor, loop, *flows.values(), added, full):
            best = measured.times.index(measured.best)
            table.add_row(
                measured.label,
                f"{measured.best:.1f} s",
                " / ".join(f"{t:.1f}" for t in measured.times),
                f"{measured.best / slower:.2f}",
                f"{measured.cpu[best]:.1f}",
                "" if measured.bases is None else str(measured.bases),
                f"{measured.rss[best]:.0f} MB",
            )
        console.print(table)
        console.print(
            f"[dim]Prefect ephemeral API start-up (once per process, not counted above): "
            f"{startup:.1f} s. Adding a member costs {added.best / full.best:.2f}× a full "
            f"rerun. Threaded workers share one process: its peak RSS holds all of them "
            f"(process workers' memory is not in the RSS column). "
            f"Target: flow ≤ 1.5× max(floor, loop).[/]"
        )
        if args.processes:
            ratio = flows["processes"].best / flows[2].best
            console.print(f"scheduler + 2 process workers ÷ embedded 2 workers: {ratio:.2f}×")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
