"""Edit throughput on GPT-2-small-shaped models (124 M parameters, float32, base + 4 members).

Usage: ``.venv/bin/python benchmarks/edit_bench.py [--workdir DIR] [--keep] [--no-mergekit]``

Every row runs in this one process on the same safetensors files (page cache warmed first):

- I/O floor: read base and members tensor by tensor with ``safe_open`` (every page touched)
  and write one model with ``storage.model_folder`` (the same writer the edit uses);
- in-memory loop: every tensor already in RAM, the same ``tasks.edit`` call per tensor,
  no reading or writing (the compute floor); for TIES also the PERFORMANCE.md reference
  (a plain loop trimming with ``torch.kthvalue`` on float magnitudes);
- streamed edit: ``safe_open`` → task vectors (fine-tuned − base, as mergekit computes
  them; the edit flow reads them from the catalogue instead) → ``tasks.edit.apply_edit`` →
  ``ModelFolderWriter``, tensor by tensor, end to end;
- mergekit 0.1.5 (``mergekit-yaml`` in mergekit_crosscheck's venv, start-up included), when that venv
  exists; its output is also compared with ours.

Targets (PERFORMANCE.md): task arithmetic ≥ 2× faster than mergekit, TIES ≥ 4× faster;
every streamed edit within 1.5× of max(I/O floor, in-memory loop).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import yaml
from safetensors import safe_open
from safetensors.torch import save_file

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gpt2_shapes import gpt2_small_shapes
from mergekit_crosscheck import MERGEKIT
from tvsplit.storage.model_folder import ModelFolderWriter
from tvsplit.tasks.edit import EditInputs, apply_edit

MEMBERS = 4
WEIGHTS = (1.0, 0.7, 0.5, 0.3)
DENSITY = 0.5
METHODS = {
    "task_arithmetic": ({}, {"normalize": False}),
    "ties": ({"density": DENSITY}, {"normalize": True}),
}


def build(root: Path) -> tuple[Path, list[Path]]:
    """Base + members as single-file safetensors folders with a GPT-2 config.json."""
    from transformers import GPT2Config

    shapes = gpt2_small_shapes()
    g = torch.Generator().manual_seed(0)
    base = {n: 0.02 * torch.randn(s, generator=g) for n, s in shapes.items()}
    folders = []
    for label in ["base", *(f"member{i}" for i in range(MEMBERS))]:
        folder = root / label
        folder.mkdir(parents=True, exist_ok=True)
        GPT2Config(architectures=["GPT2LMHeadModel"]).save_pretrained(folder)
        if label == "base":
            tensors = base
        else:
            tensors = {n: t + 0.002 * torch.randn(t.shape, generator=g) for n, t in base.items()}
        save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
        folders.append(folder)
        del tensors
    return folders[0], folders[1:]


def touch(tensor: torch.Tensor) -> float:
    """Read one element per 4 KiB page, so an mmap-ed tensor is really read."""
    return float(tensor.reshape(-1)[:: 4096 // tensor.element_size()].sum())


def timed(function: Callable[[], object]) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def open_all(base: Path, members: list[Path]):
    files = [base / "model.safetensors", *(m / "model.safetensors" for m in members)]
    return [safe_open(f, framework="pt") for f in files]


def io_floor(base: Path, members: list[Path], out: Path) -> None:
    handles = open_all(base, members)
    with ModelFolderWriter(out, overwrite=True) as writer:
        for name in handles[0].keys():  # noqa: SIM118 (safe_open is not a dict)
            tensors = [h.get_tensor(name) for h in handles]
            for t in tensors:
                touch(t)
            writer.add(name, tensors[0])


def streamed_edit(method: str, base: Path, members: list[Path], out: Path) -> None:
    params = METHODS[method][0]
    weights = [{"weight": w} for w in WEIGHTS]
    handles = open_all(base, members)
    with ModelFolderWriter(out, overwrite=True) as writer:
        for name in handles[0].keys():  # noqa: SIM118
            base_tensor = handles[0].get_tensor(name)
            vectors = tuple(h.get_tensor(name) - base_tensor for h in handles[1:])
            inputs = EditInputs(base_tensor, vectors, name=name)
            writer.add(name, apply_edit(method, inputs, params, weights))


def load_all(base: Path, members: list[Path]) -> tuple[dict, list[dict]]:
    handles = open_all(base, members)
    loaded = [{n: h.get_tensor(n).clone() for n in h.keys()} for h in handles]  # noqa: SIM118
    return loaded[0], loaded[1:]


def in_memory(method: str, base: dict, members: list[dict]) -> dict[str, torch.Tensor]:
    params = METHODS[method][0]
    weights = [{"weight": w} for w in WEIGHTS]
    out = {}
    for name, tensor in base.items():
        vectors = tuple(m[name] - tensor for m in members)
        out[name] = apply_edit(method, EditInputs(tensor, vectors, name=name), params, weights)
    return out


def reference_ties_kthvalue(base: dict, members: list[dict]) -> None:
    """PERFORMANCE.md's reference: TIES trimming with torch.kthvalue on float magnitudes."""
    w = torch.tensor(WEIGHTS)
    for name, tensor in base.items():
        trimmed = []
        for m in members:
            delta = m[name] - tensor
            flat = delta.abs().reshape(-1)
            k = max(1, int(DENSITY * flat.numel()))
            threshold = torch.kthvalue(flat, flat.numel() - k + 1).values
            trimmed.append(torch.where(delta.abs() >= threshold, delta, 0.0))
        stack = torch.stack(trimmed) * w.view(-1, *[1] * tensor.ndim)
        sign = torch.where(stack.sum(0) >= 0, 1.0, -1.0)
        agree = torch.sign(stack) == sign
        merged = (stack * agree).sum(0) / (w.view(-1, *[1] * tensor.ndim) * agree).sum(0).clamp(
            min=1e-12
        )
        _ = tensor + merged


def run_mergekit(method: str, base: Path, members: list[Path], work: Path) -> tuple[float, Path]:
    models = []
    for path, weight in zip(members, WEIGHTS, strict=True):
        parameters: dict[str, float] = {"weight": weight}
        if method == "ties":
            parameters["density"] = DENSITY
        models.append({"model": str(path), "parameters": parameters})
    config = {
        "merge_method": method,
        "base_model": str(base),
        "models": models,
        "parameters": METHODS[method][1],
        "dtype": "float32",
    }
    config_path = work / f"mergekit_{method}.yml"
    config_path.write_text(yaml.safe_dump(config))
    out = work / f"mergekit_{method}"
    shutil.rmtree(out, ignore_errors=True)
    command = [str(MERGEKIT), str(config_path), str(out), "--no-copy-tokenizer", "--quiet"]
    command += ["--no-write-model-card"]
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if result.returncode != 0:
        raise RuntimeError(f"mergekit {method} failed:\n{result.stderr[-3000:]}")
    return elapsed, out


def compare(ours: Path, theirs: Path) -> tuple[float, int, int]:
    """Max relative difference (to the tensor's largest |weight|) and the number of entries
    differing by more than 1e-5 of it, over the total compared."""
    mine = {}
    for file in ours.glob("*.safetensors"):
        with safe_open(file, framework="pt") as h:
            mine |= {n: h.get_tensor(n) for n in h.keys()}  # noqa: SIM118
    worst, differing, total = 0.0, 0, 0
    for file in theirs.glob("*.safetensors"):
        with safe_open(file, framework="pt") as h:
            for n in h.keys():  # noqa: SIM118
                if n in mine:
                    t = h.get_tensor(n)
                    relative = (mine[n] - t).abs() / t.abs().max().clamp(min=1e-12)
                    worst = max(worst, float(relative.max()))
                    differing += int((relative > 1e-5).sum())
                    total += t.numel()
    return worst, differing, total


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--no-mergekit", action="store_true")
    args = parser.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="edit-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        print(f"threads: {torch.get_num_threads()}; building models in {work} ...", flush=True)
        base, members = build(work)
        params = sum(torch.Size(s).numel() for s in gpt2_small_shapes().values())
        print(f"{params / 1e6:.1f} M parameters per model, 1 base + {MEMBERS} members")
        io_floor(base, members, work / "floor")  # warm the page cache
        floor = min(timed(lambda: io_floor(base, members, work / "floor")) for _ in range(2))
        loaded_base, loaded_members = load_all(base, members)
        rows = []
        for method in METHODS:
            memory = min(
                timed(lambda m=method: in_memory(m, loaded_base, loaded_members)) for _ in range(2)
            )
            streamed = min(
                timed(lambda m=method: streamed_edit(m, base, members, work / f"ours_{m}"))
                for _ in range(2)
            )
            peer, difference = None, None
            if not args.no_mergekit and MERGEKIT.exists():
                peer, peer_out = run_mergekit(method, base, members, work)
                difference = compare(work / f"ours_{method}", peer_out)
            rows.append((method, memory, streamed, peer, difference))
        reference = timed(lambda: reference_ties_kthvalue(loaded_base, loaded_members))
    finally:
        if not args.keep and args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)

    targets = {"task_arithmetic": 2.0, "ties": 4.0}
    print()
    print(f"I/O floor (read 5 models, touched; write 1): {floor:.2f} s")
    print(f"TIES reference loop, torch.kthvalue on floats, in memory: {reference:.2f} s")
    print()
    header = (
        f"| {'edit':<16} | {'in-memory s':>11} | {'streamed s':>10} | {'mergekit s':>10} "
        f"| {'speed-up':>8} | {'target':>6} | {'vs floor':>8} | {'max rel diff':>12} "
        f"| {'entries ≠':>10} |"
    )
    print(header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    ok = True
    for method, memory, streamed, peer, difference in rows:
        bound = max(floor, memory)
        ratio = streamed / bound
        speedup = peer / streamed if peer else None
        met = ratio <= 1.5 and (speedup is None or speedup >= targets[method])
        ok &= met
        print(
            f"| {method:<16} | {memory:>11.2f} | {streamed:>10.2f} | "
            f"{(f'{peer:.2f}' if peer else 'n/a'):>10} | "
            f"{(f'{speedup:.1f}×' if speedup else 'n/a'):>8} | {f'≥{targets[method]:.0f}×':>6} | "
            f"{ratio:>7.2f}× | {(f'{difference[0]:.1e}' if difference else 'n/a'):>12} "
            f"| {(f'{difference[1]}/{difference[2] / 1e6:.0f}M' if difference else 'n/a'):>10} |"
        )
    print()
    print("vs floor = streamed / max(I/O floor, in-memory loop); target ≤ 1.5×")
    print(
        "entries ≠ = entries differing from mergekit by > 1e-5 of the tensor's max |weight|; "
        "for TIES these are entries tied in magnitude with the trimming threshold (we keep "
        "every tie, mergekit's argsort keeps an arbitrary subset)"
    )
    print("all targets met" if ok else "SOME TARGETS MISSED")
    return 0


if __name__ == "__main__":
    sys.exit(main())
