"""Storage backends behind one contract (``contract.py``): SQLite (one host) and Redis
(many hosts). :func:`open_backend` picks one from the cache's location."""

from __future__ import annotations

from pathlib import Path

from .._config import CacheConfig
from .._log import Warnings
from .contract import Backend
from .sqlite import SqliteBackend


def open_backend(
    path: Path, url: str | None, config: CacheConfig, warnings: Warnings, *, read_only: bool = False
) -> Backend:
    """The SQLite file at ``path``, or the networked store at ``url`` when one is given.

    ``read_only``: for diagnostics; an existing store is read, nothing is created or written.
    """
    if url is None:
        return SqliteBackend(path, config, warnings, read_only=read_only)
    from .._errors import CacheConfigError

    raise CacheConfigError("networked cache URLs are not supported by this version yet")


__all__ = ["Backend", "SqliteBackend", "open_backend"]
