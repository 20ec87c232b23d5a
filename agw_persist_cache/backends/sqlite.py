"""The SQLite backend: one file per host, shared by every process on it.

Every operation of the contract is a *plan*: a generator that yields ``(sql, params)``
and receives the rows, with no I/O of its own (the httpx ``auth_flow`` pattern). Two
drivers run plans: :meth:`SqliteBackend.execute` on a pooled ``sqlite3`` connection,
:meth:`SqliteBackend.aexecute` on this event loop's ``aiosqlite`` connection. Short
primary-key reads run inline on the calling thread for both (a ~5 µs read beats a
~60 µs hop to aiosqlite's thread), but never open or migrate the file on the loop.

Resources stay bounded whatever the caller's threading model: sync work borrows from
a small pool of connections (no connection per thread), each event loop gets one
aiosqlite connection that is closed once its loop has closed, and a forked child
starts afresh (see ``_fork``). WAL mode, ``synchronous=NORMAL``, a busy timeout,
``BEGIN IMMEDIATE`` writes; versioned SQL from ``migrations/`` applied under a file
lock and tracked in ``PRAGMA user_version``.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.resources
import os
import re
import sqlite3
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Generator, Sequence
from pathlib import Path
from typing import Any, ClassVar, TypeVar, cast

import aiosqlite
import filelock

from .. import _files as files
from .. import _fork
from .._config import CacheConfig
from .._files import make_private_dirs
from .._log import Warnings, warn_unopenable
from ._filelocks import KeyLockFiles, file_lock
from ._sqlite_files import (
    APPLICATION_ID,
    DAMAGED,
    Found,
    examine,
    marked,
    move_aside,
    read_only_uri,
)
from .contract import (
    Backoff,
    Clear,
    Delete,
    Facts,
    Fence,
    GetBackoff,
    GetFacts,
    GetKeyChecks,
    KeyChecks,
    KeyLock,
    ListRows,
    Op,
    Prune,
    Read,
    Replace,
    RowInfo,
    RowsNotUnder,
    SealedRow,
    SetBackoff,
    Snapshot,
    StorageError,
    StorageUnavailable,
    Sweep,
    Touch,
    Write,
)

T = TypeVar("T")
Row = tuple[Any, ...]
Stmt = tuple[str, Sequence[Any]]


class Rows(list[Row]):
    """What a plan receives for each statement: its rows, and ``changes``, how many rows it
    inserted, updated or deleted (counted by the connection: no ``RETURNING`` needed)."""

    __slots__ = ("changes",)
    changes: int


def rows_of(found: Sequence[Row], changes: int = 0) -> Rows:
    rows = Rows(found)
    rows.changes = changes
    return rows


Plan = Generator[Stmt, Rows, T]

RETRY_UNAVAILABLE_SECONDS = 30.0
IDENTITY_CHECK_SECONDS = 2.0
"""How often a process that only reads checks that the path still names its file."""
IDENTITY_WRITE_CHECK_SECONDS = 0.1
"""How often, at most, a write checks it first (a write in the window after another process
quarantined the file lands in the file moved aside: a narrower race than a read's)."""
POOL_IDLE = 2
"""Idle ``sqlite3`` connections kept per cache; busier moments open and close extra ones."""
READERS = POOL_IDLE
"""Connections that hits may have opened at once. A hit that finds none idle waits for one to
come back (reads take microseconds and never wait for a writer) instead of opening one per
concurrent thread: SQLite keeps the descriptor of a connection closed while others are open
(for its next open), so descriptors would follow the peak number of threads inside at once."""
READER_WAIT_SECONDS = 0.005
"""Past this a waiting hit opens one more (writers may be holding the idle connections)."""
QUICK_IDLE = 1
"""Idle connections kept for best-effort writes (the rate-limited LRU touch and prune)."""
SEEN_MAX = 1024
"""Keys whose last read (sealed, as stored) each pooled connection remembers."""
_MIGRATION_NAME = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")


def migrations_dir() -> Any:
    """The packaged ``_migrations`` (wheel) or the checkout's ``migrations/``."""
    packaged = importlib.resources.files("agw_persist_cache").joinpath("_migrations")
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parent.parent.parent / "migrations"


def load_migrations() -> list[tuple[int, str, str]]:
    """(version, name, sql) for every ``migrations/NNNN_name.sql``, in order."""
    found = []
    for entry in migrations_dir().iterdir():
        match = _MIGRATION_NAME.match(entry.name)
        if match:
            found.append((int(match.group(1)), entry.name, entry.read_text(encoding="utf-8")))
    found.sort()
    versions = [v for v, _, _ in found]
    if versions != list(range(1, len(found) + 1)):
        raise RuntimeError(f"migrations must be numbered 0001.. without gaps, found {versions}")
    return found


MIGRATIONS = load_migrations()
SCHEMA_VERSION = MIGRATIONS[-1][0]


class SchemaTooNew(Exception):
    """The file was migrated by a newer agw-persist-cache than this one."""


class NoCache(FileNotFoundError):
    """A read-only look found no cache file at the path (nothing was created)."""


# The store's trouble; anything else (our bugs) propagates. (aiosqlite's own ValueError is
# reported as sqlite3's by the async driver and when a connection is opened or closed.)
_FAILURES = (sqlite3.Error, OSError, filelock.Timeout, SchemaTooNew)


# -- plans: the SQL of each operation and the decisions between its statements -------------------

_new = tuple.__new__
# The generation is meta's first row (migration 0001 inserts it first and only): found by
# rowid, one b-tree step, and its name checked so that a file of another shape reads as broken.
_READ = (
    "SELECT t.kind, t.kid, t.nonce, t.ct, t.expires_at, t.gen, t.last_used, t.created_at,"
    " m.value FROM meta m LEFT JOIN tokens t ON t.k = ? WHERE m.rowid = 1 AND m.name = 'generation'"
)
_DATA_VERSION = "PRAGMA data_version"
_INSERT = (
    "INSERT {verb} INTO tokens (k, kind, kid, nonce, ct, expires_at, gen, last_used, created_at)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
_GENERATION = "SELECT value FROM meta WHERE rowid = 1 AND name = 'generation'"
_INSERT_IF_GENERATION = (
    "INSERT OR REPLACE INTO tokens (k, kind, kid, nonce, ct, expires_at, gen, last_used,"
    " created_at) SELECT ?, ?, ?, ?, ?, ?, ?, ?, ? WHERE (" + _GENERATION + ") = ?"
)
# Write.fence: no other row of its generation took the place of the one the fetch read.
_TAKEN = "SELECT 1 FROM tokens WHERE k = ? AND gen = ? AND nonce IS NOT ?"
_FENCED = " AND NOT EXISTS (" + _TAKEN + ")"


def read(conn: _Conn, digests: tuple[bytes, ...]) -> Snapshot:
    """The hot path: what the store holds for ``digests`` now, with the current generation.

    A connection remembers what it last read per key. ``PRAGMA data_version`` moves whenever
    any other connection (of any process) commits, and ``total_changes`` whenever this one
    writes: when neither moved since a read, the store is unchanged and that read is still
    the answer, with no row read. Otherwise one primary-key SELECT per configured key until
    a row is found. A key's first read here skips the check (its answer is remembered
    unchecked; the next read checks and reads again). No transaction: a read never waits
    for a writer.
    """
    cursor = conn.hits
    seen = conn.seen.get(digests)
    version = -1
    if seen is not None:
        version = cursor.execute(_DATA_VERSION).fetchone()[0]
        if version == seen[0] and conn.total_changes == seen[1]:
            return seen[2]
    changes = conn.total_changes
    row = None
    generation = 0
    for digest in digests:
        found = cursor.execute(_READ, (digest,)).fetchone()
        if found is None:
            raise sqlite3.DatabaseError("meta table has no generation")
        generation = found[8]
        if found[0] is not None:  # (tuple.__new__: the named tuples without their Python __new__)
            row = _new(SealedRow, (digest, *found[:8]))
            break
    snap = _new(Snapshot, (row, generation))
    if len(conn.seen) >= SEEN_MAX:
        conn.seen.clear()
    conn.seen[digests] = (version, changes, snap)
    return snap


def plan_write(op: Write) -> Plan[bool]:
    """Insert or replace a row; refuse if a clear() moved the generation it was sealed in.

    Without rows to replace it is one statement, atomic by itself: no transaction around
    it, so the write lock is held for one step (writers of other processes wait less).
    """
    fence: tuple[Any, ...] = ()
    if op.fence is not None:  # ABSENT: no row may have been written meanwhile
        fence = (op.row.digest, op.row.generation, op.fence or None)
    if _one_statement(op):
        sql = _INSERT_IF_GENERATION + (_FENCED if fence else "")
        done = yield (sql, (*op.row, op.row.generation, *fence))
        return done.changes > 0
    rows = yield (_GENERATION, ())
    if not rows or rows[0][0] != op.row.generation:
        return False
    if fence:
        taken = yield (_TAKEN, fence)
        if taken:
            return False
    if op.key_check is not None:
        yield (
            "INSERT OR IGNORE INTO key_checks (kid, check_value) VALUES (?, ?)",
            (op.row.kid, op.key_check),
        )
    for digest in op.replaces:
        yield ("DELETE FROM tokens WHERE k = ?", (digest,))
    yield (_INSERT.format(verb="OR REPLACE"), tuple(op.row))
    return True


def plan_delete(op: Delete) -> Plan[int]:
    removed = 0
    for digest in op.digests:
        if op.nonce is None:
            gone = yield ("DELETE FROM tokens WHERE k = ?", (digest,))
        else:  # only the very row that was read: a replacement written since stays
            gone = yield ("DELETE FROM tokens WHERE k = ? AND nonce = ?", (digest, op.nonce))
        removed += gone.changes
    return removed


def plan_clear(op: Clear) -> Plan[int]:
    rows = yield (
        "UPDATE meta SET value = value + 1 WHERE rowid = 1 AND name = 'generation' RETURNING value",
        (),
    )
    if not rows:  # rolled back by the driver: a clear() that cannot be fenced does not happen
        raise sqlite3.DatabaseError("meta table has no generation")
    yield ("DELETE FROM tokens", ())
    yield ("DELETE FROM backoff", ())
    return int(rows[0][0])


def plan_sweep(op: Sweep) -> Plan[int]:
    """Nothing is left behind: a clear() deletes every row in its own transaction."""
    return 0
    yield  # a plan that needs no statement


def plan_fence(op: Fence) -> Plan[int]:
    rows = yield (
        "UPDATE meta SET value = max(value, ?) WHERE rowid = 1 AND name = 'generation'"
        " RETURNING value",
        (op.generation,),
    )
    if not rows:
        raise sqlite3.DatabaseError("meta table has no generation")
    return int(rows[0][0])


def plan_prune(op: Prune) -> Plan[int]:
    """Expired rows first, then per kind every row older than its ``limit`` newest.

    The OFFSET walks at most ``limit`` entries of the LRU index: no full count(*).
    """
    removed = yield ("DELETE FROM tokens WHERE expires_at <= ?", (op.now,))
    total = removed.changes
    yield ("DELETE FROM backoff WHERE until <= ?", (op.now,))
    for kind, limit in op.limits.items():
        gone = yield (
            "DELETE FROM tokens WHERE rowid IN (SELECT rowid FROM tokens WHERE kind = ?"
            " ORDER BY last_used DESC LIMIT -1 OFFSET ?)",
            (kind, limit),
        )
        total += gone.changes
    return total


def plan_touch(op: Touch) -> Plan[None]:
    yield ("UPDATE tokens SET last_used = ? WHERE k = ?", (op.now, op.digest))


def plan_get_backoff(op: GetBackoff) -> Plan[Backoff | None]:
    rows = yield ("SELECT until, cause, status FROM backoff WHERE k = ?", (op.digest,))
    return Backoff(*rows[0]) if rows else None


def plan_set_backoff(op: SetBackoff) -> Plan[None]:
    yield (
        "INSERT OR REPLACE INTO backoff (k, until, cause, status) VALUES (?, ?, ?, ?)",
        (op.digest, *op.backoff),
    )


def plan_facts(op: GetFacts) -> Plan[Facts]:
    by_kind = yield (
        "SELECT kind, count(*), sum(expires_at <= ?), min(expires_at), max(expires_at)"
        " FROM tokens GROUP BY kind",
        (op.now,),
    )
    kids = yield ("SELECT DISTINCT kid FROM tokens ORDER BY kid", ())
    ((version,),) = yield ("PRAGMA user_version", ())
    counts = {kind: n for kind, n, _, _, _ in by_kind}
    return Facts(
        entries_system=counts.get("system", 0),
        entries_user=counts.get("user", 0),
        entries_expired=sum(int(e or 0) for _, _, e, _, _ in by_kind),
        oldest_expiry=min((lo for *_, lo, _ in by_kind), default=None),
        newest_expiry=max((hi for *_, hi in by_kind), default=None),
        schema_version=int(version),
        key_ids_in_use=tuple(k for (k,) in kids),
        file_bytes=0,
        wal_bytes=0,
    )


def plan_key_checks(op: GetKeyChecks) -> Plan[KeyChecks]:
    """Two point reads; the rows' key ids (a scan) only from a file written before check
    values were kept."""
    checks = yield ("SELECT kid, check_value FROM key_checks ORDER BY kid", ())
    ((rows,),) = yield ("SELECT EXISTS (SELECT 1 FROM tokens)", ())
    kids: list[Row] = []
    if rows and not checks:
        kids = yield ("SELECT DISTINCT kid FROM tokens ORDER BY kid", ())
    return KeyChecks(
        bool(rows), tuple((kid, bytes(check)) for kid, check in checks), tuple(k for (k,) in kids)
    )


def plan_list(op: ListRows) -> Plan[list[RowInfo]]:
    rows = yield (
        "SELECT kind, k, expires_at, last_used, created_at, kid FROM tokens"
        " ORDER BY kind, last_used DESC LIMIT ? OFFSET ?",
        (-1 if op.count is None else op.count, op.start),
    )
    return [RowInfo(kind, bytes(k), *rest) for kind, k, *rest in rows]


def plan_rows_not_under(op: RowsNotUnder) -> Plan[list[SealedRow]]:
    rows = yield (
        "SELECT k, kind, kid, nonce, ct, expires_at, gen, last_used, created_at FROM ("
        "SELECT * FROM tokens ORDER BY kind, last_used LIMIT ? OFFSET ?) WHERE kid != ? LIMIT ?",
        (-1 if op.scan is None else op.scan, op.start, op.kid, op.limit + len(op.skip)),
    )
    skip = set(op.skip)
    found = [SealedRow(bytes(k), *rest) for k, *rest in rows]
    return [row for row in found if row.digest not in skip][: op.limit]


def plan_replace(op: Replace) -> Plan[bool]:
    """Re-seal one row in place of ``old`` unless a newer row already took the new digest;
    record the new key's check value, and forget the old key's once no row uses it."""
    gone = yield ("DELETE FROM tokens WHERE k = ? RETURNING kid", (op.old,))
    done = yield (_INSERT.format(verb="") + " ON CONFLICT (k) DO NOTHING", tuple(op.row))
    if op.key_check is not None:
        yield (
            "INSERT OR REPLACE INTO key_checks (kid, check_value) VALUES (?, ?)",
            (op.row.kid, op.key_check),
        )
        for (kid,) in gone:
            if kid != op.row.kid:  # stops at the first row still under it: no index needed
                yield (
                    "DELETE FROM key_checks WHERE kid = ?"
                    " AND NOT EXISTS (SELECT 1 FROM tokens WHERE kid = ?)",
                    (kid, kid),
                )
    return done.changes > 0


PLANS: dict[type[Op[Any]], Callable[[Any], Plan[Any]]] = {
    Write: plan_write,
    Delete: plan_delete,
    Clear: plan_clear,
    Sweep: plan_sweep,
    Fence: plan_fence,
    Prune: plan_prune,
    Touch: plan_touch,
    GetBackoff: plan_get_backoff,
    SetBackoff: plan_set_backoff,
    GetFacts: plan_facts,
    GetKeyChecks: plan_key_checks,
    ListRows: plan_list,
    RowsNotUnder: plan_rows_not_under,
    Replace: plan_replace,
}
# Point lookups cheap enough to run on the event loop's thread (no hop to aiosqlite).
# Touch is inline too: with no busy timeout it never waits, and a hit must not hop.
_INLINE: tuple[type[Op[Any]], ...] = (Read, GetBackoff, Touch)


def transaction(op: Op[T]) -> Plan[T]:
    """The plan of ``op``, inside ``BEGIN IMMEDIATE ... COMMIT`` when it writes more than
    one statement."""
    plan: Plan[T] = PLANS[type(op)](op)
    if not op.writes or _one_statement(op):
        return (yield from plan)
    yield ("BEGIN IMMEDIATE", ())
    result = yield from plan
    yield ("COMMIT", ())
    if isinstance(op, Prune):  # fold the WAL back; TRUNCATE waits for readers, PASSIVE never
        yield (f"PRAGMA wal_checkpoint({'TRUNCATE' if op.compact else 'PASSIVE'})", ())
    return result


def quick(op: Op[Any]) -> bool:
    """Best-effort writes: skipped, never queued, while another process holds the write lock
    (the LRU touch of a hit, the prune that follows a write)."""
    return op.nowait or (isinstance(op, Prune) and not op.compact)


def _one_statement(op: Op[Any]) -> bool:
    """Writes whose plan is a single statement (atomic without BEGIN ... COMMIT)."""
    if isinstance(op, Write):
        return not op.replaces and op.key_check is None
    if isinstance(op, Delete):
        return len(op.digests) == 1
    return isinstance(op, Touch | SetBackoff | Sweep | Fence)


def _step(plan: Plan[T], rows: Rows | None) -> Stmt | StopIteration:
    """Advance ``plan`` with the rows of its last statement (``None``: start it)."""
    try:
        return next(plan) if rows is None else plan.send(rows)
    except StopIteration as done:
        return done


def run(conn: sqlite3.Connection, plan: Plan[T]) -> T:
    """The sync driver: ``plan`` on a ``sqlite3`` connection, rolled back if it fails."""
    try:
        step = _step(plan, None)
        while not isinstance(step, StopIteration):
            before = conn.total_changes
            found = conn.execute(*step).fetchall()
            step = _step(plan, rows_of(found, conn.total_changes - before))
        return cast(T, step.value)
    finally:
        if conn.in_transaction:
            conn.execute("ROLLBACK")


async def arun(conn: aiosqlite.Connection, plan: Plan[T]) -> T:
    """The async driver: the same loop, each statement awaited on aiosqlite's thread."""
    try:
        step = _step(plan, None)
        while not isinstance(step, StopIteration):
            step = _step(plan, await _astatement(conn, step))
        return cast(T, step.value)
    finally:
        await _arollback(conn)


# aiosqlite raises ValueError("no active connection") once its worker thread is gone: that,
# and only that (not a ValueError of our plans), is the store's trouble like sqlite3's errors.


async def _astatement(conn: aiosqlite.Connection, step: Stmt) -> Rows:
    try:
        before = conn.total_changes  # read from the loop's thread: no hop
        found = await conn.execute_fetchall(*step)
        return rows_of(found, conn.total_changes - before)  # type: ignore[arg-type]  # aiosqlite types rows as Row
    except ValueError as exc:
        raise sqlite3.OperationalError(f"aiosqlite: {exc}") from None


async def _arollback(conn: aiosqlite.Connection) -> None:
    try:
        if conn.in_transaction:
            await conn.execute("ROLLBACK")
    except ValueError as exc:
        raise sqlite3.OperationalError(f"aiosqlite: {exc}") from None


# -- the backend -------------------------------------------------------------------------------


class _Conn(sqlite3.Connection):
    """A pooled connection, tagged with the pool epoch and the process it was opened in, with
    the cursor its hits reuse (a pooled connection serves one thread at a time)."""

    epoch = 0
    forks = 0
    reader = False  # opened for a hit: counted in SqliteBackend._readers while open
    hits: sqlite3.Cursor
    seen: dict[tuple[bytes, ...], tuple[int, int, Snapshot]]  # see read()

    def close(self) -> None:
        # The cursor holds its last statement: closed first, or sqlite3_close_v2 leaves a
        # zombie connection whose descriptors stay open until the cycle is collected.
        hits = getattr(self, "hits", None)  # absent if set-up failed before it was made
        if hits is not None:
            hits.close()
        super().close()


class _LoopConn:
    """One event loop's aiosqlite connection and the lock that keeps its transactions whole."""

    def __init__(self, conn: aiosqlite.Connection) -> None:
        self.conn = conn
        self.lock = asyncio.Lock()


def _stop(conn: aiosqlite.Connection) -> None:
    """Close an aiosqlite connection without awaiting it, from a thread with no loop.

    ``stop()`` hands its worker a future of whatever loop is current, which may be closed by
    the time the worker answers; from a thread with no event loop it hands over none.
    """
    helper = threading.Thread(target=conn.stop, name="agw-cache-aiosqlite-stop")
    helper.start()
    helper.join()
    worker = getattr(conn, "_thread", None)
    if isinstance(worker, threading.Thread) and worker.is_alive():
        worker.join(5.0)


class SqliteBackend:
    """The token store in one SQLite file; see the module docstring."""

    name: ClassVar[str] = "sqlite"

    def __init__(
        self,
        path: Path,
        config: CacheConfig,
        warnings: Warnings | None = None,
        *,
        read_only: bool = False,
    ) -> None:
        self.path = path
        self.read_only = read_only  # diagnostics: open an existing file, create and write nothing
        self.location = str(path)
        self.lock_dir = files.lock_dir_of(path)
        self.config = config
        self.files = KeyLockFiles(self.lock_dir, stripes=config.lock_stripes)
        self.warnings = warnings or Warnings()
        self._unavailable: str | None = None
        self._retry_at = 0.0
        busy_ms = int(config.busy_timeout_seconds * 1000)
        self._pragmas = [
            f"PRAGMA busy_timeout = {busy_ms}",
            "PRAGMA synchronous = NORMAL",
            "PRAGMA journal_size_limit = 4194304",
            "PRAGMA foreign_keys = OFF",
        ]
        if config.max_db_bytes is not None:
            self._pragmas.append(f"PRAGMA max_page_count = {max(16, config.max_db_bytes // 4096)}")
        self._reset()

    def _reset(self) -> None:
        """Fresh per-process state (at construction and in a forked child)."""
        self._forks = _fork.forks
        self._mutex = threading.Lock()
        self._ready = False
        self._identity: tuple[int, int] | None = None  # (st_dev, st_ino) of the file we use
        self._next_check = self._next_write_check = 0.0
        self._epoch = 0  # bumped whenever the connections are dropped (file replaced)
        self._idle: deque[_Conn] = deque()
        self._idle_quick: deque[_Conn] = deque()
        self._returned = threading.Condition(threading.Lock())  # an idle connection is back
        self._readers = 0  # open connections of this epoch that hits opened (READERS)
        self._waiting = 0  # hits waiting for one
        self._loops: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _LoopConn] = (
            weakref.WeakKeyDictionary()
        )

    def _check_fork(self) -> None:
        # Connections inherited across fork are dropped, never used or closed: closing one
        # in the child could checkpoint or unlink the parent's WAL under its feet.
        if self._forks != _fork.forks:
            _ABANDONED.extend(self._idle)
            _ABANDONED.extend(self._idle_quick)
            _ABANDONED.extend(state.conn for state in self._loops.values())
            self._reset()

    # -- status ----------------------------------------------------------------------------

    @property
    def unavailable(self) -> str | None:
        """Why the file cannot be used right now (retried every 30 s), or None."""
        if self._unavailable is not None and time.time() >= self._retry_at:
            return None
        return self._unavailable

    def _disable(self, reason: str) -> None:
        self._unavailable = reason
        self._retry_at = time.time() + RETRY_UNAVAILABLE_SECONDS

    def _failed(self, exc: BaseException) -> StorageError:
        """Turn a failure into a ``StorageError``; after corruption, reopen next time."""
        if isinstance(exc, NoCache):
            self._disable(str(exc))
            return StorageUnavailable(str(exc))
        if isinstance(exc, SchemaTooNew):
            self._disable(str(exc))
            self.warnings.once(
                "schema", "%s; the cache is disabled, tokens are fetched directly", exc
            )
            return StorageUnavailable(str(exc))
        if self.read_only and _is_corrupt(exc):  # a diagnostic reports it, never moves it
            reason = (
                f"cache file {self.path} {DAMAGED} ({type(exc).__name__}: {exc}); it was left "
                "in place: a worker moves it aside when it next opens it"
            )
            self._disable(reason)
            self._drop_connections()
            return StorageUnavailable(reason)
        if not self._ready:
            reason = f"cannot open cache file {self.path}: {type(exc).__name__}: {exc}"
            self._disable(reason)
            if not self.read_only:  # a diagnostic prints the reason itself
                warn_unopenable(self.warnings, self.path, exc)
            return StorageUnavailable(reason)
        if _is_corrupt(exc):
            self._quarantine(exc)
        return StorageError(f"{type(exc).__name__}: {exc}")

    # -- connections -------------------------------------------------------------------------

    def _connect(self, *, quick: bool = False) -> _Conn:
        target: str | Path = self.path
        if self.read_only:  # no -wal: nothing to merge, and nothing gets created either
            target = read_only_uri(self.path)
        conn = sqlite3.connect(
            target,
            uri=self.read_only,
            isolation_level=None,
            check_same_thread=False,
            timeout=0 if quick else self.config.busy_timeout_seconds,
            factory=_Conn,
        )
        conn.epoch, conn.forks = self._epoch, _fork.forks
        conn.hits, conn.seen = conn.cursor(), {}
        for stmt in self._pragmas[1:] if quick else self._pragmas:
            conn.execute(stmt)
        return conn

    def _borrow(self, quick: bool = False) -> _Conn:
        """An idle pooled connection (``quick``: one that never waits for the write lock)."""
        try:
            return (self._idle_quick if quick else self._idle).pop()
        except IndexError:
            pass
        self._ensure_ready()
        return self._connect(quick=quick)

    def _borrow_reader(self) -> _Conn:
        """A connection for a hit that found none idle: a new one while fewer than
        ``READERS`` that hits opened are open, else the next one given back."""
        with self._returned:
            if not self._idle and self._readers >= READERS:
                self._waiting += 1
                self._returned.wait_for(lambda: self._idle, READER_WAIT_SECONDS)
                self._waiting -= 1
            with contextlib.suppress(IndexError):
                return self._idle.pop()
            self._readers += 1
        try:
            self._ensure_ready()
            conn = self._connect()
        except BaseException:
            self._closed_reader(self._epoch)
            raise
        conn.reader = True
        return conn

    def _closed_reader(self, epoch: int) -> None:
        with self._returned:
            if epoch == self._epoch:
                self._readers -= 1
            self._returned.notify()

    def _give_back(self, conn: _Conn, quick: bool = False) -> None:
        if conn.forks != _fork.forks:
            return  # a connection of the parent's: never reuse nor close it
        idle = self._idle_quick if quick else self._idle
        if len(idle) < (QUICK_IDLE if quick else POOL_IDLE) and conn.epoch == self._epoch:
            idle.append(conn)
            if self._waiting:
                with self._returned:
                    self._returned.notify()
        else:
            self._close(conn)

    def _close(self, conn: _Conn) -> None:
        try:
            conn.close()
        finally:
            if conn.reader:
                self._closed_reader(conn.epoch)

    def _check_identity(self, op: Op[Any]) -> None:
        """Reopen when the path names another file than ours (another process moved a
        corrupt file aside and started a new one): before a write at most every
        ``IDENTITY_WRITE_CHECK_SECONDS`` (a ``stat`` right after a commit costs a set ~7%),
        and every few seconds."""
        if self._identity is None:
            return
        now = time.monotonic()
        if now < (self._next_write_check if op.writes else self._next_check):
            return
        self._next_check = now + IDENTITY_CHECK_SECONDS
        self._next_write_check = now + IDENTITY_WRITE_CHECK_SECONDS
        if _identity_of(self.path) != self._identity:
            self._drop_connections()

    async def _loop_conn(self) -> _LoopConn:
        loop = asyncio.get_running_loop()
        state = self._loops.get(loop)
        if state is not None:
            return state
        for other, stale in list(self._loops.items()):
            if other.is_closed():  # asyncio.run() per task: release what closed loops held
                del self._loops[other]
                await asyncio.to_thread(_stop, stale.conn)
        await asyncio.to_thread(self._ensure_ready)
        pending = aiosqlite.connect(
            self.path, isolation_level=None, timeout=self.config.busy_timeout_seconds
        )
        # aiosqlite's worker is not a daemon: a cache nobody closed would hold the
        # interpreter at exit. Only committed data matters, so it may die with us.
        worker = getattr(pending, "_thread", None)
        if isinstance(worker, threading.Thread):
            worker.daemon = True
        conn = await pending
        for stmt in self._pragmas:
            await conn.execute(stmt)
        state = self._loops.setdefault(loop, _LoopConn(conn))
        if state.conn is not conn:
            await conn.close()
        return state

    def _drop_connections(self) -> None:
        """Close this process's connections; the next operation opens the path afresh.

        Connections in use are closed when given back (the pool is no longer ready)."""
        with self._mutex, self._returned:
            self._ready = False
            self._identity = None
            self._epoch += 1
            self._readers = 0  # the old epoch's are closed as they come back
        for state in self._close_idle():  # their workers close them; nobody waits for that
            threading.Thread(target=_stop, args=(state.conn,), daemon=True).start()

    def _close_idle(self) -> list[_LoopConn]:
        """Close the idle pooled connections; hand back the event loops' ones to stop."""
        with self._mutex:
            idle = [*self._idle, *self._idle_quick]
            self._idle.clear()
            self._idle_quick.clear()
            loops = list(self._loops.values())
            self._loops.clear()
        for conn in idle:
            with contextlib.suppress(sqlite3.Error):
                self._close(conn)
        return loops

    def _quarantine(self, exc: BaseException) -> None:
        """Corruption found while working: move the file aside and start a new one, once.

        Under the migration lock, and only if the path still names the very file that failed
        (another process may have replaced it already: then just reopen)."""
        failed = self._identity
        self._drop_connections()
        try:
            with self._init_lock():
                if failed is not None and _identity_of(self.path) == failed:
                    if not marked(self.path):  # its header went too: not provably ours
                        self._disable(
                            f"cache file {self.path} {DAMAGED} and lost its header; "
                            "it is left alone: move it away"
                        )
                        return
                    move_aside(self.path, exc, self.warnings)
        except (OSError, filelock.Timeout):
            pass  # the next open tries again

    # -- drivers -------------------------------------------------------------------------------

    def execute(self, op: Op[T]) -> T:
        """Perform ``op`` on a pooled connection, in this thread; raise ``StorageError``."""
        if self._forks != _fork.forks:
            self._check_fork()
        if type(op) is Read:
            return self._read(op.digests)  # type: ignore[return-value]  # T is Snapshot here
        if op.writes and self.read_only:
            if quick(op):
                return cast(T, None)  # a hit's LRU touch: nothing to write in a diagnostic
            raise StorageError(f"{self.path} was opened read-only")
        self._check_identity(op)
        best_effort = quick(op)
        gate = _fork.enter()
        try:
            conn = self._borrow(best_effort)
            try:
                return self._finish(op, run(conn, transaction(op)))
            finally:
                self._give_back(conn, best_effort)
        except _FAILURES as exc:
            if best_effort and _is_busy(exc):
                return cast(T, None)  # skipped while another process writes
            raise self._failed(exc) from None
        finally:
            _fork.leave(gate)

    async def aexecute(self, op: Op[T]) -> T:
        """Perform ``op`` without blocking the loop on file I/O; raise ``StorageError``."""
        self._check_fork()
        if quick(op) and not isinstance(op, _INLINE):  # its own connection, in a thread
            return await asyncio.to_thread(self.execute, op)
        if isinstance(op, _INLINE):
            if not self._idle:  # open (and maybe migrate) off the loop, then read inline
                try:
                    conn = await asyncio.to_thread(self._borrow)
                except _FAILURES as exc:
                    raise self._failed(exc) from None
                self._give_back(conn)
            return self.execute(op)
        self._check_identity(op)
        gate = _fork.enter()
        try:
            state = await self._loop_conn()
            async with state.lock:
                return self._finish(op, await arun(state.conn, transaction(op)))
        except _FAILURES as exc:
            raise self._failed(exc) from None
        finally:
            _fork.leave(gate)

    def read_inline(self, op: Read) -> Snapshot | None:
        """A hit from an event loop: a ~5 µs read beats a ~60 µs hop to aiosqlite's thread,
        but only with a connection already open (opening is file work: never on the loop)."""
        if not self._idle or self._forks != _fork.forks:
            return None
        return self._read(op.digests)

    def _read(self, digests: tuple[bytes, ...]) -> Snapshot:
        """The hit path of ``execute``: a pooled connection and :func:`read` (one SELECT, or
        a data_version check when the connection's last read of the key still stands).

        (Every hit runs this: the pool and the fork gate are used inline, not called.)
        """
        if self._identity is not None and time.monotonic() >= self._next_check:
            self._check_identity(_READ_OP)
        gate = object()  # _fork.enter(), inline: add, then look for a fork under way
        _fork.inside.add(gate)
        if _fork.forking:
            _fork.inside.discard(gate)
            gate = _fork.enter()
        try:
            try:
                conn = self._idle.pop()
            except IndexError:
                conn = self._borrow_reader()
            try:
                return read(conn, digests)
            finally:
                if len(self._idle) < POOL_IDLE and conn.epoch == self._epoch and not self._waiting:
                    self._idle.append(conn)
                else:
                    self._give_back(conn)
        except _FAILURES as exc:
            raise self._failed(exc) from None
        finally:
            _fork.inside.discard(gate)

    def _finish(self, op: Op[T], result: T) -> T:
        if isinstance(result, Facts):  # sizes come from the file system, not from SQL
            size, wal = self.sizes()
            return cast(T, result._replace(file_bytes=size, wal_bytes=wal))
        return result

    def key_lock(self, digest: bytes) -> KeyLock:
        """The key's lock in ``<db>.locks/``: see ``_filelocks`` (OFD on Linux, else portable)."""
        return self.files.key_lock(digest)

    # -- file set-up ---------------------------------------------------------------------------

    def _ensure_ready(self) -> None:
        if self._ready:
            return
        reason = self.unavailable
        if reason is not None:
            raise StorageUnavailable(reason)
        with self._mutex:
            if not self._ready:
                self._inspect() if self.read_only else self._initialize()
                self._ready = True
                self._unavailable = None

    def prepare(self) -> None:
        """Open the file now (creating it if absent and allowed), before anything is made
        beside it (the key file): a path that is not ours gets nothing. ``StorageError``
        (the store disabled, with its reason) otherwise."""
        gate = _fork.enter()
        try:
            self._ensure_ready()
        except _FAILURES as exc:
            raise self._failed(exc) from None
        finally:
            _fork.leave(gate)

    def prepare_dirs(self) -> None:
        """Create the directory (0700) and the lock directory beside the database, after
        looking: a path that is not ours raises ``NotOurs`` and gets nothing."""
        examine(self.path)
        make_private_dirs(self.path.parent)
        make_private_dirs(self.lock_dir)

    def _inspect(self) -> None:
        """Read-only: an existing file of this cache's, at the current schema; else why not."""
        found = examine(self.path)
        if found is Found.ABSENT:
            raise NoCache(f"no cache at {self.path}")
        if found is Found.EMPTY:
            raise NoCache(
                f"cache file {self.path} is empty (a worker makes it a cache when it opens it)"
            )
        conn = self._connect()
        try:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
        finally:
            conn.close()
        if version > SCHEMA_VERSION:
            raise SchemaTooNew(_too_new(self.path, version))
        if version < SCHEMA_VERSION:
            raise SchemaTooNew(
                f"cache file {self.path} has schema version {version}, older than this "
                f"agw-persist-cache reads ({SCHEMA_VERSION}); a worker of this version migrates "
                "it when it next opens it"
            )
        self._identity = _identity_of(self.path)

    def _init_lock(self) -> filelock.BaseFileLock:
        """Serializes schema creation, migration and quarantine across processes."""
        return file_lock(
            self.lock_dir / "init.lock", timeout=max(30.0, self.config.busy_timeout_seconds)
        )

    def _initialize(self) -> None:
        self.prepare_dirs()
        files.check_dir(self.lock_dir)
        files.check(self.lock_dir / "init.lock")
        # Serialized: 32 processes opening a brand-new file must not race on the schema.
        with self._init_lock():
            found = examine(self.path)  # again: another process may have made it meanwhile
            # SQLite gives the -wal and -shm files the mode of the database file.
            if found is Found.ABSENT:
                _create(self.path)
            try:
                self._migrate()
            except sqlite3.DatabaseError as exc:
                if isinstance(exc, sqlite3.OperationalError) or found is not Found.MARKED:
                    raise  # only a file with our mark is ever moved aside
                move_aside(self.path, exc, self.warnings)
                _create(self.path)
                self._migrate()
            self._identity = _identity_of(self.path)
            self._next_check = time.monotonic() + IDENTITY_CHECK_SECONDS

    def _migrate(self) -> None:
        conn = self._connect()
        try:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise SchemaTooNew(_too_new(self.path, version))
            if conn.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
                conn.execute("PRAGMA journal_mode = WAL")
            for number, _name, sql in MIGRATIONS:
                if number <= version:
                    continue
                conn.executescript(
                    f"BEGIN IMMEDIATE;\n{sql}\nPRAGMA user_version = {number};\nCOMMIT;"
                )
            if version:
                conn.execute("SELECT count(*) FROM meta").fetchone()
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        finally:
            conn.close()

    # -- sizes and closing ---------------------------------------------------------------------

    def sizes(self) -> tuple[int, int]:
        """(database bytes, WAL bytes)."""
        return _size(self.path), _size(files.side_files_of(self.path)[0])

    def close(self) -> None:
        """Close this process's connections (the file and other processes are unaffected)."""
        self._check_fork()
        for state in self._close_idle():
            _stop(state.conn)

    async def aclose(self) -> None:
        """Close this loop's aiosqlite connection properly, then everything else."""
        self._check_fork()
        state = self._loops.pop(asyncio.get_running_loop(), None)
        if state is not None:
            with contextlib.suppress(*_FAILURES, ValueError):  # ValueError: aiosqlite's
                await state.conn.close()
        await asyncio.to_thread(self.close)


_ABANDONED: list[object] = []


_READ_OP = Read(())
_CREATE = os.O_RDWR | os.O_CREAT | os.O_EXCL | files.NOFOLLOW


def _create(path: Path) -> None:
    """A new, private database file whose first page already carries our mark.

    Written in rollback mode, before the switch to WAL: set later (a migration), the mark
    would sit in the -wal until a checkpoint, and a process looking at the file meanwhile
    (another worker opening it, outside the init lock) would find an unmarked database it
    must judge by its tables while they are being made."""
    os.close(os.open(path, _CREATE, 0o600))
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
    finally:
        conn.close()


__all__ = ["APPLICATION_ID", "SCHEMA_VERSION", "NoCache", "SchemaTooNew", "SqliteBackend"]


def _too_new(path: Path, version: int) -> str:
    return (
        f"cache file {path} has schema version {version}, newer than this agw-persist-cache "
        f"understands ({SCHEMA_VERSION}); upgrade the package on every process of this host "
        "or point AGW_CACHE_PATH elsewhere"
    )


def _is_busy(exc: BaseException) -> bool:
    return isinstance(exc, sqlite3.OperationalError) and "locked" in str(exc)


def _is_corrupt(exc: BaseException) -> bool:
    """SQLITE_CORRUPT or SQLITE_NOTADB (any extended code)."""
    code = getattr(exc, "sqlite_errorcode", None)
    return isinstance(exc, sqlite3.DatabaseError) and code is not None and code & 0xFF in (11, 26)


def _identity_of(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0
