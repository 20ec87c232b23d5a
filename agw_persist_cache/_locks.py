"""Per-key single flight: an in-process lock in front of a cross-process file lock.

The file locks are striped over a fixed set of files beside the database (100k
users must not mean 100k files). They are ``flock`` locks: a holder that dies
frees its lock at once, and lock files are never unlinked (that would split the
inode and break mutual exclusion).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, Generic, TypeVar

import filelock
from filelock.asyncio import AsyncUnixFileLock

# A waiter learns that the fetch is done within this; a try costs ~1 µs. Lock files are
# kept on release: unlinking one would split its inode and break mutual exclusion.
_LOCK_OPTIONS: dict[str, Any] = {
    "mode": 0o600,
    "thread_local": False,
    "preserve_lock_file": True,
    "poll_interval": 0.005,
}

L = TypeVar("L")
K = TypeVar("K")


class _KeyedLocks(Generic[K, L]):
    """One lock per key while anyone uses it; dropped when the last user leaves."""

    def __init__(self, factory: Callable[[], L]) -> None:
        self._factory = factory
        self._mutex = threading.Lock()
        self._locks: dict[K, tuple[L, int]] = {}

    @contextlib.contextmanager
    def ref(self, key: K) -> Iterator[L]:
        with self._mutex:
            lock, users = self._locks.get(key) or (self._factory(), 0)
            self._locks[key] = (lock, users + 1)
        try:
            yield lock
        finally:
            with self._mutex:
                lock, users = self._locks[key]
                if users == 1:
                    del self._locks[key]
                else:
                    self._locks[key] = (lock, users - 1)


def _attempt(acquire: Callable[..., object], deadline: float) -> bool:
    try:
        acquire(timeout=max(0.0, deadline - time.monotonic()))
    except (filelock.Timeout, OSError):
        return False
    return True


async def _aattempt(acquire: Callable[..., Awaitable[object]], deadline: float) -> bool:
    try:
        await acquire(timeout=max(0.0, deadline - time.monotonic()))
    except (filelock.Timeout, OSError):
        return False
    return True


class KeyLocks:
    """Single-flight locks for one cache file; build a new one after fork."""

    def __init__(self, lock_dir: Path, stripes: int) -> None:
        self.lock_dir = lock_dir
        self.stripes = stripes
        self._threads: _KeyedLocks[bytes, threading.Lock] = _KeyedLocks(threading.Lock)
        self._tasks: _KeyedLocks[tuple[asyncio.AbstractEventLoop, bytes], asyncio.Lock] = (
            _KeyedLocks(asyncio.Lock)
        )

    def stripe(self, digest: bytes) -> Path:
        return self.lock_dir / f"{int.from_bytes(digest[:4], 'big') % self.stripes:03d}.lock"

    def _file_lock(self, digest: bytes) -> filelock.UnixFileLock:
        return filelock.UnixFileLock(self.stripe(digest), **_LOCK_OPTIONS)

    def _async_file_lock(self, digest: bytes) -> AsyncUnixFileLock:
        # Each try is a non-blocking flock (~1 µs): no need for a worker thread per try.
        return AsyncUnixFileLock(self.stripe(digest), **_LOCK_OPTIONS, run_in_executor=False)

    @contextlib.contextmanager
    def local(self, digest: bytes, deadline: float) -> Iterator[bool]:
        """This process's lock for the key (threads); False if not had by ``deadline``."""
        with self._threads.ref(digest) as tlock:
            acquired = tlock.acquire(timeout=max(0.0, deadline - time.monotonic()))
            try:
                yield acquired
            finally:
                if acquired:
                    tlock.release()

    @contextlib.asynccontextmanager
    async def alocal(self, digest: bytes, deadline: float) -> AsyncIterator[bool]:
        """This process's lock for the key (tasks of the running loop)."""
        with self._tasks.ref((asyncio.get_running_loop(), digest)) as alock:
            try:
                await asyncio.wait_for(alock.acquire(), max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                acquired = False
            else:
                acquired = True
            try:
                yield acquired
            finally:
                if acquired:
                    alock.release()

    @contextlib.contextmanager
    def cross_process(self, digest: bytes, deadline: float) -> Iterator[bool]:
        """The key's stripe file lock; False if not had by ``deadline`` (fetch anyway)."""
        flock = self._file_lock(digest)
        acquired = _attempt(flock.acquire, deadline)
        try:
            yield acquired
        finally:
            if acquired:
                flock.release()

    @contextlib.asynccontextmanager
    async def across_process(self, digest: bytes, deadline: float) -> AsyncIterator[bool]:
        """The stripe file lock, polled from the event loop without blocking it."""
        flock = self._async_file_lock(digest)
        acquired = await _aattempt(flock.acquire, deadline)
        try:
            yield acquired
        finally:
            if acquired:
                await flock.release()

    def try_file_lock(self, digest: bytes) -> filelock.UnixFileLock | None:
        """Non-blocking: the lock if this process got it, else None (someone else refreshes)."""
        flock = self._file_lock(digest)
        return flock if _attempt(flock.acquire, time.monotonic()) else None
