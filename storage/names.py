"""Reversible mapping between parameter names and zarr-safe node keys.

Parameter names such as ``h.0.attn.c_attn.weight`` are kept readable: letters, digits,
``.``, ``_`` and ``-`` pass through; any other character (and ``~`` itself) becomes
``~XX`` per UTF-8 byte, a leading ``__`` (reserved by zarr) and the names ``.``/``..``
are escaped too. `param_name(param_key(n)) == n` for every non-empty string `n`.
"""

from __future__ import annotations

import re

_SAFE = re.compile(r"[A-Za-z0-9._-]")
_ESCAPE = re.compile(r"~([0-9A-F]{2})")
_NODE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


def _escape(char: str) -> str:
    return "".join(f"~{byte:02X}" for byte in char.encode("utf-8"))


def param_key(name: str) -> str:
    """The zarr node key under which parameter `name` is stored."""
    if not name:
        raise ValueError("a parameter name must not be empty")
    key = "".join(ch if _SAFE.fullmatch(ch) else _escape(ch) for ch in name)
    if key.startswith("__"):
        key = _escape("_") + key[1:]
    if key in {".", ".."}:
        key = key.replace(".", _escape("."))
    return key


def param_name(key: str) -> str:
    """The parameter name stored under zarr node `key` (inverse of `param_key`)."""
    raw = bytearray()
    pos = 0
    for match in _ESCAPE.finditer(key):
        raw += key[pos : match.start()].encode("utf-8")
        raw.append(int(match.group(1), 16))
        pos = match.end()
    raw += key[pos:].encode("utf-8")
    return raw.decode("utf-8")


def check_node_name(kind: str, value: str) -> str:
    """Return `value` if it is a valid family/member/run name, else raise ValueError naming it."""
    if not _NODE.match(value):
        raise ValueError(
            f"{kind} name {value!r} is not allowed: use letters, digits, '.', '_' or '-', "
            "starting with a letter or digit (at most 128 characters)"
        )
    return value
