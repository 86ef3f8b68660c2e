"""The denoiser: a small diffusers ``UNet2DModel``, trained with ``DDPMScheduler`` noise
prediction and sampled with ``DDIMScheduler`` in a few deterministic steps.

Pixels are in [0, 1] outside this module and in [−1, 1] inside the model. Sampling is
deterministic for a seed (η = 0; the starting noise comes from a generator of that seed),
so two models sampled with the same seeds are compared on the same starting noise.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field

TRAIN_TIMESTEPS = 1000
BETA_SCHEDULE = "squaredcos_cap_v2"


class DenoiserSpec(BaseModel):
    """The UNet's shape (a diffusers ``UNet2DModel`` config)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    sample_size: int = Field(16, ge=8, le=28)
    channels: tuple[int, int] = (16, 32)
    layers_per_block: int = Field(1, ge=1)
    norm_groups: int = Field(8, ge=1)
    attention: bool = Field(True, description="Attention in the inner down/up block.")

    def unet_config(self) -> dict[str, Any]:
        inner_down = "AttnDownBlock2D" if self.attention else "DownBlock2D"
        inner_up = "AttnUpBlock2D" if self.attention else "UpBlock2D"
        return {
            "sample_size": self.sample_size,
            "in_channels": 1,
            "out_channels": 1,
            "layers_per_block": self.layers_per_block,
            "block_out_channels": self.channels,
            "down_block_types": ("DownBlock2D", inner_down),
            "up_block_types": (inner_up, "UpBlock2D"),
            "norm_num_groups": self.norm_groups,
            "attention_head_dim": 8,
        }


class TrainSpec(BaseModel):
    """One training run: AdamW steps on random batches, linear warm-up, cosine decay."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    steps: int = Field(ge=1)
    batch_size: int = Field(128, ge=1)
    lr: float = Field(2e-3, gt=0)


def new_unet(spec: DenoiserSpec, seed: int):
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    return UNet2DModel(**spec.unet_config())


def ddpm_scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=TRAIN_TIMESTEPS, beta_schedule=BETA_SCHEDULE)


def train_denoiser(unet, images: torch.Tensor, spec: TrainSpec, seed: int) -> list[float]:
    """Train ``unet`` in place to predict the noise added to ``images`` (N×1×H×W in [0, 1]);
    returns the loss of every step."""
    scheduler = ddpm_scheduler()
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=spec.lr, weight_decay=0.0)
    warmup = max(1, spec.steps // 20)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, spec.steps - warmup)
        return 0.5 * (1 + torch.cos(torch.tensor(progress * torch.pi)).item())

    lr_schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    unet.train()
    losses = []
    for _ in range(spec.steps):
        rows = torch.randint(0, len(images), (spec.batch_size,), generator=generator)
        clean = images[rows] * 2 - 1
        noise = torch.randn(clean.shape, generator=generator)
        t = torch.randint(0, TRAIN_TIMESTEPS, (spec.batch_size,), generator=generator)
        noisy = scheduler.add_noise(clean, noise, t)
        loss = torch.nn.functional.mse_loss(unet(noisy, t).sample, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        lr_schedule.step()
        losses.append(loss.item())
    unet.eval()
    return losses


@torch.no_grad()
def sample(unet, count: int, steps: int, seed: int, batch_size: int = 256) -> torch.Tensor:
    """``count`` images (N×1×H×W in [0, 1]) from ``unet`` with ``steps`` DDIM steps (η = 0),
    the starting noise drawn from a generator seeded with ``seed``."""
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler.from_config(ddpm_scheduler().config)
    scheduler.set_timesteps(steps)
    size = unet.config.sample_size
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(count, 1, size, size, generator=generator)
    unet.eval()
    out = []
    for start in range(0, count, batch_size):
        x = noise[start : start + batch_size]
        for t in scheduler.timesteps:
            x = scheduler.step(unet(x, t).sample, t, x, eta=0.0).prev_sample
        out.append(x)
    return (torch.cat(out).clamp(-1, 1) + 1) / 2


def load_unet(base_folder: str | Path, state: Mapping[str, torch.Tensor] | None = None):
    """The UNet of ``base_folder`` (diffusers' ``from_pretrained``), with the tensors of
    ``state`` in place of its own (the family's parameters of an edited model)."""
    from diffusers import UNet2DModel

    unet = UNet2DModel.from_pretrained(str(base_folder))
    if state is not None:
        own = unet.state_dict()
        unknown = sorted(set(state) - set(own))
        if unknown:
            raise KeyError(f"{base_folder}: the UNet has no parameter(s) {unknown[:3]}")
        unet.load_state_dict({**own, **{k: v.to(own[k].dtype) for k, v in state.items()}})
    return unet.eval()
