"""The style zoo: a base denoiser trained on plain digits, one fine-tune per style and seed
(a full fine-tune, or a PEFT LoRA adapter on the attention projections), and the judges
(digit classifier, style detector), built here or reused.

Layout under ``root`` (``<data_root>/style/zoo-<fingerprint>``)::

    base/                      diffusers folder (save_pretrained: config.json + weights)
    seed<k>/<style>/           the base fine-tuned on <style>-transformed digits, seed k
    lora-<hash>/seed<k>/<style>/  the same style as a PEFT LoRA adapter (PEFT's
                               save_pretrained: adapter_config.json + adapter_model.safetensors,
                               keys ``base_model.model.<module>.lora_A.weight``)
    digits.safetensors         digit classifier (feature module of the Fréchet distance)
    styles.safetensors         style detector (one output per style)
    zoo.json                   config, fingerprint, losses, timings (written last)

Reuse: a folder whose manifest has the config's fingerprint is reused; only missing parts
are built (the fingerprint leaves out ``members`` and ``lora``: a LoRA zoo shares the base
and the judges of the full zoo with the same settings) (each model folder is written atomically, so a stopped build resumes cleanly).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from tvsplit.storage.model_folder import atomic_folder
from tvsplit.tasks.suites.style.classifiers import (
    ConvNet,
    load_classifier,
    save_classifier,
    train_classifier,
)
from tvsplit.tasks.suites.style.data import apply_styles, check_styles, digits
from tvsplit.tasks.suites.style.model import DenoiserSpec, TrainSpec, new_unet, train_denoiser

ZOO_VERSION = 1  # bump when data or training code changes what a config produces
MANIFEST = "zoo.json"


class LoraSpec(BaseModel):
    """The style LoRAs: PEFT ``LoraConfig`` on the UNet's attention projections (the
    modules style LoRAs adapt), trained with the base frozen."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    rank: int = Field(4, ge=1)
    alpha: float = Field(4.0, gt=0)
    targets: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")
    train: TrainSpec = TrainSpec(steps=250, lr=5e-3)

    def fingerprint(self) -> str:
        data = {"version": ZOO_VERSION, **self.model_dump(mode="json")}
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:8]


class StyleZooConfig(BaseModel):
    """Everything the zoo's models depend on."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    members: Literal["full", "lora"] = Field(
        "full", description="Style members as full fine-tunes or as PEFT LoRA adapters."
    )
    lora: LoraSpec = LoraSpec()
    styles: tuple[str, ...] = ("thick", "blurred", "rotated", "inverted")
    seeds: tuple[int, ...] = Field((0, 1, 2), min_length=1)
    denoiser: DenoiserSpec = DenoiserSpec()
    train_images: int = Field(50_000, ge=256)
    pretrain: TrainSpec = TrainSpec(steps=1500, lr=2e-3)
    finetune: TrainSpec = TrainSpec(steps=250, lr=5e-4)
    classifier_steps: int = Field(600, ge=1)
    base_seed: int = 0

    def fingerprint(self) -> str:
        """The base, the judges and the full fine-tunes' settings (not ``members``/``lora``)."""
        data = {"version": ZOO_VERSION, **self.model_dump(mode="json", exclude={"members", "lora"})}
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:12]


@dataclass(frozen=True)
class StyleZoo:
    root: Path
    config: StyleZooConfig
    manifest: dict[str, Any]

    @property
    def base_dir(self) -> Path:
        return self.root / "base"

    @property
    def styles(self) -> tuple[str, ...]:
        return check_styles(self.config.styles)

    @property
    def lora(self) -> bool:
        return self.config.members == "lora"

    def member_dir(self, seed: int, style: str) -> Path:
        if self.lora:
            return self.root / f"lora-{self.config.lora.fingerprint()}" / f"seed{seed}" / style
        return self.root / f"seed{seed}" / style

    def family_name(self, seed: int) -> str:
        kind = f"-lora-{self.config.lora.fingerprint()[:6]}" if self.lora else ""
        return f"style-{self.manifest['fingerprint'][:8]}{kind}-seed{seed}"

    def catalogue_spec(self) -> dict[str, Any]:
        """One family per fine-tuning seed: the base and one member per style (model folders,
        or adapter folders the LoRA source reads)."""
        return {
            "families": {
                self.family_name(seed): {
                    "base": str(self.base_dir),
                    "members": {s: str(self.member_dir(seed, s)) for s in self.styles},
                }
                for seed in self.config.seeds
            }
        }

    def digit_classifier(self) -> ConvNet:
        return load_classifier(self.root / "digits.safetensors", 10)

    def style_detector(self) -> ConvNet:
        return load_classifier(self.root / "styles.safetensors", len(self.styles))


def _write_manifest(root: Path, manifest: dict[str, Any]) -> None:
    temporary = root / f".{MANIFEST}.tmp"
    temporary.write_text(json.dumps(manifest, indent=2, sort_keys=True), encoding="utf-8")
    os.replace(temporary, root / MANIFEST)


def _save_unet(unet, folder: Path, card: str) -> None:
    with atomic_folder(folder, overwrite=True) as temporary:
        unet.save_pretrained(str(temporary))  # diffusers: config.json + safetensors
        (temporary / "README.md").write_text(card, encoding="utf-8")


def _save_adapter(model, folder: Path) -> None:
    with atomic_folder(folder, overwrite=True) as temporary:
        model.save_pretrained(str(temporary))  # PEFT: adapter_config.json + safetensors


def lora_finetune(base_dir: Path, images, spec: LoraSpec, seed: int):
    """The base of ``base_dir`` wrapped with PEFT's ``get_peft_model`` (LoRA on
    ``spec.targets``, the base frozen) and trained on ``images``; returns (PeftModel,
    losses)."""
    from peft import LoraConfig, get_peft_model
    from tvsplit.tasks.suites.style.model import load_unet

    torch.manual_seed(seed)
    config = LoraConfig(
        r=spec.rank, lora_alpha=spec.alpha, target_modules=list(spec.targets),
        lora_dropout=0.0, init_lora_weights=True,
    )  # fmt: skip
    model = get_peft_model(load_unet(base_dir), config)
    return model, train_denoiser(model, images, spec.train, seed)


def _card(title: str, config: StyleZooConfig, losses: list[float]) -> str:
    tail = sum(losses[-50:]) / len(losses[-50:])
    return (
        "---\nlibrary_name: diffusers\ntags:\n- tvsplit\n- style-suite\n---\n\n"
        f"# {title}\n\nUNet2DModel {config.denoiser.unet_config()['block_out_channels']} on "
        f"{config.denoiser.sample_size}×{config.denoiser.sample_size} MNIST digits, "
        f"{len(losses)} DDPM steps; final noise-prediction loss {tail:.4f}.\n"
    )


def default_zoo_dir(data_root: str | Path, config: StyleZooConfig) -> Path:
    return Path(data_root) / "style" / f"zoo-{config.fingerprint()}"


def build_zoo(
    root: str | Path, config: StyleZooConfig, progress: Callable[[str], None] = print
) -> StyleZoo:
    """Build (or reuse) the zoo of ``config`` in ``root``; see the module docstring."""
    from tvsplit.tasks.suites.style.model import load_unet

    root = Path(root).absolute()
    root.mkdir(parents=True, exist_ok=True)
    path = root / MANIFEST
    manifest = json.loads(path.read_text()) if path.is_file() else {}
    if manifest.get("fingerprint") != config.fingerprint():
        manifest = {
            "fingerprint": config.fingerprint(),
            "config": config.model_dump(mode="json"),
            "losses": {},
            "timings": {},
        }
    zoo = StyleZoo(root, config, manifest)
    size = config.denoiser.sample_size
    images, labels = digits("train", size, config.train_images)
    if not zoo.base_dir.is_dir():
        started = time.perf_counter()
        unet = new_unet(config.denoiser, config.base_seed)
        losses = train_denoiser(unet, images, config.pretrain, config.base_seed)
        _save_unet(unet, zoo.base_dir, _card("Style suite base", config, losses))
        manifest["timings"]["base_s"] = round(time.perf_counter() - started, 1)
        manifest["losses"]["base"] = round(sum(losses[-50:]) / len(losses[-50:]), 5)
        _write_manifest(root, manifest)
        progress(f"style zoo: trained the base in {manifest['timings']['base_s']} s")
    for seed in config.seeds:
        for style in zoo.styles:
            folder = zoo.member_dir(seed, style)
            if folder.is_dir():
                continue
            started = time.perf_counter()
            styled = apply_styles(images, [style])
            if zoo.lora:
                model, losses = lora_finetune(zoo.base_dir, styled, config.lora, 1000 * (seed + 1))
                _save_adapter(model, folder)
            else:
                unet = load_unet(zoo.base_dir)
                losses = train_denoiser(unet, styled, config.finetune, 1000 * (seed + 1))
                _save_unet(unet, folder, _card(f"Style `{style}`, seed {seed}", config, losses))
            key = str(folder.relative_to(root))
            manifest["timings"][key] = round(time.perf_counter() - started, 1)
            manifest["losses"][key] = round(sum(losses[-50:]) / len(losses[-50:]), 5)
            _write_manifest(root, manifest)
            progress(f"style zoo: fine-tuned {key} in {manifest['timings'][key]} s")
    for name, multilabel in (("digits", False), ("styles", True)):
        target = root / f"{name}.safetensors"
        if not target.is_file():
            started = time.perf_counter()
            model = train_classifier(
                images, labels, zoo.styles, multilabel=multilabel,
                steps=config.classifier_steps, seed=config.base_seed + 7,
            )  # fmt: skip
            save_classifier(model, target)
            manifest["timings"][name] = round(time.perf_counter() - started, 1)
            _write_manifest(root, manifest)
            progress(f"style zoo: trained the {name} classifier in {manifest['timings'][name]} s")
    manifest["status"] = "complete"
    _write_manifest(root, manifest)
    return StyleZoo(root, config, manifest)
