"""The vision model zoo: one pretrained base, a frozen linear-probe head per task, and a
backbone fully fine-tuned on each task for each seed, saved as local model repositories.

Layout of a zoo folder::

    zoo.json                     manifest: config, fingerprint, tasks, status, metrics, timings
    base/                        config.json, model.safetensors, README.md (hub layout)
    heads/<task>.safetensors     the task's frozen head (weight, bias); not part of any family
    seed-<s>/<task>/             the backbone fine-tuned on <task> with seed s (hub layout)

Recipe: the base (``ConvNextModel``) is pretrained self-supervised on rotation prediction over the
pooled unlabeled training images of every task (no evaluation task's labels). Each task's
head is a linear probe fitted on the frozen base's features, then frozen; the backbone is
fine-tuned under it. So any backbone (base, fine-tuned, merged) can be evaluated with every
task's own head, and a family (``catalogue_spec``) holds backbone tensors only.

Guarantees: every model folder is written atomically (complete or absent); a zoo whose
manifest fingerprint matches the config is reused (missing pieces, e.g. a new seed, are
built, nothing else is retrained); a zoo built from another config raises ``ZooError``
unless ``overwrite=True``. Deterministic for the config on a given machine and thread count.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field
from transformers import ConvNextModel
from tvsplit.storage.model_folder import atomic_folder
from tvsplit.tasks.suites.vision.data import (
    SplitSizes,
    TaskData,
    load_suite,
    pooled_train_images,
    task_names,
)
from tvsplit.tasks.suites.vision.evaluate import accuracy
from tvsplit.tasks.suites.vision.model import (
    BackboneSpec,
    load_backbone,
    load_head,
    new_backbone,
    save_head,
)
from tvsplit.tasks.suites.vision.training import TrainSpec, finetune, fit_probe, pretrain_rotation

log = logging.getLogger(__name__)

SUITE_VERSION = 2  # bump when data or training code changes what a config produces
MANIFEST = "zoo.json"


class ZooError(RuntimeError):
    """A zoo folder that cannot be used with this config; the message says what to do."""


class ZooConfig(BaseModel):
    """Everything that determines a zoo. ``seeds`` are the fine-tuning seeds (the base and
    the heads are shared by all seeds); they are not part of the fingerprint, so adding a
    seed reuses everything already built."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = "custom"
    tasks: tuple[str, ...] | None = Field(
        None, description="Task names; None = every task whose data is installed."
    )
    sizes: SplitSizes = SplitSizes()
    data_seed: int = 0
    backbone: BackboneSpec = BackboneSpec()
    base_seed: int = 0
    pretrain: TrainSpec = TrainSpec(steps=500, batch_size=64, lr=2e-3, weight_decay=0.05)
    probe_l2: float = Field(1e-3, ge=0)
    probe_iterations: int = Field(200, ge=1)
    # lr 3e-4: at 1e-3 the task vectors grew so large and conflicting that every plain merge
    # (TA, TIES, averaging) fell below the base; see RESULTS.md history in the notes.
    finetune: TrainSpec = TrainSpec(steps=300, batch_size=32, lr=3e-4)
    seeds: tuple[int, ...] = Field((0, 1, 2), min_length=1)

    @classmethod
    def small(cls, **changes: Any) -> ZooConfig:
        """The CI preset: real data, few images and steps, one seed (≈ 30–60 s on 2 cores)."""
        values: dict[str, Any] = {
            "name": "small",
            "sizes": SplitSizes(train=1000, val=128, test=256),
            "backbone": BackboneSpec(hidden_sizes=(32, 64, 128), depths=(1, 1, 1)),
            "pretrain": TrainSpec(steps=150, batch_size=64, lr=2e-3, weight_decay=0.05),
            "finetune": TrainSpec(steps=100, batch_size=32, lr=1e-3),
            "probe_l2": 1e-2,
            "probe_iterations": 100,
            "seeds": (0,),
        }
        return cls(**{**values, **changes})

    @classmethod
    def full(cls, **changes: Any) -> ZooConfig:
        """The demo preset: three fine-tuning seeds, about 5 minutes of training on 2 cores."""
        return cls(**{"name": "full", **changes})

    def resolved_tasks(self) -> tuple[str, ...]:
        """``tasks``, or every task whose data is installed."""
        return self.tasks if self.tasks is not None else task_names()

    def fingerprint(self, tasks: tuple[str, ...] | None = None) -> str:
        """Digest of everything but ``name`` and ``seeds``, with the resolved task list."""
        payload = self.model_dump(mode="json", exclude={"name", "seeds"})
        payload["tasks"] = list(tasks if tasks is not None else self.resolved_tasks())
        payload["suite_version"] = SUITE_VERSION
        text = json.dumps(payload, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Zoo:
    """A built zoo: paths of its model folders and heads, and its manifest."""

    root: Path
    config: ZooConfig
    tasks: tuple[str, ...]
    manifest: dict[str, Any]

    @property
    def base_dir(self) -> Path:
        return self.root / "base"

    @property
    def seeds(self) -> tuple[int, ...]:
        return self.config.seeds

    def member_dir(self, seed: int, task: str) -> Path:
        return self.root / f"seed-{seed}" / task

    def members(self, seed: int) -> dict[str, Path]:
        """Task → fine-tuned model folder for one seed, in task order."""
        return {task: self.member_dir(seed, task) for task in self.tasks}

    def head_path(self, task: str) -> Path:
        return self.root / "heads" / f"{task}.safetensors"

    def heads(self) -> dict[str, torch.nn.Linear]:
        """Every task's frozen head."""
        return {task: load_head(self.head_path(task)) for task in self.tasks}

    def family_name(self, seed: int) -> str:
        """Catalogue family of one seed, tied to this zoo's fingerprint: a rebuilt zoo with
        another config lands in new families instead of clashing with the old entries."""
        return f"vision-{self.config.name}-{self.manifest['fingerprint'][:8]}-seed{seed}"

    def catalogue_spec(self, seeds: tuple[int, ...] | None = None) -> dict[str, Any]:
        """Ingest spec data (``flows.ingest.parse_spec`` shape): one family per seed, the
        base and the fine-tuned backbones as local folders (heads are not in the folders)."""
        families = {
            self.family_name(seed): {
                "base": str(self.base_dir),
                "members": {task: str(path) for task, path in self.members(seed).items()},
            }
            for seed in (self.seeds if seeds is None else seeds)
        }
        return {"families": families}

    def load_tasks(self) -> dict[str, TaskData]:
        """The zoo's tasks with the zoo's split sizes and data seed."""
        return load_suite(self.tasks, self.config.sizes, self.config.data_seed)


def _model_card(title: str, body: str, tags: list[str]) -> str:
    tag_lines = "\n".join(f"- {t}" for t in tags)
    return (
        f"---\nlibrary_name: transformers\nlicense: apache-2.0\ntags:\n{tag_lines}\n---\n\n"
        f"# {title}\n\n{body}\n"
    )


def _save_backbone(model: ConvNextModel, folder: Path, card: str) -> None:
    with atomic_folder(folder, overwrite=True) as temporary:
        model.save_pretrained(str(temporary), safe_serialization=True)
        (temporary / "README.md").write_text(card, encoding="utf-8")


def _write_manifest(root: Path, manifest: dict[str, Any]) -> None:
    temporary = root / f".{MANIFEST}.tmp"
    temporary.write_text(json.dumps(manifest, indent=2, sort_keys=True), encoding="utf-8")
    os.replace(temporary, root / MANIFEST)


def read_manifest(root: str | Path) -> dict[str, Any] | None:
    path = Path(root) / MANIFEST
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def build_zoo(
    root: str | Path,
    config: ZooConfig,
    *,
    overwrite: bool = False,
    tasks: dict[str, TaskData] | None = None,
    progress: Callable[[str], None] | None = None,
) -> Zoo:
    """Build (or reuse) the zoo for ``config`` in ``root`` and return it.

    Reuse: with a manifest of the same fingerprint only missing folders are built (a
    finished zoo returns in milliseconds). A different fingerprint raises ZooError, or with
    ``overwrite`` deletes the folder and rebuilds. ``tasks`` may pass already loaded data
    (it must match the config). ``progress`` receives one line per finished stage.
    """
    say = progress or log.info
    root = Path(root).absolute()
    names = config.resolved_tasks()
    if len(names) < 2:
        raise ZooError(f"a zoo needs at least 2 tasks, got {list(names)}")
    fingerprint = config.fingerprint(names)
    manifest = read_manifest(root)
    if manifest is not None and manifest.get("fingerprint") != fingerprint:
        if not overwrite:
            raise ZooError(
                f"{root} holds a zoo built from another config (fingerprint "
                f"{manifest.get('fingerprint')}, this config {fingerprint}); use another "
                "folder or pass overwrite=True to rebuild it"
            )
        shutil.rmtree(root)
        manifest = None
    root.mkdir(parents=True, exist_ok=True)
    manifest = manifest or {
        "fingerprint": fingerprint,
        "suite_version": SUITE_VERSION,
        "config": config.model_dump(mode="json"),
        "tasks": list(names),
        "metrics": {},
        "timings": {},
        "seeds_built": [],
    }
    zoo = Zoo(root, config, names, manifest)
    todo = [(s, t) for s in config.seeds for t in names if not zoo.member_dir(s, t).is_dir()]
    heads_missing = [t for t in names if not zoo.head_path(t).is_file()]
    if not todo and not heads_missing and zoo.base_dir.is_dir():
        return _finish(zoo, manifest)
    manifest["status"] = "building"
    _write_manifest(root, manifest)
    data = tasks if tasks is not None else load_suite(names, config.sizes, config.data_seed)
    if not zoo.base_dir.is_dir():
        started = time.perf_counter()
        base = new_backbone(config.backbone, config.base_seed)
        losses = pretrain_rotation(
            base, pooled_train_images(data), config.pretrain, config.base_seed
        )
        _save_backbone(base, zoo.base_dir, _base_card(config, names, losses))
        manifest["timings"]["pretrain_s"] = round(time.perf_counter() - started, 2)
        manifest["metrics"]["pretrain_final_loss"] = losses[-1]
        say(f"zoo: pretrained the base in {manifest['timings']['pretrain_s']} s")
    base = load_backbone(zoo.base_dir)
    if heads_missing:
        started = time.perf_counter()
        for task in heads_missing:
            split = data[task].train
            head = fit_probe(
                base,
                split.images,
                split.labels,
                data[task].num_classes,
                l2=config.probe_l2,
                iterations=config.probe_iterations,
                seed=config.base_seed,
            )
            save_head(head, zoo.head_path(task))
        manifest["timings"]["probes_s"] = round(time.perf_counter() - started, 2)
        say(
            f"zoo: fitted {len(heads_missing)} linear probes in {manifest['timings']['probes_s']} s"
        )
    heads = zoo.heads()
    base_val = {t: accuracy(base, heads[t], data[t].val.images, data[t].val.labels) for t in names}
    manifest["metrics"]["base_val"] = base_val
    for seed, task in todo:
        started = time.perf_counter()
        model = load_backbone(zoo.base_dir)
        split = data[task].train
        losses = finetune(model, heads[task], split.images, split.labels, config.finetune, seed)
        val = accuracy(model, heads[task], data[task].val.images, data[task].val.labels)
        _save_backbone(
            model,
            zoo.member_dir(seed, task),
            _member_card(config, task, seed, losses, val, base_val[task], fingerprint),
        )
        elapsed = round(time.perf_counter() - started, 2)
        manifest["metrics"].setdefault("finetuned_val", {}).setdefault(str(seed), {})[task] = val
        manifest["timings"].setdefault("finetune_s", {})[f"{seed}/{task}"] = elapsed
        say(
            f"zoo: fine-tuned seed {seed} {task} in {elapsed} s (val {val:.1f}%, base {base_val[task]:.1f}%)"
        )
    return _finish(zoo, manifest)


def _finish(zoo: Zoo, manifest: dict[str, Any]) -> Zoo:
    manifest["seeds_built"] = sorted(set(manifest.get("seeds_built", [])) | set(zoo.seeds))
    if manifest.get("status") != "complete":
        manifest["status"] = "complete"
        _write_manifest(zoo.root, manifest)
    return Zoo(zoo.root, zoo.config, zoo.tasks, manifest)


def _base_card(config: ZooConfig, names: tuple[str, ...], losses: list[float]) -> str:
    body = (
        "A tiny ConvNeXt backbone (`transformers.ConvNextModel`, 28×28 grey images) pretrained "
        "self-supervised by rotation prediction (which of 4 quarter turns) on the pooled "
        f"unlabeled training images of the tvsplit vision suite's tasks: {', '.join(names)}. "
        "No task labels were used. It is the base of every fine-tuned member of the zoo.\n\n"
        f"- steps: {config.pretrain.steps}, batch {config.pretrain.batch_size}, "
        f"lr {config.pretrain.lr}\n- final rotation loss: {losses[-1]:.4f}\n"
        f"- zoo fingerprint: {config.fingerprint(names)}"
    )
    return _model_card("tvsplit vision zoo: base", body, ["tvsplit", "vision-zoo", "base"])


def _member_card(
    config: ZooConfig,
    task: str,
    seed: int,
    losses: list[float],
    val: float,
    base_val: float,
    manifest_fingerprint: str,
) -> str:
    body = (
        f"The zoo's base fully fine-tuned on task `{task}` (seed {seed}) under the task's "
        f"frozen linear-probe head (`heads/{task}.safetensors` in the zoo, not in this folder).\n\n"
        f"- steps: {config.finetune.steps}, batch {config.finetune.batch_size}, "
        f"lr {config.finetune.lr}\n- final loss: {losses[-1]:.4f}\n"
        f"- validation accuracy: {val:.2f}% (base with the same head: {base_val:.2f}%)\n"
        f"- zoo fingerprint: {manifest_fingerprint}"
    )
    return _model_card(
        f"tvsplit vision zoo: {task} (seed {seed})", body, ["tvsplit", "vision-zoo", task]
    )


def default_zoo_dir(data_root: str | Path, config: ZooConfig) -> Path:
    """``<data_root>/vision-zoo/<name>-<fingerprint>``: a changed config gets a new folder."""
    return Path(data_root) / "vision-zoo" / f"{config.name}-{config.fingerprint()}"
