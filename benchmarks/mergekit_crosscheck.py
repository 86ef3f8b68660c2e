"""Cross-check tasks/edit.py against mergekit on a tiny GPT-2 (task arithmetic and TIES).

Usage: ``.venv/bin/python benchmarks/mergekit_crosscheck.py [--workdir DIR] [--keep]``
(``make crosscheck``; CI runs it after ``make test``).

1. Makes sure a separate venv with mergekit 0.1.5 exists (``.venv-mergekit`` in the
   repository, or ``$TVSPLIT_MERGEKIT_VENV``; reused when its ``.installed`` stamp is there,
   rebuilt otherwise): ``python3.11 -m venv`` + ONE ``pip install torch==2.13.0
   mergekit==0.1.5`` (so pip takes the CPU torch wheel). If that fails the script prints one
   ``FAIL:`` line and exits 2: nothing compared is never a pass.
2. Builds a tiny GPT-2 base and 3 fine-tuned models (random perturbations of different
   scales; member 1 sparse, so that trimming and sign election matter; member 2's
   perturbation on a coarse grid, so that many magnitudes tie at the trim threshold).
3. Runs ``mergekit-yaml`` for each configuration below, in that venv.
4. Runs the same edit with ``tasks.edit.apply_edit`` on the same tensors.
5. Prints, per method, the entries compared, the entries where the two definitions differ
   (below), the max element-wise difference elsewhere (absolute and relative to the
   tensor's largest |weight|) and how far the edit is from plain task arithmetic (so a
   broken comparison would show); exits 1 if a relative difference exceeds 1e-5 anywhere
   the definitions agree.

Mapping of conventions (checked in mergekit 0.1.5's ``generalized_task_arithmetic.py`` and
``sparsify.py``): mergekit ``weight`` = our member ``weight``, ``lambda`` = our ``scale``;
``ties`` uses ``consensus_method: sum`` (sign of Σ w_i τ̂_i, a zero total elects +), a
zero entry has sign 0 and never agrees, ``normalize`` divides by Σ w_i over agreeing
entries (0 → 1), no rescale, and trimming keeps k = max(1, int(density · n)) entries by
magnitude. The one difference is ties at the threshold: mergekit keeps exactly k entries,
the first k of ``torch.argsort(|τ|, descending=True)``, an unstable sort whose order among
equal magnitudes is arbitrary (neither index order nor reproducible from outside);
``trim_to_density`` keeps every entry tied with the k-th largest magnitude, so its result
does not depend on the order of entries. Only entries where some member's magnitude equals
its (non-zero) threshold while more than k entries reach it can differ; the script finds
them and excludes them from the tolerance. Float32 task vectors of real size have such
ties (member − base is rounded to the base's grid): on a 50257×768 tensor of 0.002-scale
deltas, 7–19 tied entries gave relative differences up to 2e-2, which is the TIES gap
seen on the GPT-2-small-shaped family of benchmarks/cli_bench.py.
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

from tvsplit.tasks.edit import EditInputs, apply_edit, magnitude_threshold

ROOT = Path(__file__).resolve().parents[1]
VENV = Path(os.environ.get("TVSPLIT_MERGEKIT_VENV", ROOT / ".venv-mergekit"))
MERGEKIT = VENV / "bin" / "mergekit-yaml"
STAMP = VENV / ".installed"
PINS = ("torch==2.13.0", "mergekit==0.1.5")
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


class MergekitUnavailable(RuntimeError):
    """mergekit's venv could not be built (one line saying why)."""


def ensure_mergekit() -> str:
    """Path of ``mergekit-yaml``: the venv is reused when its stamp is there, (re)built
    otherwise. Raises MergekitUnavailable, naming the step that failed."""
    if STAMP.exists() and MERGEKIT.exists():
        return str(MERGEKIT)
    python = shutil.which("python3.11") or shutil.which("python3")
    if python is None:
        raise MergekitUnavailable("neither python3.11 nor python3 found to create its venv")
    shutil.rmtree(VENV, ignore_errors=True)  # a half-built venv (no stamp) is rebuilt
    print(f"creating {VENV} (pip install {' '.join(PINS)}) ...", flush=True)
    steps = (
        [python, "-m", "venv", str(VENV)],
        [str(VENV / "bin" / "python"), "-m", "pip", "install", "-q",
         "--disable-pip-version-check", *PINS],
        [str(MERGEKIT), "--help"],
    )  # fmt: skip
    for step in steps:
        result = subprocess.run(step, capture_output=True, text=True)
        if result.returncode != 0:
            lines = [ln for ln in (result.stderr or result.stdout).splitlines() if ln.strip()]
            last = lines[-1] if lines else f"exit status {result.returncode}"
            raise MergekitUnavailable(f"`{' '.join(step[:3])} ...` failed: {last}")
    STAMP.touch()
    return str(MERGEKIT)


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
    with torch.no_grad():  # on a 2**-12 grid, so that base + a 2**-8-grid perturbation is exact
        for tensor in base.state_dict().values():
            tensor.copy_(torch.round(tensor * 4096) / 4096)
    base.save_pretrained(root / "base")
    members = []
    g = torch.Generator().manual_seed(1)
    for i, scale in enumerate((0.02, 0.05, 0.012)):
        model = GPT2LMHeadModel(config)
        state = base.state_dict()
        with torch.no_grad():
            for name, tensor in model.state_dict().items():
                noise = scale * torch.randn(tensor.shape, generator=g)
                if i == 1:  # a sparse member: its trimmed entries and zeros matter
                    noise *= torch.rand(tensor.shape, generator=g) < 0.3
                if i == 2:  # magnitudes on a grid: many tie at the trim threshold
                    noise = torch.round(noise * 256) / 256
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


def threshold_ties(vectors: list[torch.Tensor], density: float | None) -> torch.Tensor:
    """Entries where the two trims may differ: some member's |τ_i| equals its non-zero
    threshold while more than k entries reach it (mergekit keeps k of them, we keep all)."""
    tied = torch.zeros(vectors[0].shape, dtype=torch.bool)
    if density is None or density >= 1:
        return tied
    for vector in vectors:
        magnitudes = vector.abs()
        k = max(1, int(density * vector.numel()))
        threshold = magnitude_threshold(magnitudes, k)
        if threshold > 0 and int((magnitudes >= threshold).sum()) > k:
            tied |= magnitudes == threshold
    return tied


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
    try:
        mergekit = ensure_mergekit()
    except MergekitUnavailable as error:
        print(f"FAIL: mergekit 0.1.5 could not be installed into {VENV}: {error}")
        return 2
    work = args.workdir or Path(tempfile.mkdtemp(prefix="mergekit-crosscheck-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        base_dir, member_dirs = build_models(work)
        base = read_folder(base_dir)
        members = [read_folder(d) for d in member_dirs]
        vectors = {n: [m[n].float() - t.float() for m in members] for n, t in base.items()}
        header = f"{'method':<28} {'tensors':>7} {'entries':>7} {'tied':>5} {'≠ at ties':>9}"
        print(f"{header} {'max |diff|':>10} {'max rel diff':>12} {'edit vs TA':>10}  ok")
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
            entries = tied_count = differ_at_ties = 0
            worst_abs = worst_rel = distinct = 0.0
            for n in common:
                tied = threshold_ties(vectors[n], case[4])
                diff = (mine[n] - theirs[n]).abs()
                relative = diff / theirs[n].abs().max().clamp(min=1e-12)
                entries += diff.numel()
                tied_count += int(tied.sum())
                differ_at_ties += int((relative[tied] > TOLERANCE).sum())
                agree = ~tied
                if bool(agree.any()):
                    worst_abs = max(worst_abs, float(diff[agree].max()))
                    worst_rel = max(worst_rel, float(relative[agree].max()))
                # how far this edit is from plain task arithmetic: shows the check can fail
                distinct = max(distinct, float((theirs[n] - reference[n]).abs().max()))
            ok = bool(common) and worst_rel <= TOLERANCE and not missing
            failed |= not ok
            print(
                f"{name:<28} {len(common):>7} {entries:>7} {tied_count:>5} {differ_at_ties:>9} "
                f"{worst_abs:>10.2e} {worst_rel:>12.3e} {distinct:>10.2e}  {'yes' if ok else 'NO'}"
            )
        print(
            f"tied: entries where a member's |τ| equals its trim threshold with more than k "
            f"reaching it (mergekit keeps k in argsort order, tvsplit keeps all); the "
            f"tolerance {TOLERANCE:g} applies to every other entry"
        )
        if failed:
            print("FAIL: tvsplit and mergekit disagree (rows marked NO)")
        return 1 if failed else 0
    finally:
        if not args.keep and args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
