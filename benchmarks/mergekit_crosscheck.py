"""Cross-check tasks/edit.py against mergekit on a tiny GPT-2 (task arithmetic and TIES).

Usage: ``.venv/bin/python benchmarks/mergekit_crosscheck.py [--workdir DIR] [--keep]``

1. Makes sure a separate venv with mergekit 0.1.5 exists at ``/tmp/mergekit-venv``
   (``python3.11 -m venv`` + ONE ``pip install torch==2.13.0 mergekit==0.1.5``, so pip takes
   the CPU torch wheel); if that fails the script says so and exits 0 ("SKIP").
2. Builds a tiny GPT-2 base and 3 fine-tuned models (random perturbations of different
   scales, sparse in places so that trimming and sign election matter) as local folders.
3. Runs ``mergekit-yaml`` for each configuration below, in that venv.
4. Runs the same edit with ``tasks.edit.apply_edit`` on the same tensors.
5. Prints the max element-wise difference per method (absolute and relative to the largest
   |weight|); exits 1 if any relative difference exceeds 1e-5.

Mapping of conventions (checked in mergekit 0.1.5's ``generalized_task_arithmetic.py`` and
``sparsify.py``): mergekit ``weight`` = our member ``weight``, ``lambda`` = our ``scale``;
``ties`` uses ``consensus_method: sum`` (sign of Σ w_i τ̂_i, ties elect +), a zero entry has
sign 0 and never agrees, ``normalize`` divides by Σ w_i over agreeing entries (0 → 1), and
trimming keeps k = max(1, int(density · n)) entries by magnitude (full argsort). Our
``ties_delta`` states the same conventions; ties in magnitude at the threshold (not present
in random data) are the only place they may differ.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import yaml
from safetensors import safe_open

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tvsplit.tasks.edit import EditInputs, apply_edit

VENV = Path("/tmp/mergekit-venv")
MERGEKIT = VENV / "bin" / "mergekit-yaml"
TOLERANCE = 1e-5
WEIGHTS = (1.0, 0.5, 0.8)

# name → (mergekit method, mergekit parameters, our method, our params, per-model density)
CASES: dict[str, tuple[str, dict, str, dict, float | None]] = {
    "task_arithmetic": ("task_arithmetic", {"normalize": False}, "task_arithmetic", {}, None),
    "task_arithmetic λ=0.7": (
        "task_arithmetic",
        {"normalize": False, "lambda": 0.7},
        "task_arithmetic",
        {"scale": 0.7},
        None,
    ),
    "ties d=0.5 normalize": (
        "ties",
        {"normalize": True},
        "ties",
        {"density": 0.5, "normalize": True},
        0.5,
    ),
    "ties d=0.5 no normalize": (
        "ties",
        {"normalize": False},
        "ties",
        {"density": 0.5, "normalize": False},
        0.5,
    ),
    "ties d=0.3 normalize λ=1.5": (
        "ties",
        {"normalize": True, "lambda": 1.5},
        "ties",
        {"density": 0.3, "normalize": True, "scale": 1.5},
        0.3,
    ),
}


def ensure_mergekit() -> str | None:
    """Path of ``mergekit-yaml``, installing the venv if absent; None (with a message) when
    it cannot be installed."""
    if MERGEKIT.exists():
        return str(MERGEKIT)
    python = shutil.which("python3.11")
    if python is None:
        print("SKIP: python3.11 not found; cannot create the mergekit venv")
        return None
    print(f"creating {VENV} (pip install torch==2.13.0 mergekit==0.1.5) ...", flush=True)
    try:
        subprocess.run([python, "-m", "venv", str(VENV)], check=True)
        subprocess.run(
            [str(VENV / "bin" / "pip"), "install", "-q", "torch==2.13.0", "mergekit==0.1.5"],
            check=True,
        )
    except subprocess.CalledProcessError as error:
        print(f"SKIP: mergekit could not be installed ({error}); nothing was compared")
        return None
    return str(MERGEKIT) if MERGEKIT.exists() else None


def build_models(root: Path) -> tuple[Path, list[Path]]:
    """A tiny GPT-2 base and 3 members with perturbations of different scales."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(
        n_embd=32,
        n_layer=2,
        n_head=2,
        vocab_size=64,
        n_positions=32,
        bos_token_id=0,
        eos_token_id=0,
    )
    base = GPT2LMHeadModel(config)
    base.save_pretrained(root / "base")
    members = []
    g = torch.Generator().manual_seed(1)
    for i, scale in enumerate((0.02, 0.05, 0.01)):
        model = GPT2LMHeadModel(config)
        state = base.state_dict()
        with torch.no_grad():
            for name, tensor in model.state_dict().items():
                noise = scale * torch.randn(tensor.shape, generator=g)
                if i == 1:  # a sparse member: its trimmed entries and zeros matter
                    noise *= torch.rand(tensor.shape, generator=g) < 0.3
                tensor.copy_(state[name] + noise)
        model.save_pretrained(root / f"member{i}")
        members.append(root / f"member{i}")
    return root / "base", members


def read_folder(folder: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(file, framework="pt") as handle:
            for name in handle.keys():  # noqa: SIM118 (safe_open is not a dict)
                tensors[name] = handle.get_tensor(name)
    return tensors


def run_mergekit(
    mergekit: str, work: Path, name: str, base: Path, members: list[Path], case: tuple
) -> Path:
    method, parameters, _, _, density = case
    models = []
    for path, weight in zip(members, WEIGHTS, strict=True):
        model_params: dict[str, float] = {"weight": weight}
        if density is not None:
            model_params["density"] = density
        models.append({"model": str(path), "parameters": model_params})
    config = {
        "merge_method": method,
        "base_model": str(base),
        "models": models,
        "parameters": parameters,
        "dtype": "float32",
    }
    slug = "".join(c if c.isalnum() else "_" for c in name)
    config_path = work / f"{slug}.yml"
    config_path.write_text(yaml.safe_dump(config))
    out = work / f"out_{slug}"
    command = [mergekit, str(config_path), str(out), "--no-copy-tokenizer", "--quiet"]
    command += ["--no-write-model-card"]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"mergekit failed for {name}:\n{result.stderr[-3000:]}")
    return out


def ours(
    base: dict[str, torch.Tensor], members: list[dict[str, torch.Tensor]], case: tuple
) -> dict[str, torch.Tensor]:
    _, _, method, params, _ = case
    weights = [{"weight": w} for w in WEIGHTS]
    out = {}
    for name, tensor in base.items():
        vectors = tuple(m[name].float() - tensor.float() for m in members)
        out[name] = apply_edit(method, EditInputs(tensor, vectors, name=name), params, weights)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    args = parser.parse_args()
    mergekit = ensure_mergekit()
    if mergekit is None:
        return 0
    work = args.workdir or Path(tempfile.mkdtemp(prefix="mergekit-crosscheck-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        base_dir, member_dirs = build_models(work)
        base = read_folder(base_dir)
        members = [read_folder(d) for d in member_dirs]
        header = f"{'method':<28} {'tensors':>7} {'max |diff|':>11} {'max rel diff':>12}"
        print(f"{header} {'edit vs TA':>10}  ok")
        failed = False
        reference: dict[str, torch.Tensor] | None = None
        for name, case in CASES.items():
            theirs = read_folder(run_mergekit(mergekit, work, name, base_dir, member_dirs, case))
            reference = theirs if reference is None else reference  # mergekit's plain TA
            mine = ours(base, members, case)
            common = sorted(set(mine) & set(theirs))
            missing = sorted(set(mine) - set(theirs))
            if missing:
                print(f"  note: mergekit wrote no {missing}")
            worst_abs = max(float((mine[n] - theirs[n]).abs().max()) for n in common)
            worst_rel = max(
                float((mine[n] - theirs[n]).abs().max() / theirs[n].abs().max().clamp(min=1e-12))
                for n in common
            )
            ok = worst_rel <= TOLERANCE and not missing
            failed |= not ok
            # how far this edit is from plain task arithmetic: shows the check can fail
            distinct = max(float((theirs[n] - reference[n]).abs().max()) for n in common)
            print(
                f"{name:<28} {len(common):>7} {worst_abs:>11.3e} {worst_rel:>12.3e} "
                f"{distinct:>10.2e}  {'yes' if ok else 'NO'}"
            )
        return 1 if failed else 0
    finally:
        if not args.keep and args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
