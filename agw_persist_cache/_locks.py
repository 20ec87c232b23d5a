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

    @staticmethod
    def _held(
        keyed: _KeyedLocks[L] | None, key: Hashable, local: L | None, cross: KeyLock | None
    ) -> Release:
        """Undo, in reverse order, whatever of the two locks was taken (``keyed``: the
        per-key entry this acquisition counted itself in, if any)."""

        def release() -> None:
            if cross is not None:
                cross.release()
            if local is not None:
                local.release()
            if keyed is not None:
                keyed.put(key)

        return release

    def acquire(
        self, digest: bytes, wait: float | None, *, local: bool = True, cross: bool = True
    ) -> tuple[LockResult, Release]:
        """The locks of ``digest`` within ``wait`` seconds (``None``: one try, no wait):
        the in-process one, the cross-process one, or both (in that order).

        A local lock not had in time means TIMEOUT (fetch anyway) or BUSY (a try). The
        local lock alone, found held by another caller, is waited for and NOT kept:
        LANDED says that caller's flight has ended, so this one re-reads first.
        """
        deadline = time.monotonic() + (wait or 0.0)
        keyed = self._threads if local else None
        taken: threading.Lock | None = None
        if local:
            lock = self._threads.get(digest)
            if not lock.acquire(blocking=False):
                if wait is None or not lock.acquire(timeout=wait):
                    return _refused(wait), self._held(keyed, digest, None, None)
                if not cross:
                    lock.release()
                    self._threads.put(digest)
                    return LockResult.LANDED, _nothing
            taken = lock
        if not cross:
            return LockResult.HELD, self._held(keyed, digest, taken, None)
        lock_x = self._backend.key_lock(digest)
        result = lock_x.acquire(_left(wait, deadline))
        held = lock_x if result is LockResult.HELD else None
        return result, self._held(keyed, digest, taken, held)

    async def aacquire(
        self, digest: bytes, wait: float | None, *, local: bool = True, cross: bool = True
    ) -> tuple[LockResult, Release]:
        """The same from a task: waits without blocking the event loop."""
        deadline = time.monotonic() + (wait or 0.0)
        key = (asyncio.get_running_loop(), digest)
        keyed = self._tasks if local else None
        taken: asyncio.Lock | None = None
        release = self._held(keyed, key, None, None)
        try:
            if local:
                lock = self._tasks.get(key)
                was_free = not lock.locked()
                if not await _atake(lock, wait):
                    return _refused(wait), release
                if not was_free and not cross:
                    lock.release()
                    release()
                    return LockResult.LANDED, _nothing
                taken = lock
                release = self._held(keyed, key, taken, None)
            if not cross:
                return LockResult.HELD, release
            lock_x = self._backend.key_lock(digest)
            result = await lock_x.aacquire(_left(wait, deadline))
        except BaseException:  # cancelled while waiting: give back what was taken
            release()
            raise
        held = lock_x if result is LockResult.HELD else None
        return result, self._held(keyed, key, taken, held)


def _nothing() -> None:
    """Nothing to give back."""


async def _atake(lock: asyncio.Lock, wait: float | None) -> bool:
    if not lock.locked():
        return await lock.acquire()  # free: taken at once, without a task or a timer
    if wait is None or wait <= 0:
        return False
    try:
        return await asyncio.wait_for(lock.acquire(), wait)
    except TimeoutError:
        return False


def _refused(wait: float | None) -> LockResult:
    return LockResult.BUSY if wait is None else LockResult.TIMEOUT


def _left(wait: float | None, deadline: float) -> float | None:
    return None if wait is None else max(0.0, deadline - time.monotonic())
