"""The SQLite backend's connections: a few pooled ``sqlite3`` ones, one ``aiosqlite`` per loop.

Resources stay bounded whatever the caller's threading model. Sync work borrows from a small
pool (no connection per thread); hits share at most :data:`READERS` connections they opened
themselves. Each event loop gets one aiosqlite connection, stopped once its loop has closed
(``asyncio.run()`` per task). A :class:`Pool` belongs to one process: a forked child builds
its own and abandons the parent's connections, never using or closing them (closing one
could checkpoint or unlink the parent's WAL under its feet).
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import threading
import weakref
from collections import deque
from pathlib import Path

import aiosqlite

from .. import _fork
from .._config import CacheConfig
from ._sqlite_files import read_only_uri
from .contract import Snapshot

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

_ABANDONED: list[object] = []
"""Connections a forked child inherited: kept referenced so that they are never closed."""


class Conn(sqlite3.Connection):
    """A pooled connection, tagged with the pool epoch and the process it was opened in, with
    the cursor its hits reuse and its last reads (``_sqlite_sql.read``)."""

    epoch = 0
    forks = 0
    reader = False  # opened for a hit: counted in Pool._readers while open
    hits: sqlite3.Cursor
    seen: dict[tuple[bytes, ...], tuple[int, int, Snapshot]]

    def close(self) -> None:
        # The cursor holds its last statement: closed first, or sqlite3_close_v2 leaves a
        # zombie connection whose descriptors stay open until the cycle is collected.
        hits = getattr(self, "hits", None)  # absent if set-up failed before it was made
        if hits is not None:
            hits.close()
        super().close()


class LoopConn:
    """One event loop's aiosqlite connection and the lock that keeps its transactions whole."""

    def __init__(self, conn: aiosqlite.Connection) -> None:
        self.conn = conn
        self.lock = asyncio.Lock()


def stop(conn: aiosqlite.Connection) -> None:
    """Close an aiosqlite connection without awaiting it, from a thread with no loop.

    ``stop()`` hands its worker a future of whatever loop is current, which may be closed by
    the time the worker answers; from a thread with no event loop it hands over none.
    """
    _fork.start_thread("agw-cache-aiosqlite-stop", conn.stop).join()
    worker = getattr(conn, "_thread", None)
    if isinstance(worker, threading.Thread) and worker.is_alive():
        worker.join(5.0)


def pragmas(config: CacheConfig) -> list[str]:
    """The settings of every connection; the busy timeout first (a quick one has none)."""
    found = [
        f"PRAGMA busy_timeout = {int(config.busy_timeout_seconds * 1000)}",
        "PRAGMA synchronous = NORMAL",
        "PRAGMA journal_size_limit = 4194304",
        "PRAGMA foreign_keys = OFF",
    ]
    if config.max_db_bytes is not None:
        found.append(f"PRAGMA max_page_count = {max(16, config.max_db_bytes // 4096)}")
    return found


class Pool:
    """This process's connections to the file at ``path``.

    ``idle`` is public to the backend's hit path, which pops and appends there without a call
    (``epoch`` and ``waiting`` tell it when to hand a connection to :meth:`give_back`
    instead). The caller makes the file ready (created, migrated) before it asks for a
    connection: a pool only opens what is there.
    """

    def __init__(self, path: Path, config: CacheConfig, *, read_only: bool) -> None:
        self.path = path
        self.read_only = read_only
        self._config = config
        self._pragmas = pragmas(config)
        self.epoch = 0  # bumped whenever the connections are dropped (file replaced)
        self.idle: deque[Conn] = deque()
        self._idle_quick: deque[Conn] = deque()
        self._returned = threading.Condition(threading.Lock())  # an idle connection is back
        self._readers = 0  # open connections of this epoch that hits opened (READERS)
        self.waiting = 0  # hits waiting for one
        self._loops: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, LoopConn] = (
            weakref.WeakKeyDictionary()
        )

    def connect(self, *, quick: bool = False) -> Conn:
        """A new connection (``quick``: one that never waits for the write lock)."""
        target: str | Path = self.path
        if self.read_only:  # no -wal: nothing to merge, and nothing gets created either
            target = read_only_uri(self.path)
        conn = sqlite3.connect(
            target,
            uri=self.read_only,
            isolation_level=None,
            check_same_thread=False,
            timeout=0 if quick else self._config.busy_timeout_seconds,
            factory=Conn,
        )
        conn.epoch, conn.forks = self.epoch, _fork.forks
        conn.hits, conn.seen = conn.cursor(), {}
        for stmt in self._pragmas[1:] if quick else self._pragmas:
            conn.execute(stmt)
        return conn

    def borrow(self, quick: bool = False) -> Conn:
        """An idle pooled connection, or a new one."""
        try:
            return (self._idle_quick if quick else self.idle).pop()
        except IndexError:
            return self.connect(quick=quick)

    def borrow_reader(self) -> Conn:
        """A connection for a hit that found none idle: a new one while fewer than
        ``READERS`` that hits opened are open, else the next one given back."""
        with self._returned:
            if not self.idle and self._readers >= READERS:
                self.waiting += 1
                self._returned.wait_for(lambda: self.idle, READER_WAIT_SECONDS)
                self.waiting -= 1
            with contextlib.suppress(IndexError):
                return self.idle.pop()
            self._readers += 1
        try:
            conn = self.connect()
        except BaseException:
            self._closed_reader(self.epoch)
            raise
        conn.reader = True
        return conn

    def give_back(self, conn: Conn, quick: bool = False) -> None:
        if conn.forks != _fork.forks:
            return  # a connection of the parent's: never reuse nor close it
        idle = self._idle_quick if quick else self.idle
        if len(idle) < (QUICK_IDLE if quick else POOL_IDLE) and conn.epoch == self.epoch:
            idle.append(conn)
            if self.waiting:
                with self._returned:
                    self._returned.notify()
        else:
            self._close(conn)

    def _close(self, conn: Conn) -> None:
        try:
            conn.close()
        finally:
            if conn.reader:
                self._closed_reader(conn.epoch)

    def _closed_reader(self, epoch: int) -> None:
        with self._returned:
            if epoch == self.epoch:
                self._readers -= 1
            self._returned.notify()

    async def loop_conn(self) -> LoopConn:
        """This event loop's connection (opened off the loop)."""
        loop = asyncio.get_running_loop()
        state = self._loops.get(loop)
        if state is not None:
            return state
        for other, stale in list(self._loops.items()):
            if other.is_closed():  # asyncio.run() per task: release what closed loops held
                del self._loops[other]
                await asyncio.to_thread(stop, stale.conn)
        pending = aiosqlite.connect(
            self.path, isolation_level=None, timeout=self._config.busy_timeout_seconds
        )
        # aiosqlite's worker is not a daemon: a cache nobody closed would hold the
        # interpreter at exit. Only committed data matters, so it may die with us.
        worker = getattr(pending, "_thread", None)
        if isinstance(worker, threading.Thread):
            worker.daemon = True
        conn = await pending
        for stmt in self._pragmas:
            await conn.execute(stmt)
        state = self._loops.setdefault(loop, LoopConn(conn))
        if state.conn is not conn:
            await conn.close()
        return state

    def forget_reads(self) -> None:
        """Idle connections forget their last reads (each next read reads its row)."""
        for conn in self.idle:
            conn.seen.clear()

    def drop(self) -> None:
        """Close the connections; those in use are closed when given back (a new epoch),
        the event loops' ones by their workers (nobody waits for that)."""
        with self._returned:
            self.epoch += 1
            self._readers = 0  # the old epoch's are closed as they come back
        for state in self._close_idle():
            _fork.start_thread("agw-cache-aiosqlite-stop", stop, state.conn)

    def close(self) -> None:
        """Close every connection of this process, waiting for the event loops' ones."""
        for state in self._close_idle():
            stop(state.conn)

    async def aclose(self) -> None:
        """Close this loop's aiosqlite connection properly, then everything else."""
        state = self._loops.pop(asyncio.get_running_loop(), None)
        if state is not None:
            with contextlib.suppress(sqlite3.Error, ValueError):  # ValueError: aiosqlite's
                await state.conn.close()
        await asyncio.to_thread(self.close)

    def abandon(self) -> None:
        """In a forked child: the parent's connections stay referenced, never closed."""
        _ABANDONED.extend(self.idle)
        _ABANDONED.extend(self._idle_quick)
        _ABANDONED.extend(state.conn for state in self._loops.values())

    def _close_idle(self) -> list[LoopConn]:
        """Close the idle pooled connections; hand back the event loops' ones to stop."""
        with self._returned:
            idle = [*self.idle, *self._idle_quick]
            self.idle.clear()
            self._idle_quick.clear()
            loops = list(self._loops.values())
            self._loops.clear()
        for conn in idle:
            with contextlib.suppress(sqlite3.Error):
                self._close(conn)
        return loops
