"""PersistentTokenCache: the public API. Each call goes down once, and never back up.

A get-or-fetch (``system_token``, ``user_token``, ``fetch_entry`` and their ``a`` twins),
file by file:

1. ``_cache`` (here): checks that ``fetch`` can be called, and hands the call to
   :class:`~._flight.Flights`.
2. ``_flight``: derives the key once (``_shelf.TokenShelf.key``, with ``_crypto``'s
   digests) and reads the store once (``backends``: one SELECT on SQLite, one GET on
   Redis); ``_shelf`` judges the row (opened by ``_crypto``, or remembered by ``_memory``).
   A clean hit returns here.
3. Otherwise ``_flight`` runs one flow with ``_steps``' driver: the read's follow-up write,
   or the single flight of a miss: join the key's flight in this process (``_locks``),
   take the cross-process lock (``backends``: an OFD byte-range lock, a stripe file, or a
   Redis lease), read again, check back-off, call ``fetch``, hand the token to this
   process's waiters, store it (``_writes.store``: sealed by ``_shelf`` and ``_crypto``),
   give the lock back.

Sets and invalidations are flows of ``_writes``; clear and prune too; ``stats``,
``list_entries``, ``check_keys`` and ``reseal`` are flows of ``_survey``. All run through
the same two drivers of ``_flight`` (plain calls, awaits).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal, TypeAlias

from . import _otel, _survey, _writes
from ._closing import Closing
from ._config import ENV_KEY, CacheConfig, resolve_path, split_location
from ._crypto import keys_from_config
from ._errors import CacheConfigError, CacheUsageError
from ._expiry import CachedToken, TokenData
from ._files import lock_dir_of
from ._flight import AFetch, Fetch, Flights
from ._log import Warnings
from ._shelf import TokenShelf
from ._stats import CacheStats, Counters, EntryInfo, KeyVerdict
from .backends import open_backend

Kind: TypeAlias = Literal["system", "user"]
_SET = _writes.set_token


class PersistentTokenCache(Closing):
    """An encrypted token cache shared by every process on the host (or, with a Redis URL,
    by every replica).

    ``path`` (or ``config.path``, ``$AGW_CACHE_PATH``, the user cache dir) names the
    SQLite database; ``url`` (or ``config.url``, ``$AGW_CACHE_URL``) a networked store.
    ``read_only=True`` (diagnostics) reads an existing store and creates or writes nothing.
    Keys come from ``config.keys``, ``$AGW_CACHE_KEY`` or a 0600 key file beside the
    database. Storage failures never fail a get or a get-or-fetch: they degrade to
    fetching.
    """

    def __init__(
        self,
        path: str | os.PathLike[str] | None = None,
        *,
        config: CacheConfig | None = None,
        url: str | None = None,
        read_only: bool = False,
    ) -> None:
        self.config = config or CacheConfig()
        self.read_only = read_only
        path, url = split_location(
            path if path is not None else self.config.path,
            url if url is not None else self.config.url,
        )
        self.path: Path = resolve_path(path)
        if url is not None and keys_from_config(self.config) is None:
            raise CacheConfigError(  # every host must open every row
                "a shared (redis://) cache needs the same explicit key on every host: set "
                f"{ENV_KEY} or CacheConfig.keys (a per-host key file cannot work there)"
            )
        self.lock_dir: Path = lock_dir_of(self.path)
        warnings = Warnings()
        self._backend = open_backend(self.path, url, self.config, warnings, read_only=read_only)
        self._shelf = TokenShelf(
            self.path, self.config, self._backend, warnings, read_only=read_only
        )
        self._flights = Flights(self._shelf, self._backend)
        self._counters = self._shelf.counters  # what OpenTelemetry's callbacks read
        self._health = self._shelf.health
        self.backend_name: str = self._backend.name
        _otel.register(self)

    @property
    def counters(self) -> Counters:
        """This process's event counters (also in :meth:`stats`)."""
        return self._shelf.counters

    @property
    def key_source(self) -> str:
        """Where the keys come from: ``config``, ``env`` or ``file``."""
        return self._shelf.key_source

    @property
    def key_file(self) -> Path | None:
        """The key file, when no key is given explicitly."""
        return self._shelf.key_file

    @property
    def location(self) -> str:
        """Where the store is: the SQLite file, or the URL with any password as ``***``."""
        return self._backend.location

    @property
    def key_ids(self) -> tuple[str, ...]:
        """Public ids of the configured keys, the sealing key first."""
        ring = self._shelf.ring()
        return ring.kids if ring else ()

    # -- entry-level API: the core ---------------------------------------------------------------

    def get_entry(
        self, kind: Kind, scope_key: str, *, user_jwt: str | None = None
    ) -> CachedToken | None:
        """The cached token, or None (missing, expired within the buffer, unreadable)."""
        return self._flights.get(kind, scope_key, user_jwt)

    async def aget_entry(
        self, kind: Kind, scope_key: str, *, user_jwt: str | None = None
    ) -> CachedToken | None:
        """Async twin of ``get_entry``: a hit stays on the loop's thread, with no hop."""
        return await self._flights.aget(kind, scope_key, user_jwt)

    def set_entry(
        self,
        kind: Kind,
        scope_key: str,
        token_data: TokenData,
        *,
        user_jwt: str | None = None,
        expires_at: float | None = None,
    ) -> CachedToken:
        """Store a token, committed and visible to every process when this returns.

        Returns the token as stored; one that could not be stored (storage trouble) is
        counted in ``stats().sets_not_stored`` and warned about (``set_*_token`` return
        False).
        """
        return self._flights.on_key(_SET, kind, scope_key, user_jwt, token_data, expires_at)[0]

    async def aset_entry(
        self,
        kind: Kind,
        scope_key: str,
        token_data: TokenData,
        *,
        user_jwt: str | None = None,
        expires_at: float | None = None,
    ) -> CachedToken:
        """Async twin of ``set_entry``."""
        flights = self._flights
        return (await flights.aon_key(_SET, kind, scope_key, user_jwt, token_data, expires_at))[0]

    def invalidate_entry(
        self, kind: Kind, scope_key: str, *, user_jwt: str | None = None, token: str | None = None
    ) -> bool:
        """Forget a token in every process (e.g. after the server answered 401).

        With ``token``, only if the cache still holds that very token: a replacement another
        process fetched meanwhile stays. Returns whether a row was removed; raises
        ``CacheStorageError`` if the store could not be changed (a revoked token must not
        stay in service silently).
        """
        return self._flights.on_key(_writes.invalidate, kind, scope_key, user_jwt, token)

    async def ainvalidate_entry(
        self, kind: Kind, scope_key: str, *, user_jwt: str | None = None, token: str | None = None
    ) -> bool:
        """Async twin of ``invalidate_entry``."""
        return await self._flights.aon_key(_writes.invalidate, kind, scope_key, user_jwt, token)

    def fetch_entry(
        self, kind: Kind, scope_key: str, fetch: Fetch, *, user_jwt: str | None = None
    ) -> CachedToken:
        """Get-or-fetch with single flight: one ``fetch`` per key for every process on the
        host; a token near its expiry is refreshed in a background thread."""
        _check_fetch(fetch)
        return self._flights.fetch(kind, scope_key, user_jwt, fetch)

    async def afetch_entry(
        self, kind: Kind, scope_key: str, afetch: AFetch, *, user_jwt: str | None = None
    ) -> CachedToken:
        """Async twin of ``fetch_entry`` (the refresh runs as a task of this loop)."""
        _check_fetch(afetch)
        return await self._flights.afetch(kind, scope_key, user_jwt, afetch)

    # -- the system / user API of sap-cloud-sdk's _TokenCache, plus get-or-fetch ---------------

    def get_system_token(self, scope_key: str) -> str | None:
        """The cached system token for ``scope_key``, or None."""
        return _token(self.get_entry("system", scope_key))

    def set_system_token(
        self, scope_key: str, token_data: TokenData, *, expires_at: float | None = None
    ) -> bool:
        """Store a system token (``expires_at`` epoch seconds overrides the response).

        Returns whether it was stored (False: counted and warned, e.g. disk full)."""
        return self._flights.on_key(_SET, "system", scope_key, None, token_data, expires_at)[1]

    def invalidate_system_token(self, scope_key: str) -> None:
        """Forget a system token in every process."""
        self.invalidate_entry("system", scope_key)

    def get_user_token(self, user_jwt: str, scope_key: str) -> str | None:
        """The cached token exchanged for ``user_jwt``, or None."""
        return _token(self.get_entry("user", scope_key, user_jwt=user_jwt))

    def set_user_token(
        self,
        user_jwt: str,
        scope_key: str,
        token_data: TokenData,
        *,
        expires_at: float | None = None,
    ) -> bool:
        """Store a user token; returns whether it was stored."""
        return self._flights.on_key(_SET, "user", scope_key, user_jwt, token_data, expires_at)[1]

    def invalidate_user_token(self, user_jwt: str, scope_key: str) -> None:
        """Forget a user token in every process."""
        self.invalidate_entry("user", scope_key, user_jwt=user_jwt)

    def system_token(self, scope_key: str, fetch: Fetch) -> str:
        """Get-or-fetch a system token; one ``fetch`` per key for the whole host."""
        return self.fetch_entry("system", scope_key, fetch).token

    def user_token(self, user_jwt: str, scope_key: str, fetch: Fetch) -> str:
        """Get-or-fetch a user token; one ``fetch`` per user and scope for the whole host."""
        return self.fetch_entry("user", scope_key, fetch, user_jwt=user_jwt).token

    async def aget_system_token(self, scope_key: str) -> str | None:
        """Async twin of ``get_system_token``."""
        return _token(await self.aget_entry("system", scope_key))

    async def aset_system_token(
        self, scope_key: str, token_data: TokenData, *, expires_at: float | None = None
    ) -> bool:
        """Async twin of ``set_system_token``."""
        return (
            await self._flights.aon_key(_SET, "system", scope_key, None, token_data, expires_at)
        )[1]

    async def ainvalidate_system_token(self, scope_key: str) -> None:
        """Async twin of ``invalidate_system_token``."""
        await self.ainvalidate_entry("system", scope_key)

    async def aget_user_token(self, user_jwt: str, scope_key: str) -> str | None:
        """Async twin of ``get_user_token``."""
        return _token(await self.aget_entry("user", scope_key, user_jwt=user_jwt))

    async def aset_user_token(
        self,
        user_jwt: str,
        scope_key: str,
        token_data: TokenData,
        *,
        expires_at: float | None = None,
    ) -> bool:
        """Async twin of ``set_user_token``."""
        return (
            await self._flights.aon_key(_SET, "user", scope_key, user_jwt, token_data, expires_at)
        )[1]

    async def ainvalidate_user_token(self, user_jwt: str, scope_key: str) -> None:
        """Async twin of ``invalidate_user_token``."""
        await self.ainvalidate_entry("user", scope_key, user_jwt=user_jwt)

    async def asystem_token(self, scope_key: str, afetch: AFetch) -> str:
        """Async twin of ``system_token``."""
        return (await self.afetch_entry("system", scope_key, afetch)).token

    async def auser_token(self, user_jwt: str, scope_key: str, afetch: AFetch) -> str:
        """Async twin of ``user_token``."""
        return (await self.afetch_entry("user", scope_key, afetch, user_jwt=user_jwt)).token

    # -- whole-cache operations ----------------------------------------------------------------

    def clear(self) -> None:
        """Empty the cache for every process; in-flight fetches will not write back.

        Raises ``CacheStorageError`` if the store could not be changed."""
        self._flights.run(_writes.clear)

    async def aclear(self) -> None:
        """Async twin of ``clear``."""
        await self._flights.arun(_writes.clear)

    def prune(self) -> int:
        """Remove expired rows, then least recently used ones over the size limits; returns
        how many went. Raises ``CacheStorageError`` if the store could not be changed."""
        return self._flights.run(_writes.prune)

    async def aprune(self) -> int:
        """Async twin of ``prune``."""
        return await self._flights.arun(_writes.prune)

    def stats(self) -> CacheStats:
        """Counters of this process and facts about the store shared by all."""
        return self._flights.run(_survey.facts)

    async def astats(self) -> CacheStats:
        """Async twin of ``stats``."""
        return await self._flights.arun(_survey.facts)

    def list_entries(self) -> list[EntryInfo]:
        """One record per row: metadata only, never a token, scope or user."""
        return self._flights.run(_survey.entries)

    async def alist_entries(self) -> list[EntryInfo]:
        """Async twin of ``list_entries``."""
        return await self._flights.arun(_survey.entries)

    def reseal(self, *, batch: int = 256) -> int:
        """Re-seal every row not under the primary key, in small transactions (workers keep
        reading and writing meanwhile); rows no configured key opens are left to expire."""
        return self._flights.run(_survey.reseal, batch)

    async def areseal(self, *, batch: int = 256) -> int:
        """Async twin of ``reseal``."""
        return await self._flights.arun(_survey.reseal, batch)

    def check_keys(self) -> KeyVerdict | None:
        """Whether the configured keys open the stored rows (and which key ids wrote them);
        None without a usable key or without rows. One bounded read, whatever the size;
        raises ``CacheStorageError`` if the store cannot answer."""
        return self._flights.run(_survey.checked_keys)

    async def acheck_keys(self) -> KeyVerdict | None:
        """Async twin of ``check_keys``."""
        return await self._flights.arun(_survey.checked_keys)

    def close(self) -> None:
        """Close this process's connections (the store and other processes are unaffected)."""
        self._backend.close()

    async def aclose(self) -> None:
        """Async twin of ``close``; also cancels this loop's background refreshes."""
        for task in list(self._flights.tasks):
            task.cancel()
        await self._backend.aclose()

    def __repr__(self) -> str:
        return (
            f"PersistentTokenCache(path={str(self.path)!r}, backend={self._backend.name!r}, "
            f"key_source={self.key_source!r})"
        )


def _token(entry: CachedToken | None) -> str | None:
    return entry.token if entry else None


def _check_fetch(fetch: object) -> None:
    """A fetch that cannot be called is the caller's bug: said before any lock or back-off."""
    if not callable(fetch):
        raise CacheUsageError(f"fetch must be callable, not {type(fetch).__name__}")
