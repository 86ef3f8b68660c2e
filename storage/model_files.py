"""The files a model folder carries besides its weights, and how its weights are named.

One list serves both directions: the hub fetch downloads these files (`hub.ALLOW_PATTERNS`)
and the model-folder writer copies them from the base's folder (`ModelFolderWriter`), so
what a written model carries is what a fetched base brings.

Covers transformers folders (config, generation config, tokenizer and processor files)
and diffusers folders: a pipeline's ``model_index.json`` with one sub-folder per component
(``unet/config.json``, ``scheduler/scheduler_config.json``, ``tokenizer/vocab.json``, ...),
whose weights are named ``diffusion_pytorch_model*.safetensors`` instead of
``model*.safetensors`` (the writer's names: `storage.model_folder.weight_layout`).
"""

from __future__ import annotations

import fnmatch
from pathlib import Path

#: Non-weight files of a model folder, by file name (at its root or in a component folder).
SIDE_FILE_NAMES: tuple[str, ...] = (
    # configuration
    "config.json",
    "generation_config.json",
    # tokenizers
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
    "chat_template.jinja",
    "chat_template.json",
    # image and audio processors
    "preprocessor_config.json",
    "processor_config.json",
    # diffusers: the pipeline's component index, schedulers
    "model_index.json",
    "scheduler_config.json",
)

#: The same files as patterns relative to the folder: at its root, and one level down (the
#: component folders of a diffusers pipeline).
SIDE_FILE_PATTERNS: tuple[str, ...] = SIDE_FILE_NAMES + tuple(f"*/{n}" for n in SIDE_FILE_NAMES)

#: Weight files in safetensors form (transformers' ``model*``, diffusers'
#: ``diffusion_pytorch_model*``, anything else a source names) and their shard indexes.
WEIGHT_PATTERNS: tuple[str, ...] = ("*.safetensors", "*.safetensors.index.json")


def is_side_file(relative: str) -> bool:
    """Whether the path (relative to a model folder, ``/``-separated) is a side file."""
    if relative.count("/") > 1:
        return False
    return any(fnmatch.fnmatchcase(relative, p) for p in SIDE_FILE_PATTERNS)


def side_files(folder: str | Path) -> list[str]:
    """The side files present in `folder` (relative ``/`` paths, sorted): at its root and in
    its direct sub-folders. Weights, README and anything else are left out."""
    root = Path(folder)
    found = [p.name for p in root.iterdir() if p.is_file() and is_side_file(p.name)]
    for sub in root.iterdir():
        if sub.is_dir() and not sub.name.startswith("."):
            found += [
                f"{sub.name}/{p.name}"
                for p in sub.iterdir()
                if p.is_file() and is_side_file(f"{sub.name}/{p.name}")
            ]
    return sorted(found)
