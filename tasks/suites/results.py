"""RESULTS.md as sections, one per suite, each between its own markers (pure text).

::

    # Results
    ...
    <!-- tvsplit:suite vision begin -->
    ## Vision suite ...
    <!-- tvsplit:suite vision end -->

``replace_section`` rewrites one suite's section and keeps every other byte of the file, so
rerunning one suite never touches another suite's results. A file without any markers (one
written before sections existed) is replaced by a fresh header and the section.
"""

from __future__ import annotations

import re

HEADER = (
    "# Results\n\n"
    "Each section below is written by `tvsplit evaluate <suite>` (`make demo` writes the "
    "vision section); regenerate, do not edit. A suite rewrites only its own section.\n"
)


def begin_marker(suite: str) -> str:
    return f"<!-- tvsplit:suite {suite} begin -->"


def end_marker(suite: str) -> str:
    return f"<!-- tvsplit:suite {suite} end -->"


_ANY_MARKER = re.compile(r"<!-- tvsplit:suite \S+ (begin|end) -->")


def replace_section(text: str, suite: str, body: str) -> str:
    """``text`` with ``suite``'s section set to ``body`` (appended when it has none)."""
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", suite):
        raise ValueError(f"suite name {suite!r}: letters, digits, '_', '.', '-' only")
    block = f"{begin_marker(suite)}\n{body.strip()}\n{end_marker(suite)}\n"
    if not _ANY_MARKER.search(text):
        return f"{HEADER}\n{block}"
    begin, end = begin_marker(suite), end_marker(suite)
    start = text.find(begin)
    if start < 0:
        return text.rstrip("\n") + "\n\n" + block
    stop = text.find(end, start)
    if stop < 0:
        raise ValueError(f"RESULTS.md: section {suite!r} has a begin marker but no end marker")
    stop += len(end)
    if text[stop : stop + 1] == "\n":
        stop += 1
    return text[:start] + block + text[stop:]


def read_section(text: str, suite: str) -> str | None:
    """The body of ``suite``'s section, or None."""
    begin, end = begin_marker(suite), end_marker(suite)
    start = text.find(begin)
    if start < 0:
        return None
    stop = text.find(end, start)
    return text[start + len(begin) : stop].strip("\n") if stop >= 0 else None
