"""tvsplit: split a family of task vectors into shared and unique parts, and edit with them.

Notebook users import this package; it re-exports the public API::

    import tvsplit
    split = tvsplit.decompose_layer(deltas)          # (T, *shape) tensor or list of T tensors
    split.shared, split.unique, split.basis, split.eigenvalues, split.chance
"""

from importlib.metadata import PackageNotFoundError, version

from tasks.decompose import (
    DecompositionError,
    LayerSplit,
    MemberBasis,
    decompose_layer,
    member_basis,
    split_from_bases,
)
from tasks.task_vector import TaskVectorError, task_vector

try:
    __version__ = version("tvsplit")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0"

__all__ = [
    "DecompositionError",
    "LayerSplit",
    "MemberBasis",
    "TaskVectorError",
    "__version__",
    "decompose_layer",
    "member_basis",
    "split_from_bases",
    "task_vector",
]

# Edits of one parameter (tasks/edit.py), edit recipes (flows/recipe.py), output model
# folders (storage/model_folder.py) and LoRA export (tasks/lora_export.py).
from flows.recipe import Recipe, RecipeError, check_members, load_recipe
from storage.model_folder import ModelFolderWriter, write_model_folder
from tasks.edit import (
    EditError,
    EditInputs,
    apply_edit,
    available_methods,
    get_method,
    register,
    ties_delta,
)
from tasks.lora_export import LoraExportError, lora_from_delta, write_lora_adapter

__all__ += [
    "EditError",
    "EditInputs",
    "LoraExportError",
    "ModelFolderWriter",
    "Recipe",
    "RecipeError",
    "apply_edit",
    "available_methods",
    "check_members",
    "get_method",
    "load_recipe",
    "lora_from_delta",
    "register",
    "ties_delta",
    "write_lora_adapter",
    "write_model_folder",
]
