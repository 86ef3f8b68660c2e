"""A small real suite for the generic-flow and sync tests: a pool of tiny model folders (the
family a test's spec names), edit rows with grids (one reading a split variant), and an
evaluation that scores any model, in memory or a folder, per member.

Metric of member m on a split: 100 · (1 − ‖θ − θ_m‖² / ‖θ0 − θ_m‖²) over that split's
parameters (``val``: even positions in name order, ``test``: odd ones); the base scores 0
on every metric, member m's own model 100 on its own.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import torch
import yaml
from pydantic import BaseModel, ConfigDict
from safetensors.torch import load_file
from tvsplit.tasks.split_settings import SplitSettings
from tvsplit.tasks.suites.base import Export, MethodSpec, ModelPool, Suite, grid
from tvsplit.tasks.suites.registry import register


class ToySettings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    scales: tuple[float, ...] = (0.25, 0.5, 1.0)


def _weights(folder: str | Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for path in sorted(Path(folder).glob("*.safetensors")):
        tensors |= load_file(str(path))
    return {name: t.float() for name, t in tensors.items() if t.is_floating_point()}


class Closeness:
    """Per member: how close a model is to that member's own weights (see module doc)."""

    def __init__(self, base: str, members: dict[str, str]):
        self.base = _weights(base)
        self.targets = {m: _weights(s) for m, s in members.items()}

    def evaluate(self, model, split, tasks=None):
        state = _weights(model) if isinstance(model, str | Path) else model
        names = sorted(set(state) & set(self.base))
        chosen = names[0::2] if split == "val" else names[1::2]
        metrics = {}
        for member in tasks or list(self.targets):
            target = self.targets[member]
            far = sum(float((state[n].float() - target[n]).square().sum()) for n in chosen)
            start = sum(float((self.base[n] - target[n]).square().sum()) for n in chosen)
            metrics[member] = 100.0 * (1.0 - far / start)
        return metrics


@register
class ToySuite(Suite):
    """Reads its pool from the spec file at ``SPEC`` (set by the test)."""

    name = "toy"
    title = "Toy suite"
    description = "Tiny GPT-2 family; closeness to each member."
    settings_model = ToySettings
    presets: ClassVar = {"small": {"scales": (0.5, 1.0)}, "full": {}}
    SPEC: ClassVar[Path | None] = None

    def build(self, progress):
        progress(f"toy: pool from {self.SPEC}")
        spec = yaml.safe_load(Path(self.SPEC).read_text())
        families = {
            name: {"base": entry["base"], "members": entry["members"]}
            for name, entry in spec["families"].items()
        }
        return ModelPool.from_spec({"families": families})

    def evaluation(self, pool):
        family = pool.families[0]
        return Closeness(family.base, family.members)

    def split_variants(self):
        return {"mean": SplitSettings(min_tasks=2)}

    def methods(self, pool):
        scales = grid(scale=self.settings.scales)
        shared = tuple({"shared_weight": 1.0, **p} for p in scales)
        return [
            MethodSpec("base", "base"),
            MethodSpec("individual", "individual"),
            MethodSpec("task_arithmetic", "task_arithmetic", scales),
            MethodSpec("shared_ta", "shared_augmented", shared, variant="mean"),
        ]

    def export(self):
        return Export("shared_ta")

    def report(self, result, context):
        lines = [f"- {key}: {value}" for key, value in context.items()]
        return "\n".join(["## Toy suite", "", result.markdown_table(), "", *lines])
