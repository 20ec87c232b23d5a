"""PersistentTokenCache: the public API, each call one flight run by a sync or async driver.

The entry-level methods (``get_entry``, ``set_entry``, ``invalidate_entry``,
``fetch_entry``, their ``a`` twins) are the core; the token-level names of
sap-cloud-sdk's ``_TokenCache`` are thin aliases of them. The decisions live once, in
``_shelf`` and ``_flight``: every method here builds a flight and hands it to
:meth:`_run` (plain calls) or :meth:`_arun` (awaits).
"""

from __future__ import annotations

import asyncio
import os
import threading
from pathlib import Path
from typing import Any, Literal, TypeAlias, TypeVar

from . import _fork, _otel, _survey
from ._closing import Closing
from ._config import ENV_KEY, CacheConfig, resolve_path, split_location
from ._crypto import keys_from_config
from ._errors import CacheConfigError, CacheUsageError
from ._expiry import CachedToken, TokenData
from ._files import lock_dir_of
from ._flight import AFetch, Driver, Fetch, Flight, Hit, Key, fill
from ._locks import KeyLocks
from ._log import Warnings
from ._shelf import TokenShelf
from ._stats import CacheStats, Counters, EntryInfo, KeyVerdict
from .backends import open_backend

Kind: TypeAlias = Literal["system", "user"]
T = TypeVar("T")


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
        self._counters = self._shelf.counters  # what OpenTelemetry's callbacks read
        self._health = self._shelf.health
        self.backend_name: str = self._backend.name
        self._fork_reset()
        _otel.register(self)

    def _fork_reset(self) -> None:
        self._forks = _fork.forks
        self._driver = Driver(self._backend, KeyLocks(self._backend), self._shelf.health)
        self._tasks: set[asyncio.Task[Any]] = set()

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

    # -- the two drivers -------------------------------------------------------------------------

    def _run(self, flight: Flight[T], fetch: Fetch | None = None) -> T:
        if self._forks != _fork.forks:
            self._fork_reset()
        return self._driver.run(flight, fetch)

    async def _arun(self, flight: Flight[T], afetch: AFetch | None = None) -> T:
        if self._forks != _fork.forks:
            self._fork_reset()
        if self._shelf.needs_key_file:  # read or create it off the event loop's thread
            await asyncio.to_thread(self._shelf.ring)
        return await self._driver.arun(flight, afetch)

    # -- entry-level API: the core ---------------------------------------------------------------

    def get_entry(
        self, kind: Kind, scope_key: str, *, user_jwt: str | None = None
    ) -> CachedToken | None:
        """The cached token, or None (missing, expired within the buffer, unreadable)."""
        hit = self._shelf.hit(kind, scope_key, user_jwt, self._backend.execute)
        return hit.entry if hit else self._run(self._shelf.get(kind, scope_key, user_jwt))

    async def aget_entry(
        self, kind: Kind, scope_key: str, *, user_jwt: str | None = None
    ) -> CachedToken | None:
        """Async twin of ``get_entry``: a hit stays on the loop's thread, with no hop."""
        hit = self._inline_hit(kind, scope_key, user_jwt)
        return hit.entry if hit else await self._arun(self._shelf.get(kind, scope_key, user_jwt))

    def _inline_hit(self, kind: str, scope_key: str, user_jwt: str | None) -> Hit | None:
        if self._shelf.needs_key_file:
            return None  # reading the key file is file work: off the loop, in _arun
        return self._shelf.hit(kind, scope_key, user_jwt, self._backend.read_inline)

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
        return self._run(self._shelf.set(kind, scope_key, token_data, user_jwt, expires_at))[0]

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
        flight = self._shelf.set(kind, scope_key, token_data, user_jwt, expires_at)
        return (await self._arun(flight))[0]

    def invalidate_entry(
        self, kind: Kind, scope_key: str, *, user_jwt: str | None = None, token: str | None = None
    ) -> bool:
        """Forget a token in every process (e.g. after the server answered 401).

        With ``token``, only if the cache still holds that very token: a replacement another
        process fetched meanwhile stays. Returns whether a row was removed; raises
        ``CacheStorageError`` if the store could not be changed (a revoked token must not
        stay in service silently).
        """
        return self._run(self._shelf.invalidate(kind, scope_key, user_jwt, token))

    async def ainvalidate_entry(
        self, kind: Kind, scope_key: str, *, user_jwt: str | None = None, token: str | None = None
    ) -> bool:
        """Async twin of ``invalidate_entry``."""
        return await self._arun(self._shelf.invalidate(kind, scope_key, user_jwt, token))

    def fetch_entry(
        self, kind: Kind, scope_key: str, fetch: Fetch, *, user_jwt: str | None = None
    ) -> CachedToken:
        """Get-or-fetch with single flight: one ``fetch`` per key for every process on the
        host; a token near its expiry is refreshed in a background thread."""
        _check_fetch(fetch)
        hit = self._shelf.hit(kind, scope_key, user_jwt, self._backend.execute)
        if hit is not None and not hit.due:
            return hit.entry  # (a refresh due, a miss: the flight looks again and decides)

        def refresh_later(key: Key) -> None:
            threading.Thread(
                target=self._refresh, args=(key, fetch), name="agw-cache-refresh", daemon=True
            ).start()

        return self._run(self._shelf.fetch(kind, scope_key, user_jwt, refresh_later), fetch)

    async def afetch_entry(
        self, kind: Kind, scope_key: str, afetch: AFetch, *, user_jwt: str | None = None
    ) -> CachedToken:
        """Async twin of ``fetch_entry`` (the refresh runs as a task of this loop)."""
        _check_fetch(afetch)
        hit = self._inline_hit(kind, scope_key, user_jwt)
        if hit is not None and not hit.due:
            return hit.entry

        def refresh_later(key: Key) -> None:
            task = asyncio.get_running_loop().create_task(self._arefresh(key, afetch))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

        flight = self._shelf.fetch(kind, scope_key, user_jwt, refresh_later)
        return await self._arun(flight, afetch)

    def _refresh(self, key: Key, fetch: Fetch) -> None:
        try:
            self._shelf.refreshed(self._run(fill(self._shelf, key, refresh=True), fetch))
        except Exception as exc:
            self._shelf.refreshed(exc)

    async def _arefresh(self, key: Key, afetch: AFetch) -> None:
        try:
            outcome = await self._arun(fill(self._shelf, key, refresh=True), afetch)
        except Exception as exc:
            self._shelf.refreshed(exc)
        else:
            self._shelf.refreshed(outcome)

    # -- the system / user API of sap-cloud-sdk's _TokenCache, plus get-or-fetch ---------------

    def get_system_token(self, scope_key: str) -> str | None:
        """The cached system token for ``scope_key``, or None."""
        return _token(self.get_entry("system", scope_key))

    def set_system_token(
        self, scope_key: str, token_data: TokenData, *, expires_at: float | None = None
    ) -> bool:
        """Store a system token (``expires_at`` epoch seconds overrides the response).

        Returns whether it was stored (False: counted and warned, e.g. disk full)."""
        return self._run(self._shelf.set("system", scope_key, token_data, None, expires_at))[1]

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
        return self._run(self._shelf.set("user", scope_key, token_data, user_jwt, expires_at))[1]

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
        flight = self._shelf.set("system", scope_key, token_data, None, expires_at)
        return (await self._arun(flight))[1]

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
        flight = self._shelf.set("user", scope_key, token_data, user_jwt, expires_at)
        return (await self._arun(flight))[1]

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
        self._run(self._shelf.clear())

    async def aclear(self) -> None:
        """Async twin of ``clear``."""
        await self._arun(self._shelf.clear())

    def prune(self) -> int:
        """Remove expired rows, then least recently used ones over the size limits; returns
        how many went. Raises ``CacheStorageError`` if the store could not be changed."""
        return self._run(self._shelf.prune())

    async def aprune(self) -> int:
        """Async twin of ``prune``."""
        return await self._arun(self._shelf.prune())

    def stats(self) -> CacheStats:
        """Counters of this process and facts about the store shared by all."""
        return self._run(_survey.facts(self._shelf))

    async def astats(self) -> CacheStats:
        """Async twin of ``stats``."""
        return await self._arun(_survey.facts(self._shelf))

    def list_entries(self) -> list[EntryInfo]:
        """One record per row: metadata only, never a token, scope or user."""
        return self._run(_survey.entries(self._shelf))

    async def alist_entries(self) -> list[EntryInfo]:
        """Async twin of ``list_entries``."""
        return await self._arun(_survey.entries(self._shelf))

    def reseal(self, *, batch: int = 256) -> int:
        """Re-seal every row not under the primary key, in small transactions (workers keep
        reading and writing meanwhile); rows no configured key opens are left to expire."""
        return self._run(_survey.reseal(self._shelf, batch))

    async def areseal(self, *, batch: int = 256) -> int:
        """Async twin of ``reseal``."""
        return await self._arun(_survey.reseal(self._shelf, batch))

    def check_keys(self) -> KeyVerdict | None:
        """Whether the configured keys open the stored rows (and which key ids wrote them);
        None without a usable key or without rows. One bounded read, whatever the size."""
        return self._run(self._shelf.key_verdict())

    async def acheck_keys(self) -> KeyVerdict | None:
        """Async twin of ``check_keys``."""
        return await self._arun(self._shelf.key_verdict())

    def close(self) -> None:
        """Close this process's connections (the store and other processes are unaffected)."""
        self._backend.close()

    async def aclose(self) -> None:
        """Async twin of ``close``; also cancels this loop's background refreshes."""
        for task in list(self._tasks):
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
