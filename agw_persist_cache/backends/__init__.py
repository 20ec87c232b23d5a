"""Storage backends behind one contract (``contract.py``): SQLite (one host) and Redis
(many hosts). :func:`open_backend` picks one from the cache's location."""

from __future__ import annotations

from pathlib import Path

from .._config import CacheConfig
from .._log import Warnings
from .contract import Backend
from .sqlite import SqliteBackend


def open_backend(path: Path, url: str | None, config: CacheConfig, warnings: Warnings) -> Backend:
    """The SQLite file at ``path``, or the networked store at ``url`` when one is given."""
    if url is None:
        return SqliteBackend(path, config, warnings)
    from .._errors import CacheConfigError

    raise CacheConfigError("networked cache URLs are not supported by this version yet")


__all__ = ["Backend", "SqliteBackend", "open_backend"]
