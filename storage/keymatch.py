"""Matching parameter names across checkpoints that differ only by wrapper prefixes."""

from __future__ import annotations

from collections.abc import Iterable

PREFIXES = ("base_model.model.", "model.", "transformer.")
_MAX_STRIPS = 3


def _candidates(name: str) -> list[str]:
    """`name` with up to three known prefixes stripped, nearest first."""
    out = [name]
    frontier = [name]
    for _ in range(_MAX_STRIPS):
        frontier = [c[len(p) :] for c in frontier for p in PREFIXES if c.startswith(p)]
        out.extend(frontier)
    return list(dict.fromkeys(out))


def match_name(name: str, targets: set[str]) -> str | None:
    """The name in `targets` that `name` refers to, or None.

    Exact match first; then `name` with known prefixes (``base_model.model.``, ``model.``,
    ``transformer.``) stripped, then with one of them added to a stripped form.
    """
    candidates = _candidates(name)
    for candidate in candidates:
        if candidate in targets:
            return candidate
    for candidate in candidates:
        for prefix in PREFIXES:
            if prefix + candidate in targets:
                return prefix + candidate
    return None


def match_names(names: Iterable[str], targets: Iterable[str]) -> tuple[dict[str, str], list[str]]:
    """Map each of `names` to its counterpart in `targets`.

    Returns `(matched, unmatched)`: `matched` maps target name → source name. Raises
    ValueError when two names map to the same target (ambiguous checkpoint).
    """
    target_set = set(targets)
    matched: dict[str, str] = {}
    unmatched: list[str] = []
    for name in names:
        target = match_name(name, target_set)
        if target is None:
            unmatched.append(name)
        elif target in matched:
            raise ValueError(f"parameters {matched[target]!r} and {name!r} both match {target!r}")
        else:
            matched[target] = name
    return matched, unmatched
