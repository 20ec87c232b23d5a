"""``agw-cache doctor``: one line per health check of the cache file, its keys and its locks.

A check that finds a problem prints ``FAIL`` with the fix and makes the exit code 1; a
``warn`` line is worth reading but does not fail. A network filesystem stops the checks
before the cache is opened: SQLite's WAL needs shared memory that NFS/SMB/FUSE do not give.
"""

from __future__ import annotations

import os
import sqlite3
import stat
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from ._config import ENV_PATH, resolve_path, split_location
from .cli import EXIT_OK, EXIT_PROBLEMS, open_cache

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


def _mode_problem(label: str, path: Path, *, directory: bool) -> str | None:
    """None when ``path`` is private to its owner (0700 dir / 0600 file), else the fix."""
    perms = stat.S_IMODE(path.stat().st_mode)
    want = 0o700 if directory else 0o600
    if perms & 0o077:
        return f"{label} {path} is mode {perms:04o}, want {want:04o} (chmod {want:o} {path})"
    return None


def _checks(path_arg: str | None, mounts_file: Path) -> Iterator[Check]:
    """The checks in order; stops early when going on would be unsafe or meaningless."""
    _, url = split_location(path_arg, None)
    if url is not None:  # a shared store ($AGW_CACHE_URL, --url): its own checks
        from ._doctor_redis import redis_checks

        yield from (Check(*finding) for finding in redis_checks(url))
        return
    path = resolve_path(path_arg)
    source = "--path" if path_arg else (f"${ENV_PATH}" if os.environ.get(ENV_PATH) else "default")
    if path.exists() and not path.is_file():
        yield Check("FAIL", "path", f"{path} exists and is not a regular file")
        return
    state = "exists" if path.exists() else "new: the checks below create it"
    yield Check("ok", "path", f"{path} (from {source}; {state})")

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
        cache = open_cache(path_arg)
        with cache:
            stats = cache.stats()
            lock_dir, key_file, key_source = cache.lock_dir, cache.key_file, cache.key_source
            key_ids = cache.key_ids
    except Exception as exc:  # any failure to open is what this check reports
        yield Check("FAIL", "open", f"cannot open the cache: {type(exc).__name__}: {exc}")
        return

    with closing(sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)) as conn:
        journal = str(conn.execute("PRAGMA journal_mode").fetchone()[0])
    level = "ok" if journal == "wal" else "FAIL"
    yield Check(level, "journal", f"journal_mode={journal} (want wal)")

    private: list[tuple[str, Path, bool]] = [
        ("directory", path.parent, True),
        ("file", path, False),
    ]
    for suffix in ("-wal", "-shm"):
        sidecar = Path(f"{path}{suffix}")
        if sidecar.exists():
            private.append((suffix[1:], sidecar, False))
    if key_file is not None and key_file.exists():
        private.append(("key file", key_file, False))
    if lock_dir.exists():
        private.append(("lock dir", lock_dir, True))
    problems = [m for label, p, d in private if (m := _mode_problem(label, p, directory=d))]
    if problems:
        yield Check("FAIL", "modes", "; ".join(problems))
    else:
        yield Check("ok", "modes", ", ".join(f"{label} private" for label, _, _ in private))

    me = os.geteuid()
    owners = {p.stat().st_uid for _, p, _ in private}
    if owners == {me}:
        yield Check("ok", "owner", f"uid {me} owns every file")
    elif me == 0 and len(owners) == 1:
        yield Check("warn", "owner", f"files owned by uid {owners.pop()}; you run as root")
    else:
        yield Check(
            "FAIL",
            "owner",
            f"files owned by uids {sorted(owners)}, you are uid {me}: run the workers and "
            "agw-cache as one user (or chown the directory)",
        )

    where = f" in {key_file}" if key_source == "file" else ""
    if not key_ids and stats.disabled_reason:
        yield Check("warn", "key", f"source {key_source}{where}; not loaded: the cache is disabled")
    elif not key_ids:
        yield Check("FAIL", "key", f"no usable key (source {key_source}{where}); set AGW_CACHE_KEY")
    else:
        yield Check("ok", "key", f"source {key_source}{where}; key ids {', '.join(key_ids)}")
    unknown = sorted(set(stats.key_ids_in_use) - set(key_ids))
    if unknown:
        yield Check(
            "warn",
            "key",
            f"rows sealed under key ids {', '.join(unknown)} that this environment does not "
            "have: they are refetched; give every process the same AGW_CACHE_KEY",
        )

    if stats.disabled_reason:
        yield Check("FAIL", "schema", f"cache disabled: {stats.disabled_reason}")
    else:
        yield Check("ok", "schema", f"version {stats.schema_version}")

    if not lock_dir.is_dir():
        yield Check("FAIL", "locks", f"lock dir {lock_dir} is missing")
    elif not os.access(lock_dir, os.W_OK | os.X_OK):
        yield Check("FAIL", "locks", f"lock dir {lock_dir} is not writable by uid {me}")
    else:
        count = sum(1 for _ in lock_dir.iterdir())
        yield Check("ok", "locks", f"{lock_dir} ({count} lock files)")


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
