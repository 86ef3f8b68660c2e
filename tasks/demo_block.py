"""The demo's work: a small transformer-like block whose parameters each get a synthetic
family with planted shared and member-own directions, split one parameter at a time.

Pure computation (no I/O, no printing): ``flows/demo.py`` prints the table. Guarantees: the
families are seeded (``seed + index`` per parameter), so a run is reproducible; each row
holds the split and, for a matrix or kernel, how well it recovered the planted shared
directions (`tasks.synthetic.recovery`); a 1-D parameter gets small noise and no recovery
(the split keeps it whole in the unique part).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from tvsplit.tasks.decompose import LayerSplit, decompose_layer
from tvsplit.tasks.synthetic import Recovery, planted_family, recovery

__all__ = ["DemoParameter", "DemoRow", "demo_block", "split_planted_block"]


@dataclass(frozen=True)
class DemoParameter:
    name: str
    shape: tuple[int, ...]
    shared_rank: int
    unique_rank: int


@dataclass(frozen=True)
class DemoRow:
    param: DemoParameter
    split: LayerSplit
    found: Recovery | None


def demo_block(size: int) -> list[DemoParameter]:
    """A block of `size` width: attention, MLP (wide and tall), a convolution and 1-D params."""
    return [
        DemoParameter("attn.q_proj.weight", (size, size), 8, 16),
        DemoParameter("attn.o_proj.weight", (size, size), 4, 8),
        DemoParameter("mlp.up_proj.weight", (4 * size, size), 8, 16),
        DemoParameter("mlp.down_proj.weight", (size, 4 * size), 8, 16),
        DemoParameter("patch_embed.weight", (size // 4, 3, 4, 4), 2, 3),
        DemoParameter("norm.weight", (size,), 0, 0),
    ]


def split_planted_block(
    size: int = 256, members: int = 8, noise: float = 0.1, seed: int = 0
) -> Iterator[DemoRow]:
    """Split every parameter of ``demo_block(size)``'s planted families, one at a time."""
    for index, param in enumerate(demo_block(size)):
        if len(param.shape) == 1:
            g = torch.Generator().manual_seed(seed + index)
            deltas = torch.randn(members, *param.shape, generator=g) * 0.01
            yield DemoRow(param, decompose_layer(deltas, name=param.name), None)
            continue
        rows, cols = param.shape[0], math.prod(param.shape[1:])
        family = planted_family(
            rows, cols, members, shared_rank=param.shared_rank,
            unique_rank=param.unique_rank, noise=noise, seed=seed + index,
        )  # fmt: skip
        split = decompose_layer(family.deltas.reshape(members, *param.shape), name=param.name)
        yield DemoRow(param, split, recovery(split.basis, family))
