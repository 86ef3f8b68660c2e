"""Extensions from other installed packages, found through entry points (the way pytest and
Prefect find plugins).

A package registers tvsplit extensions by naming, in its metadata, a module to import::

    [project.entry-points."tvsplit.estimators"]
    my-estimator = "my_package.estimator"        # importing it calls register_estimator

Groups: ``tvsplit.estimators`` (`tasks.estimators.register_estimator`),
``tvsplit.edit_methods`` (`tasks.edit.register`) and ``tvsplit.sources``
(`storage.source_kinds.register_source_kind`), whose registries call
``load_entry_points(group)`` before they answer a lookup (a group is loaded once per
process), and ``tvsplit.suites`` (`tasks.suites.registry`, whose entry points name a suite
class, imported on first use). Standard library
only, so any layer can import it.
"""

from __future__ import annotations

from importlib.metadata import EntryPoint, entry_points
from typing import Any

GROUPS = ("tvsplit.estimators", "tvsplit.edit_methods", "tvsplit.sources", "tvsplit.suites")

_loaded: dict[str, dict[str, Any]] = {}


class PluginError(ImportError):
    """An entry point that cannot be loaded; the message names the group, entry and package."""


def plugin_entry_points(group: str) -> list[EntryPoint]:
    """The entry points of `group` in every installed distribution (none imported)."""
    return sorted(entry_points(group=group), key=lambda ep: ep.name)


def load_entry_point(entry: EntryPoint, group: str) -> Any:
    """Import one entry point (its module registers what it defines); PluginError naming it
    when its module or object cannot be loaded."""
    try:
        return entry.load()
    except Exception as error:
        package = f" of {entry.dist.name}" if entry.dist is not None else ""
        raise PluginError(
            f"plugin {entry.name!r}{package} in group {group!r} ({entry.value}) cannot be "
            f"loaded: {type(error).__name__}: {error}"
        ) from None


def load_entry_points(group: str) -> dict[str, Any]:
    """Load every entry point of `group` once per process; name → loaded object."""
    if group not in _loaded:
        _loaded[group] = {}  # set first: a plugin importing its registry does not recurse
        try:
            for entry in plugin_entry_points(group):
                _loaded[group][entry.name] = load_entry_point(entry, group)
        except PluginError:
            del _loaded[group]  # the next lookup reports the same error
            raise
    return _loaded[group]


def forget_loaded(group: str | None = None) -> None:
    """Load `group` (every group when None) again on next use (tests, notebooks)."""
    if group is None:
        _loaded.clear()
    else:
        _loaded.pop(group, None)
