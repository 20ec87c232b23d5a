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
from typing import Generic, TypeVar

import filelock
from filelock.asyncio import AsyncUnixFileLock

# A waiter learns that the fetch is done within this; a try costs ~1 µs.
_POLL_SECONDS = 0.01

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

    def __init__(self, lock_dir: Path, stripes: int, timeout: float) -> None:
        self.lock_dir = lock_dir
        self.stripes = stripes
        self.timeout = timeout
        self._threads: _KeyedLocks[bytes, threading.Lock] = _KeyedLocks(threading.Lock)
        self._tasks: _KeyedLocks[tuple[asyncio.AbstractEventLoop, bytes], asyncio.Lock] = (
            _KeyedLocks(asyncio.Lock)
        )

    def stripe(self, digest: bytes) -> Path:
        return self.lock_dir / f"{int.from_bytes(digest[:4], 'big') % self.stripes:03d}.lock"

    def _file_lock(self, digest: bytes) -> filelock.UnixFileLock:
        return filelock.UnixFileLock(
            self.stripe(digest),
            mode=0o600,
            thread_local=False,
            preserve_lock_file=True,
            poll_interval=_POLL_SECONDS,
        )

    def _async_file_lock(self, digest: bytes) -> AsyncUnixFileLock:
        return AsyncUnixFileLock(
            self.stripe(digest),
            mode=0o600,
            thread_local=False,
            preserve_lock_file=True,
            poll_interval=_POLL_SECONDS,
        )

    @contextlib.contextmanager
    def hold(self, digest: bytes) -> Iterator[bool]:
        """Thread lock, then file lock; yields False if either timed out (fetch anyway)."""
        deadline = time.monotonic() + self.timeout
        with self._threads.ref(digest) as tlock:
            if not tlock.acquire(timeout=self.timeout):
                yield False
                return
            try:
                flock = self._file_lock(digest)
                acquired = _attempt(flock.acquire, deadline)
                try:
                    yield acquired
                finally:
                    if acquired:
                        flock.release()
            finally:
                tlock.release()

    @contextlib.asynccontextmanager
    async def ahold(self, digest: bytes) -> AsyncIterator[bool]:
        """Task lock, then file lock, without blocking the event loop."""
        deadline = time.monotonic() + self.timeout
        loop = asyncio.get_running_loop()
        with self._tasks.ref((loop, digest)) as alock:
            try:
                await asyncio.wait_for(alock.acquire(), self.timeout)
            except TimeoutError:
                locked = False
            else:
                locked = True
            if not locked:
                yield False
                return
            try:
                flock = self._async_file_lock(digest)
                acquired = await _aattempt(flock.acquire, deadline)
                try:
                    yield acquired
                finally:
                    if acquired:
                        await flock.release()
            finally:
                alock.release()

    def try_file_lock(self, digest: bytes) -> filelock.UnixFileLock | None:
        """Non-blocking: the lock if this process got it, else None (someone else refreshes)."""
        flock = self._file_lock(digest)
        return flock if _attempt(flock.acquire, time.monotonic()) else None
