"""Per-key cross-process locks in files, for the SQLite backend: one interface, two paths.

- **OFD** (Linux, the fast path; ``_ofdlocks``): one ``keys.lock`` file and a byte-range
  lock per key. Truly per key, one file, waiters woken by the kernel.
- **portable** (everywhere else: macOS and the BSDs, Windows): the platform's lock as
  ``filelock`` picks it (``flock`` on POSIX, ``LockFileEx`` on Windows; its marker-file
  lock only where neither exists) on ``NNN.lock`` files, the keys striped over
  ``CacheConfig.lock_stripes`` of them. These locks cover a whole file, and lock files are
  never unlinked (that would split the inode and break mutual exclusion), so one file per
  key would grow without bound (a user token's key changes with every user JWT); stripes
  bound the lock directory to ``lock_stripes`` empty files. The cost: two keys fetched at
  the same moment share a file with a chance of 1 in ``lock_stripes``, and then one waits
  for the other's fetch (it lands, reads, misses, takes the lock). A waiter polls every
  :data:`POLL_SECONDS` for the holder to let go and then drops the lock at once (LANDED):
  every waiter reads the landed token instead of queueing for the lock.

Both keep the contract of :class:`~.contract.KeyLock`: another descriptor of the same
process is excluded too, a killed holder frees the key (the OS does), a lock file that
cannot be opened is an ERROR (counted apart from timeouts).

Forcing a path (tests; not a user setting): ``AGW_PERSIST_CACHE_LOCKS=portable`` (or
``ofd``) in the environment, read when a store opens its lock files (spawned children
inherit it). ``portable`` on Linux is the macOS path (filelock on ``flock``); with ``fcntl``
also made unimportable it runs as on a platform without ``fcntl`` (tests/test_portable.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Generator
from pathlib import Path

import filelock

from .._steps import adrive, drive
from . import _ofdlocks
from ._ofdlocks import OfdKeyLock, reason
from .contract import KeyLock, LockResult

OFD_SUPPORTED = _ofdlocks.SUPPORTED
FORCE_ENV = "AGW_PERSIST_CACHE_LOCKS"
POLL_SECONDS = 0.01
"""How often a waiter on the portable path looks whether the holder let go: a waiter lands
at most this late; each look is one open and one non-blocking lock call."""

KEEPS_LOCK_FILES = filelock.FileLock is not getattr(filelock, "SoftFileLock", None)
"""False only for filelock's marker-file lock (POSIX without ``fcntl``): it releases by
unlinking its marker and refuses to keep it; locks on a file's inode keep the file."""


def file_lock(path: Path, *, timeout: float = -1) -> filelock.BaseFileLock:
    """filelock's lock for this platform on ``path``: private, shared by the threads of a
    process (each lock object is its own holder), its file kept on release where the lock
    lives on the file's inode."""
    return filelock.FileLock(
        path, timeout, mode=0o600, thread_local=False, preserve_lock_file=KEEPS_LOCK_FILES
    )


def use_ofd() -> bool:
    """Whether stores opened now take the OFD path: where supported, unless forced."""
    forced = os.environ.get(FORCE_ENV, "")
    if forced not in ("", "ofd", "portable"):
        raise ValueError(f"{FORCE_ENV} must be 'ofd' or 'portable', got {forced!r}")
    return OFD_SUPPORTED and forced != "portable"


class PortableKeyLock:
    """One key's lock on the portable path (a stripe file); a :class:`~.contract.KeyLock`."""

    __slots__ = ("_lock", "error", "path")

    def __init__(self, path: Path) -> None:
        self.path = path
        self.error: str | None = None
        self._lock = file_lock(path)

    def _try(self) -> LockResult:
        """One non-blocking attempt: HELD, BUSY or ERROR."""
        try:
            self._lock.acquire(blocking=False)
        except filelock.Timeout:
            return LockResult.BUSY
        except OSError as exc:
            self.error = f"cannot lock {self.path}: {reason(exc)}"
            return LockResult.ERROR
        return LockResult.HELD

    def _attempts(self, wait: float | None) -> Generator[float, None, LockResult]:
        """The decisions of one acquisition; yields how long to sleep between looks (run
        by ``_steps.drive`` on ``time.sleep``, ``adrive`` on ``asyncio.sleep``)."""
        first = self._try()
        if first is not LockResult.BUSY or wait is None:
            return first
        deadline = time.monotonic() + wait
        while (left := deadline - time.monotonic()) > 0:
            yield min(POLL_SECONDS, left)
            looked = self._try()
            if looked is LockResult.HELD:  # the holder let go: land, do not queue
                self.release()
                return LockResult.LANDED
            if looked is LockResult.ERROR:
                return looked
        return LockResult.TIMEOUT

    def acquire(self, wait: float | None) -> LockResult:
        return drive(self._attempts(wait), time.sleep)

    async def aacquire(self, wait: float | None) -> LockResult:
        return await adrive(self._attempts(wait), asyncio.sleep)

    def release(self) -> None:
        if self._lock.is_locked:
            # An unlock the OS refused (it never does on a good descriptor): the lock goes
            # when filelock's finalizer or this process's exit closes it; the caller has its
            # token either way, as on the OFD path.
            with contextlib.suppress(OSError):
                self._lock.release()


class KeyLockFiles:
    """The lock files of one store: ``keys.lock`` (OFD) or ``NNN.lock`` stripes (portable)."""

    def __init__(self, lock_dir: Path, *, stripes: int, ofd: bool | None = None) -> None:
        self.lock_dir = lock_dir
        self.stripes = stripes
        self.ofd = use_ofd() if ofd is None else ofd
        self._keys_path = lock_dir / "keys.lock"

    def path(self, digest: bytes) -> Path:
        """The file that holds ``digest``'s lock."""
        if self.ofd:
            return self._keys_path
        return self.lock_dir / f"{int.from_bytes(digest[:4], 'big') % self.stripes:03d}.lock"

    def key_lock(self, digest: bytes) -> KeyLock:
        if self.ofd:
            return OfdKeyLock(self._keys_path, digest)
        return PortableKeyLock(self.path(digest))
