"""``agw-cache doctor``: one line per health check of the cache file, its keys and its locks.

A check that finds a problem prints ``FAIL`` with the fix and makes the exit code 1; a
``warn`` line is worth reading but does not fail. Doctor only reads: it opens an existing
database read-only and creates nothing; any failure is a ``FAIL`` line, never a traceback.
A network filesystem stops the checks before the cache is opened: SQLite's WAL needs shared
memory that NFS/SMB/FUSE do not give.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Generator, Iterator
from pathlib import Path
from typing import TextIO

from . import _files as files
from ._cli_common import EXIT_OK, EXIT_PROBLEMS, Where, open_cache
from ._config import ENV_KEY, ENV_PATH, ENV_URL, resolve_path
from ._findings import Finding, key_finding
from ._health import HEALTHY
from ._stats import CacheStats
from .backends._sqlite_files import DAMAGED, Found, examine

NETWORK_FILESYSTEMS = frozenset(
    {
        "nfs",
        "nfs4",
        "cifs",
        "smb",
        "smb3",
        "smbfs",
        "9p",
        "afs",
        "ceph",
        "glusterfs",
        "lustre",
        "gpfs",
        "davfs",
        "fuse",
        "fuseblk",
    }
)


def _unescape_mount(field: str) -> str:
    """Undo the octal escapes (``\\040`` for a space) of /proc/mounts fields."""
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and field[i + 1 : i + 4].isdigit():
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def filesystem_of(path: Path, mounts_text: str) -> tuple[str, str]:
    """The (mount point, filesystem type) that holds ``path``: the longest matching mount."""
    target = os.path.realpath(path)
    best = ("/", "unknown")
    for line in mounts_text.splitlines():
        fields = line.split()
        if len(fields) < 3:
            continue
        point = _unescape_mount(fields[1])
        inside = target == point or target.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best[0]):
            best = (point, fields[2])
    return best


def is_network_filesystem(fstype: str) -> bool:
    """True for filesystems where SQLite WAL (shared-memory index, POSIX locks) is unsafe."""
    return fstype in NETWORK_FILESYSTEMS or fstype.startswith("fuse.")


def _existing_ancestor(path: Path) -> Path:
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return Path("/")


def _guarded(name: str, check: Callable[[], Iterator[Finding]]) -> Iterator[Finding]:
    """Run one group of checks; whatever it raises becomes a FAIL line, never a traceback."""
    try:
        yield from check()
    except Exception as exc:  # reason: doctor exists for broken set-ups; it reports, not crashes
        yield Finding("FAIL", name, f"{type(exc).__name__}: {exc}")


def _checks(where: Where, mounts_file: Path) -> Iterator[Finding]:
    """The checks in order, reading only; stops early when going on would be unsafe or moot."""
    sqlite_path, url = where.split()
    if url is not None:  # a shared store (--url, $AGW_CACHE_URL): its own checks
        from ._doctor_redis import redis_checks

        yield from redis_checks(url, where)
        return
    path = resolve_path(sqlite_path)
    source = _source(where)
    try:
        mounts = mounts_file.read_text()
    except OSError as exc:
        yield Finding("warn", "filesystem", f"cannot read {mounts_file} ({exc.strerror})")
        mounts = ""
    point, fstype = filesystem_of(_existing_ancestor(path.parent), mounts)
    if is_network_filesystem(fstype):
        yield Finding(
            "FAIL",
            "filesystem",
            f"{path.parent} is on {fstype} (mounted at {point}), a network filesystem: "
            "SQLite WAL needs shared memory and locks that it does not provide, so workers "
            "could corrupt the cache. Refusing to open it here; set AGW_CACHE_PATH to a local "
            "disk (e.g. /var/tmp/agw-cache/tokens.db) or tmpfs (/dev/shm)",
        )
        return
    yield Finding("ok", "filesystem", f"{fstype} at {point} (local)")
    try:
        os.lstat(path)
    except FileNotFoundError:
        yield Finding("FAIL", "path", f"no cache at {path} (from {source}); nothing was created")
        return
    except OSError as exc:
        yield Finding(
            "FAIL",
            "path",
            f"cannot look at {path} as {_user()} ({exc.strerror}); run doctor as the "
            "user the workers run as",
        )
        return
    yield Finding("ok", "path", f"{path} (from {source})")
    refused = yield from _ownership(path)
    if refused:
        return  # the cache leaves this path alone; nothing more to learn by opening it
    yield from _guarded("directory", lambda: _directory(path))
    found = yield from _recognized(path)
    if found is not None:
        yield from _guarded("open", lambda: _opened(where, path))


def _source(where: Where) -> str:
    """Which setting named the cache file (the doctor's ``path`` line says)."""
    if where.path or where.url:
        return "--path" if where.path else "--url"
    return next((f"${name}" for name in (ENV_URL, ENV_PATH) if os.environ.get(name)), "default")


def _user() -> str:
    uid = files.euid()
    return "this user" if uid is None else f"uid {uid}"  # None: Windows (no uids)


def _files_of(path: Path) -> list[Path]:
    names = [path, *files.side_files_of(path), files.key_file_of(path)]
    with contextlib.suppress(OSError):
        names += sorted(files.lock_dir_of(path).iterdir())
    return [p for p in names if os.path.lexists(p)]


ASPECTS = {"type": "file", "owner": "owner", "mode": "modes"}


def _ownership(path: Path) -> Generator[Finding, None, bool]:
    """One line per aspect (file type, owner, modes) of every file of the cache; whether
    the database file itself is refused (then nothing is opened)."""
    found: dict[str, list[str]] = {aspect: [] for aspect in ASPECTS}
    refused = False
    for p in _files_of(path):
        try:
            trouble = files.trouble(p, os.lstat(p))
        except FileNotFoundError:
            continue  # gone since it was listed
        if trouble is not None:
            found[trouble[0]].append(trouble[1])
            refused = refused or p == path
    fine = {
        "owner": f"{_user()} owns every file",
        "mode": "every file regular and private (0600)" if not found["type"] else None,
    }
    for aspect, name in ASPECTS.items():
        if found[aspect]:
            yield Finding("FAIL", name, "; ".join(found[aspect]))
        elif fine.get(aspect):
            yield Finding("ok", name, str(fine[aspect]))
    return refused


def _directory(path: Path) -> Iterator[Finding]:
    if files.others_may_write(path.parent):
        yield Finding(
            "warn",
            "directory",
            f"{path.parent} is writable by others without the sticky bit: another user could "
            "replace the cache's files there (they would then be refused, and the cache "
            "bypassed); prefer a directory of this user's (mode 0700)",
        )
    else:
        yield Finding("ok", "directory", f"{path.parent} is not writable by others")


def _recognized(path: Path) -> Generator[Finding, None, Found | None]:
    """Whether the file is a cache of ours (from its header; nothing else is opened)."""
    try:
        found = examine(path)
    except OSError as exc:  # NotOurs too: left alone by every worker
        yield Finding("FAIL", "file", f"{exc}; every worker bypasses the cache while it is there")
        return None
    if found is Found.EMPTY:
        yield Finding(
            "warn", "file", f"{path} is empty; a worker makes it a cache when it opens it"
        )
        return None
    if found is Found.MARKED:
        yield Finding("ok", "header", f"{path} carries the agw-persist-cache mark")
    else:
        yield Finding("ok", "header", f"{path} holds only agw-persist-cache tables (no mark yet)")
    return found


def _opened(where: Where, path: Path) -> Iterator[Finding]:
    with open_cache(where, read_only=True) as cache:
        stats = cache.stats()
        key_ids, key_source, key_file = cache.key_ids, cache.key_source, cache.key_file
        # The cache's own judgement of its key (what a process warns about at its first miss).
        verdict = None if stats.disabled_reason else cache.check_keys()
    yield _mode(stats)
    # A store that answered knows its schema: what disabled it then is the key file.
    answered = stats.schema_version is not None
    if stats.disabled_reason and not answered:
        name = "file" if DAMAGED in stats.disabled_reason else "schema"
        yield Finding("FAIL", name, f"cache disabled: {stats.disabled_reason}")
        return
    yield Finding("ok", "schema", f"version {stats.schema_version}")
    header = files.read_private(path, 20)  # the header says (a connection could make a -wal)
    journal = "wal" if header[18:20] == b"\x02\x02" else "rollback"
    level = "ok" if journal == "wal" else "FAIL"
    yield Finding(level, "journal", f"journal_mode={journal} (want wal)")
    where_key = f" in {key_file}" if key_source == "file" else ""
    rows = stats.entries_system + stats.entries_user
    if stats.disabled_reason:
        yield Finding(
            "FAIL",
            "key",
            f"{stats.disabled_reason}; every worker bypasses the cache. Fix or delete the key "
            f"file (a worker makes a new one), or set {ENV_KEY}",
        )
    elif not key_ids:
        level = "FAIL" if rows else "warn"
        yield Finding(
            level,
            "key",
            f"no key file at {key_file} and {ENV_KEY} is not set here: rows cannot be opened "
            f"(a worker makes the key file; run doctor with the workers' {ENV_KEY})",
        )
    else:
        yield key_finding(verdict, key_ids, rows, source=f"source {key_source}{where_key}; ")
    lock_dir = files.lock_dir_of(path)
    if not lock_dir.is_dir():
        yield Finding("warn", "locks", f"lock dir {lock_dir} is missing (a worker makes it)")
    elif not os.access(lock_dir, os.W_OK | os.X_OK):
        yield Finding("FAIL", "locks", f"lock dir {lock_dir} is not writable by {_user()}")
    else:
        yield Finding("ok", "locks", f"{lock_dir}")


def _mode(stats: CacheStats) -> Finding:
    """Healthy, or degraded: what a worker does when it cannot use the store either."""
    if stats.mode == HEALTHY:
        return Finding("ok", "mode", "healthy: the store answered; processes share their tokens")
    return Finding(
        "warn",
        "mode",
        f"degraded ({stats.degraded_reason}): a worker that meets this serves the tokens it "
        "holds from memory and fetches each missing one once per process until the store is "
        "back",
    )


def run_doctor(where: Where, out: TextIO, *, mounts_file: Path) -> int:
    """Print every check, then a summary line; exit code 1 when any check failed."""
    failed = warned = 0
    for check in _checks(where, mounts_file):
        failed += check.level == "FAIL"
        warned += check.level == "warn"
        out.write(f"{check.level:<5} {check.name:<11} {check.detail}\n")
    if failed:
        out.write(f"doctor: {failed} problem(s), {warned} warning(s)\n")
        return EXIT_PROBLEMS
    out.write(f"doctor: all checks passed ({warned} warning(s))\n")
    return EXIT_OK
