"""A module imported on first use, so that importing tvsplit's modules stays cheap.

``torch = lazy_module("torch")`` at the top of a module binds a stand-in that imports
torch the first time one of its attributes is read (``torch.float32``, ``torch.Tensor``);
until then torch is not imported at all (it is not put in ``sys.modules``, so no other
library sees a half-imported module). Use it for the heavy libraries (torch, Prefect,
MLflow, Dask) in modules that commands with no model work import: their functions pay
the import when they run, the commands that never call them never do. For type checkers,
import the real module under ``TYPE_CHECKING``::

    if TYPE_CHECKING:
        import torch
    else:
        torch = lazy_module("torch")

An attribute, once read, is kept on the stand-in, so later reads cost what a module
attribute costs.
"""

from __future__ import annotations

import importlib
import types
from typing import Any

__all__ = ["lazy_module"]


class _LazyModule(types.ModuleType):
    def __getattr__(self, attribute: str) -> Any:
        if attribute.startswith("__") and attribute.endswith("__"):
            raise AttributeError(attribute)  # copy/pickle/inspect probes import nothing
        value = getattr(importlib.import_module(self.__name__), attribute)
        setattr(self, attribute, value)
        return value

    def __repr__(self) -> str:
        return f"<lazy module {self.__name__!r}>"


def lazy_module(name: str) -> types.ModuleType:
    """A stand-in for module ``name`` that imports it when an attribute is first read."""
    return _LazyModule(name)
