"""The one registry of evaluation suites: built-in suites and plugins.

Built-in suites are listed in ``BUILTIN`` (name → ``module:Class``) and imported on first
use; another installed package adds suites with an entry point in the ``tvsplit.suites``
group (``toy = "my_package.toy:ToySuite"``), found the way pytest and Prefect find plugins.
``register`` adds a class directly (tests, notebooks). Suite modules import without torch,
Prefect, Dask or MLflow, so ``available_suites()`` is fast.
"""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points
from typing import TYPE_CHECKING

from tvsplit.tasks.suites.base import SuiteError

if TYPE_CHECKING:
    from tvsplit.tasks.suites.base import Suite

ENTRY_POINT_GROUP = "tvsplit.suites"

BUILTIN: dict[str, str] = {
    "style": "tvsplit.tasks.suites.style.suite:StyleSuite",
    "style-lora": "tvsplit.tasks.suites.style.suite:StyleLoraSuite",
    "vision": "tvsplit.tasks.suites.vision.suite:VisionSuite",
}

_registered: dict[str, type[Suite]] = {}


def register(cls: type[Suite]) -> type[Suite]:
    """Class decorator: register a ``Suite`` subclass under its ``name``."""
    from tvsplit.tasks.suites.base import Suite

    if not (isinstance(cls, type) and issubclass(cls, Suite)):
        raise SuiteError(f"{cls!r} is not a Suite subclass")
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        raise SuiteError(f"suite class {cls.__qualname__} has no name")
    for preset in ("small", "full"):
        if preset not in cls.presets:
            raise SuiteError(f"suite {name!r} has no {preset!r} preset (every suite needs both)")
    _registered[name] = cls
    return cls


def _load(target: str, where: str) -> type[Suite]:
    module_name, _, attribute = target.partition(":")
    try:
        cls = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as error:
        raise SuiteError(f"{where}: cannot load suite {target!r}: {error}") from None
    return register(cls)


def _plugin_targets() -> dict[str, str]:
    return {ep.name: ep.value for ep in entry_points(group=ENTRY_POINT_GROUP)}


def suite_names() -> list[str]:
    """Every registered suite name (built-in, plugins, registered), sorted, without
    importing any suite module."""
    return sorted({*BUILTIN, *_plugin_targets(), *_registered})


def get_suite(name: str) -> type[Suite]:
    """The suite class registered as ``name``; SuiteError naming the choices otherwise."""
    if name in _registered:
        return _registered[name]
    if name in BUILTIN:
        return _load(BUILTIN[name], "built-in suite")
    plugins = _plugin_targets()
    if name in plugins:
        return _load(plugins[name], f"entry point {name!r} in group {ENTRY_POINT_GROUP!r}")
    raise SuiteError(f"no suite {name!r}; registered suites: {', '.join(suite_names())}")


def available_suites() -> dict[str, type[Suite]]:
    """Name → suite class for every registered suite (imports the suite modules: light)."""
    return {name: get_suite(name) for name in suite_names()}
