"""PersistentTokenCache: get / set / invalidate / clear / get-or-fetch, shared by processes.

The entry-level methods (``get_entry``, ``set_entry``, ``invalidate_entry``,
``fetch_entry`` and their ``a`` twins) are the core; the token-level names of
sap-cloud-sdk's ``_TokenCache`` are thin aliases of them. Every multi-step decision
is a flight (``_flight``) performed by one sync and one async driver; a hit is one
read of the backend plus, for a row this process already opened, no decryption.
"""

from __future__ import annotations

import asyncio
import hmac
import os
import random
import threading
import time
from pathlib import Path
from types import MappingProxyType, TracebackType
from typing import Any, Literal, TypeAlias, TypeVar

from ._config import ENV_KEY, CacheConfig, resolve_path, split_location
from ._crypto import (
    Envelope,
    Keyring,
    UnsealError,
    keys_from_config,
    load_or_create_key_file,
    user_hash,
)
from ._errors import CacheConfigError, CacheStorageError, CacheUsageError
from ._expiry import CachedToken, TokenData, normalize
from ._flight import AFetch, Driver, Fetch, Flight, Key, Lookup, fill
from ._locks import KeyLocks
from ._log import Warnings
from ._stats import CacheStats, Counters, EntryInfo
from .backends import open_backend
from .backends.contract import (
    Backend,
    Clear,
    Delete,
    GetFacts,
    ListRows,
    LockResult,
    Prune,
    Read,
    Replace,
    RowsNotUnder,
    SealedRow,
    Snapshot,
    StorageError,
    StorageUnavailable,
    Touch,
    Write,
)
from .backends.sqlite import SqliteBackend

Kind: TypeAlias = Literal["system", "user"]
T = TypeVar("T")

_MEMO_MAX = 4096
_REFRESH_RETRY_SECONDS = 2.0
MAX_SCOPE_KEY_CHARS = 8 * 1024
MAX_USER_JWT_CHARS = 64 * 1024


class PersistentTokenCache:
    """An encrypted token cache shared by every process on the host.

    ``path`` (or ``config.path``, ``$AGW_CACHE_PATH``, the user cache dir) names the
    database. Keys come from ``config.keys``, ``$AGW_CACHE_KEY`` or a 0600 key file
    beside the database. Storage failures never fail a get or a get-or-fetch: they
    degrade to fetching.
    """

    def __init__(
        self,
        path: str | os.PathLike[str] | None = None,
        *,
        config: CacheConfig | None = None,
        url: str | None = None,
    ) -> None:
        self.config = config or CacheConfig()
        path, url = split_location(
            path if path is not None else self.config.path,
            url if url is not None else self.config.url,
        )
        self.path: Path = resolve_path(path)
        self.counters = Counters()
        self.warnings = Warnings()
        explicit = keys_from_config(self.config)
        if url is not None and explicit is None:  # every host must open every row
            raise CacheConfigError(
                "a shared (redis://) cache needs the same explicit key on every host: set "
                f"{ENV_KEY} or CacheConfig.keys (a per-host key file cannot work there)"
            )
        self._backend: Backend = open_backend(self.path, url, self.config, self.warnings)
        self.lock_dir: Path = self.path.with_name(self.path.name + ".locks")
        self.key_source: str = explicit.source if explicit else "file"
        self.key_file: Path | None = None
        if explicit is None:
            kf = self.config.key_file
            self.key_file = (
                Path(os.fspath(kf)) if kf else self.path.with_name(self.path.name + ".key")
            )
        self._keyring: Keyring | None = Keyring(explicit.keys) if explicit else None
        self._memo: dict[bytes, tuple[bytes, CachedToken]] = {}
        self._keys: dict[tuple[str, str, str | None], Key] = {}
        self._jitter = random.uniform(0.0, 0.3)
        self._last_prune = 0.0
        self._generation = 0  # the last clear() generation seen; sets seal under it
        self._fork_reset()

    def _fork_reset(self) -> None:
        self._pid = os.getpid()
        self._driver = Driver(self._backend, KeyLocks(self._backend))
        self._refresh_attempts: dict[bytes, float] = {}
        self._tasks: set[asyncio.Task[Any]] = set()

    def _check_fork(self) -> None:
        if self._pid != os.getpid():
            self._fork_reset()

    @property
    def location(self) -> str:
        """Where the store is: the SQLite file, or the URL with any password as ``***``."""
        return self._backend.location

    # -- keys ----------------------------------------------------------------------------------

    @property
    def key_ids(self) -> tuple[str, ...]:
        """Public ids of the configured keys, the sealing key first."""
        ring = self._ring()
        return ring.kids if ring else ()

    def _ring(self) -> Keyring | None:
        if self._keyring is None and self.key_file is not None and not self._backend.unavailable:
            try:
                if isinstance(self._backend, SqliteBackend):
                    self._backend.prepare_dirs()
                self._keyring = Keyring([load_or_create_key_file(self.key_file)])
            except OSError as exc:  # the directory is unusable: the store's own warning
                self.counters.storage_errors += 1
                self.warnings.once(
                    "open",
                    "cannot open token cache at %s (%s: %s); tokens are fetched directly. "
                    "Set AGW_CACHE_PATH to a writable local path or run `agw-cache doctor`",
                    self.path,
                    type(exc).__name__,
                    exc,
                )
                return None
            except ValueError as exc:
                self.counters.storage_errors += 1
                self.warnings.once(
                    "keyfile",
                    "cannot use key file %s (%s); tokens are fetched directly. Delete the file "
                    "to regenerate it, or set AGW_CACHE_KEY",
                    self.key_file,
                    type(exc).__name__,
                )
                return None
        return self._keyring

    async def _aring(self) -> Keyring | None:
        """The keyring, reading or creating a key file off the event loop's thread."""
        if self._keyring is None and self.key_file is not None:
            return await asyncio.to_thread(self._ring)
        return self._keyring

    def _key(self, kind: str, scope_key: str, user_jwt: str | None) -> Key | None:
        """The key of a (kind, scope, user); checks the arguments (the API boundary)."""
        cached = self._keys.get((kind, scope_key, user_jwt))
        if cached is not None:
            return cached
        _check_identity(kind, scope_key, user_jwt)
        ring = self._ring()
        if ring is None:
            return None
        uhash = user_hash(user_jwt if kind == "user" else None)
        digests = ring.digests(kind, scope_key, uhash)
        key = Key(kind, scope_key, uhash, digests, Read(digests))
        if len(self._keys) >= _MEMO_MAX:
            self._keys.clear()
        self._keys[(kind, scope_key, user_jwt)] = key
        return key

    # -- what a row means (shared by hits and flights) -----------------------------------------

    def judge(self, key: Key, snap: Snapshot, now: float) -> Lookup:
        """The usable entry in ``snap`` (or None), a write to do afterwards, refresh due.

        The memo holds what this process last opened per row, keyed by the row's random
        nonce: an unchanged row is not decrypted again, a rewritten one always is.
        """
        row = snap.row
        if row is None:
            return Lookup(None, None, False)
        self._generation = snap.generation
        if row.generation != snap.generation:  # written before a clear(), or replayed
            return Lookup(None, Delete((row.digest,), row.nonce), False)
        memo = self._memo.get(row.digest)
        if memo is not None and memo[0] == row.nonce:
            entry: CachedToken | None = memo[1]
        else:
            entry = self._open(key, row)
            if entry is None:
                return Lookup(None, Delete((row.digest,), row.nonce), False)
        assert entry is not None
        # Capped on read: a row written under a clock running ahead is not served for longer.
        expires_at = min(entry.expires_at, now + self.config.max_token_ttl_seconds)
        remaining = expires_at - self.config.token_expiry_buffer_seconds - now
        if remaining <= 0:
            return Lookup(None, None, False)
        followup = None
        if now - row.last_used >= self.config.last_used_interval_seconds:
            followup = Touch(row.digest, now)
        ratio = self.config.refresh_ahead_ratio
        lifetime = entry.expires_at - row.created_at
        due = ratio > 0 and remaining <= ratio * (1 - self._jitter) * lifetime
        return Lookup(entry, followup, due)

    def _open(self, key: Key, row: SealedRow) -> CachedToken | None:
        ring = self._ring()
        try:
            if ring is None:
                raise UnsealError("no key")
            envelope = ring.open(row)
            if envelope.scope_key != key.scope_key or envelope.uhash != key.uhash:
                raise UnsealError("envelope belongs to another key")
        except UnsealError as exc:
            self.counters.decrypt_failures += 1
            self.warnings.once(
                "unseal",
                "a cached token in %s did not open (%s); dropped it and fetching anew. "
                "Rows sealed under another key or altered in storage are treated as misses",
                self._backend.location,
                exc,
            )
            return None
        entry = CachedToken(
            envelope.token, envelope.expires_at, MappingProxyType(dict(envelope.extra))
        )
        if len(self._memo) >= _MEMO_MAX:
            self._memo.pop(next(iter(self._memo), b""), None)
        self._memo[row.digest] = (row.nonce, entry)
        return entry

    def _counted(self, key: Key, snap: Snapshot) -> Lookup:
        lookup = self.judge(key, snap, time.time())
        if lookup.entry is None:
            self.counters.misses += 1
        else:
            self.counters.hits += 1
        return lookup

    def _get(self, key: Key | None) -> Flight[Lookup]:
        """A hit or a miss; storage trouble is a miss (counted, warned once)."""
        if key is None:
            self.counters.misses += 1
            return Lookup(None, None, False)
        try:
            lookup = self._counted(key, (yield key.read))
        except StorageError as exc:
            self.storage_failed(exc)
            self.counters.misses += 1
            return Lookup(None, None, False)
        if lookup.followup is not None:
            try:
                yield lookup.followup
            except StorageError as exc:
                self.storage_failed(exc)
        return lookup

    # -- writes --------------------------------------------------------------------------------

    def store(self, key: Key, entry: CachedToken, generation: int | None) -> Flight[bool]:
        """Seal and write ``entry``. With ``generation`` (a fetch), refuse if a clear() came
        since; without (a plain set), seal under the current generation."""
        ring = self._ring()
        if ring is None:
            return False
        now = time.time()
        short = entry.expires_at - self.config.token_expiry_buffer_seconds <= now
        if short and generation is not None:
            self.warnings.once(
                "short-lived",
                "a fetched token expires within token_expiry_buffer_seconds (%.0fs): it was "
                "handed to its caller but not stored, since it could never be served. Lower "
                "CacheConfig.token_expiry_buffer_seconds",
                self.config.token_expiry_buffer_seconds,
            )
            return False
        envelope = Envelope(entry.token, entry.expires_at, key.scope_key, key.uhash, entry.extra)
        gen = self._generation if generation is None else generation
        for _attempt in range(2):
            kid, nonce, ct = ring.seal(key.kind, key.digest, gen, envelope)
            row = SealedRow(key.digest, key.kind, kid, nonce, ct, entry.expires_at, gen, now, now)
            if (yield Write(row, key.digests[1:])):
                self._memo[key.digest] = (nonce, entry)
                for old in key.digests[1:]:
                    self._memo.pop(old, None)
                return True
            if generation is not None:  # the fetch began before a clear(): do not write back
                self.counters.stale_writes_skipped += 1
                return False
            snap: Snapshot = yield key.read  # a clear() we had not seen: learn its generation
            gen = self._generation = snap.generation
        return False

    def _set(
        self,
        kind: str,
        scope_key: str,
        token_data: TokenData,
        user_jwt: str | None,
        expires_at: float | None,
        stored: list[bool],
    ) -> Flight[CachedToken]:
        key = self._key(kind, scope_key, user_jwt)
        entry = normalize(token_data, now=time.time(), expires_at=expires_at, config=self.config)
        ok = False
        if key is not None:
            try:
                ok = yield from self.store(key, entry, None)
                yield from self.prune_if_due()
            except StorageError as exc:
                self.storage_failed(exc)
        if not ok:  # why was warned where it happened (storage, key, clear race)
            self.counters.sets_not_stored += 1
        stored.append(ok)
        return entry

    def _invalidate(
        self, kind: str, scope_key: str, user_jwt: str | None, token: str | None
    ) -> Flight[bool]:
        key = self._key(kind, scope_key, user_jwt)
        if key is None:
            return False  # no usable key: nothing of ours can be in service
        try:
            if token is None:
                for digest in key.digests:
                    self._memo.pop(digest, None)
                removed: int = yield Delete(key.digests)
                return removed > 0
            snap: Snapshot = yield key.read
            row = snap.row
            if row is None:
                return False
            entry = self.judge(key, snap, time.time()).entry
            if entry is not None and not hmac.compare_digest(entry.token, token):
                return False  # another process already replaced the rejected token: keep it
            self._memo.pop(row.digest, None)
            gone: int = yield Delete((row.digest,), row.nonce)
            return gone > 0
        except StorageError as exc:
            raise_if(self._reported(exc, "invalidate"))
        return False

    def _clear(self) -> Flight[None]:
        self._memo.clear()
        try:
            self._generation = yield Clear()
        except StorageError as exc:
            raise_if(self._reported(exc, "clear"))

    def prune_if_due(self) -> Flight[int]:
        """Prune after a write if this process has not for ``prune_interval_seconds``."""
        if time.time() - self._last_prune < self.config.prune_interval_seconds:
            return 0
        return (yield from self._prune(compact=False))

    def _prune(self, *, compact: bool) -> Flight[int]:
        now = self._last_prune = time.time()
        limits = {
            "system": self.config.max_system_token_cache_size,
            "user": self.config.max_user_token_cache_size,
        }
        removed: int = yield Prune(now, limits, compact)
        return removed

    def _prune_reported(self) -> Flight[int]:
        try:
            return (yield from self._prune(compact=True))
        except StorageError as exc:
            raise_if(self._reported(exc, "prune"))
        return 0

    def _reported(self, exc: StorageError, what: str) -> CacheStorageError | None:
        """The error a change that did not happen raises; None for an unusable store.

        An unusable store (no file, newer schema) serves this process nothing, so there is
        nothing of its to forget: that is counted, not raised.
        """
        self.storage_failed(exc)
        if isinstance(exc, StorageUnavailable):
            return None
        return CacheStorageError(
            f"{what} did not take effect: {exc}; the token cache was not changed (retry, or "
            "run `agw-cache doctor`)"
        )

    # -- trouble, counted once -----------------------------------------------------------------

    def storage_failed(self, exc: StorageError) -> None:
        """Count a storage failure and warn once; the caller carries on without the cache."""
        self.counters.storage_errors += 1
        if isinstance(exc, StorageUnavailable):
            return  # the store said why when it gave up on the file
        self.warnings.once(
            f"storage:{exc}",
            "token cache operation failed on %s (%s); carrying on without it",
            self._backend.location,
            exc,
        )

    def lock_trouble(self, result: LockResult, key: Key) -> None:
        """A lock not had: after a timeout, or because the lock itself failed (I/O)."""
        if result is LockResult.TIMEOUT:
            self.counters.lock_timeouts += 1
            self.warnings.once(
                "lock",
                "waited %.1fs for another process's token fetch; fetching anyway "
                "(raise CacheConfig.lock_timeout_seconds if fetches are slow)",
                self.config.lock_timeout_seconds,
            )
        else:
            self.counters.lock_errors += 1
            self.warnings.once(
                "lock-error",
                "the cross-process lock of the token cache at %s failed; fetching without "
                "de-duplication across processes (run `agw-cache doctor`)",
                self._backend.location,
            )

    # -- entry-level API: the core -------------------------------------------------------------

    def get_entry(
        self, kind: Kind, scope_key: str, *, user_jwt: str | None = None
    ) -> CachedToken | None:
        """The cached token, or None (missing, expired within the buffer, unreadable)."""
        self._check_fork()
        return self._driver.run(self._get(self._key(kind, scope_key, user_jwt))).entry

    async def aget_entry(
        self, kind: Kind, scope_key: str, *, user_jwt: str | None = None
    ) -> CachedToken | None:
        """Async twin of ``get_entry``."""
        self._check_fork()
        await self._aring()
        return (await self._driver.arun(self._get(self._key(kind, scope_key, user_jwt)))).entry

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

        A token that could not be stored (storage trouble) is counted in
        ``stats().sets_not_stored`` and warned about; ``set_system_token`` says so.
        """
        return self._set_stored(kind, scope_key, token_data, user_jwt, expires_at)[0]

    def _set_stored(
        self,
        kind: str,
        scope_key: str,
        token_data: TokenData,
        user_jwt: str | None,
        expires_at: float | None,
    ) -> tuple[CachedToken, bool]:
        self._check_fork()
        stored: list[bool] = []
        flight = self._set(kind, scope_key, token_data, user_jwt, expires_at, stored)
        return self._driver.run(flight), stored[0]

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
        return (await self._aset_stored(kind, scope_key, token_data, user_jwt, expires_at))[0]

    async def _aset_stored(
        self,
        kind: str,
        scope_key: str,
        token_data: TokenData,
        user_jwt: str | None,
        expires_at: float | None,
    ) -> tuple[CachedToken, bool]:
        self._check_fork()
        await self._aring()
        stored: list[bool] = []
        flight = self._set(kind, scope_key, token_data, user_jwt, expires_at, stored)
        return await self._driver.arun(flight), stored[0]

    def invalidate_entry(
        self, kind: Kind, scope_key: str, *, user_jwt: str | None = None, token: str | None = None
    ) -> bool:
        """Forget a token in every process (e.g. after the server answered 401).

        With ``token``, only if the cache still holds that very token: a replacement another
        process fetched meanwhile stays. Returns whether a row was removed; raises
        ``CacheStorageError`` if the store could not be changed (a revoked token must not
        stay in service silently).
        """
        self._check_fork()
        return self._driver.run(self._invalidate(kind, scope_key, user_jwt, token))

    async def ainvalidate_entry(
        self, kind: Kind, scope_key: str, *, user_jwt: str | None = None, token: str | None = None
    ) -> bool:
        """Async twin of ``invalidate_entry``."""
        self._check_fork()
        await self._aring()
        return await self._driver.arun(self._invalidate(kind, scope_key, user_jwt, token))

    def fetch_entry(
        self, kind: Kind, scope_key: str, fetch: Fetch, *, user_jwt: str | None = None
    ) -> CachedToken:
        """Get-or-fetch with single flight: one fetch per key for every process on the host."""
        self._check_fork()
        key = self._key(kind, scope_key, user_jwt)
        lookup = self._driver.run(self._get(key))
        if lookup.entry is not None:
            if lookup.due and key is not None and self._may_refresh(key):
                threading.Thread(
                    target=self._refresh, args=(key, fetch), name="agw-cache-refresh", daemon=True
                ).start()
            return lookup.entry
        if key is None or self._backend.unavailable:
            return self._direct(fetch())
        entry = self._driver.run(fill(self, key, refresh=False), fetch)
        assert entry is not None
        return entry

    async def afetch_entry(
        self, kind: Kind, scope_key: str, afetch: AFetch, *, user_jwt: str | None = None
    ) -> CachedToken:
        """Async twin of ``fetch_entry``."""
        self._check_fork()
        await self._aring()
        key = self._key(kind, scope_key, user_jwt)
        lookup = await self._driver.arun(self._get(key))
        if lookup.entry is not None:
            if lookup.due and key is not None and self._may_refresh(key):
                task = asyncio.get_running_loop().create_task(self._arefresh(key, afetch))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
            return lookup.entry
        if key is None or self._backend.unavailable:
            return self._direct(await afetch())
        entry = await self._driver.arun(fill(self, key, refresh=False), afetch)
        assert entry is not None
        return entry

    def _direct(self, data: TokenData) -> CachedToken:
        """The cache is unusable: hand the fetched token straight through."""
        self.counters.fetches += 1
        return normalize(data, now=time.time(), expires_at=None, config=self.config)

    # -- refresh ahead -------------------------------------------------------------------------

    def _may_refresh(self, key: Key) -> bool:
        """At most one attempt per key per process every couple of seconds."""
        now = time.monotonic()
        if now - self._refresh_attempts.get(key.digest, -1e9) < _REFRESH_RETRY_SECONDS:
            return False
        if len(self._refresh_attempts) >= _MEMO_MAX:
            self._refresh_attempts.clear()
        self._refresh_attempts[key.digest] = now
        return True

    def _refreshed(self, outcome: CachedToken | BaseException | None) -> None:
        if isinstance(outcome, BaseException):
            self.warnings.once(
                "refresh",
                "background token refresh failed (%s); the cached token stays in use until "
                "it expires",
                type(outcome).__name__,
            )
        elif outcome is not None:
            self.counters.refreshes += 1

    def _refresh(self, key: Key, fetch: Fetch) -> None:
        try:
            self._refreshed(self._driver.run(fill(self, key, refresh=True), fetch))
        except Exception as exc:
            self._refreshed(exc)

    async def _arefresh(self, key: Key, afetch: AFetch) -> None:
        try:
            self._refreshed(await self._driver.arun(fill(self, key, refresh=True), afetch))
        except Exception as exc:
            self._refreshed(exc)

    # -- the system / user API of sap-cloud-sdk's _TokenCache, plus get-or-fetch ---------------

    def get_system_token(self, scope_key: str) -> str | None:
        """The cached system token for ``scope_key``, or None."""
        entry = self.get_entry("system", scope_key)
        return entry.token if entry else None

    def set_system_token(
        self, scope_key: str, token_data: TokenData, *, expires_at: float | None = None
    ) -> bool:
        """Store a system token (``expires_at`` epoch seconds overrides the response).

        Returns whether it was stored (False: counted and warned, e.g. disk full)."""
        return self._set_stored("system", scope_key, token_data, None, expires_at)[1]

    def invalidate_system_token(self, scope_key: str) -> None:
        """Forget a system token in every process."""
        self.invalidate_entry("system", scope_key)

    def get_user_token(self, user_jwt: str, scope_key: str) -> str | None:
        """The cached token exchanged for ``user_jwt``, or None."""
        entry = self.get_entry("user", scope_key, user_jwt=user_jwt)
        return entry.token if entry else None

    def set_user_token(
        self,
        user_jwt: str,
        scope_key: str,
        token_data: TokenData,
        *,
        expires_at: float | None = None,
    ) -> bool:
        """Store a user token; returns whether it was stored."""
        return self._set_stored("user", scope_key, token_data, user_jwt, expires_at)[1]

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
        entry = await self.aget_entry("system", scope_key)
        return entry.token if entry else None

    async def aset_system_token(
        self, scope_key: str, token_data: TokenData, *, expires_at: float | None = None
    ) -> bool:
        """Async twin of ``set_system_token``."""
        return (await self._aset_stored("system", scope_key, token_data, None, expires_at))[1]

    async def ainvalidate_system_token(self, scope_key: str) -> None:
        """Async twin of ``invalidate_system_token``."""
        await self.ainvalidate_entry("system", scope_key)

    async def aget_user_token(self, user_jwt: str, scope_key: str) -> str | None:
        """Async twin of ``get_user_token``."""
        entry = await self.aget_entry("user", scope_key, user_jwt=user_jwt)
        return entry.token if entry else None

    async def aset_user_token(
        self,
        user_jwt: str,
        scope_key: str,
        token_data: TokenData,
        *,
        expires_at: float | None = None,
    ) -> bool:
        """Async twin of ``set_user_token``."""
        return (await self._aset_stored("user", scope_key, token_data, user_jwt, expires_at))[1]

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
        self._check_fork()
        self._driver.run(self._clear())

    async def aclear(self) -> None:
        """Async twin of ``clear``."""
        self._check_fork()
        await self._driver.arun(self._clear())

    def prune(self) -> int:
        """Remove expired rows, then least recently used ones over the size limits."""
        self._check_fork()
        return self._driver.run(self._prune_reported())

    async def aprune(self) -> int:
        """Async twin of ``prune``."""
        self._check_fork()
        return await self._driver.arun(self._prune_reported())

    def _facts(self) -> Flight[CacheStats]:
        try:
            facts = yield GetFacts(time.time())
        except StorageError as exc:
            self.storage_failed(exc)
            facts = None
        c = self.counters
        return CacheStats(
            hits=c.hits,
            misses=c.misses,
            fetches=c.fetches,
            stale_writes_skipped=c.stale_writes_skipped,
            lock_timeouts=c.lock_timeouts,
            lock_errors=c.lock_errors,
            decrypt_failures=c.decrypt_failures,
            storage_errors=c.storage_errors,
            sets_not_stored=c.sets_not_stored,
            refreshes=c.refreshes,
            backoff_rejections=c.backoff_rejections,
            entries_system=facts.entries_system if facts else 0,
            entries_user=facts.entries_user if facts else 0,
            entries_expired=facts.entries_expired if facts else 0,
            oldest_expiry=facts.oldest_expiry if facts else None,
            newest_expiry=facts.newest_expiry if facts else None,
            file_bytes=facts.file_bytes if facts else 0,
            wal_bytes=facts.wal_bytes if facts else 0,
            schema_version=facts.schema_version if facts else None,
            key_ids_in_use=facts.key_ids_in_use if facts else (),
            disabled_reason=self._backend.unavailable,
            backend=self._backend.name,
        )

    def stats(self) -> CacheStats:
        """Counters of this process and facts about the store shared by all."""
        self._check_fork()
        return self._driver.run(self._facts())

    async def astats(self) -> CacheStats:
        """Async twin of ``stats``."""
        self._check_fork()
        return await self._driver.arun(self._facts())

    def _list(self) -> Flight[list[EntryInfo]]:
        try:
            rows = yield ListRows()
        except StorageError as exc:
            self.storage_failed(exc)
            return []
        return [
            EntryInfo(r.kind, r.digest.hex()[:12], r.expires_at, r.last_used, r.created_at, r.kid)
            for r in rows
        ]

    def list_entries(self) -> list[EntryInfo]:
        """One record per row, metadata only."""
        self._check_fork()
        return self._driver.run(self._list())

    async def alist_entries(self) -> list[EntryInfo]:
        """Async twin of ``list_entries``."""
        self._check_fork()
        return await self._driver.arun(self._list())

    def _reseal(self, batch: int) -> Flight[int]:
        """Re-seal every row not under the primary key; rows no key opens are left to expire."""
        ring = self._ring()
        if ring is None:
            return 0
        done = 0
        skip: tuple[bytes, ...] = ()
        while True:
            rows: list[SealedRow] = yield RowsNotUnder(ring.primary.kid, batch, skip)
            if not rows:
                return done
            for row in rows:
                try:
                    envelope = ring.open(row)
                except UnsealError:
                    skip += (row.digest,)
                    continue
                (digest, *_) = ring.digests(row.kind, envelope.scope_key, envelope.uhash)
                kid, nonce, ct = ring.seal(row.kind, digest, row.generation, envelope)
                new = row._replace(digest=digest, kid=kid, nonce=nonce, ct=ct)
                yield Replace(row.digest, new)
                self._memo.pop(row.digest, None)
                done += 1

    def reseal(self, *, batch: int = 256) -> int:
        """Re-seal every row not under the primary key, in small transactions (workers keep
        reading and writing meanwhile); rows no configured key opens are left to expire."""
        self._check_fork()
        return self._driver.run(self._reseal(batch))

    async def areseal(self, *, batch: int = 256) -> int:
        """Async twin of ``reseal``."""
        self._check_fork()
        await self._aring()
        return await self._driver.arun(self._reseal(batch))

    def close(self) -> None:
        """Close this process's connections (the store and other processes are unaffected)."""
        self._backend.close()

    async def aclose(self) -> None:
        """Async twin of ``close``; also cancels this loop's background refreshes."""
        for task in list(self._tasks):
            task.cancel()
        await self._backend.aclose()

    def __enter__(self) -> PersistentTokenCache:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    async def __aenter__(self) -> PersistentTokenCache:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        return (
            f"PersistentTokenCache(path={str(self.path)!r}, backend={self._backend.name!r}, "
            f"key_source={self.key_source!r})"
        )


def _check_identity(kind: str, scope_key: str, user_jwt: str | None) -> None:
    """Arguments are checked once, here; messages name them and never echo their values."""
    if kind not in ("system", "user"):
        raise CacheUsageError("kind must be 'system' or 'user'")
    if not isinstance(scope_key, str):
        raise CacheUsageError(f"scope_key must be a str, not {type(scope_key).__name__}")
    if len(scope_key) > MAX_SCOPE_KEY_CHARS:
        raise CacheUsageError(f"scope_key is longer than {MAX_SCOPE_KEY_CHARS} characters")
    if kind == "system":
        if user_jwt is not None:
            raise CacheUsageError("user_jwt must be None for system tokens")
        return
    if not isinstance(user_jwt, str):
        raise CacheUsageError(
            f"user_jwt must be a str for user tokens, not {type(user_jwt).__name__}"
        )
    if not user_jwt.strip():
        raise CacheUsageError("user_jwt must not be empty or whitespace for user tokens")
    if len(user_jwt) > MAX_USER_JWT_CHARS:
        raise CacheUsageError(f"user_jwt is longer than {MAX_USER_JWT_CHARS} characters")


def raise_if(error: CacheStorageError | None) -> None:
    """Raise ``error`` if there is one, without chaining the storage error behind it."""
    if error is not None:
        raise error from None
