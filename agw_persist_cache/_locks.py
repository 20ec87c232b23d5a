"""Per-key single flight: one in-flight record per key in this process, in front of the
backend's cross-process lock.

The first caller of a key *leads* its flight; every other caller of that key in the process
(threads and coroutines of any event loop alike) waits for the leader's one result, held in
the key's in-flight record: a ``threading.Event`` for threads and a future per waiting
coroutine, all resolved at once when the leader lands, never handed a lock one by one. This
holds whether or not the store works. Only the leader goes on to the cross-process lock.
Records exist per key while a flight is under way: unrelated keys never wait for each other.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import threading
from collections.abc import Callable, Hashable
from typing import Any

from ._expiry import CachedToken
from .backends.contract import Backend, LockResult, StorageError

Release = Callable[[], None]


class Joined(enum.Enum):
    """How joining a key's flight ended, when it did not hand over the leader's token."""

    LEAD = "lead"  # no flight was under way: this caller leads it
    AGAIN = "again"  # the leader landed without a token (failed, cancelled): look again
    TIMEOUT = "timeout"  # the leader took longer than the wait: fetch anyway
    ALONE = "alone"  # the leader is a coroutine of this very thread's loop: waiting would
    # block it forever, so fetch without it (a plain call from inside async code)
    BUSY = "busy"  # a try found a flight under way (refresh-ahead: it is being done)


Outcome = CachedToken | Joined


class InFlight:
    """One key's flight in this process: its result, once the leader lands."""

    __slots__ = ("done", "outcome", "thread", "waiters")

    def __init__(self) -> None:
        self.thread = threading.get_ident()  # the leader's
        self.done = threading.Event()
        self.outcome: Outcome = Joined.AGAIN
        self.waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[Outcome]]] = []


class KeyLocks:
    """The single flights of one cache; rebuilt in a forked child (the parent's are not its)."""

    def __init__(self, backend: Backend) -> None:
        self._backend = backend
        self._mutex = threading.Lock()
        self._flights: dict[Hashable, InFlight] = {}

    def _lead(self, ident: Hashable) -> InFlight | None:
        """A new record led by the caller, or None (with the mutex held) if one exists."""
        record = self._flights.get(ident)
        if record is None:
            record = self._flights[ident] = InFlight()
            return record
        return None

    def join(self, ident: Hashable, wait: float | None) -> tuple[Outcome, InFlight | None]:
        """Lead the key's flight (``LEAD`` and its record) or wait up to ``wait`` seconds
        (``None``: do not wait, ``BUSY``) for the leader's outcome."""
        with self._mutex:
            led = self._lead(ident)
            record = led or self._flights[ident]
        if led is not None:
            return Joined.LEAD, led
        if wait is None:
            return Joined.BUSY, None
        if record.thread == threading.get_ident():
            return Joined.ALONE, None
        if not record.done.wait(wait):
            return Joined.TIMEOUT, None
        return record.outcome, None

    async def ajoin(self, ident: Hashable, wait: float | None) -> tuple[Outcome, InFlight | None]:
        """The same from a coroutine: it waits on a future of its own loop, resolved with
        every other waiter's in one step when the leader lands."""
        loop = asyncio.get_running_loop()
        with self._mutex:
            led = self._lead(ident)
            if led is not None:
                return Joined.LEAD, led
            if wait is None:
                return Joined.BUSY, None
            record = self._flights[ident]
            waiter: asyncio.Future[Outcome] = loop.create_future()
            record.waiters.append((loop, waiter))
        timer = loop.call_later(wait, _resolve, [waiter], Joined.TIMEOUT)
        try:
            return await waiter, None
        finally:
            timer.cancel()

    def land(self, ident: Hashable, record: InFlight, entry: CachedToken | None) -> None:
        """End the key's flight: every waiter gets ``entry`` (None: ``AGAIN``) at once."""
        with self._mutex:
            if self._flights.get(ident) is record:
                del self._flights[ident]
            record.outcome = Joined.AGAIN if entry is None else entry
            waiters, record.waiters = record.waiters, []
        record.done.set()
        by_loop: dict[asyncio.AbstractEventLoop, list[asyncio.Future[Outcome]]] = {}
        for loop, waiter in waiters:
            by_loop.setdefault(loop, []).append(waiter)
        try:
            running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        for loop, futures in by_loop.items():
            if loop is running:
                _resolve(futures, record.outcome)
            else:
                with contextlib.suppress(RuntimeError):  # that loop has closed meanwhile
                    loop.call_soon_threadsafe(_resolve, futures, record.outcome)

    # -- the cross-process lock ------------------------------------------------------------------

    def acquire(self, digest: bytes, wait: float | None) -> tuple[LockResult, Release]:
        """The cross-process lock of ``digest`` within ``wait`` seconds (``None``: one try).

        After a wait it is not held (LANDED): its holder's flight has ended, so the caller
        reads again first. A store that cannot lock (down) is ERROR: fetch anyway.
        """
        lock = self._backend.key_lock(digest)
        try:
            result = lock.acquire(wait)
        except StorageError:
            return LockResult.ERROR, _nothing
        return result, lock.release if result is LockResult.HELD else _nothing

    async def aacquire(self, digest: bytes, wait: float | None) -> tuple[LockResult, Release]:
        """The same from a task: waits without blocking the event loop."""
        lock = self._backend.key_lock(digest)
        try:
            result = await lock.aacquire(wait)
        except StorageError:
            return LockResult.ERROR, _nothing
        return result, lock.release if result is LockResult.HELD else _nothing


def _resolve(futures: list[asyncio.Future[Any]], outcome: Outcome) -> None:
    for future in futures:
        if not future.done():  # cancelled, or timed out, meanwhile
            future.set_result(outcome)


def _nothing() -> None:
    """Nothing to give back."""
