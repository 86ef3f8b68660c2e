"""The style suite as a registered suite: does mixing only the unique parts of two style
task vectors combine the styles without degrading generation?

- pool of models: the style zoo (``zoo``: a diffusers UNet trained on plain digits, one
  full fine-tune per style and seed, saved with ``save_pretrained``); one catalogue family
  per fine-tuning seed, the styles as members;
- methods, per mixable pair A+B (``data.mixable_pairs``): ``full[A+B]`` θ0 + α(τ_A + τ_B)
  (``task_arithmetic``), ``unique[A+B]`` θ0 + α(u_A + u_B) + β·mean(s_A, s_B)
  (``unique_mix`` on the stored split), ``ties[A+B]`` and ``tsv_m[A+B]``; plus ``base`` and
  ``individual`` (each style's own model);
- evaluation (``evaluate``): samples of each model judged by classifiers trained here;
  coefficients chosen on validation samples (``choose``: the lowest Fréchet distance to the
  pair's real distribution among candidates where both styles show at least half their
  single-style strength), reported on test samples drawn from other seeds.

``style-lora`` (``StyleLoraSuite``) is the same suite on the same styles made as PEFT LoRA
adapters (``get_peft_model`` with a ``LoraConfig`` on the attention projections, saved with
PEFT's ``save_pretrained``), ingested through the LoRA source: the family style-LoRA users
mix. It reuses the full suite's base and judges (same zoo folder) and writes its own section.

Presets: ``small`` (CI: two styles, a tiny zoo; asserts the path, not the paper's numbers),
``reduced`` (the run this machine affords, see RESULTS.md), ``full`` (3 seeds, 4 styles,
the issue's ~45-minute budget on 2 free cores).

Declarations import pydantic only.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field
from tvsplit.tasks.split_settings import SplitSettings
from tvsplit.tasks.suites.base import (
    Export,
    MethodSpec,
    ModelPool,
    Progress,
    Suite,
    SuiteResult,
    Trial,
    grid,
)

VARIANT = "split"


class StyleSettings(BaseModel):
    """The zoo, the sampling budget, the coefficient grids and the choice rule."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    zoo: dict[str, Any] = Field(
        default_factory=dict, description="StyleZooConfig fields (styles, seeds, training)."
    )
    val_samples: int = Field(512, ge=2)
    test_samples: int = Field(1024, ge=2)
    reference_images: int = Field(2000, ge=2)
    ddim_steps: int = Field(10, ge=1)
    val_seed: int = 1001
    test_seed: int = 2002
    max_pairs: int | None = Field(None, ge=1, description="Only the first N mixable pairs.")
    scales: tuple[float, ...] = (0.6, 0.8, 1.0, 1.2)
    shared_weights: tuple[float, ...] = (0.0, 1.0)
    ties_scales: tuple[float, ...] = (0.8, 1.0, 1.3)
    ties_density: float = Field(0.3, gt=0, le=1)
    tsv_scales: tuple[float, ...] = (0.8, 1.0, 1.3)
    min_strength_fraction: float = Field(0.5, ge=0, le=1)
    noise_batches: int = Field(
        3, ge=0, description="Test batches of other seeds for the base's FID spread."
    )
    split: SplitSettings = SplitSettings(min_tasks=2)


SMALL: dict[str, Any] = {
    "zoo": {
        "styles": ("thick", "inverted"),
        "seeds": (0,),
        "denoiser": {"sample_size": 8, "channels": (8, 16), "norm_groups": 4},
        "train_images": 2000,
        "pretrain": {"steps": 20, "batch_size": 32},
        "finetune": {"steps": 6, "batch_size": 32, "lr": 1e-3},
        "classifier_steps": 40,
    },
    "val_samples": 32,
    "test_samples": 32,
    "reference_images": 64,
    "ddim_steps": 2,
    "scales": (0.5, 1.0),
    "shared_weights": (1.0,),
    "ties_scales": (1.0,),
    "tsv_scales": (1.0,),
    "noise_batches": 1,
}
REDUCED: dict[str, Any] = {
    "zoo": {
        "seeds": (0, 1, 2),
        "denoiser": {"sample_size": 16, "channels": (8, 16), "norm_groups": 4},
        "train_images": 20_000,
        "pretrain": {"steps": 400, "batch_size": 64},
        "finetune": {"steps": 60, "batch_size": 64, "lr": 1e-3},
        "classifier_steps": 300,
    },
    "val_samples": 128,
    "test_samples": 256,
    "reference_images": 512,
    "ddim_steps": 6,
    "max_pairs": 3,
    "scales": (0.7, 1.0),
    "shared_weights": (0.0, 1.0),
    "ties_scales": (1.0, 1.3),
    "tsv_scales": (0.8, 1.1),
    "noise_batches": 3,
}


class StyleSuite(Suite):
    """≥ 4 real image styles of a diffusion model: full against unique mixing."""

    name = "style"
    title = "Style suite"
    description = "Diffusers UNet on digits, styles as fine-tunes: full vs unique mixing."
    settings_model = StyleSettings
    presets: ClassVar[Mapping[str, Mapping[str, Any]]] = {
        "small": SMALL,
        "reduced": REDUCED,
        "full": {},
    }
    figures_beside_results = True

    settings: StyleSettings

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._single: dict[str, dict[str, float]] = {}
        self._current: str | None = None
        self._tensors: dict[str, Any] = {}
        self._evaluation: Any = None
        self._pool: ModelPool | None = None
        self._noise: dict[str, list[float]] = {}

    # -- the pool of models -------------------------------------------------------------
    def zoo_config(self):
        from tvsplit.tasks.suites.style.zoo import StyleZooConfig

        return StyleZooConfig.model_validate(self.settings.zoo)

    def build(self, progress: Progress) -> ModelPool:
        from tvsplit.tasks.suites.style.zoo import build_zoo, default_zoo_dir

        config = self.zoo_config()
        zoo = build_zoo(default_zoo_dir(self.data_root, config), config, progress=progress)
        labels = {zoo.family_name(seed): f"seed-{seed}" for seed in config.seeds}
        spec = config.denoiser
        if zoo.lora:
            lora = config.lora
            members = (
                f"PEFT LoRA r={lora.rank}, alpha={lora.alpha:g} on {', '.join(lora.targets)}, "
                f"{lora.train.steps} steps"
            )
        else:
            members = f"full fine-tunes {config.finetune.steps} steps"
        notes = {
            "zoo": (
                f"UNet2DModel {spec.channels} on {spec.sample_size}×{spec.sample_size} digits, "
                f"styles {list(zoo.styles)}, seeds {list(config.seeds)}; base "
                f"{config.pretrain.steps} steps, {members}"
            ),
            "zoo_fingerprint": zoo.manifest["fingerprint"],
        }
        self._pool = ModelPool.from_spec(zoo.catalogue_spec(), labels, handle=zoo, notes=notes)
        return self._pool

    def pairs(self, pool: ModelPool) -> tuple[tuple[str, str], ...]:
        from tvsplit.tasks.suites.style.data import mixable_pairs

        pairs = mixable_pairs(pool.handle.styles)
        return pairs[: self.settings.max_pairs] if self.settings.max_pairs else pairs

    # -- the pool of evaluation tasks ---------------------------------------------------
    def evaluation(self, pool: ModelPool):
        from tvsplit.tasks.suites.style.evaluate import StyleEvaluation

        s = self.settings
        self._evaluation = StyleEvaluation(
            pool.handle, samples={"val": s.val_samples, "test": s.test_samples},
            seeds={"val": s.val_seed, "test": s.test_seed}, references=s.reference_images,
            steps=s.ddim_steps,
        )  # fmt: skip
        return self._evaluation

    def member_metrics(self, pool, family, member) -> list[str]:
        return [f"strength/{member}", f"fid/{member}"]

    # -- methods ------------------------------------------------------------------------
    def split_variants(self) -> dict[str, SplitSettings]:
        return {VARIANT: self.settings.split}

    def methods(self, pool: ModelPool) -> list[MethodSpec]:
        s = self.settings
        ties = tuple({"density": s.ties_density, **p} for p in grid(scale=s.ties_scales))
        rows = [MethodSpec("base", "base"), MethodSpec("individual", "individual")]
        for a, b in self.pairs(pool):
            pair = f"{a}+{b}"
            rows += [
                MethodSpec(f"full[{pair}]", "task_arithmetic", grid(scale=s.scales), (a, b)),
                MethodSpec(
                    f"unique[{pair}]",
                    "unique_mix",
                    grid(scale=s.scales, shared_weight=s.shared_weights),
                    (a, b),
                    variant=VARIANT,
                ),
                MethodSpec(f"ties[{pair}]", "ties", ties, (a, b)),
                MethodSpec(f"tsv_m[{pair}]", "tsv_m", grid(scale=s.tsv_scales), (a, b)),
            ]
        return rows

    def begin_family(self, family, tensors, evaluation) -> None:
        """Each style's own model's validation strength (the choice rule's yardstick)."""
        from tvsplit.tasks.suites.edited import member_model

        self._current = family.label
        self._tensors[family.label] = tensors
        self._single[family.label] = {
            m: evaluation.evaluate(member_model(tensors, source, m), "val")[f"strength/{m}"]
            for m, source in family.members.items()
        }
        if self._noise or not self.settings.noise_batches:
            return
        seeds = range(
            self.settings.test_seed + 1, self.settings.test_seed + 1 + self.settings.noise_batches
        )
        self._noise[family.label] = [
            evaluation.score_images(evaluation.samples_of(tensors.base, "test", seed=k), "test")[
                "fid/plain"
            ]
            for k in seeds
        ]

    def score(self, metrics: Mapping[str, float]) -> float:
        """The digit classifier's confidence (%): a plain quality number for the generic
        table; the suite's own tables read the pair's Fréchet distance."""
        return float(metrics.get("confidence", float("nan")))

    def present(self, metrics: Mapping[str, float], members: Sequence[str], family: str) -> bool:
        """Whether every style of ``members`` shows at least ``min_strength_fraction`` of
        its single-style validation strength on ``family``."""
        single = self._single[family]
        fraction = self.settings.min_strength_fraction
        return all(metrics[f"strength/{m}"] >= fraction * single[m] for m in members)

    def choose(self, method: MethodSpec, trials: Sequence[Trial], base_val) -> int:
        """Pair rows: the lowest Fréchet distance to the pair's real distribution among the
        candidates where both styles are present (``present``); when none is, the one whose
        weaker style is strongest relative to its single-style model."""
        if method.members is None or len(method.members) != 2 or self._current is None:
            return super().choose(method, trials, base_val)
        pair = "-".join(method.members)
        present = [
            i for i, t in enumerate(trials) if self.present(t.val, method.members, self._current)
        ]
        if present:
            return min(present, key=lambda i: (trials[i].val[f"fid/{pair}"], i))
        single = self._single[self._current]

        def weakest(i: int) -> float:
            return min(
                trials[i].val[f"strength/{m}"] / max(single[m], 1e-9) for m in method.members
            )

        return max(range(len(trials)), key=lambda i: (weakest(i), -i))

    def diagnostics(self, family, variant, tensors, run) -> dict[str, Any]:
        """The single-style validation strengths the choice used on this family, and the
        base's test FID to plain digits over other sampling seeds (the metric's noise)."""
        found: dict[str, Any] = {"single_style_val_strength": dict(self._single[family.label])}
        if family.label in self._noise:
            found["base_fid_over_seeds"] = self._noise[family.label]
        return found

    # -- output -------------------------------------------------------------------------
    def export(self) -> Export:
        return Export(f"unique[{'+'.join(self.pairs(self._pool)[0])}]", family=0)

    def report(self, result: SuiteResult, context: Mapping[str, Any]) -> str:
        from tvsplit.tasks.suites.style.report import results_markdown

        return results_markdown(self, result, context)

    def artifacts(self, result: SuiteResult, folder: Path) -> list[Path]:
        from tvsplit.tasks.suites.style.report import sample_grid, samples_file

        return [sample_grid(self, result, Path(folder) / samples_file(self))]

    def row_metrics(self, result: SuiteResult, row: str) -> dict[str, float]:
        from tvsplit.tasks.suites.style.report import row_metrics

        return row_metrics(result, row)

    def summary(self, result: SuiteResult) -> str:
        from tvsplit.tasks.suites.style.report import mixing_table

        return mixing_table(self, result)


def _as_lora(preset: Mapping[str, Any], lora: Mapping[str, Any]) -> dict[str, Any]:
    return {**preset, "zoo": {**preset.get("zoo", {}), "members": "lora", "lora": dict(lora)}}


class StyleLoraSuite(StyleSuite):
    """The same styles as PEFT LoRA adapters on the UNet's attention projections (what
    style-LoRA users mix): the family goes through the LoRA source, its task vectors are
    the adapters' ΔW. Shares the base and the judges with the full suite's zoo."""

    name = "style-lora"
    title = "Style suite, LoRA adapters"
    description = "The style suite's styles as PEFT LoRA adapters: full vs unique mixing."
    presets: ClassVar[Mapping[str, Mapping[str, Any]]] = {
        "small": _as_lora(SMALL, {"rank": 2, "alpha": 2.0, "train": SMALL["zoo"]["finetune"]}),
        "reduced": _as_lora(REDUCED, {"train": {"steps": 60, "batch_size": 64, "lr": 5e-3}}),
        "full": _as_lora({}, {}),
    }
