"""The storage contract: what a token store must do, and nothing more.

A backend sees digests and sealed bytes only: never a token, scope, user or key
(sealing happens above it, in ``_crypto``). Every operation is a small typed value
(:class:`Op`) that a backend performs as ONE atomic step: a SQLite transaction, a
Redis Lua script or pipeline. The cache and the single-flight generator yield these
values; a backend's two drivers (``execute`` for threads, ``aexecute`` for asyncio)
are the only code that touches its client library.

Failures are raised as :class:`StorageError` (:class:`StorageUnavailable` while a
store cannot be opened at all); the cache decides per call whether that is hidden
(gets, get-or-fetch) or reported (clear, invalidate, set).
"""

from __future__ import annotations

import enum
from collections.abc import Generator, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Generic, NamedTuple, Protocol, TypeAlias, TypeVar

T = TypeVar("T")
T_co = TypeVar("T_co", covariant=True)


class SealedRow(NamedTuple):
    """One cached token as stored: identity, sealed bytes and the times that drive TTL/LRU."""

    digest: bytes
    kind: str  # "system" | "user"
    kid: str  # public id of the sealing key
    nonce: bytes
    ct: bytes
    expires_at: float
    generation: int  # the clear() generation it was written in (bound into the seal)
    last_used: float
    created_at: float


class Snapshot(NamedTuple):
    """What a read returns: the first row found among the digests, and the generation now."""

    row: SealedRow | None
    generation: int


class Backoff(NamedTuple):
    """A recent failed fetch: callers of that key fail fast until ``until`` (epoch)."""

    until: float
    cause: str
    status: int | None


class RowInfo(NamedTuple):
    """Metadata of one row for ``list_entries``: nothing sealed."""

    kind: str
    digest: bytes
    expires_at: float
    last_used: float
    created_at: float
    kid: str


class Facts(NamedTuple):
    """Aggregates for ``stats()``, in the order ``CacheStats`` shows them; ``Facts()`` is what
    a store that could not answer reports."""

    entries_system: int = 0
    entries_user: int = 0
    entries_expired: int = 0
    oldest_expiry: float | None = None
    newest_expiry: float | None = None
    file_bytes: int = 0
    wal_bytes: int = 0
    schema_version: int | None = None
    key_ids_in_use: tuple[str, ...] = ()


class KeyChecks(NamedTuple):
    """What tells whether a process's keys open the stored rows, read without a scan."""

    rows: bool  # any row at all
    checks: tuple[tuple[str, bytes], ...]  # (key id, check value) of keys that wrote
    kids: tuple[str, ...]  # the rows' key ids, only from a store that keeps no check values


class StorageError(Exception):
    """The store failed one operation (locked, full, corrupt, unreachable)."""


class StorageUnavailable(StorageError):
    """The store cannot be used at all right now (unopenable, newer schema); retried later."""


# -- operations ------------------------------------------------------------------------------


class Op(Generic[T_co]):
    """One atomic storage step whose result is a ``T_co``.

    ``writes``: the step changes the store. ``nowait``: it must not wait for other
    writers (a best-effort step skipped when the store is busy).
    """

    __slots__ = ()
    writes: ClassVar[bool] = False
    nowait: ClassVar[bool] = False


@dataclass(frozen=True, slots=True)
class Read(Op[Snapshot]):
    """The row under the first of ``digests`` that has one (rotation: new key, then old)."""

    digests: tuple[bytes, ...]


@dataclass(frozen=True, slots=True)
class Write(Op[bool]):
    """Store ``row`` and drop ``replaces``; refuse (False) if a clear moved the generation
    away from ``row.generation`` since it was read."""

    writes: ClassVar[bool] = True
    row: SealedRow
    replaces: tuple[bytes, ...] = ()
    key_check: bytes | None = None  # record the check value of row.kid too (once a process)
    fence: bytes | None = None
    """A fetch's write: the nonce of the row it read before fetching (``ABSENT``: none).
    Refused if another row took that place since (a newer token written by a process that
    took the key's lock after ours lapsed). ``None``: unconditional (a plain set)."""


ABSENT = b""
"""``Write.fence`` of a fetch that found no row under its digest."""


@dataclass(frozen=True, slots=True)
class Delete(Op[int]):
    """Remove the rows of ``digests``; with ``nonce``, only a row that still holds it."""

    writes: ClassVar[bool] = True
    digests: tuple[bytes, ...]
    nonce: bytes | None = None


@dataclass(frozen=True, slots=True)
class Clear(Op[int]):
    """Drop every row and back-off mark for every process; returns the new generation."""

    writes: ClassVar[bool] = True


@dataclass(frozen=True, slots=True)
class Sweep(Op[int]):
    """Drop up to ``limit`` of the rows a clear() fenced off but left in place; returns
    how many are still left (0: the clear is complete). Each step is short, however many
    rows there were."""

    writes: ClassVar[bool] = True
    limit: int = 200  # about a millisecond of a Redis server's time


@dataclass(frozen=True, slots=True)
class Fence(Op[int]):
    """Raise the store's clear() generation to at least ``generation`` (a store restored
    from a backup, or whose generation was lost or rewound, must not revive what a clear()
    this process saw removed); returns the generation now."""

    writes: ClassVar[bool] = True
    generation: int


@dataclass(frozen=True, slots=True)
class Prune(Op[int]):
    """Drop expired rows, then per kind the least recently used beyond ``limits[kind]``."""

    writes: ClassVar[bool] = True
    now: float
    limits: Mapping[str, int]
    compact: bool = False  # also give space back (explicit prunes)


@dataclass(frozen=True, slots=True)
class Touch(Op[None]):
    """Record a use for LRU; best effort, skipped when the store is busy."""

    writes: ClassVar[bool] = True
    nowait: ClassVar[bool] = True
    digest: bytes
    now: float


@dataclass(frozen=True, slots=True)
class GetBackoff(Op["Backoff | None"]):
    """The back-off mark of a key, if any. A mark is honoured at most ``longest`` seconds
    after it was written, by the store's own clock where it has one (Redis ``TIME``)."""

    digest: bytes
    longest: float = float("inf")


@dataclass(frozen=True, slots=True)
class SetBackoff(Op[None]):
    """Mark a key as failing until ``backoff.until``."""

    writes: ClassVar[bool] = True
    digest: bytes
    backoff: Backoff


@dataclass(frozen=True, slots=True)
class GetFacts(Op[Facts]):
    """Counts by kind, expiry range, sizes, schema version, key ids in use."""

    now: float


@dataclass(frozen=True, slots=True)
class GetKeyChecks(Op[KeyChecks]):
    """Whether there are rows and the check values of the keys that wrote them (a process's
    first miss asks: it must stay cheap however many rows there are)."""


@dataclass(frozen=True, slots=True)
class ListRows(Op[list[RowInfo]]):
    """Metadata of the rows at positions ``start`` to ``start + count`` (``None``: to the
    end) in the order system rows, then user rows, most recently used first within each
    kind; positions whose row has gone meanwhile give nothing. Pages keep each step short."""

    start: int = 0
    count: int | None = None


@dataclass(frozen=True, slots=True)
class RowsNotUnder(Op[list[SealedRow]]):
    """Up to ``limit`` rows sealed under a key other than ``kid`` (for re-sealing), among the
    ``scan`` positions from ``start`` (``None``: to the end) in the order system rows, then
    user rows, least recently used first. Windows keep each step short."""

    kid: str
    limit: int
    skip: tuple[bytes, ...] = ()
    start: int = 0
    scan: int | None = None


@dataclass(frozen=True, slots=True)
class Replace(Op[bool]):
    """Put ``row`` (re-sealed) in place of ``old``, unless a newer row took its digest.

    ``key_check``: the check value of ``row.kid``, recorded (a store that keeps check values
    then forgets those of key ids no row uses any more): after a rotation the new key alone
    is known to open the rows, the old one alone is not."""

    writes: ClassVar[bool] = True
    old: bytes
    row: SealedRow
    key_check: bytes | None = None


OpFlow: TypeAlias = Generator[Op[Any], Any, T]
"""A flow of operations: a decision that yields each operation it needs and receives its
result (or has its ``StorageError`` thrown in); run by ``_steps.drive`` / ``adrive``."""


# -- the per-key cross-process lock --------------------------------------------------------------


class LockResult(enum.Enum):
    """How an attempt at a key's cross-process lock ended."""

    HELD = "held"
    LANDED = "landed"  # its holder let go (its flight has landed): read again, then retry
    TIMEOUT = "timeout"  # another process held it past the wait: fetch anyway
    BUSY = "busy"  # a non-blocking try found it held (refresh-ahead: someone else does it)
    ERROR = "error"  # the lock itself failed (I/O): fetch anyway, counted apart


class KeyLock(Protocol):
    """A per-key lock shared by every process using the store. Unrelated keys never wait."""

    def acquire(self, wait: float | None) -> LockResult:
        """Take the lock at once, or wait up to ``wait`` seconds for its holder to let go.

        ``None``: one non-blocking try. After a wait the lock is *not* held (LANDED): every
        waiter wakes at once and reads what the holder stored, instead of queueing for it.
        """

    async def aacquire(self, wait: float | None) -> LockResult:
        """The same without blocking the event loop."""

    def release(self) -> None:
        """Give the lock back (never blocks)."""


class Backend(Protocol):
    """A token store shared by processes: one SQLite file, or one Redis server."""

    name: ClassVar[str]  # "sqlite" | "redis": a metric attribute, never a location
    location: str  # what to show the operator (no credentials)

    def execute(self, op: Op[T]) -> T:
        """Perform ``op`` as one atomic step; raise :class:`StorageError` on failure."""

    async def aexecute(self, op: Op[T]) -> T:
        """Async twin of :meth:`execute` (never blocks the loop on I/O)."""

    def read_inline(self, op: Read) -> Snapshot | None:
        """``op`` answered at once if that needs no waiting on I/O (an event loop may call
        it: SQLite with a pooled connection ready), else None (then ``aexecute`` it)."""

    def prepare(self) -> None:
        """Make the store's place ready before anything is created beside it (a key file):
        raise :class:`StorageError` if it is not the cache's to use. No-op for a server."""

    def key_lock(self, digest: bytes) -> KeyLock:
        """A fresh, unheld cross-process lock for one key."""

    @property
    def unavailable(self) -> str | None:
        """Why the store is not usable right now, or ``None``."""

    def close(self) -> None:
        """Release this process's connections and descriptors."""

    async def aclose(self) -> None:
        """Async twin of :meth:`close`."""


__all__ = [
    "ABSENT",
    "Backend",
    "Backoff",
    "Clear",
    "Delete",
    "Facts",
    "Fence",
    "GetBackoff",
    "GetFacts",
    "GetKeyChecks",
    "KeyChecks",
    "KeyLock",
    "ListRows",
    "LockResult",
    "Op",
    "OpFlow",
    "Prune",
    "Read",
    "Replace",
    "RowInfo",
    "RowsNotUnder",
    "SealedRow",
    "SetBackoff",
    "Snapshot",
    "StorageError",
    "StorageUnavailable",
    "Sweep",
    "Touch",
    "Write",
]
