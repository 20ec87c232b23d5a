"""PersistentTokenCache: get / set / invalidate / clear / get-or-fetch across processes.

The miss path is written once as a generator (:meth:`PersistentTokenCache._fill`)
that yields what it needs — a storage plan to run or the token fetch — and two
small drivers perform it, one with ``sqlite3`` and a plain call, one with
``aiosqlite`` and an awaited call. The hit path is one synchronous primary-key
SELECT for both APIs (cheaper than any thread hop) plus an in-memory shortcut
that skips decryption when the row is the very one this process already opened.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import random
import threading
import time
from collections.abc import Awaitable, Callable, Generator
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType, TracebackType
from typing import Any, Literal, TypeAlias

from ._config import CacheConfig, resolve_path
from ._crypto import (
    Keyring,
    UnsealError,
    keys_from_config,
    load_or_create_key_file,
    user_hash,
)
from ._errors import FetchBackoffError, TokenFetchError
from ._expiry import CachedToken, TokenData, normalize
from ._locks import KeyLocks
from ._store import (
    SQL_READ,
    SQL_READ_CT,
    Counters,
    NewRow,
    Plan,
    Row,
    Store,
    fork_epoch,
    plan_backoff,
    plan_checkpoint,
    plan_clear,
    plan_delete,
    plan_delete_if_nonce,
    plan_facts,
    plan_generation,
    plan_list,
    plan_prune,
    plan_replace,
    plan_rows_not_under,
    plan_set_backoff,
    plan_touch,
    plan_write,
)

log = logging.getLogger("agw_persist_cache")

Kind: TypeAlias = Literal["system", "user"]
Fetch: TypeAlias = Callable[[], TokenData]
AFetch: TypeAlias = Callable[[], Awaitable[TokenData]]

_MEMO_MAX = 4096
_REFRESH_RETRY_SECONDS = 2.0


@dataclass(frozen=True, slots=True)
class EntryInfo:
    """Metadata of one row: never the token, the scope or the user."""

    kind: str
    digest_prefix: str
    expires_at: float
    last_used: float
    created_at: float
    key_id: str


@dataclass(frozen=True, slots=True)
class CacheStats:
    """This process's counters, and facts about the shared file."""

    hits: int
    misses: int
    fetches: int
    stale_writes_skipped: int
    lock_timeouts: int
    decrypt_failures: int
    storage_errors: int
    refreshes: int
    backoff_rejections: int
    entries_system: int
    entries_user: int
    entries_expired: int
    oldest_expiry: float | None
    newest_expiry: float | None
    file_bytes: int
    wal_bytes: int
    schema_version: int | None
    key_ids_in_use: tuple[str, ...]
    disabled_reason: str | None


@dataclass(frozen=True, slots=True)
class _Key:
    kind: str
    scope_key: str
    uhash: str
    digests: tuple[bytes, ...]  # one per key of the keyring; the first is where new rows go

    @property
    def digest(self) -> bytes:
        return self.digests[0]


@dataclass(frozen=True, slots=True)
class _Run:
    plan: Plan[Any]
    write: bool
    default: Any = None


_FETCH = object()
_Step: TypeAlias = "_Run | object"


class PersistentTokenCache:
    """An encrypted SQLite token cache shared by every process on the host.

    ``path`` (or ``config.path``, ``$AGW_CACHE_PATH``, the user cache dir) names the
    database. Keys come from ``config.keys``, ``$AGW_CACHE_KEY`` or a 0600 key file
    beside the database. Storage failures never raise: they degrade to fetching.
    """

    def __init__(
        self, path: str | os.PathLike[str] | None = None, *, config: CacheConfig | None = None
    ) -> None:
        self.config = config or CacheConfig()
        self.path: Path = resolve_path(path if path is not None else self.config.path)
        self._counters = Counters()
        self._store = Store(self.path, self.config, self._counters)
        self.lock_dir: Path = self._store.lock_dir
        explicit = keys_from_config(self.config)
        self._explicit_keys = explicit
        self.key_source: str = explicit.source if explicit else "file"
        self.key_file: Path | None = None
        if explicit is None:
            kf = self.config.key_file
            self.key_file = (
                Path(os.fspath(kf)) if kf else self.path.with_name(self.path.name + ".key")
            )
        self._keyring: Keyring | None = Keyring(explicit.keys) if explicit else None
        self._memo: dict[bytes, tuple[bytes, CachedToken]] = {}
        self._keys: dict[tuple[str, str, str | None], _Key] = {}
        self._jitter = random.uniform(0.0, 0.3)
        self._last_prune = 0.0
        self._fork_reset()

    def _fork_reset(self) -> None:
        self._epoch = fork_epoch()
        self._locks = KeyLocks(self.lock_dir, self.config.lock_stripes)
        self._refresh_attempts: dict[bytes, float] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    # -- keys --------------------------------------------------------------------------

    @property
    def key_ids(self) -> tuple[str, ...]:
        """Public ids of the configured keys, the sealing key first."""
        ring = self._ring()
        return ring.kids if ring else ()

    def _ring(self) -> Keyring | None:
        if self._keyring is None and self.key_file is not None and not self._store.disabled():
            try:
                self._store.prepare_dirs()
                self._keyring = Keyring([load_or_create_key_file(self.key_file)])
            except OSError as exc:  # the directory is unusable: the store says so, once
                self._store.failed(exc)
                return None
            except ValueError as exc:
                self._store.counters.storage_errors += 1
                self._store.warn(
                    "keyfile",
                    "cannot use key file %s (%s); tokens are fetched directly. Delete the file "
                    "to regenerate it, or set AGW_CACHE_KEY",
                    self.key_file,
                    type(exc).__name__,
                )
                return None
        return self._keyring

    def _key(self, kind: str, scope_key: str, user_jwt: str | None) -> _Key | None:
        cached = self._keys.get((kind, scope_key, user_jwt))
        if cached is not None:
            return cached
        if not isinstance(scope_key, str):
            raise TypeError(f"scope_key must be str, not {type(scope_key).__name__}")
        if kind == "user":
            if not isinstance(user_jwt, str) or not user_jwt:
                raise ValueError("user_jwt must be a non-empty str for user tokens")
        elif kind != "system":
            raise ValueError(f"kind must be 'system' or 'user', not {kind!r}")
        ring = self._ring()
        if ring is None:
            return None
        uhash = user_hash(user_jwt if kind == "user" else None)
        message = ring.digest_input(kind, scope_key, uhash)
        key = _Key(kind, scope_key, uhash, tuple(ring.digest(k, message) for k in ring.keys))
        if len(self._keys) >= _MEMO_MAX:
            self._keys.clear()
        self._keys[(kind, scope_key, user_jwt)] = key
        return key

    # -- the hit path (shared by sync and async) ----------------------------------------

    def _check_fork(self) -> None:
        if self._epoch != fork_epoch():
            self._fork_reset()

    def _lookup(self, key: _Key, now: float) -> tuple[CachedToken | None, _Run | None, bool]:
        """(valid entry or None, a write to do afterwards, whether it is due for refresh).

        The memo holds what this process last opened per row, keyed by the row's random
        nonce: an unchanged row is not decrypted again, a rewritten one always is.
        """
        current = self._current(key)
        if current is None:
            return None, None, False
        digest, (nonce, last_used, created_at, _), entry_or_none = current
        if entry_or_none is None:
            return None, _Run(plan_delete_if_nonce(digest, nonce), write=True), False
        entry = entry_or_none
        remaining = entry.expires_at - self.config.token_expiry_buffer_seconds - now
        if remaining <= 0:
            return None, None, False
        followup = None
        if now - last_used >= self.config.last_used_interval_seconds:
            followup = _Run(plan_touch(digest, now), write=True)
        ratio = self.config.refresh_ahead_ratio
        due = ratio > 0 and remaining <= ratio * (1 - self._jitter) * (
            entry.expires_at - created_at
        )
        return entry, followup, due

    def _current(self, key: _Key) -> tuple[bytes, Row, CachedToken | None] | None:
        """The row stored for ``key`` (under any configured key) and what it opens to."""
        read = self._store.read
        for digest in key.digests:
            row = read(SQL_READ, (digest,))
            if row is not None:
                nonce = row[0]
                memo = self._memo.get(digest)
                if memo is not None and memo[0] == nonce:
                    return digest, row, memo[1]
                return digest, row, self._open(key, digest, row[3], nonce)
        return None

    def _open(self, key: _Key, digest: bytes, kid: str, nonce: bytes) -> CachedToken | None:
        ring = self._ring()
        try:
            found = self._store.read(SQL_READ_CT, (digest, nonce))
            if found is None:  # rewritten or deleted since the first read: a plain miss
                return None
            if ring is None:
                raise UnsealError("no key")
            payload = ring.open(key.kind, digest, kid, nonce, found[0])
            token, expires_at, extra = payload["t"], float(payload["e"]), payload.get("x") or {}
            if payload.get("s") != key.scope_key or payload.get("u", "") != key.uhash:
                raise UnsealError("envelope belongs to another key")
        except (UnsealError, KeyError, TypeError, ValueError) as exc:
            self._counters.decrypt_failures += 1
            self._store.warn(
                "unseal",
                "a cached token in %s did not open (%s); dropped it and fetching anew. "
                "Rows sealed under another key or altered on disk are treated as misses",
                self.path,
                exc,
            )
            return None
        entry = CachedToken(token, expires_at, MappingProxyType(dict(extra)))
        if len(self._memo) >= _MEMO_MAX:
            self._memo.pop(next(iter(self._memo), b""), None)
        self._memo[digest] = (nonce, entry)
        return entry

    # -- the miss path, once, as a generator of steps -------------------------------------

    def _fill(self, key: _Key, *, refresh: bool) -> Generator[_Step, Any, CachedToken | None]:
        """Under the key's locks: re-read, honour back-off, fetch, store unless cleared meanwhile.

        With ``refresh``, a valid token no longer due for refresh means someone else
        already refreshed it: nothing to do (returns None).
        """
        now = time.time()
        entry, followup, due = self._lookup(key, now)
        if followup is not None and entry is None:
            yield followup
        if entry is not None and not (refresh and due):
            return None if refresh else entry
        backoff = yield _Run(plan_backoff(key.digest), write=False)
        if backoff is not None and backoff[0] > now and self.config.fetch_backoff_seconds > 0:
            self._counters.backoff_rejections += 1
            raise FetchBackoffError(
                retry_after=backoff[0] - now, cause_type=backoff[1], status=backoff[2]
            )
        generation = yield _Run(plan_generation(), write=False)
        self._counters.fetches += 1
        started = time.time()
        try:
            data = yield _FETCH
        except Exception as exc:
            if self.config.fetch_backoff_seconds > 0:
                status = exc.status if isinstance(exc, TokenFetchError) else None
                until = time.time() + self.config.fetch_backoff_seconds
                yield _Run(
                    plan_set_backoff(key.digest, until, type(exc).__name__, status), write=True
                )
            raise
        entry = normalize(data, now=started, expires_at=None, config=self.config)
        yield from self._store_steps(key, entry, generation)
        return entry

    def _store_steps(
        self, key: _Key, entry: CachedToken, generation: int | None
    ) -> Generator[_Step, Any, None]:
        ring = self._ring()
        if ring is None:
            return
        now = time.time()
        payload: dict[str, Any] = {
            "t": entry.token,
            "e": entry.expires_at,
            "s": key.scope_key,
            "u": key.uhash,
        }
        if entry.extra:
            payload["x"] = dict(entry.extra)
        kid, nonce, ct = ring.seal(key.kind, key.digest, payload)
        row = NewRow(key.digest, key.kind, kid, nonce, ct, entry.expires_at, now)
        written = yield _Run(
            plan_write(row, generation=generation, delete=key.digests[1:]), write=True, default=None
        )
        if written is False:
            self._counters.stale_writes_skipped += 1
        elif written:
            self._memo[key.digest] = (nonce, entry)
            for old in key.digests[1:]:
                self._memo.pop(old, None)

    def _then_prune(self, steps: Generator[_Step, Any, None]) -> Generator[_Step, Any, None]:
        """``steps``, then a prune if one is due: after the write, outside any lock."""
        yield from steps
        yield from self._prune_steps(due_only=True)

    def _prune_steps(self, *, due_only: bool) -> Generator[_Step, Any, int]:
        """Prune and checkpoint; ``due_only``: only if this process has not for a while."""
        now = time.time()
        if due_only and now - self._last_prune < self.config.prune_interval_seconds:
            return 0
        self._last_prune = now
        limits = {
            "system": self.config.max_system_token_cache_size,
            "user": self.config.max_user_token_cache_size,
        }
        removed: int = yield _Run(plan_prune(now, limits), write=True, default=0)
        yield _Run(plan_checkpoint(truncate=not due_only), write=False)
        return removed

    # -- drivers ----------------------------------------------------------------------------

    def _drive(self, steps: Generator[_Step, Any, Any], fetch: Fetch | None = None) -> Any:
        value: Any = None
        error: BaseException | None = None
        while True:
            try:
                step = steps.throw(error) if error is not None else steps.send(value)
            except StopIteration as done:
                return done.value
            error = None
            if isinstance(step, _Run):
                value = self._store.run(step.plan, write=step.write, default=step.default)
            else:
                assert fetch is not None
                try:
                    value = fetch()
                except Exception as exc:
                    error = exc

    async def _adrive(self, steps: Generator[_Step, Any, Any], afetch: AFetch | None = None) -> Any:
        value: Any = None
        error: BaseException | None = None
        while True:
            try:
                step = steps.throw(error) if error is not None else steps.send(value)
            except StopIteration as done:
                return done.value
            error = None
            if isinstance(step, _Run):
                value = await self._store.arun(step.plan, write=step.write, default=step.default)
            else:
                assert afetch is not None
                try:
                    value = await afetch()
                except Exception as exc:
                    error = exc

    # -- entry-level API -----------------------------------------------------------------------

    def _hit(
        self, kind: str, scope_key: str, user_jwt: str | None
    ) -> tuple[_Key | None, CachedToken | None, _Run | None, bool]:
        if self._epoch != fork_epoch():
            self._fork_reset()
        key = self._keys.get((kind, scope_key, user_jwt)) or self._key(kind, scope_key, user_jwt)
        if key is None:
            self._counters.misses += 1
            return None, None, None, False
        entry, followup, due = self._lookup(key, time.time())
        if entry is None:
            self._counters.misses += 1
        else:
            self._counters.hits += 1
        return key, entry, followup, due

    def get_entry(
        self, kind: Kind, scope_key: str, *, user_jwt: str | None = None
    ) -> CachedToken | None:
        """The cached token, or None (missing, expired within the buffer, unreadable)."""
        _, entry, followup, _ = self._hit(kind, scope_key, user_jwt)
        if followup is not None:
            self._store.run(followup.plan, write=True, default=None)
        return entry

    async def aget_entry(
        self, kind: Kind, scope_key: str, *, user_jwt: str | None = None
    ) -> CachedToken | None:
        """Async twin of ``get_entry``."""
        _, entry, followup, _ = self._hit(kind, scope_key, user_jwt)
        if followup is not None:
            await self._store.arun(followup.plan, write=True, default=None)
        return entry

    def _set_steps(
        self,
        kind: str,
        scope_key: str,
        token_data: TokenData,
        user_jwt: str | None,
        expires_at: float | None,
    ) -> tuple[CachedToken, Generator[_Step, Any, None] | None]:
        self._check_fork()
        entry = normalize(token_data, now=time.time(), expires_at=expires_at, config=self.config)
        key = self._key(kind, scope_key, user_jwt)
        if key is None:
            return entry, None
        return entry, self._then_prune(self._store_steps(key, entry, None))

    def set_entry(
        self,
        kind: Kind,
        scope_key: str,
        token_data: TokenData,
        *,
        user_jwt: str | None = None,
        expires_at: float | None = None,
    ) -> CachedToken:
        """Store a token (committed and visible to every process when this returns)."""
        entry, steps = self._set_steps(kind, scope_key, token_data, user_jwt, expires_at)
        if steps is not None:
            self._drive(steps)
        return entry

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
        entry, steps = self._set_steps(kind, scope_key, token_data, user_jwt, expires_at)
        if steps is not None:
            await self._adrive(steps)
        return entry

    def _invalidate_plan(
        self, kind: str, scope_key: str, user_jwt: str | None, token: str | None
    ) -> Plan[int] | None:
        self._check_fork()
        key = self._key(kind, scope_key, user_jwt)
        if key is None:
            return None
        if token is None:
            for digest in key.digests:
                self._memo.pop(digest, None)
            return plan_delete(key.digests)
        current = self._current(key)
        if current is None:
            return None
        digest, row, entry = current
        if entry is not None and not hmac.compare_digest(entry.token, token):
            return None  # another process already replaced the rejected token: keep theirs
        return plan_delete_if_nonce(digest, row[0])

    def invalidate_entry(
        self, kind: Kind, scope_key: str, *, user_jwt: str | None = None, token: str | None = None
    ) -> bool:
        """Forget a token in every process (e.g. after the server answered 401).

        With ``token``, only if the cache still holds that very token: a replacement another
        process fetched meanwhile stays. Returns whether a row was removed.
        """
        plan = self._invalidate_plan(kind, scope_key, user_jwt, token)
        return plan is not None and self._store.run(plan, write=True, default=0) > 0

    async def ainvalidate_entry(
        self, kind: Kind, scope_key: str, *, user_jwt: str | None = None, token: str | None = None
    ) -> bool:
        """Async twin of ``invalidate_entry``."""
        plan = self._invalidate_plan(kind, scope_key, user_jwt, token)
        return plan is not None and await self._store.arun(plan, write=True, default=0) > 0

    def fetch_entry(
        self, kind: Kind, scope_key: str, fetch: Fetch, *, user_jwt: str | None = None
    ) -> CachedToken:
        """Get-or-fetch with single flight: one fetch per key for every process on the host."""
        key, entry, followup, due = self._hit(kind, scope_key, user_jwt)
        if followup is not None:
            self._store.run(followup.plan, write=True, default=None)
        if entry is not None:
            if due and key is not None and self._may_refresh(key):
                threading.Thread(
                    target=self._refresh, args=(key, fetch), name="agw-cache-refresh", daemon=True
                ).start()
            return entry
        if key is None or self._store.disabled_reason is not None:
            return self._direct(fetch())
        deadline = time.monotonic() + self.config.lock_timeout_seconds
        with self._locks.local(key.digest, deadline) as local_ok:
            entry = self._peek(key)  # another thread here may just have fetched it
            if entry is not None:
                return entry
            with self._locks.cross_process(key.digest, deadline) as file_ok:
                if not (local_ok and file_ok):
                    self._lock_timed_out()
                result: CachedToken = self._drive(self._fill(key, refresh=False), fetch)
        self._drive(self._prune_steps(due_only=True))
        return result

    async def afetch_entry(
        self, kind: Kind, scope_key: str, afetch: AFetch, *, user_jwt: str | None = None
    ) -> CachedToken:
        """Async twin of ``fetch_entry``."""
        key, entry, followup, due = self._hit(kind, scope_key, user_jwt)
        if followup is not None:
            await self._store.arun(followup.plan, write=True, default=None)
        if entry is not None:
            if due and key is not None and self._may_refresh(key):
                task = asyncio.get_running_loop().create_task(self._arefresh(key, afetch))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
            return entry
        if key is None or self._store.disabled_reason is not None:
            return self._direct(await afetch())
        deadline = time.monotonic() + self.config.lock_timeout_seconds
        async with self._locks.alocal(key.digest, deadline) as local_ok:
            entry = self._peek(key)  # another task here may just have fetched it
            if entry is not None:
                return entry
            async with self._locks.across_process(key.digest, deadline) as file_ok:
                if not (local_ok and file_ok):
                    self._lock_timed_out()
                result: CachedToken = await self._adrive(self._fill(key, refresh=False), afetch)
        await self._adrive(self._prune_steps(due_only=True))
        return result

    def _peek(self, key: _Key) -> CachedToken | None:
        """A valid entry, read without counting or writing: the re-check under a lock."""
        return self._lookup(key, time.time())[0]

    def _direct(self, data: TokenData) -> CachedToken:
        """The cache is unusable: hand the fetched token straight through."""
        self._counters.fetches += 1
        return normalize(data, now=time.time(), expires_at=None, config=self.config)

    def _lock_timed_out(self) -> None:
        self._counters.lock_timeouts += 1
        self._store.warn(
            "lock",
            "waited %.1fs for another process's token fetch; fetching anyway "
            "(raise CacheConfig.lock_timeout_seconds if fetches are slow)",
            self.config.lock_timeout_seconds,
        )

    # -- refresh ahead ---------------------------------------------------------------------------

    def _may_refresh(self, key: _Key) -> bool:
        """At most one attempt per key per process every couple of seconds."""
        now = time.monotonic()
        if now - self._refresh_attempts.get(key.digest, -1e9) < _REFRESH_RETRY_SECONDS:
            return False
        self._refresh_attempts[key.digest] = now
        return True

    def _refresh_failed(self, exc: BaseException) -> None:
        self._store.warn(
            "refresh",
            "background token refresh failed (%s); the cached token stays in use until it expires",
            type(exc).__name__,
        )

    def _refresh(self, key: _Key, fetch: Fetch) -> None:
        flock = self._locks.try_file_lock(key.digest)
        if flock is None:
            return
        try:
            if self._drive(self._fill(key, refresh=True), fetch) is not None:
                self._counters.refreshes += 1
        except Exception as exc:
            self._refresh_failed(exc)
        finally:
            flock.release()

    async def _arefresh(self, key: _Key, afetch: AFetch) -> None:
        flock = self._locks.try_file_lock(key.digest)  # non-blocking: no loop stall
        if flock is None:
            return
        try:
            if await self._adrive(self._fill(key, refresh=True), afetch) is not None:
                self._counters.refreshes += 1
        except Exception as exc:
            self._refresh_failed(exc)
        finally:
            flock.release()

    # -- the system / user API of sap-cloud-sdk's _TokenCache, plus get-or-fetch ------------------

    def get_system_token(self, scope_key: str) -> str | None:
        """The cached system token for ``scope_key``, or None."""
        entry = self.get_entry("system", scope_key)
        return entry.token if entry else None

    def set_system_token(
        self, scope_key: str, token_data: TokenData, *, expires_at: float | None = None
    ) -> None:
        """Store a system token (``expires_at`` epoch seconds overrides the response)."""
        self.set_entry("system", scope_key, token_data, expires_at=expires_at)

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
    ) -> None:
        """Store a user token (``expires_at`` epoch seconds overrides the response)."""
        self.set_entry("user", scope_key, token_data, user_jwt=user_jwt, expires_at=expires_at)

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
    ) -> None:
        """Async twin of ``set_system_token``."""
        await self.aset_entry("system", scope_key, token_data, expires_at=expires_at)

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
    ) -> None:
        """Async twin of ``set_user_token``."""
        await self.aset_entry(
            "user", scope_key, token_data, user_jwt=user_jwt, expires_at=expires_at
        )

    async def ainvalidate_user_token(self, user_jwt: str, scope_key: str) -> None:
        """Async twin of ``invalidate_user_token``."""
        await self.ainvalidate_entry("user", scope_key, user_jwt=user_jwt)

    async def asystem_token(self, scope_key: str, afetch: AFetch) -> str:
        """Async twin of ``system_token``."""
        return (await self.afetch_entry("system", scope_key, afetch)).token

    async def auser_token(self, user_jwt: str, scope_key: str, afetch: AFetch) -> str:
        """Async twin of ``user_token``."""
        return (await self.afetch_entry("user", scope_key, afetch, user_jwt=user_jwt)).token

    # -- whole-cache operations ------------------------------------------------------------------

    def clear(self) -> None:
        """Truncate the tokens table for every process; in-flight fetches will not write back."""
        self._check_fork()
        self._memo.clear()
        self._store.run(plan_clear(), write=True, default=None)

    async def aclear(self) -> None:
        """Async twin of ``clear``."""
        self._check_fork()
        self._memo.clear()
        await self._store.arun(plan_clear(), write=True, default=None)

    def prune(self) -> int:
        """Remove expired rows, then least recently used ones over the size limits."""
        self._check_fork()
        removed: int = self._drive(self._prune_steps(due_only=False))
        return removed

    async def aprune(self) -> int:
        """Async twin of ``prune``."""
        self._check_fork()
        removed: int = await self._adrive(self._prune_steps(due_only=False))
        return removed

    def stats(self) -> CacheStats:
        """Counters of this process and facts about the file shared by all."""
        self._check_fork()
        facts = self._store.run(plan_facts(time.time()), write=False, default=None) or {
            "entries_system": 0,
            "entries_user": 0,
            "entries_expired": 0,
            "oldest_expiry": None,
            "newest_expiry": None,
            "schema_version": None,
            "key_ids_in_use": (),
        }
        c = self._counters
        return CacheStats(
            hits=c.hits,
            misses=c.misses,
            fetches=c.fetches,
            stale_writes_skipped=c.stale_writes_skipped,
            lock_timeouts=c.lock_timeouts,
            decrypt_failures=c.decrypt_failures,
            storage_errors=c.storage_errors,
            refreshes=c.refreshes,
            backoff_rejections=c.backoff_rejections,
            file_bytes=_size(self.path),
            wal_bytes=_size(self.path.with_name(self.path.name + "-wal")),
            disabled_reason=self._store.disabled_reason,
            **facts,
        )

    def list_entries(self) -> list[EntryInfo]:
        """One record per row, metadata only."""
        self._check_fork()
        rows = self._store.run(plan_list(), write=False, default=[])
        return [
            EntryInfo(kind, bytes(k).hex()[:12], exp, used, created, kid)
            for kind, k, exp, used, created, kid in rows
        ]

    def reseal(self, *, batch: int = 256) -> int:
        """Re-seal every row not under the primary key; rows no key opens are left to expire.

        Runs in small transactions, so workers keep reading and writing meanwhile.
        """
        self._check_fork()
        ring = self._ring()
        if ring is None:
            return 0
        done = 0
        skip: set[bytes] = set()
        while True:
            rows = self._store.run(
                plan_rows_not_under(ring.primary.kid, batch + len(skip)), write=False, default=[]
            )
            todo = [r for r in rows if bytes(r[0]) not in skip]
            if not todo:
                return done
            for k, kind, kid, nonce, ct, expires_at, created_at in todo:
                digest = bytes(k)
                try:
                    payload = ring.open(kind, digest, kid, nonce, ct)
                except UnsealError:
                    skip.add(digest)
                    continue
                new_digest = ring.digest(
                    ring.primary, ring.digest_input(kind, payload["s"], payload["u"])
                )
                new_kid, new_nonce, new_ct = ring.seal(
                    kind, new_digest, {k: v for k, v in payload.items() if k != "v"}
                )
                row = NewRow(new_digest, kind, new_kid, new_nonce, new_ct, expires_at, time.time())
                self._store.run(plan_replace(digest, row, created_at), write=True, default=None)
                self._memo.pop(digest, None)
                done += 1

    def close(self) -> None:
        """Close this process's connections (the file and other processes are unaffected)."""
        self._store.close()

    async def aclose(self) -> None:
        """Async twin of ``close``."""
        for task in list(self._tasks):
            task.cancel()
        await self._store.aclose()

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
        return f"PersistentTokenCache(path={str(self.path)!r}, key_source={self.key_source!r})"


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0
