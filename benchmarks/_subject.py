"""The subject: ``PersistentTokenCache`` opened the way the benchmarks need it.

The core is imported here only, and only when a benchmark runs, so the floor and the peers
keep working while the core is missing or broken.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from agw_persist_cache import PersistentTokenCache

MAX_ROWS = 1_000_000
"""Row limits well above any benchmark size, so LRU pruning never evicts benchmark rows."""


def open_cache(path: Path, key: bytes, **config: Any) -> PersistentTokenCache:
    """A cache on ``path`` sealed with ``key``; ``config`` overrides :class:`CacheConfig` fields."""
    from agw_persist_cache import CacheConfig, PersistentTokenCache

    settings: dict[str, Any] = {
        "keys": [key],
        "max_system_token_cache_size": MAX_ROWS,
        "max_user_token_cache_size": MAX_ROWS,
        **config,
    }
    return PersistentTokenCache(path, config=CacheConfig(**settings))


def populate_cache(
    cache: PersistentTokenCache, scopes: Sequence[str], tokens: Sequence[str], expires_at: float
) -> tuple[float, str]:
    """Fill ``cache``; returns (seconds, how).

    Fast route: the cache's own sealing and write plan for every row (exactly what
    ``set_system_token`` writes), run in ONE transaction: 100,000 separate sets take ~45 s
    on a busy 2-core machine. It reaches private names, so when they change the fill falls
    back to the public ``set_system_token`` loop (and the smoke test still passes).
    """
    t0 = time.perf_counter()
    try:
        _bulk_fill(cache, scopes, tokens, expires_at)
        how = "one transaction of the cache's own set plans"
    except (AttributeError, TypeError, ImportError):
        for scope, token in zip(scopes, tokens, strict=True):
            cache.set_system_token(scope, token, expires_at=expires_at)
        how = "set_system_token per row"
    return time.perf_counter() - t0, how


def _bulk_fill(cache: Any, scopes: Sequence[str], tokens: Sequence[str], expires_at: float) -> None:
    from agw_persist_cache._expiry import CachedToken
    from agw_persist_cache.backends._sqlite_sql import INSERT

    shelf, rows = cache._shelf, []
    for scope, token in zip(scopes, tokens, strict=True):
        key = shelf.key("system", scope, None)
        write = shelf.seal(key, CachedToken(token, expires_at, {}), 0, None)  # 0: a new file
        rows.append(tuple(write.row))
    cache.get_system_token(scopes[0])  # the file exists, migrated, before another connection
    conn = sqlite3.connect(cache.path, isolation_level=None)  # as another process would write
    try:
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany(INSERT.format(verb="OR REPLACE"), rows)
        conn.execute("COMMIT")
    finally:
        conn.close()
    missing = [s for s in (scopes[0], scopes[-1]) if cache.get_system_token(s) is None]
    if missing:
        raise AttributeError("bulk fill did not land; the core's internals changed")


def core_available() -> str | None:
    """``None`` when the core imports and has ``PersistentTokenCache``, else why not."""
    try:
        from agw_persist_cache import PersistentTokenCache
    except Exception as exc:  # reason: any import failure means "not ready"
        return f"{type(exc).__name__}: {exc}"
    del PersistentTokenCache
    return None
