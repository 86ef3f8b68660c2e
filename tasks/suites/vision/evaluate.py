"""Accuracy of a backbone with every task's own frozen head.

A backbone may be given as a ``ConvNextModel``, a model folder, or a state dict (base, fine-tuned
or merged). Metrics (all in percent):

- per-task accuracy on a split;
- average absolute accuracy: the unweighted mean over tasks;
- normalized accuracy: merged / individual per task (the individual model is the one
  fine-tuned on that task), averaged over tasks, in percent.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from transformers import ConvNextConfig, ConvNextModel
from tvsplit.tasks.suites.vision.data import TaskData
from tvsplit.tasks.suites.vision.model import features, load_backbone

BackboneLike = ConvNextModel | str | Path | Mapping[str, torch.Tensor]


def accuracy(
    backbone: ConvNextModel, head: torch.nn.Linear, images: torch.Tensor, labels: torch.Tensor
) -> float:
    """Top-1 accuracy in percent of ``head(backbone(images))``."""
    with torch.inference_mode():
        predictions = head(features(backbone, images)).argmax(1)
    return 100.0 * float((predictions == labels).double().mean())


class Evaluator:
    """Evaluates backbones on a fixed set of tasks and heads, reusing one model instance.

    ``evaluate(backbone, split)`` returns ``{task: accuracy}`` in the order of ``tasks``.
    """

    def __init__(
        self,
        tasks: Mapping[str, TaskData],
        heads: Mapping[str, torch.nn.Linear],
        config: ConvNextConfig,
    ) -> None:
        missing = [name for name in tasks if name not in heads]
        if missing:
            raise KeyError(f"no head for task(s) {', '.join(missing)}")
        self.tasks = dict(tasks)
        self.heads = {name: heads[name] for name in tasks}
        self.config = config
        self._model = ConvNextModel(config).eval()

    def _backbone(self, backbone: BackboneLike) -> ConvNextModel:
        if isinstance(backbone, ConvNextModel):
            return backbone
        if isinstance(backbone, str | Path):
            return load_backbone(backbone)
        self._model.load_state_dict(dict(backbone), strict=True)
        return self._model

    def evaluate(
        self, backbone: BackboneLike, split: str = "test", tasks: list[str] | None = None
    ) -> dict[str, float]:
        """Accuracy (%) per task on ``split`` (``train``, ``val`` or ``test``)."""
        model = self._backbone(backbone)
        names = list(self.tasks) if tasks is None else tasks
        result = {}
        for name in names:
            data = self.tasks[name].split(split)
            result[name] = accuracy(model, self.heads[name], data.images, data.labels)
        return result


def average(accuracies: Mapping[str, float]) -> float:
    """Unweighted mean accuracy over tasks."""
    return sum(accuracies.values()) / len(accuracies)


def normalized(
    accuracies: Mapping[str, float], individual: Mapping[str, float]
) -> dict[str, float]:
    """Per-task normalized accuracy in percent: 100 · merged / individual."""
    return {name: 100.0 * accuracies[name] / individual[name] for name in accuracies}
