"""Errors raised by `storage`: every message names the source, file or entry concerned."""

from __future__ import annotations


class StorageError(ValueError):
    """Bad input found while reading a source or the catalogue (retrying will not help)."""


class SourceError(StorageError):
    """A model source that cannot be used as given: bad string, unknown layout, bad tensor."""


class PickleRefusedError(SourceError):
    """A pickle checkpoint (`.bin`, `.pt`) met without `allow_pickle=True`."""


class CatalogueError(StorageError):
    """A catalogue entry that is absent, incomplete, or does not hold what was asked for."""


class SourceUnavailableError(ConnectionError):
    """A source that could not be reached (network, hub outage, offline without a cache).

    A `ConnectionError`, so retry policies can tell it apart from bad input.
    """
