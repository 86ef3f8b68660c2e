"""Training loops of the vision zoo: rotation-prediction pretraining, linear probes, and
fine-tuning a backbone under a frozen head. Deterministic for a seed (no dropout, seeded
batch sampling, CPU)."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from transformers import ConvNextModel
from tvsplit.tasks.suites.vision.data import to_pixels
from tvsplit.tasks.suites.vision.model import feature_size, features


class TrainSpec(BaseModel):
    """Optimiser settings of one training stage (AdamW, linear warm-up, cosine decay)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    steps: int = Field(..., ge=1)
    batch_size: int = Field(64, ge=1)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    warmup_fraction: float = Field(0.1, ge=0, lt=1)


def _optimiser(
    params: list[torch.nn.Parameter], spec: TrainSpec
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    optimiser = torch.optim.AdamW(params, lr=spec.lr, weight_decay=spec.weight_decay)
    warmup = max(1, int(spec.warmup_fraction * spec.steps))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, spec.steps - warmup)
        return 0.5 * (1 + math.cos(math.pi * progress))

    return optimiser, torch.optim.lr_scheduler.LambdaLR(optimiser, factor)


def rotate_batch(images: torch.Tensor, quarter_turns: torch.Tensor) -> torch.Tensor:
    """Rotate each image (N, 1, H, W) by its number of quarter turns (0–3) counter-clockwise."""
    out = images.clone()
    for k in range(1, 4):
        chosen = quarter_turns == k
        if chosen.any():
            out[chosen] = torch.rot90(images[chosen], k, dims=(2, 3))
    return out


def pretrain_rotation(
    backbone: ConvNextModel, images: torch.Tensor, spec: TrainSpec, seed: int
) -> list[float]:
    """Self-supervised pretraining in place: predict which of 4 quarter turns was applied
    to an unlabeled image. The 4-way rotation head is discarded. Returns the loss per step."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    head = torch.nn.Linear(feature_size(backbone.config), 4)

    def step_loss() -> torch.Tensor:
        index = torch.randint(0, images.shape[0], (spec.batch_size,), generator=generator)
        turns = torch.randint(0, 4, (spec.batch_size,), generator=generator)
        batch = to_pixels(rotate_batch(images[index], turns))
        return F.cross_entropy(head(backbone(pixel_values=batch).pooler_output), turns)

    return _train(backbone, [*backbone.parameters(), *head.parameters()], spec, step_loss)


def fit_probe(
    backbone: ConvNextModel,
    images: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    *,
    l2: float = 1e-4,
    iterations: int = 200,
    seed: int = 0,
) -> torch.nn.Linear:
    """A linear probe on the frozen backbone's pooled features: multinomial logistic
    regression with an L2 penalty ``l2`` on the weights, fitted by full-batch L-BFGS.
    Returned frozen."""
    x = features(backbone, images)
    torch.manual_seed(seed)
    head = torch.nn.Linear(x.shape[1], num_classes)
    torch.nn.init.zeros_(head.weight)
    torch.nn.init.zeros_(head.bias)
    optimiser = torch.optim.LBFGS(
        head.parameters(), lr=1.0, max_iter=iterations, line_search_fn="strong_wolfe"
    )

    def closure() -> torch.Tensor:
        optimiser.zero_grad()
        loss = F.cross_entropy(head(x), labels) + l2 * head.weight.square().sum()
        loss.backward()
        return loss

    optimiser.step(closure)
    head.requires_grad_(False)
    return head


def finetune(
    backbone: ConvNextModel,
    head: torch.nn.Linear,
    images: torch.Tensor,
    labels: torch.Tensor,
    spec: TrainSpec,
    seed: int,
) -> list[float]:
    """Fine-tune every backbone parameter in place on a labelled task, with ``head`` frozen
    (its weights are not changed). Returns the loss per step."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    head.requires_grad_(False)

    def step_loss() -> torch.Tensor:
        index = torch.randint(0, images.shape[0], (spec.batch_size,), generator=generator)
        logits = head(backbone(pixel_values=to_pixels(images[index])).pooler_output)
        return F.cross_entropy(logits, labels[index])

    return _train(backbone, list(backbone.parameters()), spec, step_loss)


def _train(
    backbone: ConvNextModel,
    parameters: list[torch.nn.Parameter],
    spec: TrainSpec,
    step_loss: Callable[[], torch.Tensor],
) -> list[float]:
    """``spec.steps`` optimiser steps on ``step_loss()`` (which draws its own batch), the
    backbone in train mode meanwhile; returns the loss per step."""
    optimiser, scheduler = _optimiser(parameters, spec)
    backbone.train()
    losses = []
    for _ in range(spec.steps):
        loss = step_loss()
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        scheduler.step()
        losses.append(float(loss.detach()))
    backbone.eval()
    return losses
