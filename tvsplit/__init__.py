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
