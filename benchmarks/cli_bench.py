"""Whole commands, timed as a user runs them: `tvsplit` beside `mergekit-yaml` on the same files.

Usage::

    .venv/bin/python benchmarks/cli_bench.py [--install-mergekit] [--rounds 2] [--fixed-rounds 5]
        [--layers 12] [--members 4] [--no-mergekit] [--no-decompose] [--markdown FILE]
        [--workdir DIR] [--keep]

Every row is a new process (``subprocess``, wall time from spawn to exit). Rows are
interleaved (round 1 runs every row once, then round 2 ...) and each row reports its best
round, so a neighbour's burst of CPU shows up as a worse round, not as a worse row. The
machine is shared: compare rows of one run, not runs.

1. Fixed cost (``--fixed-rounds``): the import floors (``python -c "import torch"``, with
   prefect, with mlflow; mergekit's own imports), ``tvsplit --version``, ``--help``,
   ``catalogue ls`` on an empty catalogue, two recipes with an error (a bad field; a family
   that does not exist), and flow commands with no work on a tiny family: the first (cold)
   command on a fresh data folder and warm reruns (ingest with everything present, a tracked
   edit of a tiny family).
2. Model commands (``--rounds``) on a GPT-2-small-shaped family (``--layers`` blocks; base
   + ``--members`` members, float32 single-file safetensors folders): ingest into a fresh
   catalogue, decompose, and edits (task arithmetic; TIES at densities 0.3 and 0.7), each
   edit beside ``mergekit-yaml`` on the same files; the two outputs are compared.
   In-process floors of the same round: the edit's I/O (read the base and the members'
   vectors from the catalogue, write one model) and mergekit's (read five models, write one).

Stages: tvsplit writes where its time went when ``TVSPLIT_STAGES`` names a file
(``tvsplit.tasks.stages``): start (spawn → tvsplit's entry point: the interpreter and
site-packages), imports, orchestration (reaching Prefect, flow/task runs), tracking
(MLflow), reading, compute, writing. Reading and writing run in threads beside the compute
in the edit, so those three are busy times and can sum to more than the wall time.
mergekit's row splits into its import floor and the rest.

mergekit 0.1.5 lives in its own venv (.venv-mergekit or $TVSPLIT_MERGEKIT_VENV, one ``pip install mergekit==0.1.5
torch==2.13.0``, as benchmarks/mergekit_crosscheck.py makes it); ``--install-mergekit``
creates it when absent, otherwise its rows are skipped.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from safetensors.torch import save_file

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from edit_bench import compare, io_floor, touch  # noqa: E402
from gpt2_shapes import gpt2_small_shapes  # noqa: E402
from mergekit_crosscheck import MERGEKIT, VENV, MergekitUnavailable, ensure_mergekit  # noqa: E402

BIN = Path(sys.executable).parent
TVSPLIT = str(BIN / "tvsplit")
PYTHON = sys.executable
WEIGHTS = (1.0, 0.7, 0.5, 0.3, 0.9, 0.6, 0.4, 0.2)
DENSITIES = (0.3, 0.7)
STAGES = ("start", "imports", "orchestration", "tracking", "reading", "compute", "writing")
QUIET = {
    "HF_HUB_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "DO_NOT_TRACK": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true",
}


# -- running one command ----------------------------------------------------------------------
@dataclass
class Run:
    wall: float
    returncode: int
    stages: dict[str, float] = field(default_factory=dict)
    tail: str = ""


@dataclass
class Row:
    """One command measured over several rounds; ``best`` is the fastest run."""

    label: str
    expect: int = 0
    runs: list[Run] = field(default_factory=list)

    @property
    def best(self) -> Run | None:
        good = [r for r in self.runs if r.returncode == self.expect]
        return min(good, key=lambda r: r.wall) if good else None

    def cell(self) -> str:
        best = self.best
        if best is None:
            code = self.runs[-1].returncode if self.runs else "?"
            return f"failed ({code})"
        return f"{best.wall:.2f}"


def run(
    command: Sequence[str],
    cwd: Path,
    stages_file: Path | None = None,
    env: dict[str, str] | None = None,
) -> Run:
    """Run ``command`` to completion; wall time from spawn to exit, and tvsplit's stages."""
    environment = {**os.environ, **QUIET, **(env or {})}
    environment.pop("PREFECT_API_URL", None)  # a command reaches Prefect its own default way
    if stages_file is not None:
        stages_file.unlink(missing_ok=True)
        environment["TVSPLIT_STAGES"] = str(stages_file)
    spawned = time.time()
    start = time.perf_counter()
    result = subprocess.run(list(command), cwd=cwd, env=environment, capture_output=True, text=True)
    wall = time.perf_counter() - start
    stages: dict[str, float] = {}
    if stages_file is not None and stages_file.is_file():
        data = json.loads(stages_file.read_text())
        stages = dict(data.get("stages", {}))
        stages["start"] = max(0.0, float(data["entered"]) - spawned)
    tail = (result.stderr or result.stdout)[-2000:]
    return Run(wall, result.returncode, stages, tail)


def stop_local_servers(folder: Path) -> None:
    """Stop the local Prefect server a data folder under ``folder`` may hold (by its pid)."""
    record = folder / "tvsplit-data" / "prefect" / "server.json"
    if not record.is_file():
        return
    subprocess.run([TVSPLIT, "server", "stop"], cwd=folder, capture_output=True, env=os.environ)
    try:
        pid = int(json.loads(record.read_text())["pid"])
    except (OSError, ValueError, KeyError):
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, 15)


# -- fixtures -----------------------------------------------------------------------------------
def write_family(root: Path, shapes: dict[str, tuple[int, ...]], members: int, layers: int) -> None:
    """``root/base`` and ``root/member<i>``: single-file float32 safetensors + GPT-2 config."""
    g = torch.Generator().manual_seed(0)
    base = {n: 0.02 * torch.randn(s, generator=g) for n, s in shapes.items()}
    d = shapes["transformer.wpe.weight"][1]
    vocab, positions = shapes["transformer.wte.weight"][0], shapes["transformer.wpe.weight"][0]
    config = {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "n_embd": d,
        "n_layer": layers,
        "n_head": max(1, d // 64),
        "n_positions": positions,
        "vocab_size": vocab,
    }
    for label in ["base", *(f"member{i}" for i in range(members))]:
        folder = root / label
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.json").write_text(json.dumps(config))
        if label == "base":
            tensors = base
        else:
            tensors = {n: t + 0.002 * torch.randn(t.shape, generator=g) for n, t in base.items()}
        save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
        del tensors


def spec(models: Path, family: str, members: int) -> dict:
    return {
        "families": {
            family: {
                "base": str(models / "base"),
                "members": {f"member{i}": str(models / f"member{i}") for i in range(members)},
            }
        }
    }


def recipe(models: Path, family: str, members: int, method: str, **params: object) -> dict:
    return {
        "base": str(models / "base"),
        "family": family,
        "method": method,
        "members": [{"name": f"member{i}", "weight": WEIGHTS[i]} for i in range(members)],
        "params": dict(params),
    }


def mergekit_config(models: Path, members: int, method: str, density: float | None) -> dict:
    entries = []
    for i in range(members):
        parameters: dict[str, float] = {"weight": WEIGHTS[i]}
        if density is not None:
            parameters["density"] = density
        entries.append({"model": str(models / f"member{i}"), "parameters": parameters})
    return {
        "merge_method": method,
        "base_model": str(models / "base"),
        "models": entries,
        "parameters": {"normalize": method == "ties"},
        "dtype": "float32",
    }


def dump(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


# -- in-process floors --------------------------------------------------------------------------
def edit_io_floor(models: Path, catalogue: str, family: str, members: int, out: Path) -> None:
    """What a task-arithmetic edit must read and write: the base (safetensors), every
    member's vector (catalogue) and one model folder; no compute."""
    from safetensors import safe_open
    from tvsplit.storage.catalogue import Catalogue
    from tvsplit.storage.model_folder import ModelFolderWriter

    cat = Catalogue(catalogue)
    names = [f"member{i}" for i in range(members)]
    with (
        safe_open(models / "base" / "model.safetensors", framework="pt") as base,
        ModelFolderWriter(out, overwrite=True) as writer,
    ):
        for name in base.keys():  # noqa: SIM118 (safe_open is not a dict)
            tensor = base.get_tensor(name)
            touch(tensor)
            for member in names:
                touch(cat.read(family, name, member=member))
            writer.add(name, tensor)


def timed(function: Callable[[], object]) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


# -- the table ----------------------------------------------------------------------------------
def stage_cells(row: Row | None) -> list[str]:
    best = row.best if row is not None else None
    if best is None or not best.stages:
        return ["" for _ in STAGES] + [""]
    cells = [f"{best.stages[s]:.2f}" if s in best.stages else "" for s in STAGES]
    known = sum(best.stages.get(s, 0.0) for s in ("start", "imports", "orchestration", "tracking"))
    work = best.stages.get("work")
    if work is None:  # the edit: reading/compute/writing overlap; the rest is the wall left
        work = max(0.0, best.wall - known)
    return [*cells, f"{work:.2f}"]


def markdown(title: str, header: Sequence[str], lines: list[list[str]]) -> str:
    out = [f"**{title}**", "", "| " + " | ".join(header) + " |"]
    out.append("|" + "|".join(" --- " for _ in header) + "|")
    out += ["| " + " | ".join(line) + " |" for line in lines]
    return "\n".join(out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2, help="rounds of the model commands")
    parser.add_argument("--fixed-rounds", type=int, default=5, help="rounds of the fixed cost")
    parser.add_argument("--layers", type=int, default=12, help="GPT-2 blocks (12: GPT-2 small)")
    parser.add_argument("--members", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=50257, help="embedding rows (GPT-2: 50257)")
    parser.add_argument("--install-mergekit", action="store_true")
    parser.add_argument("--no-mergekit", action="store_true")
    parser.add_argument("--no-decompose", action="store_true")
    parser.add_argument("--markdown", type=Path, help="also write the tables to this file")
    parser.add_argument("--workdir", type=Path)
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()

    mergekit: str | None = None
    if not args.no_mergekit:
        if MERGEKIT.exists():
            mergekit = str(MERGEKIT)
        elif args.install_mergekit:
            try:
                mergekit = ensure_mergekit()
            except MergekitUnavailable as error:
                print(f"note: no mergekit rows: {error}")
        else:
            print(f"note: no {MERGEKIT}; pass --install-mergekit for the mergekit rows")
    work = args.workdir or Path(tempfile.mkdtemp(prefix="cli-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    folders = {name: work / name for name in ("empty", "warm", "gpt2", "out", "stages")}
    for folder in folders.values():
        folder.mkdir(exist_ok=True)
    try:
        return bench(args, mergekit, work, folders)
    finally:
        for folder in work.iterdir():
            if folder.is_dir():
                stop_local_servers(folder)
        if not args.keep and args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


def bench(args, mergekit: str | None, work: Path, folders: dict[str, Path]) -> int:
    members, family, tiny_family = args.members, "gpt2", "tiny"
    # tiny family for the commands that do no model work
    tiny = work / "tiny-models"
    write_family(tiny, gpt2_small_shapes(2, d=32, vocab=64, positions=32), members, 2)
    tiny_spec = dump(work / "tiny.yaml", spec(tiny, tiny_family, members))
    tiny_ta = dump(work / "tiny-ta.yaml", recipe(tiny, tiny_family, members, "task_arithmetic"))
    bad_field = dump(
        work / "bad-field.yaml", recipe(tiny, tiny_family, members, "ties", density=2.0)
    )
    no_family = dump(work / "no-family.yaml", recipe(tiny, "nosuch", members, "task_arithmetic"))
    warm = folders["warm"]
    prepared = run([TVSPLIT, "ingest", str(tiny_spec), "--no-progress"], warm)
    if prepared.returncode != 0:
        print(prepared.tail)
        return 1
    stage_dir = folders["stages"]

    mk_python = str(VENV / "bin" / "python")
    fixed: list[tuple[Row, Callable[[int], Run]]] = []

    def add_fixed(label: str, command: list[str], cwd: Path, expect: int = 0) -> None:
        row = Row(label, expect)
        slug = "".join(c if c.isalnum() else "-" for c in label)[:60]
        fixed.append((row, lambda r: run(command, cwd, stage_dir / f"{slug}-{r}.json")))

    add_fixed("python -c pass", [PYTHON, "-c", "pass"], warm)
    add_fixed('python -c "import torch"', [PYTHON, "-c", "import torch"], warm)
    add_fixed("… + prefect", [PYTHON, "-c", "import torch, prefect"], warm)
    add_fixed("… + prefect + mlflow", [PYTHON, "-c", "import torch, prefect, mlflow"], warm)
    if mergekit:
        add_fixed(
            "mergekit's imports (its venv)",
            [mk_python, "-c", "import mergekit.merge, mergekit.config"],
            warm,
        )
    add_fixed("tvsplit --version", [TVSPLIT, "--version"], warm)
    add_fixed("tvsplit --help", [TVSPLIT, "--help"], warm)
    add_fixed(
        "tvsplit catalogue ls (empty catalogue)", [TVSPLIT, "catalogue", "ls"], folders["empty"]
    )
    add_fixed("tvsplit edit: recipe with a bad field", [TVSPLIT, "edit", str(bad_field)], warm, 1)
    add_fixed("tvsplit edit: recipe names no family", [TVSPLIT, "edit", str(no_family)], warm, 1)
    add_fixed(
        "tvsplit ingest, nothing new (warm)",
        [TVSPLIT, "ingest", str(tiny_spec), "--no-progress"],
        warm,
    )
    add_fixed(
        "tvsplit edit, tiny family, tracked (warm)",
        [TVSPLIT, "edit", str(tiny_ta), "--out", str(folders["out"] / "tiny"), "--overwrite"],
        warm,
    )
    cold_row = Row("tvsplit ingest, tiny family, fresh data folder (cold)")

    def cold(r: int) -> Run:
        folder = work / f"cold-{r}"
        folder.mkdir(exist_ok=True)
        try:
            command = [TVSPLIT, "ingest", str(tiny_spec), "--no-progress"]
            return run(command, folder, stage_dir / f"cold-{r}.json")
        finally:
            stop_local_servers(folder)

    fixed.append((cold_row, cold))

    print(f"fixed cost: {len(fixed)} rows × {args.fixed_rounds} rounds, interleaved", flush=True)
    for r in range(args.fixed_rounds):
        for row, measure in fixed:
            row.runs.append(measure(r))
        print(f"  round {r + 1} done", flush=True)

    # the GPT-2-small-shaped family
    models = work / "models"
    shapes = gpt2_small_shapes(args.layers, vocab=args.vocab)
    parameters = sum(torch.Size(s).numel() for s in shapes.values())
    print(
        f"building {family}: {parameters / 1e6:.1f} M parameters × (1 + {members}) ...",
        flush=True,
    )
    write_family(models, shapes, members, args.layers)
    family_spec = dump(work / "gpt2.yaml", spec(models, family, members))
    gpt2 = folders["gpt2"]
    edits: dict[str, tuple[dict, dict | None]] = {
        "task arithmetic": (
            recipe(models, family, members, "task_arithmetic"),
            mergekit_config(models, members, "task_arithmetic", None),
        )
    }
    for density in DENSITIES:
        edits[f"TIES, density {density}"] = (
            recipe(models, family, members, "ties", density=density, normalize=True),
            mergekit_config(models, members, "ties", density),
        )
    rows: dict[str, Row] = {"ingest": Row("ingest")}
    if not args.no_decompose:
        rows["decompose"] = Row("decompose")
    for label in edits:
        rows[label] = Row(label)
        rows[f"mergekit {label}"] = Row(f"mergekit {label}")
    floors: dict[str, list[float]] = {"edit": [], "mergekit": []}
    agreement: dict[str, tuple[float, int, int]] = {}
    member_dirs = [models / f"member{i}" for i in range(members)]
    io_floor(models / "base", member_dirs, work / "warmup")  # page cache warm for every round

    for r in range(args.rounds):
        catalogue = str(gpt2 / f"catalogue-{r}.zarr")
        where = ["--catalogue", catalogue]
        command = [TVSPLIT, "ingest", str(family_spec), *where, "--no-progress"]
        rows["ingest"].runs.append(run(command, gpt2, stage_dir / f"ingest-{r}.json"))
        if rows["ingest"].runs[-1].returncode != 0:
            print(rows["ingest"].runs[-1].tail)
            return 1
        floors["edit"].append(
            timed(
                lambda c=catalogue: edit_io_floor(models, c, family, members, work / "floor-edit")
            )
        )
        floors["mergekit"].append(
            timed(lambda: io_floor(models / "base", member_dirs, work / "floor-mk"))
        )
        for label, (ours, theirs) in edits.items():
            slug = label.replace(" ", "-").replace(",", "")
            path = dump(work / f"{slug}.yaml", ours)
            out = folders["out"] / f"tvsplit-{slug}"
            command = [TVSPLIT, "edit", str(path), *where, "--out", str(out), "--overwrite"]
            rows[label].runs.append(run(command, gpt2, stage_dir / f"{slug}-{r}.json"))
            if mergekit and theirs is not None:
                config = dump(work / f"mergekit-{slug}.yaml", theirs)
                peer_out = folders["out"] / f"mergekit-{slug}"
                shutil.rmtree(peer_out, ignore_errors=True)
                command = [mergekit, str(config), str(peer_out), "--no-copy-tokenizer"]
                command += ["--quiet", "--no-write-model-card"]
                rows[f"mergekit {label}"].runs.append(run(command, gpt2))
                if r == args.rounds - 1 and rows[label].best and rows[f"mergekit {label}"].best:
                    agreement[label] = compare(out, peer_out)
        if "decompose" in rows:
            command = [TVSPLIT, "decompose", family, *where, "--seed", str(r)]
            rows["decompose"].runs.append(run(command, gpt2, stage_dir / f"decompose-{r}.json"))
        if r < args.rounds - 1:
            shutil.rmtree(catalogue, ignore_errors=True)
        print(f"  model round {r + 1} done", flush=True)

    report(args, parameters, fixed, rows, edits, floors, agreement, mergekit)
    return 0


def report(args, parameters, fixed, rows, edits, floors, agreement, mergekit) -> None:
    header = ["command", "best s", *STAGES, "work/other"]
    lines = [[row.label, row.cell(), *stage_cells(row)] for row, _ in fixed]
    fixed_md = markdown(
        f"Fixed cost: best of {args.fixed_rounds} interleaved rounds", header, lines
    )
    mk_imports = next(
        (row.best.wall for row, _ in fixed if row.label.startswith("mergekit") and row.best),
        None,
    )
    header = ["command", "tvsplit s", "mergekit s", "speed-up", *STAGES, "work/other"]
    header.append("max rel diff (entries ≠)")
    lines = []
    for label in ["ingest", "decompose", *edits]:
        if label not in rows:
            continue
        ours, theirs = rows[label], rows.get(f"mergekit {label}")
        peer = theirs.best.wall if theirs is not None and theirs.best else None
        mine = ours.best.wall if ours.best else None
        speedup = f"{peer / mine:.1f}×" if peer and mine else ""
        diff = agreement.get(label)
        diff_cell = f"{diff[0]:.1e} ({diff[1]})" if diff else ""
        peer_cell = f"{peer:.2f}" if peer else "–"
        lines.append([label, ours.cell(), peer_cell, speedup, *stage_cells(ours), diff_cell])
        if peer and mk_imports:
            lines.append(
                [f"  mergekit-yaml, {label}", "", f"{peer:.2f}", "", "", f"{mk_imports:.2f}"]
                + ["" for _ in STAGES[2:]]
                + [f"{peer - mk_imports:.2f}", ""]
            )
    ingest, ta = rows["ingest"].best, rows["task arithmetic"].best
    peer_ta = rows["mergekit task arithmetic"].best if mergekit else None
    if ingest and ta:
        both = ingest.wall + ta.wall
        lines.append(
            ["ingest + task arithmetic", f"{both:.2f}", f"{peer_ta.wall:.2f}" if peer_ta else "–"]
            + [f"{peer_ta.wall / both:.1f}×" if peer_ta else ""]
            + ["" for _ in STAGES]
            + ["", ""]
        )
    model_md = markdown(
        f"GPT-2-small-shaped family ({args.layers} blocks, {parameters / 1e6:.1f} M parameters, "
        f"base + {args.members} members, float32): best of {args.rounds} interleaved rounds",
        header,
        lines,
    )
    floor_md = (
        f"In-process I/O floors (best of {args.rounds}): the edit's (base + {args.members} "
        f"vectors from the catalogue, one model written) {min(floors['edit']):.2f} s; "
        f"mergekit's (read {args.members + 1} models, write one) {min(floors['mergekit']):.2f} s."
    )
    text = "\n\n".join([fixed_md, model_md, floor_md])
    targets = []
    need_none = [
        row
        for row, _ in fixed
        if row.label.startswith(("tvsplit --", "tvsplit catalogue", "tvsplit edit: "))
    ]
    slowest = max((r.best.wall for r in need_none if r.best), default=float("nan"))
    targets.append(f"- commands with no model work ≤ 1.5 s: slowest {slowest:.2f} s")
    floor_row = next(row for row, _ in fixed if row.label == "… + prefect + mlflow")
    tracked = next(row for row, _ in fixed if row.label.startswith("tvsplit edit, tiny"))
    if floor_row.best and tracked.best:
        targets.append(
            f"- tracked flow command ≤ import floor + 1 s: {tracked.best.wall:.2f} s against "
            f"{floor_row.best.wall:.2f} + 1 s"
        )
    for label, need in [
        ("task arithmetic", 1.5),
        *((f"TIES, density {d}", 5.0) for d in DENSITIES),
    ]:
        mine, theirs = rows[label].best, rows.get(f"mergekit {label}")
        if mine and theirs is not None and theirs.best:
            targets.append(
                f"- {label} ≥ {need}× faster than mergekit-yaml: "
                f"{theirs.best.wall / mine.wall:.1f}×"
            )
    text += "\n\nTargets (issue 20), this run:\n" + "\n".join(targets)
    text += (
        f"\n\nMachine: {os.cpu_count()} cores, shared (load {os.getloadavg()[0]:.1f} at the end); "
        "times move between runs, compare rows within one run."
    )
    print()
    print(text)
    if args.markdown:
        args.markdown.write_text(text + "\n")


if __name__ == "__main__":
    sys.exit(main())
