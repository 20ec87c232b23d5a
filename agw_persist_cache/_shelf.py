"""The cache's decisions, as flights: what a row means, what to store, what to forget.

:class:`TokenShelf` holds one cache's keys, memory tier, health and counters and writes
every decision of the cache once, as a generator of steps (see ``_flight``): a get, a
get-or-fetch (whose miss path is ``_flight.fill``), a set, an invalidation, a clear, a
prune (whole-store reports live in ``_survey``). It performs no I/O of its own except
reading or creating the key file; ``PersistentTokenCache`` runs its flights with a sync
or an async driver.
"""

from __future__ import annotations

import hmac
import math
import os
import random
import time
from collections.abc import Callable
from pathlib import Path
from types import MappingProxyType

from . import _otel
from ._config import CacheConfig
from ._crypto import (
    Envelope,
    Keyring,
    UnsealError,
    decode_key,
    keys_from_config,
    load_or_create_key_file,
    user_hash,
)
from ._errors import CacheStorageError
from ._expiry import CachedToken, TokenData, normalize
from ._files import key_file_of, read_private
from ._flight import Flight, Hit, Key, Lookup, fill
from ._health import KEY, READ, Health
from ._identity import check_identity
from ._log import Warnings, warn_unopenable
from ._memory import Kept, MemoryTier
from ._stats import Counters, KeyVerdict
from .backends.contract import (
    Backend,
    Clear,
    Delete,
    Facts,
    Fence,
    GetFacts,
    GetKeyChecks,
    KeyChecks,
    LockResult,
    Prune,
    Read,
    SealedRow,
    Snapshot,
    StorageError,
    StorageUnavailable,
    Sweep,
    Touch,
    Write,
)
from .backends.sqlite import SqliteBackend

_MEMO_MAX = 4096
_MISS = Lookup(None, None, False)
_NO_READ = Read(())
_new = tuple.__new__
_NO_EXTRA: MappingProxyType[str, str] = MappingProxyType({})
_REFRESH_RETRY_SECONDS = 2.0
_SWEEPS_MAX = 10_000  # steps of a clear()'s sweep (Sweep.limit rows each)
FUTURE_SLACK_SECONDS = 5.0
"""SQLite: a row created further than this in the future (by this host's clock) is a miss,
so that a row outlives the lifetime it was written with by this much at most."""


class TokenShelf:
    """One cache's keys, memo of opened rows and counters, and its decisions as flights."""

    def __init__(
        self,
        path: Path,
        config: CacheConfig,
        backend: Backend,
        warnings: Warnings,
        *,
        read_only: bool = False,
    ) -> None:
        self.path = path
        self.read_only = read_only  # never create a key file
        self.config = config
        self.backend = backend
        self.warnings = warnings
        self.counters = Counters()
        explicit = keys_from_config(config)
        self.key_source: str = explicit.source if explicit else "file"
        self.key_file: Path | None = None
        if explicit is None:
            kf = config.key_file
            self.key_file = Path(os.fspath(kf)) if kf else key_file_of(path)
        self._keyring: Keyring | None = Keyring(explicit.keys) if explicit else None
        self.memory = MemoryTier(config.memory_tokens)
        self.health = Health(backend.location, config.memory_tokens)
        self._kept = self.memory.kept  # the hot path reads these two without a call
        self._down = self.health.state
        self._keys: dict[tuple[str, str, str | None], Key] = {}
        jitter = random.uniform(0.0, 0.3)
        self._max_ttl = config.max_token_ttl_seconds
        self._buffer = config.token_expiry_buffer_seconds
        self._touch_every = config.last_used_interval_seconds
        # Refresh during the last ratio of a lifetime, jittered per process; 0 disables (-1).
        ratio = config.refresh_ahead_ratio
        self._refresh_share = ratio * (1 - jitter) if ratio > 0 else -1.0
        self._last_prune = 0.0
        self._generation = 0  # the highest clear() generation seen; sets seal under it
        # One host's processes share one clock: a row from its future was written while the
        # clock ran ahead. (Redis rows expire by the server's clock; hosts' clocks differ.)
        self._future_slack = FUTURE_SLACK_SECONDS if backend.name == "sqlite" else math.inf
        self._refresh_attempts: dict[bytes, float] = {}
        self._checked: set[str] = set()  # key ids whose check value this process stored
        self._unopened: dict[bytes, bytes] = {}  # digest -> nonce of rows that did not open
        self._keys_compared = False
        self.key_problem: str | None = None  # why the key file cannot be used (stats says)

    @property
    def needs_key_file(self) -> bool:
        """The key comes from a file not read yet (file I/O: keep it off event loops)."""
        return self._keyring is None and self.key_file is not None

    def ring(self) -> Keyring | None:
        if self._keyring is None and self.key_file is not None and not self.backend.unavailable:
            try:
                self._keyring = Keyring([self._read_key_file(self.key_file)])
                self.key_problem = None
                if self.health.state:
                    self.health.succeeded(KEY)
            except StorageError as exc:  # the store refused its path: nothing made beside it
                self.storage_failed(exc)
                return None
            except OSError as exc:  # the directory is unusable: the store's own warning
                if self.read_only and isinstance(exc, FileNotFoundError):
                    return None  # no key file: rows are counted, not opened
                self.key_problem = f"cannot use key file {self.key_file}: {exc}"
                self.counters.storage_errors += 1
                warn_unopenable(self.warnings, self.path, exc)
                self.health.failed(f"key file: {type(exc).__name__}", KEY, quiet=True)
                return None
            except ValueError as exc:
                self.key_problem = str(exc)
                self._trouble(
                    "storage_errors",
                    "keyfile",
                    "cannot use key file %s (%s); this process keeps its tokens in memory only. "
                    "Delete the file to regenerate it, or set AGW_CACHE_KEY",
                    self.key_file,
                    type(exc).__name__,
                )
                self.health.failed(f"key file: {type(exc).__name__}", KEY, quiet=True)
                return None
        return self._keyring

    def _read_key_file(self, key_file: Path) -> bytes:
        if self.read_only:  # diagnostics read a key file, never make one
            return decode_key(read_private(key_file), what=f"key file {key_file}")
        if isinstance(self.backend, SqliteBackend):
            self.backend.prepare()  # look before creating: a path not ours gets no key file
        return load_or_create_key_file(key_file)

    def key(self, kind: str, scope_key: str, user_jwt: str | None) -> Key:
        """The key of a (kind, scope, user); checks the arguments (the API boundary). A
        ``local`` one (memory tier only) while this process has no usable key."""
        cached = self._keys.get((kind, scope_key, user_jwt))
        if cached is not None:
            return cached
        check_identity(kind, scope_key, user_jwt)
        ring = self.ring()
        uhash = user_hash(user_jwt if kind == "user" else None)
        if ring is None:
            return Key(kind, scope_key, uhash, (), _NO_READ, (kind, scope_key, uhash), True)
        digests = ring.digests(kind, scope_key, uhash)
        key = Key(kind, scope_key, uhash, digests, Read(digests), (kind, scope_key, uhash))
        if len(self._keys) >= _MEMO_MAX:
            self._keys.clear()
        self._keys[(kind, scope_key, user_jwt)] = key
        return key

    # -- what a row means (shared by hits and flights) -----------------------------------------

    def judge(self, key: Key, snap: Snapshot, now: float) -> Lookup:
        """The usable entry in ``snap`` (or None), a write to do afterwards, refresh due.

        The memory tier holds what this process last opened per key with the row's random
        nonce and the generation it opened under: an unchanged row is not decrypted again, a
        rewritten one (a new generation in its header too) always is. A token the store never
        took is served on a miss until a clear() moves the generation. What this process has
        seen never goes backwards: a store whose generation is lower than one seen here
        (restored, rewound, lost) is fenced back up first. (The hot path of every hit:
        settings are read from attributes set up once.)
        """
        if snap.generation != self._generation:
            if snap.generation < self._generation:
                return Lookup(None, Fence(self._generation), False)
            self._generation = snap.generation
        row = snap.row
        if row is None:
            return self._unshared(key, snap.generation, now)
        if row.generation != snap.generation:  # written before a clear(), or replayed
            return Lookup(None, Delete((row.digest,), row.nonce), False)
        if row.created_at > now + self._future_slack:
            return _MISS  # its lifetime cannot be told on our clock: fetched anew
        memo = self._kept.get(key.ident)  # MemoryTier.get, inline: every hit passes here
        if memo is not None and memo[1] == row.nonce and memo[2] == row.generation:
            entry = memo[0]
            try:  # noqa: SIM105  (no context manager per hit)
                self._kept.move_to_end(key.ident)
            except KeyError:  # dropped by another thread meanwhile
                pass
        else:
            opened = self._open(key, row)
            if opened is None:
                return Lookup(None, Delete((row.digest,), row.nonce), False)
            entry = opened
        # Capped on read: a row written under a clock running ahead (or planted) is not
        # served for longer than max_token_ttl_seconds from now.
        latest = now + self._max_ttl
        if entry.expires_at > latest:
            entry = CachedToken(entry.token, latest, entry.extra)
        remaining = entry.expires_at - self._buffer - now
        if remaining <= 0:
            return _MISS
        touch = Touch(row.digest, now) if now - row.last_used >= self._touch_every else None
        due = remaining <= self._refresh_share * (entry.expires_at - row.created_at)
        return _new(Lookup, (entry, touch, due))  # Lookup(...), without its Python __new__

    def _open(self, key: Key, row: SealedRow) -> CachedToken | None:
        ring = self.ring()
        try:
            if ring is None:
                raise UnsealError("no key")
            envelope = ring.open(row)
            if envelope.scope_key != key.scope_key or envelope.uhash != key.uhash:
                raise UnsealError("envelope belongs to another key")
        except UnsealError as exc:
            if self._unopened.get(row.digest) == row.nonce:
                return None  # the same broken row, met again in one call: counted once
            self._unopened[row.digest] = row.nonce
            if len(self._unopened) > _MEMO_MAX:
                self._unopened.clear()
            self._trouble(
                "decrypt_failures",
                "unseal",
                "a cached token in %s did not open (%s); dropped it and fetching anew. "
                "Rows sealed under another key or altered in storage are treated as misses",
                self.backend.location,
                exc,
            )
            return None
        extra = MappingProxyType(dict(envelope.extra)) if envelope.extra else _NO_EXTRA
        entry = CachedToken(envelope.token, envelope.expires_at, extra)
        self.memory.put(key.ident, Kept(entry, row.nonce, row.generation))
        return entry

    def _unshared(self, key: Key, generation: int, now: float) -> Lookup:
        """A store miss: a token this process holds that the store never took (its write
        failed) is still served while no clear() came since; anything else it remembers
        was invalidated, cleared or replaced elsewhere, and goes."""
        kept = self.memory.get(key.ident)
        if kept is None:
            return _MISS
        if kept.nonce is None and kept.generation == generation:
            entry = self.memory.usable(key.ident, now, self._buffer)
            if entry is not None:
                self.counters.served_from_memory += 1
                return Lookup(entry, None, False)
        self.memory.drop(key.ident)
        return _MISS

    def remembered(self, key: Key, now: float) -> CachedToken | None:
        """The token the memory tier holds for ``key``: the store could not answer."""
        entry = self.memory.usable(key.ident, now, self._buffer)
        if entry is not None:
            self.counters.served_from_memory += 1
        return entry

    def keep(self, key: Key, entry: CachedToken) -> None:
        """Remember a token the store did not take: this process serves it from memory."""
        self.memory.put(key.ident, Kept(entry, None, self._generation))

    def uses_store(self, key: Key) -> bool:
        """Whether a flight of ``key`` goes through the store now (else: memory only)."""
        return not key.local and self.backend.unavailable is None

    def _counted(self, key: Key, snap: Snapshot) -> Lookup:
        lookup = self.judge(key, snap, time.time())
        if lookup.entry is None:
            self.counters.misses += 1
        else:
            self.counters.hits += 1
        return lookup

    def hit(
        self,
        kind: str,
        scope_key: str,
        user_jwt: str | None,
        read: Callable[[Read], Snapshot | None],
    ) -> Hit | None:
        """The hot path, without a flight: a clean hit (nothing to write afterwards), read
        with ``read``; None for anything else (a miss, a write due, trouble, ``read`` could
        not answer at once): then the caller runs the flight, which looks again."""
        key = self.key(kind, scope_key, user_jwt)
        if key.local:
            return None
        try:
            snap = read(key.read)
        except StorageError as exc:  # the memory tier answers, or the flight meets it again
            self.health.failed(str(exc), READ, quiet=isinstance(exc, StorageUnavailable))
            kept = self.remembered(key, time.time())
            if kept is None:
                return None
            self.counters.storage_errors += 1
            self.counters.hits += 1
            return _new(Hit, (kept, False))
        if snap is None:
            return None
        if self._down:
            self.health.succeeded(READ)
        entry, followup, due = self.judge(key, snap, time.time())
        if entry is None or followup is not None:
            return None
        self.counters.hits += 1
        return _new(Hit, (entry, due))

    def lookup(self, key: Key) -> Flight[Lookup]:
        """A hit or a miss; when the store cannot answer, the memory tier does (counted)."""
        try:
            if key.local:
                raise StorageUnavailable("no usable key")
            lookup = self._counted(key, (yield key.read))
            if lookup.entry is None and not self._keys_compared:
                yield from self._compare_keys()
        except StorageError as exc:
            if not key.local:
                self.storage_failed(exc)
            entry = self.remembered(key, time.time())
            if entry is None:
                self.counters.misses += 1
                return _MISS
            self.counters.hits += 1
            return Lookup(entry, None, False)
        if lookup.followup is not None:
            try:
                yield lookup.followup
            except StorageError as exc:
                self.storage_failed(exc)
        return lookup

    # -- writes --------------------------------------------------------------------------------

    def store(
        self, key: Key, entry: CachedToken, generation: int | None, fence: bytes | None = None
    ) -> Flight[bool]:
        """Seal and write ``entry``. With ``generation`` (a fetch), refuse if a clear() came
        since, or (``fence``, see ``Write.fence``) if a newer row took the one read; without
        (a plain set), seal under the current generation."""
        ring = self.ring()
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
            check = None if kid in self._checked else ring.primary.check
            if (yield Write(row, key.digests[1:], check, fence)):
                self._checked.add(kid)
                self.memory.put(key.ident, Kept(entry, nonce, gen))
                return True
            if generation is not None:  # a clear() or a newer token came since: keep them
                self.counters.stale_writes_skipped += 1
                return False
            snap: Snapshot = yield key.read  # a clear() we had not seen: learn its generation
            gen = self._generation = max(self._generation, snap.generation)
        return False

    def set(
        self,
        kind: str,
        scope_key: str,
        token_data: TokenData,
        user_jwt: str | None,
        expires_at: float | None,
    ) -> Flight[tuple[CachedToken, bool]]:
        """Store a token; the flight returns it and whether it was stored."""
        key = self.key(kind, scope_key, user_jwt)
        entry = normalize(token_data, now=time.time(), expires_at=expires_at, config=self.config)
        ok = False
        if key.local:
            self.keep(key, entry)
        else:
            try:
                ok = yield from self.store(key, entry, None)
                yield from self.prune_if_due()
            except StorageError as exc:
                self.storage_failed(exc)
                if not ok:
                    self.keep(key, entry)
        if not ok:  # why was warned where it happened (storage, key, clear race)
            self.counters.sets_not_stored += 1
        return entry, ok

    def invalidate(
        self, kind: str, scope_key: str, user_jwt: str | None, token: str | None
    ) -> Flight[bool]:
        key = self.key(kind, scope_key, user_jwt)
        kept = self.memory.get(key.ident)
        if token is None or (kept is not None and hmac.compare_digest(kept.entry.token, token)):
            self.memory.drop(key.ident)  # this process stops serving it, whatever the store
        try:
            if key.local:
                raise StorageUnavailable("no usable key")
            if token is None:
                removed: int = yield Delete(key.digests)
                return removed > 0
            snap: Snapshot = yield key.read
            row = snap.row
            if row is None:
                return False
            entry = self.judge(key, snap, time.time()).entry
            if entry is not None and not hmac.compare_digest(entry.token, token):
                return False  # another process already replaced the rejected token: keep it
            self.memory.drop(key.ident)
            gone: int = yield Delete((row.digest,), row.nonce)
            return gone > 0
        except StorageError as exc:
            raise_if(self._reported(exc, "invalidate", outage=True))
        return False

    def clear(self) -> Flight[None]:
        """Move the generation past every one seen (old rows no longer open), then delete
        the old rows in short steps (so that losing the generation cannot revive them)."""
        self.memory.clear()  # this process forgets, even if the store cannot be reached
        try:
            gen = yield Clear()
            if gen <= self._generation:  # the store went back since we last looked
                gen = yield Fence(self._generation + 1)
            self._generation = gen
        except StorageError as exc:
            raise_if(self._reported(exc, "clear", outage=True))
        try:
            for _step in range(_SWEEPS_MAX):
                if not (yield Sweep()):
                    break
        except StorageError as exc:  # fenced already; a later prune deletes the rest
            self.storage_failed(exc)

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
        removed: int | None = yield Prune(now, limits, compact)
        return removed or 0  # None: skipped, another process was writing

    def prune(self) -> Flight[int]:
        try:
            return (yield from self._prune(compact=True))
        except StorageError as exc:
            raise_if(self._reported(exc, "prune"))
        return 0

    def _reported(
        self, exc: StorageError, what: str, *, outage: bool = False
    ) -> CacheStorageError | None:
        """The error a change that did not happen raises; None for an unusable store,
        unless ``outage`` (a clear or an invalidation: this process has forgotten, but the
        other processes cannot be told).
        """
        self.storage_failed(exc)
        if isinstance(exc, StorageUnavailable) and not outage:
            return None
        return CacheStorageError(
            f"{what} did not take effect: {exc}; the token cache was not changed (retry, or "
            "run `agw-cache doctor`)"
        )

    # -- trouble, counted once -----------------------------------------------------------------

    def key_verdict(self) -> Flight[KeyVerdict | None]:
        """Whether the configured keys open the stored rows, and the key ids that wrote
        them; None without a key or without rows. A bounded read, whatever the size."""
        ring = self.ring()
        found: KeyChecks = yield GetKeyChecks()
        if ring is None or not found.rows:
            return None
        return KeyVerdict(*ring.opens(found))

    def _compare_keys(self) -> Flight[None]:
        """Once per process, at the first miss: rows written under keys we do not have are
        a wrong key (digests are keyed, so they would only ever miss). Say so, and count."""
        self._keys_compared = True
        verdict = yield from self.key_verdict()
        ring = self.ring()
        if verdict is not None and not verdict[0] and ring is not None:
            facts: Facts = yield GetFacts(time.time())  # how many rows: for the message only
            rows = facts.entries_system + facts.entries_user
            self._trouble(
                "key_mismatch",
                "key-mismatch",
                "the configured key does not open the token cache at %s: %d rows were written "
                "under key ids %s, this process has %s. Deploy the same AGW_CACHE_KEY to every "
                "process (`agw-cache doctor` checks it)",
                self.backend.location,
                rows,
                ", ".join(verdict[1]) or "-",
                ", ".join(ring.kids),
            )

    def timed(self, what: str, key: Key, seconds: float, ok: bool = True) -> None:
        """Hand a fetch's or a lock wait's duration to OpenTelemetry (no-op without it)."""
        if what == "fetch":
            outcome = "ok" if ok else "error"
            _otel.record_fetch(seconds, kind=key.kind, backend=self.backend.name, outcome=outcome)
        else:
            _otel.record_lock_wait(seconds, kind=key.kind, backend=self.backend.name)

    def _trouble(self, counter: str, category: str, message: str, *args: object) -> None:
        """Count an event in ``counters.<counter>`` and warn about it at most once a minute."""
        setattr(self.counters, counter, getattr(self.counters, counter) + 1)
        self.warnings.once(category, message, *args)

    def storage_failed(self, exc: StorageError) -> None:
        """Count a storage failure; the caller carries on with the memory tier (the warning
        is the health's, once per transition)."""
        self.counters.storage_errors += 1

    def lock_trouble(self, result: LockResult, key: Key) -> None:
        """A lock not had: after a timeout, or because the lock itself failed (I/O)."""
        if result is LockResult.TIMEOUT:
            self._trouble(
                "lock_timeouts",
                "lock",
                "waited %.1fs for another process's token fetch; fetching anyway "
                "(raise CacheConfig.lock_timeout_seconds if fetches are slow)",
                self.config.lock_timeout_seconds,
            )
        else:
            self._trouble(
                "lock_errors",
                "lock-error",
                "the cross-process lock of the token cache at %s failed; fetching without "
                "de-duplication across processes (run `agw-cache doctor`)",
                self.backend.location,
            )

    # -- get, get-or-fetch ---------------------------------------------------------------------

    def get(self, kind: str, scope_key: str, user_jwt: str | None) -> Flight[CachedToken | None]:
        """The cached token, or None."""
        return (yield from self.lookup(self.key(kind, scope_key, user_jwt))).entry

    def fetch(
        self,
        kind: str,
        scope_key: str,
        user_jwt: str | None,
        refresh_later: Callable[[Key], None],
    ) -> Flight[CachedToken]:
        """Get-or-fetch: a hit (maybe handing a due refresh to ``refresh_later``), or the
        single flight; straight to the fetch when the store is unusable."""
        key = self.key(kind, scope_key, user_jwt)
        lookup = yield from self.lookup(key)
        if lookup.entry is not None:
            if lookup.due and self._may_refresh(key):
                refresh_later(key)
            return lookup.entry
        entry = yield from fill(self, key, refresh=False)
        assert entry is not None  # only a refresh ends without a token
        return entry

    def _may_refresh(self, key: Key) -> bool:
        """At most one attempt per key per process every couple of seconds."""
        now = time.monotonic()
        if now - self._refresh_attempts.get(key.digest, -1e9) < _REFRESH_RETRY_SECONDS:
            return False
        if len(self._refresh_attempts) >= _MEMO_MAX:
            self._refresh_attempts.clear()
        self._refresh_attempts[key.digest] = now
        return True

    def refreshed(self, outcome: CachedToken | BaseException | None) -> None:
        """Count a background refresh, or warn that it failed (the old token stays)."""
        if isinstance(outcome, BaseException):
            self.warnings.once(
                "refresh",
                "background token refresh failed (%s); the cached token stays in use until "
                "it expires",
                type(outcome).__name__,
            )
        elif outcome is not None:
            self.counters.refreshes += 1


def raise_if(error: CacheStorageError | None) -> None:
    """Raise ``error`` if there is one, without chaining the storage error behind it."""
    if error is not None:
        raise error from None
