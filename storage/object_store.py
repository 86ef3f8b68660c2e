"""fsspec storage options of a catalogue URL (``s3://bucket/cat.zarr`` and the like).

Where they come from, lowest first: tvsplit's defaults for the protocol, the JSON object
in ``TVSPLIT_STORAGE_OPTIONS``, then options passed in code. Credentials and endpoints are
best left to the store's own environment (for S3: ``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_ENDPOINT_URL``), which every worker reads for itself; the
options are never logged nor written into the catalogue, and a worker on another machine
opens the same URL with its own environment.

Default for S3: no listing cache. s3fs caches directory listings per filesystem instance,
and fsspec reuses instances within a process, so a driver that listed a group before its
workers wrote into it would keep seeing the old listing (a finished run reported as
"not completed"). Reads of what other processes wrote must be current.
"""

from __future__ import annotations

import json
import os
from typing import Any

from tvsplit.storage.errors import StorageError

ENV = "TVSPLIT_STORAGE_OPTIONS"
_DEFAULTS: dict[str, dict[str, Any]] = {
    "s3": {"use_listings_cache": False},
    "s3a": {"use_listings_cache": False},
    "gs": {"use_listings_cache": False},
    "gcs": {"use_listings_cache": False},
    "abfs": {"use_listings_cache": False},
    "az": {"use_listings_cache": False},
}


class StorageOptionsError(StorageError):
    """``TVSPLIT_STORAGE_OPTIONS`` is not a JSON object."""


def protocol(url: str) -> str | None:
    """The URL's scheme (``s3``), or None for a plain local path."""
    scheme, sep, _ = str(url).partition("://")
    return scheme.lower() if sep else None


def storage_options(url: str, explicit: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """The fsspec options to open `url` with (None for a local path)."""
    scheme = protocol(url)
    if scheme is None or scheme == "file":
        return None
    options = dict(_DEFAULTS.get(scheme, {}))
    raw = os.environ.get(ENV, "").strip()
    if raw:
        try:
            parsed = json.loads(raw)
        except json.JSONDecodeError as error:
            raise StorageOptionsError(f"{ENV} is not valid JSON ({error.msg})") from None
        if not isinstance(parsed, dict):
            raise StorageOptionsError(f"{ENV} must be a JSON object of fsspec options")
        options.update(parsed)
    options.update(explicit or {})
    return options
