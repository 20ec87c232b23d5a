"""``sap_cloud_sdk.adms.TokenCache`` on the persistent cache: ADMS tokens shared host-wide.

Also has the shape of the SDK's proposed ``CacheBackend`` (``get``/``set``/``delete``/``clear``)
so it plugs in unchanged when that lands.
"""

from __future__ import annotations

import time

from agw_persist_cache import PersistentTokenCache

from ._sap_compat import TokenCache
from ._sap_time import stored_expiry

_SCOPE_PREFIX = "sap-cloud-sdk/adms:"


class AdmsTokenCache(TokenCache):
    """A ``TokenCache`` for ``IasTokenFetcher(cache=...)`` backed by a PersistentTokenCache.

    ``IasTokenFetcher`` uses the fixed key ``"cc"`` for its client-credentials token, so give
    each ADMS credential its own ``namespace`` (e.g. its client id) when several share a host.
    """

    def __init__(self, cache: PersistentTokenCache, *, namespace: str = "default") -> None:
        self.cache = cache
        self._prefix = f"{_SCOPE_PREFIX}{namespace}:"

    def get(self, key: str) -> str | None:
        """The token stored under ``key`` by any process, or None when missing or expired."""
        return self.cache.get_system_token(self._prefix + key)

    def set(self, key: str, token: str, ttl_seconds: int) -> None:
        """Store ``token`` for ``ttl_seconds`` (the SDK already took its margin off)."""
        if ttl_seconds <= 0:
            self.delete(key)
            return
        expires_at = stored_expiry(self.cache, time.time() + ttl_seconds)
        self.cache.set_system_token(self._prefix + key, token, expires_at=expires_at)

    def delete(self, key: str) -> None:
        """Forget ``key`` in every process (e.g. after a 401)."""
        self.cache.invalidate_system_token(self._prefix + key)

    def clear(self) -> None:
        """Truncate the whole token table (every kind and namespace) for every process."""
        self.cache.clear()
