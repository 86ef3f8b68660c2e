"""Writing one model folder: the planned (streamed) writer against the buffered one and
safetensors' own ``save_file`` of the whole state dict, time and peak memory, side by side.

Usage: ``.venv/bin/python benchmarks/write_bench.py [--layers 12] [--repeat 3] [--workdir DIR]``

Each row runs in a fresh process (its peak RSS is that row's alone), rows interleaved,
best of ``--repeat``. The model is GPT-2-small-shaped (124 M float32 parameters at 12
layers). Every row produces the tensors the same way, one at a time (a stand-in for an
edit's compute, which hands the writer one tensor at a time):

- ``save_file``: every tensor kept in a dict, then ``safetensors.torch.save_file`` (the
  peer: what ``save_pretrained`` does for one shard);
- ``buffered``: ``ModelFolderWriter`` without a plan (holds a shard, here the whole model,
  until it is closed);
- ``planned``: ``ModelFolderWriter`` with the plan (each tensor written at its offset as it
  is added; what ``tvsplit edit`` uses).

Printed: seconds (and the ratio to ``save_file``), peak RSS above the process's RSS before
the first tensor (MiB), and whether the files read back equal.
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

sys.path.insert(0, str(Path(__file__).resolve().parent))

MODES = ("save_file", "buffered", "planned")


def _rss_mib() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _tensors(layers: int):
    import torch
    from gpt2_shapes import gpt2_small_shapes

    for i, (name, shape) in enumerate(gpt2_small_shapes(layers).items()):
        tensor = torch.empty(shape)
        tensor.fill_(0.001 * (i + 1))
        yield name, tensor


def run_one(mode: str, layers: int, out: Path) -> dict[str, float]:
    """One row in this process: seconds and peak RSS above the starting RSS (MiB)."""
    import torch
    from gpt2_shapes import gpt2_small_shapes
    from safetensors.torch import save_file
    from tvsplit.storage.model_folder import ModelFolderWriter

    plan = {name: (shape, torch.float32) for name, shape in gpt2_small_shapes(layers).items()}
    before = _rss_mib()
    started = time.perf_counter()
    if mode == "save_file":
        out.mkdir(parents=True, exist_ok=True)
        state = dict(_tensors(layers))
        save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    else:
        with ModelFolderWriter(out, plan=plan if mode == "planned" else None) as writer:
            for name, tensor in _tensors(layers):
                writer.add(name, tensor)
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return {"seconds": seconds, "peak_mib": peak - before}


def _child(mode: str, layers: int, out: Path) -> dict[str, float]:
    command = [sys.executable, __file__, "--child", mode, "--layers", str(layers), "--out", out]
    done = subprocess.run(command, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def _same(a: Path, b: Path) -> bool:
    import torch
    from safetensors.torch import load_file

    left, right = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    return left.keys() == right.keys() and all(torch.equal(left[k], right[k]) for k in left)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_one(args.child, args.layers, args.out)))
        return
    root = Path(args.workdir or tempfile.mkdtemp(prefix="tvsplit-write-bench-"))
    best: dict[str, dict[str, float]] = {}
    for round_ in range(args.repeat):
        for mode in MODES:
            out = root / mode
            shutil.rmtree(out, ignore_errors=True)
            found = _child(mode, args.layers, out)
            print(f"round {round_ + 1} {mode}: {found['seconds']:.2f} s", file=sys.stderr)
            kept = best.get(mode)
            best[mode] = {
                "seconds": min(found["seconds"], kept["seconds"]) if kept else found["seconds"],
                "peak_mib": max(found["peak_mib"], kept["peak_mib"]) if kept else found["peak_mib"],
            }
    model_mib = (root / "save_file" / "model.safetensors").stat().st_size / 2**20
    floor = best["save_file"]["seconds"]
    print(f"\nGPT-2-shaped model, {args.layers} layers, {model_mib:.0f} MiB, best of {args.repeat}")
    print("\n| writer | seconds | ÷ save_file | peak RSS MiB (above start) | files equal |")
    print("| --- | --- | --- | --- | --- |")
    for mode in MODES:
        row = best[mode]
        equal = "—" if mode == "save_file" else str(_same(root / "save_file", root / mode))
        print(
            f"| {mode} | {row['seconds']:.2f} | {row['seconds'] / floor:.2f} | "
            f"{row['peak_mib']:.0f} | {equal} |"
        )
    if not args.workdir:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
