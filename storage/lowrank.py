"""A weight delta kept as LoRA factors: ΔW = s · up·down (transposed, reshaped), never dense
unless asked.

One formula turns factors into the dense ΔW (`LowRankDelta.dense`), used by every reader
that needs a dense tensor and by the dense LoRA ingest alike, so the two are bit-identical
by construction; it is PEFT's own order of operations (B @ A, then transpose, then the
scale, which commute exactly elementwise), so a dense read also equals PEFT's
``get_delta_weight`` bit for bit for linear and embedding adapters.

Orientations are resolved here once: ``factors()`` gives (L, R) with ΔW viewed as the
parameter's matrix (first dimension × the rest) = L @ R, whatever the module kind.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from tvsplit.storage.lazy import lazy_module

if TYPE_CHECKING:
    import torch
else:
    torch = lazy_module("torch")  # imported on first use (storage/lazy.py)


LAYOUT = "lora-factors"  # the ``layout`` attr of a ΔW stored as factors


@dataclass(frozen=True)
class LowRankDelta:
    """ΔW = ``scale`` · (``up`` @ ``down``), transposed when ``transposed``, reshaped to
    ``shape``.

    ``up`` is (p × r) and ``down`` (r × q) as the adapter stores them (PEFT's lora_B and
    lora_A, a convolution's kernels flattened to (out, r) and (r, in·kh·kw)); ``transposed``
    is set for ``fan_in_fan_out`` (Conv1D) and embedding adapters, whose parameter is
    stored the other way round. float32 (float64 stays float64).
    """

    up: torch.Tensor
    down: torch.Tensor
    scale: float
    shape: tuple[int, ...]
    transposed: bool = False

    def __post_init__(self) -> None:
        if self.up.ndim != 2 or self.down.ndim != 2 or self.up.shape[1] != self.down.shape[0]:
            raise ValueError(
                f"LoRA factors must be (p × r) and (r × q), got {tuple(self.up.shape)} and "
                f"{tuple(self.down.shape)}"
            )
        p, q = self.up.shape[0], self.down.shape[1]
        rows, cols = (q, p) if self.transposed else (p, q)
        shape = tuple(int(s) for s in self.shape)
        if not shape or shape[0] != rows or math.prod(shape[1:]) != cols:
            raise ValueError(
                f"LoRA factors {tuple(self.up.shape)} @ {tuple(self.down.shape)}"
                f"{' (transposed)' if self.transposed else ''} do not give shape {shape}"
            )
        object.__setattr__(self, "shape", shape)

    @property
    def rank(self) -> int:
        return int(self.up.shape[1])

    @property
    def dtype(self) -> torch.dtype:
        return self.up.dtype

    @property
    def matrix_shape(self) -> tuple[int, int]:
        """(m, n): the parameter viewed as first dimension × the rest."""
        return self.shape[0], math.prod(self.shape[1:])

    @property
    def nbytes(self) -> int:
        return (self.up.numel() + self.down.numel()) * self.up.element_size()

    def dense(self) -> torch.Tensor:
        """The dense ΔW in the parameter's shape (PEFT's formula, see the module docstring)."""
        product = self.up @ self.down
        if self.transposed:
            product = product.T
        return (product * self.scale).contiguous().reshape(self.shape)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(L, R) with ΔW as an (m × n) matrix = L @ R; the scale is folded into R."""
        if self.transposed:
            return self.down.T, self.up.T * self.scale
        return self.up, self.down * self.scale

    def to(self, dtype: torch.dtype, device: torch.device | str | None = None) -> LowRankDelta:
        return LowRankDelta(
            self.up.to(device=device, dtype=dtype),
            self.down.to(device=device, dtype=dtype),
            self.scale,
            self.shape,
            self.transposed,
        )

    # -- storage as one packed array (r × (p + q)): [upᵀ | down] ---------------------------
    def packed(self) -> torch.Tensor:
        return torch.cat([self.up.T, self.down], dim=1).contiguous()

    def layout(self) -> dict:
        """JSON-able attrs that, with ``packed()``, give the delta back (``from_packed``)."""
        return {
            "layout": LAYOUT,
            "param_shape": list(self.shape),
            "rank": self.rank,
            "up_rows": int(self.up.shape[0]),
            "scale": float(self.scale),
            "transposed": bool(self.transposed),
        }

    @classmethod
    def from_packed(cls, packed: torch.Tensor, layout: dict) -> LowRankDelta:
        p = int(layout["up_rows"])
        return cls(
            packed[:, :p].T.contiguous(),  # contiguous as the adapter stores them: the same
            packed[:, p:].contiguous(),  # matmul kernel as the dense ingest, bit for bit
            float(layout["scale"]),
            tuple(layout["param_shape"]),
            bool(layout["transposed"]),
        )
