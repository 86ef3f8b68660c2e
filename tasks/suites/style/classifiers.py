"""The judges, trained here on real digits: a digit classifier (its penultimate layer is the
feature space of the Fréchet distance, its top-class probability the confidence) and a
style detector (one sigmoid output per style: the probability that an image shows it).

Both see real training digits under random subsets of the styles
(``data.random_style_subsets``), so a mixed image is in their domain: the digit classifier
must name the digit whatever the styles, and each detector output is trained on images with
its style against images without it, other styles applied at random on both sides.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn
from tvsplit.tasks.suites.style.data import random_style_subsets

FEATURES = 64


class ConvNet(nn.Module):
    """Two conv blocks, a ``FEATURES``-wide layer (``features``) and a linear head."""

    def __init__(self, outputs: int):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(4),
            nn.Flatten(), nn.Linear(32 * 16, FEATURES), nn.ReLU(),
        )  # fmt: skip
        self.features.num_features = FEATURES  # read by torchmetrics' FID
        self.head = nn.Linear(FEATURES, outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def train_classifier(
    images: torch.Tensor,
    labels: torch.Tensor,
    styles: Sequence[str],
    *,
    multilabel: bool,
    steps: int,
    seed: int,
    batch_size: int = 128,
) -> ConvNet:
    """A ``ConvNet`` trained on ``images`` under random style subsets: for digits
    (``multilabel`` False) the targets are ``labels``, for the style detector the applied
    styles."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = ConvNet(len(styles) if multilabel else 10)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    model.train()
    for _ in range(steps):
        rows = torch.randint(0, len(images), (batch_size,), generator=generator)
        batch, applied = random_style_subsets(images[rows], styles, generator)
        logits = model(batch)
        if multilabel:
            loss = nn.functional.binary_cross_entropy_with_logits(logits, applied)
        else:
            loss = nn.functional.cross_entropy(logits, labels[rows])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return model.eval()


def save_classifier(model: ConvNet, path: Path) -> None:
    from safetensors.torch import save_file

    temporary = path.with_name(f".{path.name}.tmp")
    save_file(model.state_dict(), str(temporary))
    temporary.replace(path)


def load_classifier(path: Path, outputs: int) -> ConvNet:
    from safetensors.torch import load_file

    model = ConvNet(outputs)
    model.load_state_dict(load_file(str(path)))
    return model.eval()
