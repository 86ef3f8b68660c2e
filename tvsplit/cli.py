"""Console entry point `tvsplit` (the app itself lives in `flows.cli`)."""

from flows.cli import app

__all__ = ["app"]

if __name__ == "__main__":
    app()
