"""Task vectors: fine-tuned weights minus base weights, one parameter at a time."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping

import torch


class TaskVectorError(ValueError):
    """A base and a fine-tuned model that cannot be subtracted; the message names the parameter."""


def all_finite(tensor: torch.Tensor) -> bool:
    """True when no element is NaN or Inf. Checks the sum first (under IEEE addition a NaN or
    an Inf element makes the sum NaN or Inf, whatever the order), and only on a non-finite
    sum (a NaN or Inf, or finite elements whose sum overflowed) looks element by element.

    The sum runs in the tensor's own precision (float32, float64; float32 for 16-bit
    floats): a float32 sum runs at memory speed (measured: 20 GB/s against 0.8 GB/s for a
    float64 sum of float32 and 0.5 GB/s for ``isfinite().all()``), and an overflow costs
    only the exact check."""
    if tensor.is_floating_point():
        wide = tensor.dtype in (torch.float32, torch.float64)
        total = tensor.sum() if wide else tensor.sum(dtype=torch.float32)
    else:
        total = tensor.sum()
    return bool(torch.isfinite(total)) or bool(torch.isfinite(tensor).all())


ENERGY_CHUNK = 1 << 20  # elements converted to float64 at a time


def energy(tensor: torch.Tensor) -> float:
    """‖tensor‖² (squared Frobenius norm), accumulated in float64.

    Row blocks of about a million elements at a time: the float64 temporary stays at 8 MB
    whatever the tensor's size (a whole-tensor float64 norm copies it, twice its size for
    float32)."""
    if tensor.ndim == 0 or tensor.numel() <= ENERGY_CHUNK:
        return float(torch.linalg.vector_norm(tensor, dtype=torch.float64)) ** 2
    rows = max(1, ENERGY_CHUNK // max(1, tensor[0].numel()))
    return sum(
        float(torch.linalg.vector_norm(block, dtype=torch.float64)) ** 2
        for block in tensor.split(rows)
    )


def parameter_delta(name: str, base: torch.Tensor, finetuned: torch.Tensor) -> torch.Tensor:
    """`finetuned - base` for one parameter, computed in float32 (float64 stays float64).

    Raises TaskVectorError naming `name` on a shape mismatch, a non-float tensor, or NaN/Inf.
    """
    if base.shape != finetuned.shape:
        raise TaskVectorError(
            f"parameter {name!r}: base has shape {tuple(base.shape)} but the fine-tuned model "
            f"has {tuple(finetuned.shape)}"
        )
    for role, tensor in (("base", base), ("fine-tuned", finetuned)):
        if not tensor.is_floating_point():
            raise TaskVectorError(
                f"parameter {name!r}: the {role} tensor has dtype {tensor.dtype}; task vectors "
                "need floating-point weights (exclude this parameter)"
            )
    dtype = torch.float64 if torch.float64 in (base.dtype, finetuned.dtype) else torch.float32
    delta = finetuned.to(dtype) - base.to(dtype)
    if not all_finite(delta):
        raise TaskVectorError(f"parameter {name!r}: the task vector contains NaN or Inf")
    return delta


def task_vector(
    base: Mapping[str, torch.Tensor],
    finetuned: Mapping[str, torch.Tensor],
    *,
    keys: Iterable[str] | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield `(name, finetuned[name] - base[name])` one key at a time, in the order of `keys`
    (default: the base's keys).

    Works over any mapping, including lazy ones that load a tensor on `__getitem__`, so at
    most one pair of tensors is held at a time. Raises TaskVectorError for a key missing on
    either side (naming the side and the key), and as `parameter_delta` does.
    """
    names = list(base.keys()) if keys is None else list(keys)
    if keys is None:
        extra = sorted(set(finetuned.keys()) - set(names))
        if extra:
            raise TaskVectorError(
                f"the fine-tuned model has {len(extra)} parameter(s) the base lacks, "
                f"first {extra[:3]}; pass keys=... to choose which to subtract"
            )
    for name in names:
        if name not in base:
            raise TaskVectorError(f"parameter {name!r} is missing from the base model")
        if name not in finetuned:
            raise TaskVectorError(f"parameter {name!r} is missing from the fine-tuned model")
        yield name, parameter_delta(name, base[name], finetuned[name])
