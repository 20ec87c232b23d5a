"""The process-wide default cache the SDK drop-ins use when no ``cache=`` is given."""

from __future__ import annotations

import threading
from pathlib import Path

from agw_persist_cache import PersistentTokenCache
from agw_persist_cache._config import resolve_path

_defaults: dict[Path, PersistentTokenCache] = {}
_defaults_lock = threading.Lock()


def default_cache() -> PersistentTokenCache:
    """This process's cache at the default path (``$AGW_CACHE_PATH`` or the user cache dir)."""
    path = resolve_path(None)
    with _defaults_lock:
        cache = _defaults.get(path)
        if cache is None:
            cache = _defaults[path] = PersistentTokenCache(path)
        return cache
