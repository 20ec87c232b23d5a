"""The cache's decisions, as flights: what a row means, what to store, what to forget.

:class:`TokenShelf` holds one cache's keys, memo and counters and writes every decision
of the cache once, as a generator of steps (see ``_flight``): a get, a get-or-fetch
(whose miss path is ``_flight.fill``), a set, an invalidation, a clear, a prune, the
facts for ``stats()``, a re-seal. It performs no I/O of its own except reading or
creating the key file; ``PersistentTokenCache`` runs its flights with a sync or an async
driver.
"""

from __future__ import annotations

import dataclasses
import hmac
import math
import os
import random
import time
from collections.abc import Callable
from pathlib import Path
from types import MappingProxyType
from typing import Any

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
from ._errors import CacheStorageError, CacheUsageError
from ._expiry import CachedToken, TokenData, normalize
from ._files import read_private
from ._flight import FETCH, Flight, Hit, Key, Lookup, fill
from ._log import Warnings, warn_unopenable
from ._stats import CacheStats, Counters, EntryInfo
from .backends.contract import (
    Backend,
    Clear,
    Delete,
    Facts,
    Fence,
    GetFacts,
    GetKeyChecks,
    KeyChecks,
    ListRows,
    LockResult,
    Prune,
    Read,
    Replace,
    RowInfo,
    RowsNotUnder,
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
_new = tuple.__new__
_NO_EXTRA: MappingProxyType[str, str] = MappingProxyType({})
_NO_FACTS: dict[str, Any] = {
    "entries_system": 0,
    "entries_user": 0,
    "entries_expired": 0,
    "oldest_expiry": None,
    "newest_expiry": None,
    "schema_version": None,
    "key_ids_in_use": (),
    "file_bytes": 0,
    "wal_bytes": 0,
}
_REFRESH_RETRY_SECONDS = 2.0
LIST_PAGE = 500  # rows of one ListRows step (about a millisecond or two of a Redis server)
_SWEEPS_MAX = 10_000  # steps of a clear()'s sweep (Sweep.limit rows each)
_RESEAL_PASSES = 4  # passes of a re-seal over every row
FUTURE_SLACK_SECONDS = 5.0
"""SQLite: a row created further than this in the future (by this host's clock) is a miss,
so that a row outlives the lifetime it was written with by this much at most."""
MAX_SCOPE_KEY_CHARS = 8 * 1024
MAX_USER_JWT_CHARS = 64 * 1024


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
            self.key_file = Path(os.fspath(kf)) if kf else path.with_name(path.name + ".key")
        self._keyring: Keyring | None = Keyring(explicit.keys) if explicit else None
        # digest -> (nonce, generation, entry) of the row last opened here
        self._memo: dict[bytes, tuple[bytes, int, CachedToken]] = {}
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

    @property
    def needs_key_file(self) -> bool:
        """The key comes from a file not read yet (file I/O: keep it off event loops)."""
        return self._keyring is None and self.key_file is not None

    def ring(self) -> Keyring | None:
        if self._keyring is None and self.key_file is not None and not self.backend.unavailable:
            try:
                if self.read_only:  # diagnostics read a key file, never make one
                    what = f"key file {self.key_file}"
                    master = decode_key(read_private(self.key_file), what=what)
                else:
                    if isinstance(self.backend, SqliteBackend):
                        self.backend.prepare_dirs()
                    master = load_or_create_key_file(self.key_file)
                self._keyring = Keyring([master])
            except OSError as exc:  # the directory is unusable: the store's own warning
                if self.read_only and isinstance(exc, FileNotFoundError):
                    return None  # no key file: rows are counted, not opened
                self.counters.storage_errors += 1
                warn_unopenable(self.warnings, self.path, exc)
                return None
            except ValueError as exc:
                self._trouble(
                    "storage_errors",
                    "keyfile",
                    "cannot use key file %s (%s); tokens are fetched directly. Delete the file "
                    "to regenerate it, or set AGW_CACHE_KEY",
                    self.key_file,
                    type(exc).__name__,
                )
                return None
        return self._keyring

    def key(self, kind: str, scope_key: str, user_jwt: str | None) -> Key | None:
        """The key of a (kind, scope, user); checks the arguments (the API boundary)."""
        cached = self._keys.get((kind, scope_key, user_jwt))
        if cached is not None:
            return cached
        _check_identity(kind, scope_key, user_jwt)
        ring = self.ring()
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
        nonce and the generation it opened under: an unchanged row is not decrypted again, a
        rewritten one (a new generation in its header too) always is. What this process has
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
            return _MISS
        if row.generation != snap.generation:  # written before a clear(), or replayed
            return Lookup(None, Delete((row.digest,), row.nonce), False)
        if row.created_at > now + self._future_slack:
            return _MISS  # its lifetime cannot be told on our clock: fetched anew
        memo = self._memo.get(row.digest)
        if memo is not None and memo[0] == row.nonce and memo[1] == row.generation:
            entry = memo[2]
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
        if len(self._memo) >= _MEMO_MAX:
            self._memo.pop(next(iter(self._memo), b""), None)
        self._memo[row.digest] = (row.nonce, row.generation, entry)
        return entry

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
        if key is None:
            return None
        try:
            snap = read(key.read)
        except StorageError:
            return None  # the flight meets it again, and counts it once
        if snap is None:
            return None
        entry, followup, due = self.judge(key, snap, time.time())
        if entry is None or followup is not None:
            return None
        self.counters.hits += 1
        return _new(Hit, (entry, due))

    def lookup(self, key: Key | None) -> Flight[Lookup]:
        """A hit or a miss; storage trouble is a miss (counted, warned once)."""
        if key is None:
            self.counters.misses += 1
            return _MISS
        try:
            lookup = self._counted(key, (yield key.read))
            if lookup.entry is None and not self._keys_compared:
                yield from self._compare_keys()
        except StorageError as exc:
            self.storage_failed(exc)
            self.counters.misses += 1
            return _MISS
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
                self._memo[key.digest] = (nonce, gen, entry)
                for old in key.digests[1:]:
                    self._memo.pop(old, None)
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
        if key is not None:
            try:
                ok = yield from self.store(key, entry, None)
                yield from self.prune_if_due()
            except StorageError as exc:
                self.storage_failed(exc)
        if not ok:  # why was warned where it happened (storage, key, clear race)
            self.counters.sets_not_stored += 1
        return entry, ok

    def invalidate(
        self, kind: str, scope_key: str, user_jwt: str | None, token: str | None
    ) -> Flight[bool]:
        key = self.key(kind, scope_key, user_jwt)
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

    def clear(self) -> Flight[None]:
        """Move the generation past every one seen (old rows no longer open), then delete
        the old rows in short steps (so that losing the generation cannot revive them)."""
        self._memo.clear()
        try:
            gen = yield Clear()
            if gen <= self._generation:  # the store went back since we last looked
                gen = yield Fence(self._generation + 1)
            self._generation = gen
        except StorageError as exc:
            raise_if(self._reported(exc, "clear"))
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

    def key_verdict(self) -> Flight[tuple[bool, tuple[str, ...]] | None]:
        """Whether the configured keys open the stored rows, and the key ids that wrote
        them; None without a key or without rows. A bounded read, whatever the size."""
        ring = self.ring()
        found: KeyChecks = yield GetKeyChecks()
        if ring is None or not found.rows:
            return None
        return ring.opens(found)

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
        """Count a storage failure and warn once; the caller carries on without the cache."""
        self.counters.storage_errors += 1
        if isinstance(exc, StorageUnavailable):
            return  # the store said why when it gave up on the file
        self.warnings.once(
            f"storage:{exc}",
            "token cache operation failed on %s (%s); carrying on without it",
            self.backend.location,
            exc,
        )

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
            if lookup.due and key is not None and self._may_refresh(key):
                refresh_later(key)
            return lookup.entry
        if key is None or self.backend.unavailable:
            self.counters.fetches += 1
            started = time.time()
            data: TokenData = yield FETCH
            if key is not None:
                self.timed("fetch", key, time.time() - started)
            return normalize(data, now=time.time(), expires_at=None, config=self.config)
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

    # -- whole-store facts and re-sealing -------------------------------------------------------

    def facts(self) -> Flight[CacheStats]:
        try:
            facts = yield GetFacts(time.time())
        except StorageError as exc:
            self.storage_failed(exc)
            facts = None
        found = _NO_FACTS if facts is None else facts._asdict()
        return CacheStats(
            **dataclasses.asdict(self.counters),
            **found,
            disabled_reason=self.backend.unavailable,
            backend=self.backend.name,
        )

    def entries(self) -> Flight[list[EntryInfo]]:
        """Every row's metadata, read in pages (on Redis each page is a short script)."""
        rows: list[RowInfo] = []
        try:
            facts: Facts = yield GetFacts(time.time())
            total = facts.entries_system + facts.entries_user
            for start in range(0, total, LIST_PAGE):
                rows += yield ListRows(start, LIST_PAGE)
        except StorageError as exc:
            self.storage_failed(exc)
            return []
        return [
            EntryInfo(r.kind, r.digest.hex()[:12], r.expires_at, r.last_used, r.created_at, r.kid)
            for r in rows
        ]

    def reseal(self, batch: int) -> Flight[int]:
        """Re-seal every row not under the primary key; rows no key opens are left to expire.

        Windows of ``batch`` positions at a time (each a short step); rows written meanwhile
        shift positions, so passes repeat until one finds nothing to re-seal."""
        ring = self.ring()
        if ring is None:
            return 0
        done = 0
        for _pass in range(_RESEAL_PASSES):
            facts: Facts = yield GetFacts(time.time())
            total = facts.entries_system + facts.entries_user
            resealed = 0
            for start in range(0, total, batch):
                rows: list[SealedRow] = yield RowsNotUnder(
                    ring.primary.kid, batch, (), start, batch
                )
                for row in rows:
                    try:
                        envelope = ring.open(row)
                    except UnsealError:
                        continue
                    (digest, *_) = ring.digests(row.kind, envelope.scope_key, envelope.uhash)
                    kid, nonce, ct = ring.seal(row.kind, digest, row.generation, envelope)
                    new = row._replace(digest=digest, kid=kid, nonce=nonce, ct=ct)
                    yield Replace(row.digest, new)
                    self._memo.pop(row.digest, None)
                    resealed += 1
            done += resealed
            if not resealed:
                break
        return done


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
