"""The SQLite backend's schema: versioned SQL from ``migrations/``, applied once per file.

A new file is created with our mark in its header, then migrated; an existing one is
migrated from its ``PRAGMA user_version`` up to :data:`SCHEMA_VERSION`. Both happen under
the init lock in the lock directory, so that many processes opening a brand-new file at
once never race on the schema. A file of a newer schema is refused (:class:`SchemaTooNew`),
never downgraded. A read-only look (:func:`inspect`) migrates and creates nothing.
"""

from __future__ import annotations

import importlib.resources
import os
import re
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import filelock

from .. import _files as files
from .._log import Warnings
from ._filelocks import file_lock
from ._sqlite_files import APPLICATION_ID, Found, examine, identity_of, move_aside

Identity = tuple[int, int]
_MIGRATION_NAME = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")
INIT_LOCK = "init.lock"
"""The lock file, in the lock directory, that serializes creation, migration and quarantine."""


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


def too_new(path: Path, version: int) -> str:
    return (
        f"cache file {path} has schema version {version}, newer than this agw-persist-cache "
        f"understands ({SCHEMA_VERSION}); upgrade the package on every process of this host "
        "or point AGW_CACHE_PATH elsewhere"
    )


def init_lock(lock_dir: Path, busy_timeout: float) -> filelock.BaseFileLock:
    """Serializes schema creation, migration and quarantine across processes."""
    return file_lock(lock_dir / INIT_LOCK, timeout=max(30.0, busy_timeout))


def initialize(
    path: Path,
    lock_dir: Path,
    connect: Callable[[], sqlite3.Connection],
    warnings: Warnings,
    busy_timeout: float,
) -> Identity | None:
    """Create the file at ``path`` if absent, migrate it, and return its identity (all
    under the init lock). A file of ours that fails to migrate as damaged is moved aside
    and started afresh; any other file is left as it is (the error propagates)."""
    files.check_dir(lock_dir)
    files.check(lock_dir / INIT_LOCK)
    with init_lock(lock_dir, busy_timeout):
        found = examine(path)  # again: another process may have made it meanwhile
        # SQLite gives the -wal and -shm files the mode of the database file.
        if found is Found.ABSENT:
            _create(path)
        try:
            _migrate(path, connect)
        except sqlite3.DatabaseError as exc:
            if isinstance(exc, sqlite3.OperationalError) or found is not Found.MARKED:
                raise  # only a file with our mark is ever moved aside
            move_aside(path, exc, warnings)
            _create(path)
            _migrate(path, connect)
        return identity_of(path)


def inspect(path: Path, connect: Callable[[], sqlite3.Connection]) -> Identity | None:
    """Read-only: an existing file of this cache's, at the current schema (its identity);
    else :class:`NoCache` or :class:`SchemaTooNew` saying why not."""
    found = examine(path)
    if found is Found.ABSENT:
        raise NoCache(f"no cache at {path}")
    if found is Found.EMPTY:
        raise NoCache(f"cache file {path} is empty (a worker makes it a cache when it opens it)")
    conn = connect()
    try:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
    finally:
        conn.close()
    if version > SCHEMA_VERSION:
        raise SchemaTooNew(too_new(path, version))
    if version < SCHEMA_VERSION:
        raise SchemaTooNew(
            f"cache file {path} has schema version {version}, older than this "
            f"agw-persist-cache reads ({SCHEMA_VERSION}); a worker of this version migrates "
            "it when it next opens it"
        )
    return identity_of(path)


def _migrate(path: Path, connect: Callable[[], sqlite3.Connection]) -> None:
    conn = connect()
    try:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise SchemaTooNew(too_new(path, version))
        if conn.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
            conn.execute("PRAGMA journal_mode = WAL")
        for number, _name, sql in MIGRATIONS:
            if number <= version:
                continue
            conn.executescript(f"BEGIN IMMEDIATE;\n{sql}\nPRAGMA user_version = {number};\nCOMMIT;")
        if version:
            conn.execute("SELECT count(*) FROM meta").fetchone()
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    finally:
        conn.close()


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
