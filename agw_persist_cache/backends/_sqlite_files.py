"""The SQLite backend's files: is what the path names ours, and what to do with one that broke.

Every entry point looks before it creates: :func:`examine` decides *absent*, *ours* or
*not ours* (``NotOurs``) with ``lstat`` and a non-blocking, no-follow read of the 100-byte
header, before any directory, key file or lock directory is made. A FIFO, socket, device,
directory or link is refused from its ``lstat`` alone (never opened). Only a file that
carries our ``application_id`` in its header is provably ours, and only such a file is ever
moved aside when it breaks (:func:`move_aside`). A process tells whether the path still
names the file it uses by the file's identity (:func:`identity_of`).
"""

from __future__ import annotations

import contextlib
import enum
import os
import sqlite3
import time
from pathlib import Path

from .. import _files as files
from .._log import Warnings

APPLICATION_ID = int.from_bytes(b"AGWC", "big")
OUR_TABLES = frozenset({"tokens", "meta", "backoff", "key_checks"})
SQLITE_MAGIC = b"SQLite format 3\x00"
HEADER_BYTES = 100
DAMAGED = "is damaged"
"""In the reason a read-only look gives for a damaged file of ours (doctor names it so)."""


class Found(enum.Enum):
    """What :func:`examine` found at a path that is not refused."""

    ABSENT = "absent"  # nothing there: a worker may create the cache, a diagnostic may not
    EMPTY = "empty"  # an empty private file of this user's: adopted
    MARKED = "marked"  # an SQLite file with our application_id: provably ours
    LEGACY = "legacy"  # SQLite without the mark but with only our tables (a version-1 cache)


def examine(path: Path) -> Found:
    """What ``path`` holds, changing nothing anywhere; ``NotOurs`` for whatever the cache did
    not make (a text file, another application's database, a link, a directory, a FIFO,
    another user's or an open-mode file), ``OSError`` when it cannot be looked at."""
    for side in files.side_files_of(path):
        files.check(side)
    try:
        header = files.read_private(path, HEADER_BYTES)
    except FileNotFoundError:
        return Found.ABSENT
    if not header:
        return Found.EMPTY
    if not header.startswith(SQLITE_MAGIC) or len(header) < HEADER_BYTES:
        raise files.NotOurs(f"{path} is not an SQLite file this cache made; it is left alone")
    app_id = int.from_bytes(header[68:72], "big")
    if app_id == APPLICATION_ID:
        return Found.MARKED
    if app_id:
        raise files.NotOurs(
            f"{path} belongs to another application (application_id {app_id}); it is left alone"
        )
    tables = _tables(path)
    if tables is None:
        raise files.NotOurs(f"{path} is not an SQLite file this cache made; it is left alone")
    if tables - OUR_TABLES:
        raise files.NotOurs(
            f"{path} is an SQLite database with tables of its own; it is left alone"
        )
    return Found.LEGACY  # no tables yet, or a version-1 cache file (before the mark)


def marked(path: Path) -> bool:
    """Whether ``path`` still carries our mark (checked again before moving a file aside)."""
    try:
        return examine(path) is Found.MARKED
    except OSError:  # NotOurs too: not provably ours, never moved
        return False


def identity_of(path: Path) -> tuple[int, int] | None:
    """``(st_dev, st_ino)`` of the file at ``path`` (None if there is none): changes when
    another process moved a damaged file aside and started a new one."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def sizes(path: Path) -> tuple[int, int]:
    """(database bytes, WAL bytes); 0 for a file that is not there."""
    return _size(path), _size(files.side_files_of(path)[0])


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def read_only_uri(path: Path) -> str:
    """An SQLite URI that opens ``path`` read-only and creates nothing beside it (no ``-shm``
    unless a ``-wal`` is there to be read); absolute, so relative paths work."""
    wal = os.path.lexists(files.side_files_of(path)[0])
    return f"{path.absolute().as_uri()}?mode=ro{'' if wal else '&immutable=1'}"


def _tables(path: Path) -> set[str] | None:
    """The table names of an SQLite file, read-only; None if it does not open."""
    try:
        conn = sqlite3.connect(read_only_uri(path), uri=True)
        try:
            listed = conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
            return {name for (name,) in listed}
        finally:
            conn.close()
    except sqlite3.DatabaseError:
        return None


def move_aside(path: Path, exc: BaseException, warnings: Warnings) -> None:
    """Rename a damaged file of ours (with its ``-wal`` and ``-shm``) to
    ``<name>.corrupt-<time>-<pid>``: kept for a post-mortem, out of the workers' way."""
    stamp = f"corrupt-{int(time.time())}-{os.getpid()}"
    for suffix in ("", *files.SIDE_SUFFIXES):
        src = files.sibling(path, suffix)
        with contextlib.suppress(FileNotFoundError):
            src.rename(src.with_name(f"{path.name}.{stamp}{suffix}"))
    warnings.once(
        "corrupt",
        "cache file %s was damaged (%s); moved it aside as %s.%s and started an empty one",
        path,
        type(exc).__name__,
        path.name,
        stamp,
    )
