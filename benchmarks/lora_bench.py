"""LoRA families kept as factors: speed, bytes and memory, in one run (issue 19, item 5).

(a) one 4096 × 4096 module, T = 8 members of rank 16: member bases + split from the factors
    (exact, O((m+n)r²)) against the dense route (the dense ΔW through today's randomized
    sketch), time, peak RSS and the largest difference of S Sᵀ.
(b) a 7B-shaped family (hidden 4096, intermediate 11008, 32 layers; LoRA on q, k, v, o,
    gate, up, down; r = 16, T = 8), synthetic factors with 4 planted shared output
    directions per module, written as PEFT adapter folders (float32), through ingest
    (base kept by reference) → decompose (2 worker processes running the decomposition
    job) → the exact one-adapter edit (``unique_mix``). Reports wall time per step, the
    catalogue's bytes per part against the adapters' bytes, peak RSS of the driver and of
    each worker, the recovery of the planted directions, and the one-adapter edit against
    the dense edit of the same modules (computed in a checker process of its own).
(c) the same with T = 32: cost per member of the member-wise steps, and the measured
    exponent of the shared step (the split from the stacked bases) in T on one module.

The base is a sparse safetensors file (its real 7B header, bfloat16, no data on disk):
an adapter family's ingest and split read only the base's headers, and the base is kept by
reference, so it costs nothing in the catalogue and nothing to write here.

Every process runs one torch thread (2 workers on 2 cores): on this machine, shared with
other jobs (load ≈ 13), two OpenMP threads per process made a 11008 × 16 QR take 0.85 s
instead of 5 ms (threads spinning for a core), which would measure contention, not work.

    .venv/bin/python benchmarks/lora_bench.py                 # the full run
    .venv/bin/python benchmarks/lora_bench.py --layers 4      # fewer layers (a smoke run)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

HIDDEN, INTERMEDIATE, VOCAB, RANK, PLANTED, ALPHA = 4096, 11008, 32000, 16, 4, 32
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
FAMILY = "llama"
INCLUDE = ("*_proj.weight",)
EDIT = ("unique_mix", {"scale": 0.8, "shared_weight": 0.3})


# -- memory ------------------------------------------------------------------------------------
def reset_peak() -> None:
    """Reset this process's RSS high-water mark (Linux: /proc/self/clear_refs)."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def peak_mib() -> float:
    """This process's peak RSS since the last reset (VmHWM), MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# -- the synthetic family ------------------------------------------------------------------------
def module_shapes(layers: int) -> dict[str, tuple[int, int]]:
    """Adapted module → (out, in), in Llama's names."""
    shapes = {}
    for layer in range(layers):
        for name in ATTENTION:
            shapes[f"model.layers.{layer}.self_attn.{name}"] = (HIDDEN, HIDDEN)
        for name in MLP:
            out_in = (HIDDEN, INTERMEDIATE) if name == "down_proj" else (INTERMEDIATE, HIDDEN)
            shapes[f"model.layers.{layer}.mlp.{name}"] = out_in
    return shapes


def base_header(layers: int) -> dict[str, list[int]]:
    """Every tensor of a Llama-7B-shaped model with `layers` layers."""
    tensors: dict[str, list[int]] = {"model.embed_tokens.weight": [VOCAB, HIDDEN]}
    for module, shape in module_shapes(layers).items():
        tensors[f"{module}.weight"] = list(shape)
    for layer in range(layers):
        for norm in ("input_layernorm", "post_attention_layernorm"):
            tensors[f"model.layers.{layer}.{norm}.weight"] = [HIDDEN]
    tensors["model.norm.weight"] = [HIDDEN]
    tensors["lm_head.weight"] = [VOCAB, HIDDEN]
    return tensors


def write_sparse_base(folder: Path, layers: int) -> int:
    """A safetensors model folder with the real header and no data on disk (a sparse file:
    reads give zeros). Returns its apparent size in bytes."""
    folder.mkdir(parents=True, exist_ok=True)
    header, offset = {}, 0
    for name, shape in base_header(layers).items():
        size = math.prod(shape) * 2
        header[name] = {"dtype": "BF16", "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    header["__metadata__"] = {"format": "pt"}
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path = folder / "model.safetensors"
    with open(path, "wb") as handle:
        handle.write(len(text).to_bytes(8, "little"))
        handle.write(text)
        handle.truncate(8 + len(text) + offset)
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    return path.stat().st_size


def planted_common(index: int, rows: int) -> torch.Tensor:
    """The planted shared output directions of module `index` (orthonormal, rows × 4)."""
    generator = torch.Generator().manual_seed(10_000 + index)
    return torch.linalg.qr(torch.randn(rows, PLANTED, generator=generator))[0]


def write_adapter(folder: Path, member: int, layers: int) -> int:
    """One PEFT LoRA adapter folder: per module lora_B = [3·common | own] (out × r) and
    lora_A random (r × in); float32. Returns the weights file's bytes."""
    from peft import LoraConfig
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(member)
    tensors = {}
    for index, (module, (out, inn)) in enumerate(module_shapes(layers).items()):
        own = torch.randn(out, RANK - PLANTED, generator=generator) / math.sqrt(out)
        up = torch.cat([3.0 * planted_common(index, out) / math.sqrt(out), own], dim=1)
        down = torch.randn(RANK, inn, generator=generator) / math.sqrt(inn)
        tensors[f"base_model.model.{module}.lora_A.weight"] = down.contiguous()
        tensors[f"base_model.model.{module}.lora_B.weight"] = up.contiguous()
    save_file(tensors, folder / "adapter_model.safetensors", metadata={"format": "pt"})
    config = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=[*ATTENTION, *MLP])
    config.save_pretrained(str(folder))
    return (folder / "adapter_model.safetensors").stat().st_size


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0


# -- (a) one module ---------------------------------------------------------------------------
def one_module(console: Console) -> dict:
    from tvsplit.storage.lowrank import LowRankDelta
    from tvsplit.tasks.decompose import decompose_layer

    generator = torch.Generator().manual_seed(0)
    m = n = HIDDEN
    common = torch.linalg.qr(torch.randn(m, PLANTED, generator=generator))[0]
    family = []
    for _ in range(8):
        own = torch.randn(m, RANK - PLANTED, generator=generator) / math.sqrt(m)
        up = torch.cat([3.0 * common / math.sqrt(m), own], dim=1)
        down = torch.randn(RANK, n, generator=generator) / math.sqrt(n)
        family.append(LowRankDelta(up, down, ALPHA / RANK, (m, n)))
    dense = torch.stack([d.dense() for d in family])
    rows = {}
    for label, inputs in (("factored", family), ("dense (sketch)", dense)):
        if label == "factored":
            decompose_layer(inputs[:2])  # warm up (the dense route is slow enough not to need it)
        reset_peak()
        before = peak_mib()
        started = time.perf_counter()
        split = decompose_layer(inputs)
        seconds = time.perf_counter() - started
        rows[label] = (seconds, peak_mib() - before, split.basis)
    p_factored = rows["factored"][2] @ rows["factored"][2].T
    p_dense = rows["dense (sketch)"][2] @ rows["dense (sketch)"][2].T
    difference = float((p_factored - p_dense).abs().max())
    table = Table(title="(a) one 4096 × 4096 module, T = 8, r = 16: bases + split")
    for column in ("route", "seconds", "peak RSS above start (MiB)", "k"):
        table.add_column(column, justify="right")
    for label, (seconds, mib, basis) in rows.items():
        table.add_row(label, f"{seconds:.3f}", f"{mib:.0f}", str(basis.shape[1]))
    console.print(table)
    speedup = rows["dense (sketch)"][0] / rows["factored"][0]
    console.print(
        f"factored ÷ dense: {speedup:.0f}× faster (target ≥ 50×); "
        f"max |S Sᵀ(factored) − S Sᵀ(dense)| = {difference:.1e} (target ≤ 1e-5)"
    )
    return {"speedup": speedup, "projector_difference": difference}


# -- (b), (c) the pipeline ---------------------------------------------------------------------
def run_worker(spec: dict) -> None:
    """Worker process body: the decomposition job on a batch of parameters."""
    from tvsplit.tasks.decompose_job import SplitSettings, decompose_parameters

    torch.set_num_threads(1)
    reset_peak()
    started = time.perf_counter()
    reports, failures = decompose_parameters(
        spec["url"], FAMILY, spec["run"], spec["names"], spec["members"],
        spec["fingerprints"], SplitSettings(),
    )  # fmt: skip
    print(json.dumps({
        "peak_mib": peak_mib(), "seconds": time.perf_counter() - started,
        "cpu_s": time.process_time(),
        "reports": len(reports), "failures": {k: str(v) for k, v in failures.items()},
    }))  # fmt: skip


def edit_plan(url: str, run: str, members: list[str]):
    from tvsplit.storage.catalogue import Catalogue
    from tvsplit.tasks.edit import get_method
    from tvsplit.tasks.edit_job import plan_edit

    method, params = EDIT
    edit = get_method(method)
    return plan_edit(
        Catalogue(url), FAMILY, method, members, edit.parse_params(params),
        edit.parse_members(None, len(members)), run, edit.needs_split,
    )  # fmt: skip


def run_check(spec: dict) -> None:
    """Checker process body: the dense edit of some modules (the dense route, from the
    catalogue) against the written adapter (PEFT's formula), relative Frobenius error."""
    from tvsplit.storage.catalogue import Catalogue
    from tvsplit.storage.lora import LoraAdapter
    from tvsplit.tasks.edit import apply_edit
    from tvsplit.tasks.edit_job import edit_inputs

    torch.set_num_threads(1)
    reset_peak()
    plan = edit_plan(spec["url"], spec["run"], spec["members"])
    catalogue = Catalogue(spec["url"])
    adapter = LoraAdapter(Path(spec["adapter"]))
    errors = {}
    for name in spec["names"]:
        shape = catalogue.open_entry(FAMILY, spec["members"][0]).shape(name)
        inputs = edit_inputs(plan, catalogue, name, torch.zeros(shape))
        dense = apply_edit(plan.method, inputs, plan.method_params, list(plan.member_params))
        got = adapter.delta(name)
        errors[name] = float((got - dense).norm() / dense.norm())
        del inputs, dense, got
    print(json.dumps({"peak_mib": peak_mib(), "errors": errors}))


def subprocess_json(mode: str, spec: dict) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, mode, json.dumps(spec)],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


def pipeline(work: Path, members: int, layers: int, check: bool) -> dict:
    from tvsplit.storage.catalogue import Catalogue
    from tvsplit.storage.decompositions import BasisCache, DecompositionRun
    from tvsplit.tasks.adapter_edit_job import write_edit_adapter
    from tvsplit.tasks.decompose_job import SplitSettings, member_fingerprint, plan_batches, run_id
    from tvsplit.tasks.ingest import IngestJob, run_ingest_job
    from tvsplit.tasks.synthetic import principal_angles_deg

    root = work / f"T{members}"
    shutil.rmtree(root, ignore_errors=True)
    base = root / "base"
    apparent = write_sparse_base(base, layers)
    names = [f"m{i:02d}" for i in range(members)]
    adapter_bytes = sum(write_adapter(root / name, i, layers) for i, name in enumerate(names))
    url = str(root / "catalogue.zarr")
    out: dict = {"T": members, "layers": layers, "adapter_bytes": adapter_bytes}

    reset_peak()
    started = time.perf_counter()
    run_ingest_job(IngestJob(url, FAMILY, None, str(base), str(base), include=INCLUDE,
                             base_by_reference=True))  # fmt: skip
    out["ingest_base_s"] = time.perf_counter() - started  # sha256 of the base's file
    started = time.perf_counter()
    for name in names:
        run_ingest_job(IngestJob(url, FAMILY, name, str(root / name), str(base), include=INCLUDE))
    out["ingest_members_s"] = time.perf_counter() - started
    out["ingest_peak_mib"] = peak_mib()

    reset_peak()
    started = time.perf_counter()
    catalogue = Catalogue(url)
    settings = SplitSettings()
    fingerprints = {m: member_fingerprint(catalogue, FAMILY, m) for m in names}
    run = run_id(FAMILY, names, settings, fingerprints)
    parameters = catalogue.parameters(FAMILY)
    store = DecompositionRun(catalogue, FAMILY, run)
    store.begin(settings.model_dump(), names, parameters)
    BasisCache(catalogue, FAMILY, settings.basis_key()).prepare()
    first = catalogue.open_entry(FAMILY, names[0])
    batches = plan_batches({p: first.stored_bytes(p) // 4 for p in parameters}, 2)
    workers = [
        subprocess.Popen(
            [
                sys.executable,
                __file__,
                "--worker",
                json.dumps(
                    {
                        "url": url,
                        "run": run,
                        "names": batch,
                        "members": names,
                        "fingerprints": fingerprints,
                    }
                ),
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        for batch in batches
    ]
    results = []
    for worker in workers:
        stdout, _ = worker.communicate()
        if worker.returncode:
            raise RuntimeError(f"decomposition worker failed ({worker.returncode})")
        results.append(json.loads(stdout.strip().splitlines()[-1]))
    failures = {k: v for r in results for k, v in r["failures"].items()}
    if failures:
        raise RuntimeError(f"decomposition failed: {next(iter(failures.items()))}")
    store.finish({})
    out["decompose_s"] = time.perf_counter() - started
    out["worker_peak_mib"] = [r["peak_mib"] for r in results]
    out["worker_job_s"] = max(r["seconds"] for r in results)  # without process start-up
    out["worker_cpu_s"] = sum(r["cpu_s"] for r in results)
    out["driver_decompose_peak_mib"] = peak_mib()

    shapes = module_shapes(layers)
    angles, found = [], []
    for index, module in enumerate(shapes):
        split = store.read_parameter(f"{module}.weight")
        basis = split.arrays["basis"]
        found.append(basis.shape[1])
        common = planted_common(index, shapes[module][0])
        angles.append(float(principal_angles_deg(basis, common).max()) if basis.shape[1] else 90.0)
    out["k_found"] = (min(found), max(found))
    out["max_angle_deg"] = max(angles)

    reset_peak()
    started = time.perf_counter()
    plan = edit_plan(url, run, names)
    report = write_edit_adapter(plan, root / "edit-adapter")
    out["edit_s"] = time.perf_counter() - started
    out["edit_peak_mib"] = peak_mib()
    out["edit_routes"] = report.routes()
    out["edit_rank"] = (
        min(r["rank"] for r in report.modules.values()),
        max(r["rank"] for r in report.modules.values()),
    )
    out["edit_bytes"] = folder_bytes(root / "edit-adapter")

    out["edit_vs_dense"], out["check_peak_mib"] = float("nan"), float("nan")
    if check:  # the dense edit holds T dense ΔW per module: for the first family only
        modules = [f"model.layers.0.self_attn.{n}.weight" for n in ATTENTION]
        modules += [f"model.layers.{layers - 1}.self_attn.q_proj.weight"]
        spec = {"url": url, "run": run, "members": names, "names": modules}
        checked = subprocess_json("--check", {**spec, "adapter": str(root / "edit-adapter")})
        out["edit_vs_dense"] = max(checked["errors"].values())
        out["check_peak_mib"] = checked["peak_mib"]

    family = root / "catalogue.zarr" / "families" / FAMILY
    out["bytes"] = {
        part.name: folder_bytes(part) for part in sorted(family.iterdir()) if part.is_dir()
    }
    out["base_apparent_bytes"] = apparent
    shutil.rmtree(root)
    return out


def shared_step_exponent(counts: tuple[int, ...]) -> dict:
    """The split from the stacked bases (the shared step) on one 11008 × 4096 module, and the
    member bases, timed against T; the exponent fitted from the smallest and largest T."""
    from tvsplit.storage.lowrank import LowRankDelta
    from tvsplit.tasks.decompose import member_basis, split_from_bases

    generator = torch.Generator().manual_seed(1)
    m, n = INTERMEDIATE, HIDDEN
    common = torch.linalg.qr(torch.randn(m, PLANTED, generator=generator))[0]
    times = {}
    for count in counts:
        family = []
        for _ in range(count):
            own = torch.randn(m, RANK - PLANTED, generator=generator) / math.sqrt(m)
            up = torch.cat([3.0 * common / math.sqrt(m), own], dim=1)
            down = torch.randn(RANK, n, generator=generator) / math.sqrt(n)
            family.append(LowRankDelta(up, down, ALPHA / RANK, (m, n)))
        started = time.perf_counter()
        bases = [member_basis(d) for d in family]
        member_s = time.perf_counter() - started
        started = time.perf_counter()
        split_from_bases(family, bases)
        times[count] = (member_s, time.perf_counter() - started)
    low, high = min(counts), max(counts)
    exponent = math.log(times[high][1] / times[low][1]) / math.log(high / low)
    member_exponent = math.log(times[high][0] / times[low][0]) / math.log(high / low)
    return {"times": times, "shared_exponent": exponent, "member_exponent": member_exponent}


def report(rows: list[dict], full_layers: int, console: Console) -> None:
    mib = 2**20
    table = Table(title="(b)/(c) 7B-shaped LoRA family (r = 16, 7 modules per layer)")
    table.add_column("")
    for row in rows:
        table.add_column(f"T = {row['T']}, {row['layers']} layers", justify="right")

    def line(label, fn):
        table.add_row(label, *[fn(r) for r in rows])

    line("adapters' bytes (MiB, float32)", lambda r: f"{r['adapter_bytes'] / mib:.0f}")
    line("catalogue: members (MiB)", lambda r: f"{r['bytes'].get('vectors', 0) / mib:.0f}")
    line(
        "  ÷ adapters' bytes (target ≤ 1.1)",
        lambda r: f"{r['bytes'].get('vectors', 0) / r['adapter_bytes']:.3f}",
    )
    line("catalogue: base, by reference (MiB)", lambda r: f"{r['bytes'].get('base', 0) / mib:.1f}")
    line(
        "  the base's own size (GiB, not copied)",
        lambda r: f"{r['base_apparent_bytes'] / 2**30:.1f}",
    )
    line("catalogue: basis cache (MiB)", lambda r: f"{r['bytes'].get('bases', 0) / mib:.0f}")
    line(
        "catalogue: decomposition (MiB)",
        lambda r: f"{r['bytes'].get('decompositions', 0) / mib:.0f}",
    )
    line("ingest base (s, sha256 of its file)", lambda r: f"{r['ingest_base_s']:.1f}")
    line("ingest members (s)", lambda r: f"{r['ingest_members_s']:.1f}")
    line("  per member (s)", lambda r: f"{r['ingest_members_s'] / r['T']:.2f}")
    line("decompose, 2 workers (s)", lambda r: f"{r['decompose_s']:.1f}")
    line("  per member (s)", lambda r: f"{r['decompose_s'] / r['T']:.2f}")
    line("  the job itself, slowest worker (s)", lambda r: f"{r['worker_job_s']:.1f}")
    line("  workers' CPU time (s)", lambda r: f"{r['worker_cpu_s']:.1f}")
    line(
        "ingest + decompose (s, target ≤ 300)",
        lambda r: f"{r['ingest_base_s'] + r['ingest_members_s'] + r['decompose_s']:.0f}",
    )
    line(
        f"  extrapolated to {full_layers} layers (s)",
        lambda r: (
            f"{r['ingest_base_s'] + (r['ingest_members_s'] + r['decompose_s']) * full_layers / r['layers']:.0f}"
        ),
    )
    line("one-adapter edit (s)", lambda r: f"{r['edit_s']:.1f}")
    line("  edit rank (min–max per module)", lambda r: "–".join(map(str, r["edit_rank"])))
    line("  routes", lambda r: ", ".join(f"{k}: {v}" for k, v in r["edit_routes"].items()))
    line("  max rel. error vs dense edit (≤ 1e-5)", lambda r: f"{r['edit_vs_dense']:.1e}")
    line("peak RSS driver: ingest (MiB)", lambda r: f"{r['ingest_peak_mib']:.0f}")
    line("peak RSS driver: decompose (MiB)", lambda r: f"{r['driver_decompose_peak_mib']:.0f}")
    line(
        "peak RSS workers (MiB, ≤ 2048)",
        lambda r: " / ".join(f"{x:.0f}" for x in r["worker_peak_mib"]),
    )
    line("peak RSS driver: edit (MiB)", lambda r: f"{r['edit_peak_mib']:.0f}")
    line("peak RSS dense checker (MiB)", lambda r: f"{r['check_peak_mib']:.0f}")
    line(
        "shared directions found (k min–max)",
        lambda r: "–".join(map(str, r["k_found"])) + f" of {PLANTED}",
    )
    line("  largest angle to planted (°)", lambda r: f"{r['max_angle_deg']:.2e}")
    console.print(table)
    if len(rows) > 1:
        a, b = rows[0], rows[-1]
        grow = b["T"] / a["T"]
        console.print(
            f"T ×{grow:.0f}: ingest of members ×{b['ingest_members_s'] / a['ingest_members_s']:.2f}, "
            f"decompose ×{b['decompose_s'] / a['decompose_s']:.2f} (linear would be ×{grow:.0f})"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--members", default="8,32", help="member counts for (b), (c)")
    parser.add_argument("--work", default=None, help="scratch folder (default: a temp one)")
    parser.add_argument("--skip-module", action="store_true", help="skip part (a)")
    args = parser.parse_args()
    torch.set_num_threads(1)  # one thread per process; see the module docstring
    console = Console()
    if not args.skip_module:
        one_module(console)
    work = Path(args.work or os.environ.get("TMPDIR", "/tmp")) / "tvsplit-lora-bench"
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    for count in (int(c) for c in args.members.split(",")):
        rows.append(pipeline(work, count, args.layers, check=not rows))
        console.print(rows[-1])
    report(rows, 32, console)
    exponent = shared_step_exponent((8, 16, 32))
    table = Table(title="(c) one 11008 × 4096 module: member bases and shared step against T")
    for column in ("T", "member bases (s)", "shared step (s)"):
        table.add_column(column, justify="right")
    for count, (member_s, shared_s) in exponent["times"].items():
        table.add_row(str(count), f"{member_s:.3f}", f"{shared_s:.3f}")
    console.print(table)
    console.print(
        f"measured exponents in T: member bases {exponent['member_exponent']:.2f}, "
        f"shared step {exponent['shared_exponent']:.2f}"
    )
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        run_worker(json.loads(sys.argv[2]))
    elif len(sys.argv) == 3 and sys.argv[1] == "--check":
        run_check(json.loads(sys.argv[2]))
    else:
        main()
