"""The SQLite backend's statements: the SQL of every operation and the decisions between them.

Every operation of the contract is a *plan*: a generator that yields ``(sql, params)`` and
receives the rows, with no I/O of its own (the httpx ``auth_flow`` pattern). Plans run through
the package's one step runner (``_steps.drive`` / ``adrive``): :func:`run_op` on a
``sqlite3`` connection, :func:`arun_op` on an ``aiosqlite`` one, each statement performed by
:func:`perform` / :func:`aperform`, whatever is left open rolled back. :func:`transaction`
wraps a plan that writes more than one statement in ``BEGIN IMMEDIATE ... COMMIT``.
The hot path, a Read, is not a plan: :func:`read` is one call on a pooled connection.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Generator, Sequence
from functools import partial
from typing import Any, Protocol, TypeVar

import aiosqlite

from .._steps import adrive, drive
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

    def __init__(self, found: Sequence[Row], changes: int) -> None:
        super().__init__(found)
        self.changes = changes


Plan = Generator[Stmt, Rows, T]

SEEN_MAX = 1024
"""Keys whose last read (sealed, as stored) each pooled connection remembers."""


class Reader(Protocol):
    """A connection that serves hits: the cursor its reads reuse, and what it last read per
    key (see :func:`read`). A pooled connection serves one thread at a time."""

    hits: sqlite3.Cursor
    seen: dict[tuple[bytes, ...], tuple[int, int, Snapshot]]

    @property
    def total_changes(self) -> int: ...


_new = tuple.__new__
# The generation is meta's first row (migration 0001 inserts it first and only): found by
# rowid, one b-tree step, and its name checked so that a file of another shape reads as broken.
_READ = (
    "SELECT t.kind, t.kid, t.nonce, t.ct, t.expires_at, t.gen, t.last_used, t.created_at,"
    " m.value FROM meta m LEFT JOIN tokens t ON t.k = ? WHERE m.rowid = 1 AND m.name = 'generation'"
)
_DATA_VERSION = "PRAGMA data_version"
INSERT = (
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


def read(conn: Reader, digests: tuple[bytes, ...]) -> Snapshot:
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
    yield (INSERT.format(verb="OR REPLACE"), tuple(op.row))
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
    done = yield (INSERT.format(verb="") + " ON CONFLICT (k) DO NOTHING", tuple(op.row))
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
INLINE: tuple[type[Op[Any]], ...] = (Read, GetBackoff, Touch)


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


def perform(conn: sqlite3.Connection, stmt: Stmt) -> Rows:
    """One statement on a ``sqlite3`` connection: its rows and how many it changed."""
    before = conn.total_changes
    found = conn.execute(*stmt).fetchall()
    return Rows(found, conn.total_changes - before)


def run_op(conn: sqlite3.Connection, op: Op[T]) -> T:
    """``op`` on a ``sqlite3`` connection; whatever it left open is rolled back."""
    try:
        return drive(transaction(op), partial(perform, conn))
    finally:
        if conn.in_transaction:
            conn.execute("ROLLBACK")


# aiosqlite raises ValueError("no active connection") once its worker thread is gone: that,
# and only that (not a ValueError of our plans), is the store's trouble like sqlite3's errors.


async def aperform(conn: aiosqlite.Connection, stmt: Stmt) -> Rows:
    """One statement on an ``aiosqlite`` connection, awaited on its thread."""
    try:
        before = conn.total_changes  # read from the loop's thread: no hop
        found = await conn.execute_fetchall(*stmt)
        return Rows(found, conn.total_changes - before)  # type: ignore[arg-type]  # aiosqlite types rows as Row
    except ValueError as exc:
        raise sqlite3.OperationalError(f"aiosqlite: {exc}") from None


async def arun_op(conn: aiosqlite.Connection, op: Op[T]) -> T:
    """Async twin of :func:`run_op`."""
    try:
        return await adrive(transaction(op), partial(aperform, conn))
    finally:
        try:
            if conn.in_transaction:
                await conn.execute("ROLLBACK")
        except ValueError as exc:
            raise sqlite3.OperationalError(f"aiosqlite: {exc}") from None
