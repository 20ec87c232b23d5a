"""The SQLite backend: one file per host, shared by every process on it.

:class:`SqliteBackend` keeps the storage contract by gluing four parts, one job each:
``_sqlite_files`` (is the file ours, its identity, moving a damaged one aside),
``_sqlite_schema`` (creating and migrating it under the init lock), ``_sqlite_pool`` (this
process's connections) and ``_sqlite_sql`` (the statements of every operation). What it
decides itself: which failures are the store's trouble and what they do (a newer schema
disables the store for a while, corruption moves a file of ours aside once), when a process
must reopen the path (another process replaced the file; a fork), and where each operation
runs. Every Read, whichever entry it comes by, runs :meth:`SqliteBackend._read`, on the
calling thread once a connection is open (a ~5 µs read beats a ~60 µs hop to aiosqlite's
thread); an event loop's first one runs in a worker thread (opening and migrating the file
are file work). Other operations from an event loop run on its aiosqlite connection. WAL
mode, ``synchronous=NORMAL``, a busy timeout, ``BEGIN IMMEDIATE`` writes.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any, ClassVar, TypeVar, cast

import filelock

from .. import _files as files
from .. import _fork
from .._config import CacheConfig
from .._files import make_private_dirs
from .._log import Warnings, warn_unopenable
from ._filelocks import KeyLockFiles
from ._sqlite_files import (
    APPLICATION_ID,
    DAMAGED,
    examine,
    identity_of,
    marked,
    move_aside,
    sizes,
)
from ._sqlite_pool import POOL_IDLE, Pool
from ._sqlite_schema import (
    SCHEMA_VERSION,
    NoCache,
    SchemaTooNew,
    init_lock,
    initialize,
    inspect,
)
from ._sqlite_sql import INLINE, arun_op, quick, read, run_op
from .contract import (
    Facts,
    KeyLock,
    Op,
    Read,
    Snapshot,
    StorageError,
    StorageUnavailable,
)

T = TypeVar("T")

RETRY_UNAVAILABLE_SECONDS = 30.0
IDENTITY_CHECK_SECONDS = 2.0
"""How often a process that only reads checks that the path still names its file."""
IDENTITY_WRITE_CHECK_SECONDS = 0.1
"""How often, at most, a write checks it first (a write in the window after another process
quarantined the file lands in the file moved aside: a narrower race than a read's)."""

# The store's trouble; anything else (our bugs) propagates. (aiosqlite's own ValueError is
# reported as sqlite3's by the async statements and when a connection is opened or closed.)
_FAILURES = (sqlite3.Error, OSError, filelock.Timeout, SchemaTooNew)
_READ_OP = Read(())


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
        self._reset()

    def _reset(self) -> None:
        """Fresh per-process state (at construction and in a forked child)."""
        self._forks = _fork.forks
        self._mutex = threading.Lock()
        self._ready = False
        self._identity: tuple[int, int] | None = None  # (st_dev, st_ino) of the file we use
        self._next_check = self._next_write_check = 0.0
        self._pool = Pool(self.path, self.config, read_only=self.read_only)

    def _check_fork(self) -> None:
        if self._forks != _fork.forks:
            self._pool.abandon()
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
        if identity_of(self.path) != self._identity:
            self._drop_connections()

    def _drop_connections(self) -> None:
        """Forget the file; the next operation opens the path afresh."""
        with self._mutex:
            self._ready = False
            self._identity = None
        self._pool.drop()

    def _quarantine(self, exc: BaseException) -> None:
        """Corruption found while working: move the file aside and start a new one, once.

        Under the init lock, and only if the path still names the very file that failed
        (another process may have replaced it already: then just reopen)."""
        failed = self._identity
        self._drop_connections()
        try:
            with init_lock(self.lock_dir, self.config.busy_timeout_seconds):
                if failed is not None and identity_of(self.path) == failed:
                    if not marked(self.path):  # its header went too: not provably ours
                        self._disable(
                            f"cache file {self.path} {DAMAGED} and lost its header; "
                            "it is left alone: move it away"
                        )
                        return
                    move_aside(self.path, exc, self.warnings)
        except (OSError, filelock.Timeout):
            pass  # the next open tries again

    # -- operations ----------------------------------------------------------------------------

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
            if not self._ready:
                self._ensure_ready()
            conn = self._pool.borrow(best_effort)
            try:
                return self._finish(run_op(conn, op))
            finally:
                self._pool.give_back(conn, best_effort)
        except _FAILURES as exc:
            if best_effort and _is_busy(exc):
                return cast(T, None)  # skipped while another process writes
            raise self._failed(exc) from None
        finally:
            _fork.leave(gate)

    async def aexecute(self, op: Op[T]) -> T:
        """Perform ``op`` without blocking the loop on file I/O; raise ``StorageError``."""
        self._check_fork()
        if isinstance(op, INLINE):  # point reads and the LRU touch: no hop once a connection
            if self._pool.idle:  # is open (opening and migrating are file work: off the loop)
                return self.execute(op)
            return await asyncio.to_thread(self.execute, op)
        if quick(op):  # its own connection, in a thread
            return await asyncio.to_thread(self.execute, op)
        self._check_identity(op)
        gate = _fork.enter()
        try:
            if not self._ready:  # file work: off the loop
                await asyncio.to_thread(self._ensure_ready)
            state = await self._pool.loop_conn()
            async with state.lock:
                return self._finish(await arun_op(state.conn, op))
        except _FAILURES as exc:
            raise self._failed(exc) from None
        finally:
            _fork.leave(gate)

    def read_inline(self, op: Read) -> Snapshot | None:
        """A hit from an event loop, with a connection already open; else None."""
        if not self._pool.idle or self._forks != _fork.forks:
            return None
        return self._read(op.digests)

    def _read(self, digests: tuple[bytes, ...]) -> Snapshot:
        """Every Read: a pooled connection and :func:`read` (one SELECT, or a data_version
        check when the connection's last read of the key still stands).

        (Every hit runs this: the pool and the fork gate are used inline, not called.)
        """
        if self._identity is not None and time.monotonic() >= self._next_check:
            self._check_identity(_READ_OP)
        gate = object()  # _fork.enter(), inline: add, then look for a fork under way
        _fork.inside.add(gate)
        if _fork.forking:
            _fork.inside.discard(gate)
            gate = _fork.enter()
        pool = self._pool
        try:
            try:
                conn = pool.idle.pop()
            except IndexError:
                if not self._ready:
                    self._ensure_ready()
                conn = pool.borrow_reader()
            try:
                return read(conn, digests)
            finally:
                if len(pool.idle) < POOL_IDLE and conn.epoch == pool.epoch and not pool.waiting:
                    pool.idle.append(conn)
                else:
                    pool.give_back(conn)
        except _FAILURES as exc:
            raise self._failed(exc) from None
        finally:
            _fork.inside.discard(gate)

    def _finish(self, result: T) -> T:
        if isinstance(result, Facts):  # sizes come from the file system, not from SQL
            size, wal = sizes(self.path)
            return cast(T, result._replace(file_bytes=size, wal_bytes=wal))
        return result

    def key_lock(self, digest: bytes) -> KeyLock:
        """The key's lock in the lock directory: see ``_filelocks`` (OFD on Linux, else
        portable)."""
        return self.files.key_lock(digest)

    def forget_reads(self) -> None:
        """This process's next read of every key reads its row (for measuring that read)."""
        self._pool.forget_reads()

    # -- opening the file --------------------------------------------------------------------

    def _ensure_ready(self) -> None:
        """Open the file before a first connection: create and migrate it (a worker) or
        check it (a read-only look); ``StorageUnavailable`` while disabled."""
        if self._ready:
            return
        reason = self.unavailable
        if reason is not None:
            raise StorageUnavailable(reason)
        with self._mutex:
            if not self._ready:
                if self.read_only:
                    self._identity = inspect(self.path, self._pool.connect)
                else:
                    self._initialize()
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

    def _initialize(self) -> None:
        self.prepare_dirs()
        # Serialized: 32 processes opening a brand-new file must not race on the schema.
        self._identity = initialize(
            self.path,
            self.lock_dir,
            self._pool.connect,
            self.warnings,
            self.config.busy_timeout_seconds,
        )
        self._next_check = time.monotonic() + IDENTITY_CHECK_SECONDS

    # -- closing -------------------------------------------------------------------------------

    def close(self) -> None:
        """Close this process's connections (the file and other processes are unaffected)."""
        self._check_fork()
        self._pool.close()

    async def aclose(self) -> None:
        """Close this loop's aiosqlite connection properly, then everything else."""
        self._check_fork()
        await self._pool.aclose()


def _is_busy(exc: BaseException) -> bool:
    return isinstance(exc, sqlite3.OperationalError) and "locked" in str(exc)


def _is_corrupt(exc: BaseException) -> bool:
    """SQLITE_CORRUPT or SQLITE_NOTADB (any extended code)."""
    code = getattr(exc, "sqlite_errorcode", None)
    return isinstance(exc, sqlite3.DatabaseError) and code is not None and code & 0xFF in (11, 26)


__all__ = ["APPLICATION_ID", "SCHEMA_VERSION", "NoCache", "SchemaTooNew", "SqliteBackend"]
