"""Storage backends behind one contract (``contract.py``): SQLite (one host) and Redis
(many hosts). :func:`open_backend` picks one from the cache's location."""

from __future__ import annotations

from pathlib import Path

from .._config import CacheConfig
from .._errors import CacheConfigError
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
    try:
        from .redis import RedisBackend
    except ImportError as exc:
        if exc.name is None or exc.name.partition(".")[0] != "redis":
            raise
        raise CacheConfigError(
            "a redis:// cache URL needs the redis client: pip install 'agw-persist-cache[redis]'"
        ) from None
    try:
        return RedisBackend(url, config, warnings)
    except CacheConfigError:
        raise  # says what is wrong with the URL already
    except ValueError:  # redis-py's URL parser (its message may quote the URL: not shown)
        raise CacheConfigError(
            "cache URL is not a valid Redis URL; expected redis://[user:password@]host:port/db, "
            "rediss://... or unix:///path/to/socket"
        ) from None


__all__ = ["Backend", "SqliteBackend", "open_backend"]
