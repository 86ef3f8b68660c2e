"""The vision suite's backbone (a tiny transformers ConvNeXt) and per-task linear heads.

The backbone is a plain ``transformers.ConvNextModel`` (LayerNorm, no batch statistics, so
task vectors and merges need no buffer handling), so every base, fine-tuned or merged
backbone loads with ``ConvNextModel.from_pretrained(folder)``. A tiny ViT was tried first:
on 2 CPU cores its rotation pretraining barely left chance in the time budget (linear probe
on MNIST 32% vs 80–89% for ConvNeXt after the same 300 steps). A task's prediction is
``head(backbone(pixels).pooler_output)``; heads are ``torch.nn.Linear`` saved apart from the
backbone (``heads/<task>.safetensors``), so a family's task vectors are backbone-only.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field
from safetensors.torch import load_file, save_file
from transformers import ConvNextConfig, ConvNextModel
from tvsplit.tasks.suites.vision.data import IMAGE_SIZE, to_pixels


class BackboneSpec(BaseModel):
    """Size of the ConvNeXt backbone (28×28 grey images; a ``patch_size`` stem, then one
    stage per entry of ``hidden_sizes``/``depths``, each stage after the first halving the
    resolution)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    patch_size: int = Field(4, ge=1)
    hidden_sizes: tuple[int, ...] = (64, 128, 256)
    depths: tuple[int, ...] = (2, 2, 1)

    def hf_config(self) -> ConvNextConfig:
        """The transformers config (no stochastic depth: training is deterministic)."""
        if len(self.hidden_sizes) != len(self.depths):
            raise ValueError("hidden_sizes and depths need one entry per stage")
        return ConvNextConfig(
            num_channels=1,
            image_size=IMAGE_SIZE,
            patch_size=self.patch_size,
            num_stages=len(self.depths),
            hidden_sizes=list(self.hidden_sizes),
            depths=list(self.depths),
            drop_path_rate=0.0,
        )


Backbone = ConvNextModel


def feature_size(config: ConvNextConfig) -> int:
    """Width of the pooled features a head reads."""
    return int(config.hidden_sizes[-1])


def new_backbone(spec: BackboneSpec, seed: int) -> ConvNextModel:
    """A freshly initialised backbone (initialisation fixed by ``seed``)."""
    torch.manual_seed(seed)
    return ConvNextModel(spec.hf_config())


def load_backbone(
    source: str | Path | Mapping[str, torch.Tensor], config: ConvNextConfig | None = None
) -> ConvNextModel:
    """A backbone in eval mode from a model folder (``from_pretrained``) or a state dict
    (``config`` then required). A state dict must hold exactly the backbone's tensors."""
    if isinstance(source, str | Path):
        model = ConvNextModel.from_pretrained(str(source))
    else:
        if config is None:
            raise ValueError("loading a backbone from a state dict needs its ConvNextConfig")
        model = ConvNextModel(config)
        model.load_state_dict(dict(source), strict=True)
    return model.eval()


def features(backbone: ConvNextModel, images: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    """Pooled features (N, hidden) of uint8 images, without gradients."""
    was_training = backbone.training
    backbone.eval()
    outputs = []
    with torch.inference_mode():
        for start in range(0, images.shape[0], batch_size):
            batch = to_pixels(images[start : start + batch_size])
            outputs.append(backbone(pixel_values=batch).pooler_output)
    backbone.train(was_training)
    return torch.cat(outputs)


def save_head(head: torch.nn.Linear, path: str | Path) -> None:
    """Write a head as safetensors (``weight``, ``bias``)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().clone() for k, v in head.state_dict().items()}
    save_file(tensors, str(path), metadata={"format": "pt"})


def load_head(path: str | Path) -> torch.nn.Linear:
    """Read a head written by ``save_head`` (frozen: ``requires_grad`` False)."""
    tensors = load_file(str(path))
    out_features, in_features = tensors["weight"].shape
    head = torch.nn.Linear(in_features, out_features)
    head.load_state_dict(tensors)
    head.requires_grad_(False)
    return head


def state_dict(backbone: ConvNextModel) -> dict[str, torch.Tensor]:
    """The backbone's tensors, detached copies (the keys a saved model folder holds)."""
    return {k: v.detach().clone() for k, v in backbone.state_dict().items()}
