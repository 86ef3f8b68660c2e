"""The vision suite as a registered suite: does merging with shared parts beat the baselines
on real images?

- pool of models: the zoo (``zoo``: one pretrained ConvNeXt base, a frozen head per task, a
  backbone fine-tuned per task and seed), built here or reused; one catalogue family per
  fine-tuning seed (backbones only; the heads live beside the zoo);
- methods: ``base``, ``individual``, ``weight_average`` (θ0 + mean τ_i), ``task_arithmetic``,
  ``ties``, the shared-augmented merges ``shared_ta[<variant>]`` / ``shared_ties[<variant>]``
  (shared parts as T extra task vectors, weight γ) for the one-sided and two-sided splits,
  and the subspace baselines ``tsv_m``, ``iso_c``, ``iso_cts``; every edit row is a
  registered ``tasks.edit`` method;
- evaluation: accuracy (%) per task with each task's own head on the validation and test
  splits; a row's score is the mean over tasks.

Presets: ``small`` (CI: small zoo, one seed, coarse grids), ``full`` (the demo, 3 seeds),
``tiny`` (three tasks, a few training steps, every row on a short grid: the default test run
and the real-server test).
The chosen one-sided shared-augmented merge of the first seed is written as a model folder.

Declarations import pydantic only (the zoo, torch and the evaluator load in the methods).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field
from tvsplit.tasks.split_settings import SplitSettings
from tvsplit.tasks.suites.base import (
    Export,
    MethodSpec,
    ModelPool,
    Progress,
    Suite,
    SuiteResult,
    grid,
)

VARIANTS = ("one-sided", "two-sided")
EXPORTED_ROW = "shared_ta[one-sided]"


class VisionSettings(BaseModel):
    """Which zoo, the coefficient grids and the split variants the suite runs."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    zoo: Literal["tiny", "small", "full"] = Field(
        "full", description="Zoo preset (ZooConfig: full, small, or tiny for server tests)."
    )
    seeds: tuple[int, ...] | None = Field(
        None, min_length=1, description="Fine-tuning seeds (default: the zoo preset's)."
    )
    scales: tuple[float, ...] = Field(
        (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0), description="λ for task arithmetic."
    )
    ties_scales: tuple[float, ...] = (0.4, 0.6, 0.8, 1.0, 1.2, 1.5, 2.0)
    ties_density: float = Field(0.2, gt=0, le=1)
    shared_weights: tuple[float, ...] = Field(
        (0.5, 1.0), description="γ, the weight of each member's shared part (extra vector)."
    )
    subspace_scales: tuple[float, ...] = (0.2, 0.4, 0.6, 0.8, 1.0, 1.2, 1.5, 2.0)
    split: SplitSettings = Field(
        SplitSettings(min_tasks=2),
        description="Decomposition settings; `two_sided` is set per variant.",
    )
    variants: tuple[Literal["one-sided", "two-sided"], ...] = VARIANTS
    subspace_methods: tuple[str, ...] = ("tsv_m", "iso_c", "iso_cts")

    def split_settings(self, variant: str) -> SplitSettings:
        if variant not in VARIANTS:
            raise ValueError(f"split variant must be 'one-sided' or 'two-sided', not {variant!r}")
        return self.split.model_copy(update={"two_sided": variant == "two-sided"})


SMALL: dict[str, Any] = {
    "zoo": "small",
    "scales": (0.2, 0.4, 0.7, 1.0),
    "ties_scales": (0.6, 1.0, 1.5),
    "shared_weights": (1.0,),
    "subspace_scales": (0.5, 1.0, 1.5),
}
# Every row of the table, a short grid each: `make test`'s run and the real-server test.
TINY: dict[str, Any] = {
    "zoo": "tiny",
    "scales": (0.2, 0.5),
    "ties_scales": (0.6, 1.0),
    "shared_weights": (1.0,),
    "subspace_scales": (0.5, 1.0),
}


class VisionSuite(Suite):
    """≥ 6 real image classification tasks, a zoo built here, every merge method."""

    name = "vision"
    title = "Vision suite"
    description = "ConvNeXt zoo on ≥ 6 image tasks: shared-part merges against the baselines."
    settings_model = VisionSettings
    presets: ClassVar[Mapping[str, Mapping[str, Any]]] = {
        "tiny": TINY,  # three tasks, seconds of training: `make test` and the server test
        "small": SMALL,
        "full": {},
    }

    settings: VisionSettings

    # -- the pool of models -------------------------------------------------------------
    def zoo_config(self):
        from tvsplit.tasks.suites.vision.zoo import ZooConfig

        changes = {} if self.settings.seeds is None else {"seeds": self.settings.seeds}
        if self.settings.zoo == "tiny":
            from tvsplit.tasks.suites.vision.data import SplitSizes
            from tvsplit.tasks.suites.vision.training import TrainSpec

            tiny = {
                "name": "tiny",
                "tasks": ("mnist", "mnist_parity", "digits"),
                "sizes": SplitSizes(train=300, val=64, test=128),
                # 60/60 steps: each fine-tune beats the base on its task by 6-13 points
                # (at 30/40 the parity fine-tune scored below the base).
                "pretrain": TrainSpec(steps=60, batch_size=64, lr=2e-3, weight_decay=0.05),
                "finetune": TrainSpec(steps=60, batch_size=32, lr=1e-3),
                "probe_iterations": 50,
            }
            return ZooConfig.small(**{**tiny, **changes})
        if self.settings.zoo == "small":
            return ZooConfig.small(**changes)
        return ZooConfig.full(**changes)

    def build(self, progress: Progress) -> ModelPool:
        from tvsplit.tasks.suites.vision.zoo import build_zoo, default_zoo_dir

        config = self.zoo_config()
        zoo = build_zoo(default_zoo_dir(self.data_root, config), config, progress=progress)
        labels = {zoo.family_name(seed): f"seed-{seed}" for seed in zoo.seeds}
        notes = {
            "zoo": f"{config.name} preset, {len(zoo.tasks)} tasks, seeds {list(zoo.seeds)}",
            "zoo_fingerprint": zoo.manifest["fingerprint"],
        }
        return ModelPool.from_spec(zoo.catalogue_spec(), labels=labels, handle=zoo, notes=notes)

    # -- the pool of evaluation tasks ---------------------------------------------------
    def evaluation(self, pool: ModelPool):
        from tvsplit.tasks.suites.vision.evaluate import Evaluator
        from tvsplit.tasks.suites.vision.model import load_backbone

        zoo = pool.handle
        return Evaluator(zoo.load_tasks(), zoo.heads(), load_backbone(zoo.base_dir).config)

    # -- methods ------------------------------------------------------------------------
    def split_variants(self) -> dict[str, SplitSettings]:
        return {v: self.settings.split_settings(v) for v in self.settings.variants}

    def methods(self, pool: ModelPool) -> list[MethodSpec]:
        s = self.settings
        members = len(pool.families[0].members)
        ties = {"density": s.ties_density}
        shared_ta = tuple(
            {"merge": "task_arithmetic", "shared_as": "each", **p}
            for p in grid(scale=s.scales, shared_weight=s.shared_weights)
        )
        shared_ties = tuple(
            {"merge": "ties", "shared_as": "each", **ties, **p}
            for p in grid(scale=s.ties_scales, shared_weight=s.shared_weights)
        )
        rows = [
            MethodSpec("base", "base"),
            MethodSpec("individual", "individual"),
            MethodSpec("weight_average", "task_arithmetic", ({"scale": 1.0 / members},)),
            MethodSpec("task_arithmetic", "task_arithmetic", grid(scale=s.scales)),
            MethodSpec("ties", "ties", tuple({**ties, **p} for p in grid(scale=s.ties_scales))),
        ]
        for variant in s.variants:
            rows += [
                MethodSpec(f"shared_ta[{variant}]", "shared_augmented", shared_ta, variant=variant),
                MethodSpec(
                    f"shared_ties[{variant}]", "shared_augmented", shared_ties, variant=variant
                ),
            ]
        rows += [MethodSpec(m, m, grid(scale=s.subspace_scales)) for m in s.subspace_methods]
        return rows

    def diagnostics(self, family, variant, tensors, run) -> dict[str, Any]:
        """How the members' shared parts agree (``merging.shared_alignment``)."""
        import torch
        from tvsplit.tasks.suites.vision.merging import Family, shared_alignment

        members = tensors.members
        vectors = {p: tuple(tensors.vectors[m][p] for m in members) for p in tensors.parameters}
        shared = {p: torch.stack(parts) for p, parts in tensors.shared(run).items()}
        return shared_alignment(Family(members, tensors.base, vectors), shared)

    # -- output -------------------------------------------------------------------------
    def export(self) -> Export:
        return Export(EXPORTED_ROW, family=0)

    def report(self, result: SuiteResult, context: Mapping[str, Any]) -> str:
        from tvsplit.tasks.suites.vision.report import results_markdown

        return results_markdown(result, context)

    def artifacts(self, result: SuiteResult, folder: Path) -> list[Path]:
        from tvsplit.tasks.suites.vision.report import bar_chart

        return [bar_chart(result, Path(folder) / "vision_results.png")]

    def row_metrics(self, result: SuiteResult, row: str) -> dict[str, float]:
        from tvsplit.tasks.suites.vision.report import row_metrics

        return row_metrics(result, row)

    def summary(self, result: SuiteResult) -> str:
        from tvsplit.tasks.suites.vision.report import markdown_table, verdict

        judged = verdict(result)
        lines = [markdown_table(result), f"the +5-point claim: {judged.outcome}"]
        return "\n".join([*lines, *(f"  {line}" for line in judged.lines)])
