"""Rank rules of a member's basis, parsed: ``gavish-donoho``, ``energy:E``, ``fixed:R``,
``fraction:F`` (METHOD.md). No torch: the split settings check a rule when they are made,
before any engine starts; `tasks.ranks` applies it.
"""

from __future__ import annotations

from dataclasses import dataclass

RULES = ("gavish-donoho", "energy", "fixed", "fraction")


class RankRuleError(ValueError):
    """A rank rule that cannot be parsed or has a value out of range."""


@dataclass(frozen=True)
class RankRule:
    """A parsed rank rule: ``kind`` is one of RULES, ``value`` its parameter (None for GD)."""

    kind: str
    value: float | None = None

    def __str__(self) -> str:
        if self.value is None:
            return self.kind
        value = int(self.value) if self.kind == "fixed" else self.value
        return f"{self.kind}:{value}"


def parse_rank_rule(rule: str | RankRule) -> RankRule:
    """Parse ``"gavish-donoho"``, ``"energy:0.9"``, ``"fixed:16"`` or ``"fraction:0.1"``."""
    if isinstance(rule, RankRule):
        return rule
    text = str(rule).strip().lower()
    if text in ("gavish-donoho", "gd"):
        return RankRule("gavish-donoho")
    kind, sep, raw = text.partition(":")
    if not sep or kind not in RULES[1:]:
        raise RankRuleError(
            f"unknown rank rule {rule!r}; use 'gavish-donoho', 'energy:E' (0<E<=1), "
            "'fixed:R' (R>=1) or 'fraction:F' (0<F<=1)"
        )
    try:
        value = float(raw)
    except ValueError:
        raise RankRuleError(f"rank rule {rule!r}: {raw!r} is not a number") from None
    if kind == "fixed" and (value < 1 or value != int(value)):
        raise RankRuleError(f"rank rule {rule!r}: fixed rank must be a whole number >= 1")
    if kind in ("energy", "fraction") and not 0 < value <= 1:
        raise RankRuleError(f"rank rule {rule!r}: {kind} must be in (0, 1]")
    return RankRule(kind, value)
