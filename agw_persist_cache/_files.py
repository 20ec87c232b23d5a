"""Only what is ours: the checks every file and directory of the cache passes before use.

An existing database, ``-wal``/``-shm``, key file or lock file must be a regular file (never
a symbolic link: they are refused, not followed; a FIFO, socket, device or directory is
refused from its ``lstat``, never opened), owned by the effective user and closed to group
and others. Otherwise another local user could have planted it to read the tokens
(a 0666 database makes SQLite create 0666 ``-wal`` files) or to make us use a key they know.
Directories the cache creates are 0700 whatever the umask.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
CLOEXEC = getattr(os, "O_CLOEXEC", 0)  # Windows has none: its descriptors are never inherited
NONBLOCK = getattr(os, "O_NONBLOCK", 0)  # Windows has none (nor FIFOs to block on)


KEY_SUFFIX = ".key"
LOCKS_SUFFIX = ".locks"
SIDE_SUFFIXES = ("-wal", "-shm")


def sibling(path: Path, suffix: str) -> Path:
    """The file named like ``path`` plus ``suffix``, beside it: every name derived from the
    cache path is spelled with one of the suffixes above."""
    return path.with_name(path.name + suffix)


def key_file_of(path: Path) -> Path:
    """The key file of the cache at ``path`` (when no key is given explicitly)."""
    return sibling(path, KEY_SUFFIX)


def lock_dir_of(path: Path) -> Path:
    """The directory of the cache's lock files."""
    return sibling(path, LOCKS_SUFFIX)


def side_files_of(path: Path) -> tuple[Path, ...]:
    """SQLite's ``-wal`` and ``-shm`` beside the database."""
    return tuple(sibling(path, suffix) for suffix in SIDE_SUFFIXES)


def euid() -> int | None:
    """The effective user id; None on Windows, where ACLs guard files, not owner and mode bits
    (``st_uid`` is always 0 and ``st_mode`` reports 0666 there), so those checks do not apply."""
    return os.geteuid() if hasattr(os, "geteuid") else None


class NotOurs(PermissionError):
    """A path holds something the cache did not make, or that others could read or swap.

    The message names the path, its owner and mode (never its contents) and what to do.
    """


def trouble(path: Path, st: os.stat_result) -> tuple[str, str] | None:
    """Why the file ``st`` (from ``lstat`` or ``fstat``) describes is not ours, as
    ``(aspect, reason)`` with aspect ``type``, ``owner`` or ``mode``; None if it is ours."""
    if stat.S_ISLNK(st.st_mode):
        return (
            "type",
            f"{path} is a symbolic link; the cache never follows one (point it at the target)",
        )
    if not stat.S_ISREG(st.st_mode):
        return "type", f"{path} is {_kind(st.st_mode)}, not a regular file; it is left alone"
    user = euid()
    if user is None:
        return None  # Windows: ACLs, not owner and mode bits
    if st.st_uid != user:
        return "owner", (
            f"{path} is owned by uid {st.st_uid}, not by this user (uid {user}); the cache "
            "uses only files its own user made"
        )
    if st.st_mode & 0o077:
        return "mode", (
            f"{path} has mode {stat.S_IMODE(st.st_mode):04o}: others could read or change it "
            f"(chmod 600 {path} if it is yours)"
        )
    return None


def problem(path: Path, st: os.stat_result) -> str | None:
    """Why the file ``st`` describes is not ours, or None (see :func:`trouble`)."""
    found = trouble(path, st)
    return None if found is None else found[1]


_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
)


def _kind(mode: int) -> str:
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


def check(path: Path) -> bool:
    """Raise :class:`NotOurs` if an existing ``path`` is not ours; False if it is missing."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    reason = problem(path, st)
    if reason is not None:
        raise NotOurs(reason)
    return True


def check_dir(directory: Path) -> None:
    """A directory of the cache's own (the lock directory): ours, not a link."""
    st = os.lstat(directory)
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        raise NotOurs(f"{directory} is not a directory (a link is never followed)")
    user = euid()
    if user is not None and st.st_uid != user:
        raise NotOurs(f"{directory} is owned by uid {st.st_uid}, not by this user (uid {user})")


def read_private(path: Path, limit: int = -1) -> bytes:
    """The bytes (the first ``limit``) of a file that is ours (``NotOurs`` otherwise), read
    without following links or blocking: a FIFO, socket or device is refused without being
    opened (``lstat`` first; ``fstat`` after opening catches a swap in between)."""
    reason = problem(path, os.lstat(path))
    if reason is not None:
        raise NotOurs(reason)
    fd = os.open(path, os.O_RDONLY | NOFOLLOW | NONBLOCK | CLOEXEC)
    try:
        reason = problem(path, os.fstat(fd))
        if reason is not None:
            raise NotOurs(reason)
        with os.fdopen(fd, "rb", closefd=False) as handle:
            return handle.read(limit)
    finally:
        os.close(fd)


def make_private_dirs(directory: Path) -> None:
    """Create ``directory`` and missing parents 0700 (whatever the umask). An existing one
    is used as it is (it may be a shared volume): what must be ours are the files in it."""
    missing = []
    at = directory
    while not at.exists() and at != at.parent:
        missing.append(at)
        at = at.parent
    for new in reversed(missing):
        try:
            new.mkdir(mode=0o700)
        except FileExistsError:
            continue  # another process made it meanwhile; checked below
        os.chmod(new, 0o700)
    if not directory.is_dir():
        raise NotADirectoryError(f"{directory} is not a directory")


def others_may_write(directory: Path) -> bool:
    """A directory others can write to without the sticky bit (e.g. a Kubernetes emptyDir):
    they could replace our files there. Used, but ``agw-cache doctor`` warns."""
    try:
        mode = os.stat(directory).st_mode
    except OSError:
        return False
    return bool(mode & 0o022) and not mode & stat.S_ISVTX
