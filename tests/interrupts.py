"""A stop for tests of interrupted writes."""

from __future__ import annotations


class Killed(BaseException):
    """A stop no handler catches, raised inside a write (also on zarr's event loop: asyncio
    hands KeyboardInterrupt to the loop itself, so tests cannot use that)."""
