"""tvsplit: split a family of task vectors into shared and unique parts, and edit with them.

Notebook users import this package; it re-exports the public API::

    import tvsplit
    split = tvsplit.decompose_layer(deltas)          # (T, *shape) tensor or list of T tensors
    split.shared, split.unique, split.basis, split.eigenvalues, split.chance

The pipeline's layers are installed under this one name: ``tvsplit.storage`` (data) ←
``tvsplit.tasks`` (math and units of work) ← ``tvsplit.flows`` (Prefect flows, CLI).
Names are resolved on first use, so ``import tvsplit`` (and the CLI's ``--help``) costs no
torch, Prefect, Dask or MLflow import until one of them is needed.
"""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, version
from typing import Any

try:
    __version__ = version("tvsplit")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0"

# public name → module that defines it
_EXPORTS: dict[str, str] = {
    # splitting one parameter (tasks/decompose.py)
    "DecompositionError": "tvsplit.tasks.decompose",
    "LayerSplit": "tvsplit.tasks.decompose",
    "MemberBasis": "tvsplit.tasks.decompose",
    "decompose_layer": "tvsplit.tasks.decompose",
    "member_basis": "tvsplit.tasks.decompose",
    "split_from_bases": "tvsplit.tasks.decompose",
    "TaskVectorError": "tvsplit.tasks.task_vector",
    "task_vector": "tvsplit.tasks.task_vector",
    # edits of one parameter, recipes, output folders, LoRA export
    "Recipe": "tvsplit.flows.recipe",
    "RecipeError": "tvsplit.flows.recipe",
    "check_members": "tvsplit.flows.recipe",
    "load_recipe": "tvsplit.flows.recipe",
    "ModelFolderWriter": "tvsplit.storage.model_folder",
    "write_model_folder": "tvsplit.storage.model_folder",
    "EditError": "tvsplit.tasks.edit",
    "EditInputs": "tvsplit.tasks.edit",
    "apply_edit": "tvsplit.tasks.edit",
    "available_methods": "tvsplit.tasks.edit",
    "get_method": "tvsplit.tasks.edit",
    "register": "tvsplit.tasks.edit",
    "ties_delta": "tvsplit.tasks.edit",
    "LoraExportError": "tvsplit.tasks.lora_export",
    "lora_from_delta": "tvsplit.tasks.lora_export",
    "write_lora_adapter": "tvsplit.tasks.lora_export",
}

__all__ = ["__version__", *sorted(_EXPORTS)]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'tvsplit' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
