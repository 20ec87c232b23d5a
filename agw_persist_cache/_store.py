"""Storage: the SQLite file, its migrations, and the SQL the cache runs.

Every operation is a *plan*: a generator that yields ``(sql, params)`` and
receives the rows, with no I/O of its own (the httpx ``auth_flow`` pattern).
:meth:`Store.run` drives a plan on ``sqlite3``, :meth:`Store.arun` on
``aiosqlite``; those two loops are the only code that touches either library.
Write plans run inside ``BEGIN IMMEDIATE``.

Whatever goes wrong with the file (corrupt, unwritable, full, locked, newer
schema) is logged once, counted, and answered with the plan's default: the
cache degrades to fetching, it never fails the agent.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.resources
import logging
import os
import re
import sqlite3
import threading
import time
from collections.abc import Generator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import aiosqlite
import filelock

from ._config import CacheConfig

log = logging.getLogger("agw_persist_cache")

T = TypeVar("T")
Row = tuple[Any, ...]
Stmt = tuple[str, Sequence[Any]]
Plan = Generator[Stmt, list[Row], T]

RETRY_DISABLED_SECONDS = 30.0
_MIGRATION_NAME = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")

# Connections inherited across fork are parked here, never used or closed: closing
# them in the child could checkpoint or unlink the parent's WAL under its feet.
_ABANDONED: list[object] = []
_FORK_EPOCH = 0


def _after_fork_in_child() -> None:
    global _FORK_EPOCH
    _FORK_EPOCH += 1


os.register_at_fork(after_in_child=_after_fork_in_child)


def _stop_outside_loop(conn: aiosqlite.Connection) -> None:
    """Close an aiosqlite connection without awaiting it.

    ``stop()`` would hand its worker a future of whatever loop is current, which may be
    closed by the time the worker answers (an error in the worker thread). Called from a
    thread with no event loop, it hands over no future at all.
    """
    helper = threading.Thread(target=conn.stop, name="agw-cache-aiosqlite-stop")
    helper.start()
    helper.join()


def fork_epoch() -> int:
    """Changes in every forked child: state built before it belongs to the parent."""
    return _FORK_EPOCH


def _migrations_dir() -> Any:
    packaged = importlib.resources.files("agw_persist_cache").joinpath("_migrations")
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parent.parent / "migrations"


def load_migrations() -> list[tuple[int, str, str]]:
    """(version, name, sql) for every ``migrations/NNNN_name.sql``, in order."""
    found = []
    for entry in _migrations_dir().iterdir():
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


STORAGE_ERRORS = (sqlite3.Error, OSError, filelock.Timeout, SchemaTooNew)
# aiosqlite raises ValueError("no active connection") once its worker thread is gone.
ASYNC_STORAGE_ERRORS = (*STORAGE_ERRORS, ValueError)


@dataclass
class Counters:
    """Per-process event counters (see ``CacheStats``)."""

    hits: int = 0
    misses: int = 0
    fetches: int = 0
    stale_writes_skipped: int = 0
    lock_timeouts: int = 0
    decrypt_failures: int = 0
    storage_errors: int = 0
    refreshes: int = 0
    backoff_rejections: int = 0


class _AsyncState:
    def __init__(self, conn: aiosqlite.Connection) -> None:
        self.conn = conn
        self.lock = asyncio.Lock()


class Store:
    """One SQLite file: per-thread ``sqlite3`` connections, per-loop ``aiosqlite`` ones."""

    def __init__(self, path: Path, config: CacheConfig, counters: Counters) -> None:
        self.path = path
        self.lock_dir = path.with_name(path.name + ".locks")
        self.config = config
        self.counters = counters
        self.disabled_reason: str | None = None
        self._retry_at = 0.0
        self._warned: dict[str, float] = {}
        self._mutex = threading.Lock()
        self._reset()

    # -- connections ---------------------------------------------------------

    def _reset(self) -> None:
        self._epoch = fork_epoch()
        self._ready = False
        self._local = threading.local()
        self._conns: list[sqlite3.Connection] = []
        self._aconns: dict[asyncio.AbstractEventLoop, _AsyncState] = {}

    def _check_fork(self) -> None:
        if self._epoch != fork_epoch():
            _ABANDONED.extend(self._conns)
            _ABANDONED.extend(s.conn for s in self._aconns.values())
            self._mutex = threading.Lock()
            self._reset()

    def pragmas(self) -> list[str]:
        stmts = [
            f"PRAGMA busy_timeout = {int(self.config.busy_timeout_seconds * 1000)}",
            "PRAGMA synchronous = NORMAL",
            "PRAGMA journal_size_limit = 4194304",
            "PRAGMA foreign_keys = OFF",
        ]
        if self.config.max_db_bytes is not None:
            stmts.append(f"PRAGMA max_page_count = {max(16, self.config.max_db_bytes // 4096)}")
        return stmts

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(
            self.path,
            isolation_level=None,
            check_same_thread=False,
            timeout=self.config.busy_timeout_seconds,
        )
        for stmt in self.pragmas():
            conn.execute(stmt)
        return conn

    def conn(self) -> sqlite3.Connection:
        """This thread's connection, opening (and initializing the file) on first use."""
        self._check_fork()
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            self._ensure_ready()
            conn = self._connect()
            with self._mutex:
                self._conns.append(conn)
            self._local.conn = conn
        return conn

    async def _astate(self) -> _AsyncState:
        self._check_fork()
        loop = asyncio.get_running_loop()
        state = self._aconns.get(loop)
        if state is None:
            self._ensure_ready()
            pending = aiosqlite.connect(
                self.path, isolation_level=None, timeout=self.config.busy_timeout_seconds
            )
            # aiosqlite's worker is not a daemon: a cache nobody closed would hold the
            # interpreter at exit. Only committed data matters, so it may die with us.
            worker = getattr(pending, "_thread", None)
            if isinstance(worker, threading.Thread):
                worker.daemon = True
            conn = await pending
            for stmt in self.pragmas():
                await conn.execute(stmt)
            state = self._aconns.setdefault(loop, _AsyncState(conn))
            if state.conn is not conn:
                await conn.close()
        return state

    def close(self) -> None:
        self._check_fork()
        with self._mutex:
            conns, self._conns = self._conns, []
        for conn in conns:
            with contextlib.suppress(sqlite3.Error):
                conn.close()
        self._local = threading.local()
        for state in list(self._aconns.values()):
            _stop_outside_loop(state.conn)
        self._aconns.clear()

    async def aclose(self) -> None:
        self._check_fork()
        state = self._aconns.pop(asyncio.get_running_loop(), None)
        if state is not None:
            await state.conn.close()
        self.close()

    # -- file set-up -----------------------------------------------------------

    def _ensure_ready(self) -> None:
        if self._ready:
            return
        if self.disabled():
            raise sqlite3.OperationalError(self.disabled_reason)
        with self._mutex:
            if not self._ready:
                self._initialize()
                self._ready = True
                self.disabled_reason = None

    def prepare_dirs(self) -> None:
        """Create the directory (0700) and the lock directory beside the database."""
        for directory in (self.path.parent, self.lock_dir):
            if not directory.is_dir():
                directory.mkdir(mode=0o700, parents=True, exist_ok=True)

    def _initialize(self) -> None:
        self.prepare_dirs()
        init_lock = filelock.FileLock(
            self.lock_dir / "init.lock",
            timeout=max(30.0, self.config.busy_timeout_seconds),
            mode=0o600,
            thread_local=False,
            preserve_lock_file=True,
        )
        # Serialized: 32 processes opening a brand-new file must not race on the schema.
        with init_lock:
            # SQLite gives the -wal and -shm files the mode of the database file.
            with contextlib.suppress(FileExistsError):
                os.close(os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600))
            try:
                self._migrate()
            except sqlite3.DatabaseError as exc:
                if isinstance(exc, sqlite3.OperationalError):
                    raise
                self._move_aside(exc)
                os.close(os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600))
                self._migrate()

    def _migrate(self) -> None:
        conn = self._connect()
        try:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise SchemaTooNew(
                    f"cache file {self.path} has schema version {version}, newer than this "
                    f"agw-persist-cache understands ({SCHEMA_VERSION}); upgrade the package on "
                    "every process of this host or point AGW_CACHE_PATH elsewhere"
                )
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

    def _move_aside(self, exc: BaseException) -> None:
        stamp = f"corrupt-{int(time.time())}-{os.getpid()}"
        for suffix in ("", "-wal", "-shm"):
            src = self.path.with_name(self.path.name + suffix)
            with contextlib.suppress(FileNotFoundError):
                src.rename(src.with_name(f"{self.path.name}.{stamp}{suffix}"))
        self.warn(
            "corrupt",
            "cache file %s was not a usable SQLite database (%s); moved it aside as %s.%s "
            "and started an empty one",
            self.path,
            type(exc).__name__,
            self.path.name,
            stamp,
        )

    # -- failure handling ------------------------------------------------------

    def warn(self, category: str, message: str, *args: object) -> None:
        """One warning per category per minute: a broken file must not flood the logs."""
        now = time.monotonic()
        if now - self._warned.get(category, -1e9) >= 60.0:
            self._warned[category] = now
            log.warning(message, *args)

    def failed(self, exc: BaseException) -> None:
        """Count a storage failure, warn once, and degrade to fetching."""
        self.counters.storage_errors += 1
        if self.disabled():
            return  # already warned; retry later
        if isinstance(exc, SchemaTooNew):
            self._disable(str(exc))
            self.warn("schema", "%s; the cache is disabled, tokens are fetched directly", exc)
            return
        if not self._ready:
            self._disable(f"cannot open cache file {self.path}: {type(exc).__name__}: {exc}")
            self.warn(
                "open",
                "cannot open token cache at %s (%s: %s); tokens are fetched directly. "
                "Set AGW_CACHE_PATH to a writable local path or run `agw-cache doctor`",
                self.path,
                type(exc).__name__,
                exc,
            )
            return
        if isinstance(exc, sqlite3.DatabaseError) and not isinstance(exc, sqlite3.OperationalError):
            # Corruption under a running process: reopen, which moves a broken file aside.
            self._drop_connections()
        self.warn(
            f"op:{type(exc).__name__}:{exc}",
            "token cache operation failed on %s (%s: %s); carrying on without it",
            self.path,
            type(exc).__name__,
            exc,
        )

    def disabled(self) -> bool:
        """True while a failure to open the file is recent: don't try again yet."""
        return self.disabled_reason is not None and time.time() < self._retry_at

    def _disable(self, reason: str) -> None:
        self.disabled_reason = reason
        self._retry_at = time.time() + RETRY_DISABLED_SECONDS

    def _drop_connections(self) -> None:
        with self._mutex:
            _ABANDONED.extend(self._conns)
            self._conns = []
            self._local = threading.local()
            self._ready = False

    # -- drivers -----------------------------------------------------------------

    def run(self, plan: Plan[T], *, write: bool, default: T) -> T:
        """Drive ``plan`` on this thread's sqlite3 connection."""
        try:
            conn = self.conn()
            if write:
                conn.execute("BEGIN IMMEDIATE")
            try:
                stmt = next(plan)
                while True:
                    stmt = plan.send(conn.execute(*stmt).fetchall())
            except StopIteration as done:
                if write:
                    conn.execute("COMMIT")
                return done.value  # type: ignore[no-any-return]  # StopIteration.value is Any
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
        except STORAGE_ERRORS as exc:
            plan.close()
            self.failed(exc)
            return default

    async def arun(self, plan: Plan[T], *, write: bool, default: T) -> T:
        """Drive ``plan`` on this event loop's aiosqlite connection."""
        try:
            state = await self._astate()
            async with state.lock:
                conn = state.conn
                if write:
                    await conn.execute("BEGIN IMMEDIATE")
                try:
                    stmt = next(plan)
                    while True:
                        rows = await conn.execute_fetchall(*stmt)
                        stmt = plan.send(list(rows))  # type: ignore[arg-type]  # aiosqlite types rows as Row
                except StopIteration as done:
                    if write:
                        await conn.execute("COMMIT")
                    return done.value  # type: ignore[no-any-return]  # StopIteration.value is Any
                except BaseException:
                    if conn.in_transaction:
                        await conn.execute("ROLLBACK")
                    raise
        except ASYNC_STORAGE_ERRORS as exc:
            plan.close()
            self.failed(exc)
            return default

    def read(self, sql: str, params: tuple[Any, ...]) -> Row | None:
        """The hot path: one primary-key SELECT on this thread's connection, no thread hop.

        Also used by the async API: a ~5 µs read beats a ~60 µs hop to aiosqlite's thread.
        """
        try:
            conn = self._local.conn if self._epoch == _FORK_EPOCH else None
        except AttributeError:
            conn = None
        try:
            row: Row | None = (conn or self.conn()).execute(sql, params).fetchone()
            return row
        except STORAGE_ERRORS as exc:
            self.failed(exc)
            return None


SQL_READ = "SELECT nonce, last_used, created_at, kid FROM tokens WHERE k = ?"
SQL_READ_CT = "SELECT ct FROM tokens WHERE k = ? AND nonce = ?"


# -- plans ------------------------------------------------------------------------------
# Each plan is the SQL of one operation and the decisions between its statements.


def plan_touch(digest: bytes, now: float) -> Plan[None]:
    yield ("UPDATE tokens SET last_used = ? WHERE k = ?", (now, digest))


def plan_delete(digests: Sequence[bytes]) -> Plan[int]:
    removed = 0
    for digest in digests:
        removed += len((yield ("DELETE FROM tokens WHERE k = ? RETURNING 1", (digest,))))
    return removed


def plan_delete_if_nonce(digest: bytes, nonce: bytes) -> Plan[int]:
    """Drop exactly the row version that was read, unless another process rewrote it since."""
    gone = yield ("DELETE FROM tokens WHERE k = ? AND nonce = ? RETURNING 1", (digest, nonce))
    return len(gone)


def plan_generation() -> Plan[int | None]:
    rows = yield ("SELECT value FROM meta WHERE name = 'generation'", ())
    return int(rows[0][0]) if rows else None


def plan_backoff(digest: bytes) -> Plan[Row | None]:
    rows = yield ("SELECT until, cause, status FROM backoff WHERE k = ?", (digest,))
    return rows[0] if rows else None


def plan_set_backoff(digest: bytes, until: float, cause: str, status: int | None) -> Plan[None]:
    yield (
        "INSERT OR REPLACE INTO backoff (k, until, cause, status) VALUES (?, ?, ?, ?)",
        (digest, until, cause, status),
    )


@dataclass(frozen=True)
class NewRow:
    digest: bytes
    kind: str
    kid: str
    nonce: bytes
    ct: bytes
    expires_at: float
    now: float


def plan_write(row: NewRow, *, generation: int | None, delete: Sequence[bytes] = ()) -> Plan[bool]:
    """Insert or replace a row; refuse if a clear() happened since ``generation`` was read."""
    if generation is not None:
        current = yield from plan_generation()
        if current != generation:
            return False
    for digest in delete:
        yield ("DELETE FROM tokens WHERE k = ?", (digest,))
    yield (
        "INSERT OR REPLACE INTO tokens (k, kind, kid, nonce, ct, expires_at, last_used, created_at)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        (row.digest, row.kind, row.kid, row.nonce, row.ct, row.expires_at, row.now, row.now),
    )
    # A back-off row left behind is harmless: fetches only consult it on a miss, and it
    # is long expired by the time this token is; prune() sweeps it.
    return True


def plan_clear() -> Plan[None]:
    yield ("UPDATE meta SET value = value + 1 WHERE name = 'generation'", ())
    yield ("DELETE FROM tokens", ())
    yield ("DELETE FROM backoff", ())


def plan_prune(now: float, limits: dict[str, int]) -> Plan[int]:
    """Expired rows first, then per kind every row older than its ``limit`` newest.

    The OFFSET walks at most ``limit`` entries of the LRU index: no full count(*).
    """
    removed = yield ("DELETE FROM tokens WHERE expires_at <= ? RETURNING 1", (now,))
    total = len(removed)
    yield ("DELETE FROM backoff WHERE until <= ?", (now,))
    for kind, limit in limits.items():
        gone = yield (
            "DELETE FROM tokens WHERE rowid IN (SELECT rowid FROM tokens WHERE kind = ?"
            " ORDER BY last_used DESC LIMIT -1 OFFSET ?) RETURNING 1",
            (kind, limit),
        )
        total += len(gone)
    return total


def plan_facts(now: float) -> Plan[dict[str, Any]]:
    by_kind = yield (
        "SELECT kind, count(*), sum(expires_at <= ?), min(expires_at), max(expires_at)"
        " FROM tokens GROUP BY kind",
        (now,),
    )
    kids = yield ("SELECT DISTINCT kid FROM tokens ORDER BY kid", ())
    ((version,),) = yield ("PRAGMA user_version", ())
    counts = {kind: n for kind, n, _, _, _ in by_kind}
    return {
        "entries_system": counts.get("system", 0),
        "entries_user": counts.get("user", 0),
        "entries_expired": sum(int(e or 0) for _, _, e, _, _ in by_kind),
        "oldest_expiry": min((lo for *_, lo, _ in by_kind), default=None),
        "newest_expiry": max((hi for *_, hi in by_kind), default=None),
        "schema_version": int(version),
        "key_ids_in_use": tuple(k for (k,) in kids),
    }


def plan_list() -> Plan[list[Row]]:
    rows = yield (
        "SELECT kind, k, expires_at, last_used, created_at, kid FROM tokens"
        " ORDER BY kind, last_used DESC",
        (),
    )
    return rows


def plan_rows_not_under(kid: str, limit: int) -> Plan[list[Row]]:
    rows = yield (
        "SELECT k, kind, kid, nonce, ct, expires_at, created_at FROM tokens WHERE kid != ? LIMIT ?",
        (kid, limit),
    )
    return rows


def plan_replace(old: bytes, row: NewRow, created_at: float) -> Plan[None]:
    """Re-seal one row in place of ``old`` unless a newer row already took the new digest."""
    yield ("DELETE FROM tokens WHERE k = ?", (old,))
    yield (
        "INSERT INTO tokens (k, kind, kid, nonce, ct, expires_at, last_used, created_at)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (k) DO NOTHING",
        (row.digest, row.kind, row.kid, row.nonce, row.ct, row.expires_at, row.now, created_at),
    )


def plan_checkpoint(*, truncate: bool) -> Plan[None]:
    """Fold the WAL back into the database (best effort: readers may keep it busy).

    PASSIVE never waits; TRUNCATE (explicit prunes) waits for readers, then empties the file.
    """
    yield (f"PRAGMA wal_checkpoint({'TRUNCATE' if truncate else 'PASSIVE'})", ())
