"""The process-wide default cache the SDK drop-ins use when no ``cache=`` is given."""

from __future__ import annotations

import threading
from pathlib import Path

from agw_persist_cache import PersistentTokenCache
from agw_persist_cache._config import resolve_path, split_location

_defaults: dict[Path | str, PersistentTokenCache] = {}
_defaults_lock = threading.Lock()


def default_cache() -> PersistentTokenCache:
    """This process's cache at the default location: ``$AGW_CACHE_URL`` (a store shared by
    many hosts), else ``$AGW_CACHE_PATH`` or the user cache dir."""
    _, url = split_location(None, None)
    where: Path | str = url if url is not None else resolve_path(None)
    with _defaults_lock:
        cache = _defaults.get(where)
        if cache is None:
            cache = _defaults[where] = PersistentTokenCache()
        return cache
