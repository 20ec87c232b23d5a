"""Per-key single flight: an in-process lock in front of the backend's cross-process lock.

The in-process lock (a ``threading.Lock`` for threads, an ``asyncio.Lock`` per event
loop for tasks) lets one caller per process go on to the cross-process lock, so 50
coroutines waiting for one key cost one lock wait, not fifty. Locks exist per key
while someone uses them: unrelated keys never wait for each other.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

from .backends.contract import Backend, KeyLock, LockResult

L = TypeVar("L", threading.Lock, asyncio.Lock)
Release = Callable[[], None]


class _KeyedLocks(Generic[L]):
    """One lock per key while anyone holds or waits for it; dropped by the last one out."""

    def __init__(self, factory: Callable[[], L]) -> None:
        self._factory: Callable[[], L] = factory
        self._mutex = threading.Lock()
        self._locks: dict[Hashable, tuple[L, int]] = {}

    def get(self, key: Hashable) -> L:
        with self._mutex:
            lock, users = self._locks.get(key) or (self._factory(), 0)
            self._locks[key] = (lock, users + 1)
        return lock

    def put(self, key: Hashable) -> None:
        with self._mutex:
            lock, users = self._locks[key]
            if users == 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock, users - 1)


class KeyLocks:
    """The locks of one cache; rebuilt in a forked child (inherited ones may be held)."""

    def __init__(self, backend: Backend) -> None:
        self._backend = backend
        self._threads: _KeyedLocks[threading.Lock] = _KeyedLocks(threading.Lock)
        self._tasks: _KeyedLocks[asyncio.Lock] = _KeyedLocks(asyncio.Lock)

    def acquire(self, digest: bytes, wait: float | None) -> tuple[LockResult, Release]:
        """Both locks of ``digest`` within ``wait`` seconds (``None``: one try, no wait).

        A local lock not had in time means TIMEOUT (fetch anyway) or BUSY (a try).
        """
        deadline = time.monotonic() + (wait or 0.0)
        local = self._threads.get(digest)
        if not (local.acquire(blocking=False) if wait is None else local.acquire(timeout=wait)):
            return _refused(wait), _releaser(self._threads, digest, None)
        cross = self._backend.key_lock(digest)
        result = cross.acquire(_left(wait, deadline))
        return _settled(result, cross, _releaser(self._threads, digest, local))

    async def aacquire(self, digest: bytes, wait: float | None) -> tuple[LockResult, Release]:
        """The same from a task: waits without blocking the event loop."""
        deadline = time.monotonic() + (wait or 0.0)
        key = (asyncio.get_running_loop(), digest)
        local = self._tasks.get(key)
        release = _releaser(self._tasks, key, None)
        try:
            if not await _atake(local, wait):
                return _refused(wait), release
            release = _releaser(self._tasks, key, local)
            cross = self._backend.key_lock(digest)
            result = await cross.aacquire(_left(wait, deadline))
        except BaseException:  # cancelled while waiting: give back what was taken
            release()
            raise
        return _settled(result, cross, release)


def _releaser(keyed: _KeyedLocks[L], key: Hashable, local: L | None) -> Release:
    """Let go of the local lock (if taken) and of this user's reference to it."""

    def release() -> None:
        if local is not None:
            local.release()
        keyed.put(key)

    return release


async def _atake(lock: asyncio.Lock, wait: float | None) -> bool:
    if not lock.locked():
        return await lock.acquire()  # free: taken at once, without a task or a timer
    if wait is None or wait <= 0:
        return False
    try:
        return await asyncio.wait_for(lock.acquire(), wait)
    except TimeoutError:
        return False


def _settled(result: LockResult, cross: KeyLock, local: Release) -> tuple[LockResult, Release]:
    """What the caller holds now. After WAITED nothing: the local lock is let go at once so
    that this process's other waiters read the new token too, instead of queueing."""
    if result is LockResult.WAITED:
        local()
        return result, _noop
    if result is LockResult.HELD:

        def release() -> None:
            cross.release()
            local()

        return result, release
    return result, local


def _noop() -> None:
    pass


def _refused(wait: float | None) -> LockResult:
    return LockResult.BUSY if wait is None else LockResult.TIMEOUT


def _left(wait: float | None, deadline: float) -> float | None:
    return None if wait is None else max(0.0, deadline - time.monotonic())
