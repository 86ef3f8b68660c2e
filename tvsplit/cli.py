"""Console entry point `tvsplit` (the app itself lives in `tvsplit.flows.cli`).

Quiet, offline-friendly defaults for the engines, set before they are imported; a user's
own environment always wins.
"""

import time

_ENTERED = time.time()  # first: benchmarks/cli_bench.py measures the interpreter's start-up

import logging  # noqa: E402
import os  # noqa: E402

for _key, _value in {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "1",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "PREFECT_LOGGING_LEVEL": "WARNING",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90",
}.items():
    os.environ.setdefault(_key, _value)
logging.getLogger("distributed").setLevel(logging.WARNING)

from tvsplit.tasks import stages  # noqa: E402

stages.mark_entered(_ENTERED)
with stages.stage("imports"):
    from tvsplit.flows.cli import app

__all__ = ["app"]

if __name__ == "__main__":
    app()
