"""Scoring a denoiser by its samples: Fréchet distances, digit confidence, style strengths.

A model (a family state dict or a diffusers folder) is sampled with DDIM from fixed seeds
(``val`` and ``test`` use different seeds: the test batch is fresh noise), and its samples
are judged by the zoo's classifiers:

- ``fid/<reference>``: torchmetrics' ``FrechetInceptionDistance`` with the digit
  classifier's feature module, against real held-out digits of the split with that
  reference's styles applied (``plain``, each style, each mixable pair ``a-b``: MLflow
  allows no ``+`` in metric names);
- ``confidence``: the digit classifier's mean top-class probability (%);
- ``strength/<style>``: the style detector's mean probability that a sample shows the style
  (%).

Results of a folder are cached per split (the ``individual`` row and the choice rule read
the same single-style numbers).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from tvsplit.tasks.suites.style.data import apply_styles, digits, mixable_pairs
from tvsplit.tasks.suites.style.model import load_unet, sample


def reference_names(styles: Sequence[str]) -> tuple[str, ...]:
    """``plain``, each style and each mixable pair (``a-b``), in that order."""
    return ("plain", *styles, *(f"{a}-{b}" for a, b in mixable_pairs(styles)))


def _reference_styles(name: str) -> list[str]:
    return [] if name == "plain" else name.split("-")


class StyleEvaluation:
    """The style suite's evaluation tasks (``Evaluation`` protocol of ``tasks.suites.base``).

    ``samples``: split → number of samples per model; ``seeds``: split → sampling seed;
    ``references``: real images per reference distribution."""

    def __init__(
        self,
        zoo: Any,
        *,
        samples: Mapping[str, int],
        seeds: Mapping[str, int],
        references: int,
        steps: int,
    ):
        from torchmetrics.image.fid import FrechetInceptionDistance

        self.styles = zoo.styles
        self.base_dir = zoo.base_dir
        self.samples = dict(samples)
        self.seeds = dict(seeds)
        self.steps = steps
        self.digit_classifier = zoo.digit_classifier()
        self.detector = zoo.style_detector()
        self.references = reference_names(self.styles)
        self._unet = load_unet(self.base_dir)
        self._base_state = {k: v.clone() for k, v in self._unet.state_dict().items()}
        self._fids: dict[str, dict[str, Any]] = {}
        self._cache: dict[tuple[str, str], dict[str, float]] = {}
        size = self._unet.config.sample_size
        for split in ("val", "test"):
            real, _ = digits(split, size, references)
            self._fids[split] = {}
            for name in self.references:
                fid = FrechetInceptionDistance(
                    feature=self.digit_classifier.features, normalize=True,
                    reset_real_features=False, input_img_size=(1, size, size),
                )  # fmt: skip
                fid.update(apply_styles(real, _reference_styles(name)), real=True)
                self._fids[split][name] = fid

    # -- models → samples
    def model(self, model: Any):
        """The UNet of ``model``: a folder (diffusers' ``from_pretrained``) or a state dict
        of family parameters over the base."""
        if isinstance(model, str | Path):
            return load_unet(model)
        self._unet.load_state_dict({**self._base_state, **model})
        return self._unet

    def samples_of(self, model: Any, split: str, count: int | None = None, seed: int | None = None):
        return sample(
            self.model(model), count or self.samples[split], self.steps,
            self.seeds[split] if seed is None else seed,
        )  # fmt: skip

    # -- samples → metrics
    @torch.no_grad()
    def score_images(self, images: torch.Tensor, split: str) -> dict[str, float]:
        metrics: dict[str, float] = {}
        for name, fid in self._fids[split].items():
            fid.reset()  # keeps the real features
            fid.update(images, real=False)
            metrics[f"fid/{name}"] = float(fid.compute())
        probabilities = self.digit_classifier(images).softmax(dim=1)
        metrics["confidence"] = 100.0 * float(probabilities.max(dim=1).values.mean())
        strengths = torch.sigmoid(self.detector(images)).mean(dim=0)
        for style, value in zip(self.styles, strengths.tolist(), strict=True):
            metrics[f"strength/{style}"] = 100.0 * value
        return metrics

    def evaluate(self, model: Any, split: str, tasks: Sequence[str] | None = None):
        key = (str(Path(model).absolute()), split) if isinstance(model, str | Path) else None
        if key is not None and key in self._cache:
            metrics = self._cache[key]
        else:
            metrics = self.score_images(self.samples_of(model, split), split)
            if key is not None:
                self._cache[key] = metrics
        return dict(metrics) if tasks is None else {t: metrics[t] for t in tasks}
