"""Decomposition speed and memory, as ratios measured side by side in one run.

Table 1: one layer, m × n in {768², 1024 × 4096, 4096²}, T in {2, 8, 20}: member bases by the
randomized sketch and by full SVD, then the split by each method; every time divided by one
full SVD of one member's matrix (the yardstick), and the peak RSS above the inputs.
Table 2: a ViT-B/32-shaped block at T = 8 (4 × 768², 3072 × 768, 768 × 3072, 1-D params),
tvsplit against the registered TSV-M merge (`tasks.merges.tsv_merge`, computed the way
FusionBench runs it: a full SVD per member plus two orthogonalizing SVDs per matrix), on the
same planted tensors, with the recovery tvsplit
reached. ../shared/PERFORMANCE.md lists the peers' own times on this kind of machine.

    .venv/bin/python benchmarks/decompose_bench.py            # full run (~10 min on 2 cores)
    .venv/bin/python benchmarks/decompose_bench.py --quick    # small sizes, a smoke run
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from pathlib import Path

import psutil
import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tvsplit.tasks.decompose import decompose_layer, member_basis, split_from_bases
from tvsplit.tasks.merges import tsv_merge
from tvsplit.tasks.synthetic import planted_family, recovery

METHODS = ("mean-projector", "projector-product", "pairwise")


class PeakRSS:
    """This process's peak RSS above the start, over a `with` block.

    On Linux the kernel's own high-water mark is reset on entry (``/proc/self/clear_refs``)
    and read on exit: exact, and no sampling thread competing with what is measured.
    Elsewhere RSS is sampled every 10 ms.
    """

    def __init__(self) -> None:
        self._process = psutil.Process(os.getpid())
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.start = self.peak = 0

    def __enter__(self) -> PeakRSS:
        self.start = self.peak = self._process.memory_info().rss
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, self._process.memory_info().rss)

    def __exit__(self, *exc: object) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
        else:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    self.peak = int(line.split()[1]) * 1024
        self.peak = max(self.peak, self._process.memory_info().rss)

    @property
    def above_start_mb(self) -> float:
        return (self.peak - self.start) / 2**20


def timed(fn, *args, repeat: int = 1, **kwargs):
    """Minimum wall time over `repeat` calls, and the last result."""
    best, result = float("inf"), None
    for _ in range(repeat):
        started = time.perf_counter()
        result = fn(*args, **kwargs)
        best = min(best, time.perf_counter() - started)
    return best, result


def bases_of(deltas: torch.Tensor, solver: str) -> list:
    return [member_basis(d, solver=solver) for d in deltas]


def one_layer_table(sizes, member_counts, full_members_cap: dict, console: Console) -> None:
    table = Table(title="One layer: time ÷ one full SVD of one member (lower is better)")
    for column in ("m × n", "T", "full SVD", "bases: sketch", "bases: full", "sketch speed-up"):
        table.add_column(column, justify="right")
    for method in METHODS:
        table.add_column(f"split: {method}", justify="right")
    table.add_column("peak MB", justify="right")
    for m, n in sizes:
        for members in member_counts:
            family = planted_family(m, n, members, noise=0.1, seed=members)
            deltas = family.deltas
            yardstick, _ = timed(torch.linalg.svd, deltas[0], full_matrices=False)
            with PeakRSS() as rss:
                sketch_time, bases = timed(bases_of, deltas, "randomized")
                split_times = {}
                for method in METHODS:
                    split_times[method], split = timed(
                        split_from_bases, deltas, bases, method=method
                    )
                    _ = split.shared  # derive the parts: what a caller pays to use them
            full_n = min(members, full_members_cap.get((m, n), members))
            full_time, _ = timed(bases_of, deltas[:full_n], "full")
            full_time *= members / full_n
            full_label = f"{full_time / yardstick:.2f}" + ("" if full_n == members else " (ext.)")
            table.add_row(
                f"{m} × {n}",
                str(members),
                f"{yardstick:.3f} s",
                f"{sketch_time / yardstick:.2f}",
                full_label,
                f"{full_time / sketch_time:.1f}×",
                *(f"{split_times[method] / yardstick:.3f}" for method in METHODS),
                f"{rss.above_start_mb:.0f}",
            )
            del family, deltas, bases
    console.print(table)
    console.print(
        "[dim]bases: member_basis for all T members (Gavish–Donoho ranks); split: split_from_bases "
        "plus deriving every shared and unique part; (ext.): full-SVD bases measured on fewer "
        "members and scaled by T (each member's basis is independent of the others).[/]"
    )


def vit_block(width: int) -> list[tuple[str, tuple[int, ...]]]:
    return [
        ("attn.q.weight", (width, width)),
        ("attn.k.weight", (width, width)),
        ("attn.v.weight", (width, width)),
        ("attn.out_proj.weight", (width, width)),
        ("mlp.c_fc.weight", (4 * width, width)),
        ("mlp.c_proj.weight", (width, 4 * width)),
        ("attn.in_proj_bias", (3 * width,)),
        ("attn.out_proj.bias", (width,)),
        ("mlp.c_fc.bias", (4 * width,)),
        ("mlp.c_proj.bias", (width,)),
        ("ln_1.weight", (width,)),
        ("ln_1.bias", (width,)),
        ("ln_2.weight", (width,)),
        ("ln_2.bias", (width,)),
    ]


def block_table(width: int, members: int, console: Console, repeat: int) -> None:
    params = []
    for index, (name, shape) in enumerate(vit_block(width)):
        if len(shape) == 2:
            family = planted_family(*shape, members, noise=0.1, seed=100 + index)
            params.append((name, family.deltas, family))
        else:
            params.append((name, 0.01 * torch.randn(members, *shape), None))

    def run_tvsplit():
        return [decompose_layer(deltas, name=name) for name, deltas, _ in params]

    def run_tsv():
        return [tsv_merge(list(deltas)) for _, deltas, _ in params]  # the registered TSV-M

    tvsplit_time, splits = timed(run_tvsplit, repeat=repeat)
    tsv_time, _ = timed(run_tsv, repeat=1)
    angles = [recovery(s.basis, fam) for s, (_, _, fam) in zip(splits, params, strict=True) if fam]
    found = sum(r.found for r in angles)
    planted = sum(r.planted for r in angles)
    table = Table(title=f"ViT-B/32-shaped block ({width} wide), T = {members}: side by side")
    for column in ("work", "time", "ratio to tvsplit", "planted recovery"):
        table.add_column(column, justify="right")
    worst = max(r.max_angle_deg for r in angles)
    leak = max(r.leak for r in angles)
    table.add_row(
        "tvsplit decompose_layer (defaults)",
        f"{tvsplit_time:.2f} s",
        "1.0×",
        f"{found}/{planted} found, max angle {worst:.2f}°, leak {100 * leak:.2f}%",
    )
    table.add_row(
        "TSV-M, FusionBench-style (T + 2 full SVDs / matrix)",
        f"{tsv_time:.2f} s",
        f"{tsv_time / tvsplit_time:.1f}×",
        "—",
    )
    console.print(table)
    console.print(
        "[dim]PERFORMANCE.md, same block on this kind of machine: FusionBench TSV-M 8.1 s, "
        "Iso-CTS 11.4 s, Iso-C 1.1 s. Target: tvsplit ≥ 10× faster than TSV-M.[/]"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run")
    parser.add_argument("--block-only", action="store_true", help="only the ViT-B/32 block table")
    args = parser.parse_args()
    console = Console(width=200) if not Console().is_terminal else Console()
    console.print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    if args.quick:
        one_layer_table([(96, 128)], (2, 4), {}, console)
        block_table(128, 4, console, repeat=1)
        return
    if args.block_only:
        block_table(768, 8, console, repeat=3)
        return
    one_layer_table(
        [(768, 768), (1024, 4096), (4096, 4096)],
        (2, 8, 20),
        {(4096, 4096): 2},
        console,
    )
    block_table(768, 8, console, repeat=3)


if __name__ == "__main__":
    main()
