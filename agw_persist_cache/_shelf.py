"""What a row means: one cache's keys, memory tier, health and counters, and the decisions
about a single row, with no I/O of their own but reading or creating the key file.

:class:`TokenShelf` derives a key's digests (:meth:`~TokenShelf.key`), judges what a read
found (:meth:`~TokenShelf.judge`: open it, or remember the opened token, decide expiry,
refresh-ahead and what to write afterwards), and seals a token into a write
(:meth:`~TokenShelf.seal`). The multi-step decisions that use it (get-or-fetch, set,
invalidate, clear, prune) are flows one floor up, in ``_flight`` and ``_writes``.
"""

from __future__ import annotations

import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, NamedTuple

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
from ._expiry import CachedToken
from ._files import key_file_of, read_private
from ._health import KEY, Health
from ._identity import check_identity
from ._log import Warnings, warn_unopenable
from ._memory import Ident, Kept, MemoryTier
from ._stats import Counters
from .backends.contract import (
    Backend,
    Delete,
    Fence,
    LockResult,
    Op,
    Read,
    SealedRow,
    Snapshot,
    StorageError,
    StorageUnavailable,
    Touch,
    Write,
)

_MEMO_MAX = 4096
_NO_READ = Read(())
_new = tuple.__new__
_NO_EXTRA: MappingProxyType[str, str] = MappingProxyType({})
_REFRESH_RETRY_SECONDS = 2.0
FUTURE_SLACK_SECONDS = 5.0
"""SQLite: a row created further than this in the future (by this host's clock) is a miss,
so that a row outlives the lifetime it was written with by this much at most."""


@dataclass(frozen=True, slots=True)
class Key:
    """What identifies a cached token: kind, scope and user (as a hash), and its digests.

    A ``local`` key has no digests: the process has no usable key for the store, so the
    token lives in its memory tier only."""

    kind: str
    scope_key: str
    uhash: str
    digests: tuple[bytes, ...]  # one per configured key; new rows go under the first
    read: Read  # the lookup of this key, built once
    ident: Ident  # (kind, scope_key, uhash): the memory tier's and the flights' key
    local: bool = False

    @property
    def digest(self) -> bytes:
        return self.digests[0]

    def __repr__(self) -> str:
        shown = self.digest.hex()[:12] + "..." if self.digests else "local"
        return f"Key(kind={self.kind!r}, digest={shown})"


class Lookup(NamedTuple):
    """What a read means now: a usable entry (or None), a write to do, refresh due."""

    entry: CachedToken | None
    followup: Op[Any] | None
    due: bool


MISS = Lookup(None, None, False)


class TokenShelf:
    """One cache's keys, memory tier, health and counters, and its decisions about a row."""

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
        self._kept = self.memory.kept  # the hot path reads these without a call
        self.down = self.health.state
        self._keys: dict[tuple[str, str, str | None], Key] = {}
        jitter = random.uniform(0.0, 0.3)
        self._max_ttl = config.max_token_ttl_seconds
        self._buffer = config.token_expiry_buffer_seconds
        self._touch_every = config.last_used_interval_seconds
        # Refresh during the last ratio of a lifetime, jittered per process; 0 disables (-1).
        ratio = config.refresh_ahead_ratio
        self._refresh_share = ratio * (1 - jitter) if ratio > 0 else -1.0
        self.last_prune = 0.0
        self.generation = 0  # the highest clear() generation seen; sets seal under it
        # One host's processes share one clock: a row from its future was written while the
        # clock ran ahead. (Redis rows expire by the server's clock; hosts' clocks differ.)
        self._future_slack = FUTURE_SLACK_SECONDS if backend.name == "sqlite" else math.inf
        self._refresh_attempts: dict[bytes, float] = {}
        self._checked: set[str] = set()  # key ids whose check value this process stored
        self._unopened: dict[bytes, bytes] = {}  # digest -> nonce of rows that did not open
        self.keys_compared = False
        self.key_problem: str | None = None  # why the key file cannot be used (stats says)

    # -- keys ----------------------------------------------------------------------------------

    @property
    def needs_key_file(self) -> bool:
        """The key comes from a file not read yet (file I/O: keep it off event loops)."""
        return self._keyring is None and self.key_file is not None

    def ring(self) -> Keyring | None:
        """The keys, reading (or creating) the key file the first time; None while unusable."""
        if self._keyring is None and self.key_file is not None and not self.backend.unavailable:
            try:
                self._keyring = Keyring([self._read_key_file(self.key_file)])
                self.key_problem = None
                if self.down:
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
                self.trouble(
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

    # -- what a row means ----------------------------------------------------------------------

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
        if snap.generation != self.generation:
            if snap.generation < self.generation:
                return Lookup(None, Fence(self.generation), False)
            self.generation = snap.generation
        row = snap.row
        if row is None:
            return self._unshared(key, snap.generation, now)
        if row.generation != snap.generation:  # written before a clear(), or replayed
            return Lookup(None, Delete((row.digest,), row.nonce), False)
        if row.created_at > now + self._future_slack:
            return MISS  # its lifetime cannot be told on our clock: fetched anew
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
            return MISS
        touch = Touch(row.digest, now) if now - row.last_used >= self._touch_every else None
        due = remaining <= self._refresh_share * (entry.expires_at - row.created_at)
        return _new(Lookup, (entry, touch, due))  # Lookup(...), without its Python __new__

    def seen(self, key: Key, snap: Snapshot) -> Lookup:
        """What a read of ``key`` found, judged now and counted as a hit or a miss."""
        lookup = self.judge(key, snap, time.time())
        if lookup[0] is None:
            self.counters.misses += 1
        else:
            self.counters.hits += 1
        return lookup

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
            self.trouble(
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
            return MISS
        if kept.nonce is None and kept.generation == generation:
            entry = self.memory.usable(key.ident, now, self._buffer)
            if entry is not None:
                self.counters.served_from_memory += 1
                return Lookup(entry, None, False)
        self.memory.drop(key.ident)
        return MISS

    def unreadable(self, key: Key, exc: StorageError | None) -> Lookup:
        """The store could not answer (``exc``; None: no usable key): the memory tier does.
        Counted as a hit or a miss, and the error as storage trouble."""
        if exc is not None:
            self.storage_failed(exc)
        entry = self.remembered(key, time.time())
        if entry is None:
            self.counters.misses += 1
            return MISS
        self.counters.hits += 1
        return Lookup(entry, None, False)

    def remembered(self, key: Key, now: float) -> CachedToken | None:
        """The token the memory tier holds for ``key``: the store could not answer."""
        entry = self.memory.usable(key.ident, now, self._buffer)
        if entry is not None:
            self.counters.served_from_memory += 1
        return entry

    def keep(self, key: Key, entry: CachedToken) -> None:
        """Remember a token the store did not take: this process serves it from memory."""
        self.memory.put(key.ident, Kept(entry, None, self.generation))

    def uses_store(self, key: Key) -> bool:
        """Whether a flow of ``key`` goes through the store now (else: memory only)."""
        return not key.local and self.backend.unavailable is None

    # -- what to write -------------------------------------------------------------------------

    def seal(
        self, key: Key, entry: CachedToken, generation: int, fence: bytes | None
    ) -> Write | None:
        """The write that stores ``entry`` under ``generation``; None without a usable key."""
        ring = self.ring()
        if ring is None:
            return None
        now = time.time()
        envelope = Envelope(entry.token, entry.expires_at, key.scope_key, key.uhash, entry.extra)
        kid, nonce, ct = ring.seal(key.kind, key.digest, generation, envelope)
        row = SealedRow(
            key.digest, key.kind, kid, nonce, ct, entry.expires_at, generation, now, now
        )
        check = None if kid in self._checked else ring.primary.check
        return Write(row, key.digests[1:], check, fence)

    def stored(self, key: Key, entry: CachedToken, write: Write) -> None:
        """``write`` took: this process knows its key check and remembers the token."""
        self._checked.add(write.row.kid)
        self.memory.put(key.ident, Kept(entry, write.row.nonce, write.row.generation))

    def too_short(self, entry: CachedToken) -> bool:
        """A fetched token that could never be served (it expires within the buffer)."""
        if entry.expires_at - self._buffer > time.time():
            return False
        self.warnings.once(
            "short-lived",
            "a fetched token expires within token_expiry_buffer_seconds (%.0fs): it was "
            "handed to its caller but not stored, since it could never be served. Lower "
            "CacheConfig.token_expiry_buffer_seconds",
            self._buffer,
        )
        return True

    # -- refresh-ahead -------------------------------------------------------------------------

    def may_refresh(self, key: Key) -> bool:
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

    # -- trouble, counted once -----------------------------------------------------------------

    def trouble(self, counter: str, category: str, message: str, *args: object) -> None:
        """Count an event in ``counters.<counter>`` and warn about it at most once a minute."""
        setattr(self.counters, counter, getattr(self.counters, counter) + 1)
        self.warnings.once(category, message, *args)

    def storage_failed(self, exc: StorageError) -> None:
        """Count a storage failure; the caller carries on with the memory tier (the warning
        is the health's, once per transition)."""
        self.counters.storage_errors += 1

    def reported(
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

    def lock_trouble(self, result: LockResult) -> None:
        """A lock not had: after a timeout, or because the lock itself failed (I/O)."""
        if result is LockResult.TIMEOUT:
            self.trouble(
                "lock_timeouts",
                "lock",
                "waited %.1fs for another process's token fetch; fetching anyway "
                "(raise CacheConfig.lock_timeout_seconds if fetches are slow)",
                self.config.lock_timeout_seconds,
            )
        else:
            self.trouble(
                "lock_errors",
                "lock-error",
                "the cross-process lock of the token cache at %s failed; fetching without "
                "de-duplication across processes (run `agw-cache doctor`)",
                self.backend.location,
            )

    def timed(self, what: str, key: Key, seconds: float, ok: bool = True) -> None:
        """Hand a fetch's or a lock wait's duration to OpenTelemetry (no-op without it)."""
        if what == "fetch":
            outcome = "ok" if ok else "error"
            _otel.record_fetch(seconds, kind=key.kind, backend=self.backend.name, outcome=outcome)
        else:
            _otel.record_lock_wait(seconds, kind=key.kind, backend=self.backend.name)


def raise_if(error: CacheStorageError | None) -> None:
    """Raise ``error`` if there is one, without chaining the storage error behind it."""
    if error is not None:
        raise error from None
