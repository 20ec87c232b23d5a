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
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from . import _files as files
from ._cli_common import EXIT_OK, EXIT_PROBLEMS, open_cache
from ._config import ENV_KEY, ENV_PATH, resolve_path, split_location
from ._health import Down
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


@dataclass(frozen=True)
class Check:
    """One doctor line: ``level`` is ``ok``, ``warn`` or ``FAIL``."""

    level: str
    name: str
    detail: str


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


def _guarded(name: str, check: Callable[[], Iterator[Check]]) -> Iterator[Check]:
    """Run one group of checks; whatever it raises becomes a FAIL line, never a traceback."""
    try:
        yield from check()
    except Exception as exc:  # reason: doctor exists for broken set-ups; it reports, not crashes
        yield Check("FAIL", name, f"{type(exc).__name__}: {exc}")


def _checks(path_arg: str | None, mounts_file: Path) -> Iterator[Check]:
    """The checks in order, reading only; stops early when going on would be unsafe or moot."""
    _, url = split_location(path_arg, None)
    if url is not None:  # a shared store ($AGW_CACHE_URL, --url): its own checks
        from ._doctor_redis import redis_checks

        yield from (Check(*finding) for finding in redis_checks(url))
        return
    path = resolve_path(path_arg)
    source = "--path" if path_arg else (f"${ENV_PATH}" if os.environ.get(ENV_PATH) else "default")
    try:
        mounts = mounts_file.read_text()
    except OSError as exc:
        yield Check("warn", "filesystem", f"cannot read {mounts_file} ({exc.strerror})")
        mounts = ""
    point, fstype = filesystem_of(_existing_ancestor(path.parent), mounts)
    if is_network_filesystem(fstype):
        yield Check(
            "FAIL",
            "filesystem",
            f"{path.parent} is on {fstype} (mounted at {point}), a network filesystem: "
            "SQLite WAL needs shared memory and locks that it does not provide, so workers "
            "could corrupt the cache. Refusing to open it here; set AGW_CACHE_PATH to a local "
            "disk (e.g. /var/tmp/agw-cache/tokens.db) or tmpfs (/dev/shm)",
        )
        return
    yield Check("ok", "filesystem", f"{fstype} at {point} (local)")
    try:
        os.lstat(path)
    except FileNotFoundError:
        yield Check("FAIL", "path", f"no cache at {path} (from {source}); nothing was created")
        return
    except OSError as exc:
        yield Check(
            "FAIL",
            "path",
            f"cannot look at {path} as {_user()} ({exc.strerror}); run doctor as the "
            "user the workers run as",
        )
        return
    yield Check("ok", "path", f"{path} (from {source})")
    refused = yield from _ownership(path)
    if refused:
        return  # the cache leaves this path alone; nothing more to learn by opening it
    yield from _guarded("directory", lambda: _directory(path))
    found = yield from _recognized(path)
    if found is not None:
        yield from _guarded("open", lambda: _opened(path_arg, path))


def _user() -> str:
    uid = files.euid()
    return "this user" if uid is None else f"uid {uid}"  # None: Windows (no uids)


def _files_of(path: Path) -> list[Path]:
    names = [path, *files.side_files_of(path), files.key_file_of(path)]
    with contextlib.suppress(OSError):
        names += sorted(files.lock_dir_of(path).iterdir())
    return [p for p in names if os.path.lexists(p)]


ASPECTS = {"type": "file", "owner": "owner", "mode": "modes"}


def _ownership(path: Path) -> Generator[Check, None, bool]:
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
            yield Check("FAIL", name, "; ".join(found[aspect]))
        elif fine.get(aspect):
            yield Check("ok", name, str(fine[aspect]))
    return refused


def _directory(path: Path) -> Iterator[Check]:
    if files.others_may_write(path.parent):
        yield Check(
            "warn",
            "directory",
            f"{path.parent} is writable by others without the sticky bit: another user could "
            "replace the cache's files there (they would then be refused, and the cache "
            "bypassed); prefer a directory of this user's (mode 0700)",
        )
    else:
        yield Check("ok", "directory", f"{path.parent} is not writable by others")


def _recognized(path: Path) -> Generator[Check, None, Found | None]:
    """Whether the file is a cache of ours (from its header; nothing else is opened)."""
    try:
        found = examine(path)
    except OSError as exc:  # NotOurs too: left alone by every worker
        yield Check("FAIL", "file", f"{exc}; every worker bypasses the cache while it is there")
        return None
    if found is Found.EMPTY:
        yield Check("warn", "file", f"{path} is empty; a worker makes it a cache when it opens it")
        return None
    if found is Found.MARKED:
        yield Check("ok", "header", f"{path} carries the agw-persist-cache mark")
    else:
        yield Check("ok", "header", f"{path} holds only agw-persist-cache tables (no mark yet)")
    return found


def _opened(path_arg: str | None, path: Path) -> Iterator[Check]:
    with open_cache(path_arg, read_only=True) as cache:
        stats = cache.stats()
        key_ids, key_source, key_file = cache.key_ids, cache.key_source, cache.key_file
        key_problem = cache._shelf.key_problem
        store_problem = cache._backend.unavailable
        # The cache's own judgement of its key (what a process warns about at its first miss).
        verdict = None if stats.disabled_reason else cache.check_keys()
        down = cache._shelf.health.down  # the mode after every read above
    yield _mode(down)
    if store_problem:
        name = "file" if DAMAGED in store_problem else "schema"
        yield Check("FAIL", name, f"cache disabled: {store_problem}")
        return
    yield Check("ok", "schema", f"version {stats.schema_version}")
    header = files.read_private(path, 20)  # the header says (a connection could make a -wal)
    journal = "wal" if header[18:20] == b"\x02\x02" else "rollback"
    level = "ok" if journal == "wal" else "FAIL"
    yield Check(level, "journal", f"journal_mode={journal} (want wal)")
    where = f" in {key_file}" if key_source == "file" else ""
    rows = stats.entries_system + stats.entries_user
    if key_problem:
        yield Check(
            "FAIL",
            "key",
            f"{key_problem}; every worker bypasses the cache. Fix or delete the key file (a "
            f"worker makes a new one), or set {ENV_KEY}",
        )
    elif not key_ids:
        level = "FAIL" if rows else "warn"
        yield Check(
            level,
            "key",
            f"no key file at {key_file} and {ENV_KEY} is not set here: rows cannot be opened "
            f"(a worker makes the key file; run doctor with the workers' {ENV_KEY})",
        )
    elif verdict is not None and not verdict[0]:
        yield Check(
            "FAIL",
            "key",
            f"the configured key does not open this cache: {rows} rows were written under key "
            f"ids {', '.join(verdict[1])}, this environment has {', '.join(key_ids)}; "
            f"give every process the same {ENV_KEY}",
        )
    else:
        yield Check("ok", "key", f"source {key_source}{where}; key ids {', '.join(key_ids)}")
    lock_dir = files.lock_dir_of(path)
    if not lock_dir.is_dir():
        yield Check("warn", "locks", f"lock dir {lock_dir} is missing (a worker makes it)")
    elif not os.access(lock_dir, os.W_OK | os.X_OK):
        yield Check("FAIL", "locks", f"lock dir {lock_dir} is not writable by {_user()}")
    else:
        yield Check("ok", "locks", f"{lock_dir}")


def _mode(down: Down | None) -> Check:
    """Healthy, or degraded: what a worker does when it cannot use the store either."""
    if down is None:
        return Check("ok", "mode", "healthy: the store answered; processes share their tokens")
    return Check(
        "warn",
        "mode",
        f"degraded ({down.reason}): a worker that meets this serves the tokens it "
        "holds from memory and fetches each missing one once per process until the store is "
        "back",
    )


def run_doctor(path_arg: str | None, out: TextIO, *, mounts_file: Path) -> int:
    """Print every check, then a summary line; exit code 1 when any check failed."""
    failed = warned = 0
    for check in _checks(path_arg, mounts_file):
        failed += check.level == "FAIL"
        warned += check.level == "warn"
        out.write(f"{check.level:<5} {check.name:<11} {check.detail}\n")
    if failed:
        out.write(f"doctor: {failed} problem(s), {warned} warning(s)\n")
        return EXIT_PROBLEMS
    out.write(f"doctor: all checks passed ({warned} warning(s))\n")
    return EXIT_OK
