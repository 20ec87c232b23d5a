"""The Redis key lock: its waiting logic (one flow, run by ``_steps.drive``/``adrive``), the
lock a backend hands out, and its background threads: lease renewal, releases on behalf of
event loops, and the pub/sub subscription that wakes waiters when a key is released."""

from __future__ import annotations

import asyncio
import contextlib
import queue
import secrets
import threading
import time
from collections.abc import Callable, Generator, Iterator
from typing import Any, Protocol, TypeVar

from .. import _fork
from .._config import CacheConfig
from .._steps import adrive, drive
from ._redis_conn import STORE_ERRORS
from ._redis_ops import Call, Codec, Layout
from .contract import LockResult, StorageError

T = TypeVar("T")

POLL_SECONDS = 0.25
"""Waiters re-try the lock this often even without a wake-up (pub/sub is best effort)."""
LISTEN_SECONDS = 0.25
"""How often the pub/sub thread looks up from its subscription (to stop when idle)."""
LINGER_SECONDS = 2.0
"""The subscription stays this long after its last waiter left, then closes."""


class LockHost(Protocol):
    """What the threads need of the backend."""

    config: CacheConfig
    codec: Codec
    layout: Layout
    lease_ms: int

    @property
    def unavailable(self) -> str | None: ...

    def run(self, call: Call[T]) -> T: ...

    def pubsub_client(self) -> Any: ...


class KeyLockHost(LockHost, Protocol):
    """What a key lock needs of the backend: its calls and its threads."""

    keeper: Keeper
    wakeups: Wakeups

    async def arun(self, call: Call[T]) -> T: ...


class Try:
    """Step: one ``SET NX PX`` attempt; answered with True if it took the lock."""


class Listen:
    """Step: start receiving wake-ups for this key."""


TRY = Try()
LISTEN = Listen()
LockFlow = Generator["Try | Listen | float", bool, LockResult]


def lock_flow(wait: float | None, poll: float) -> LockFlow:
    """The waiting logic of a key lock, without I/O: yields a try, a listen, or the seconds
    to sleep (answered with whether a release woke it); returns the outcome. Written once
    for both drivers.

    A release of the key ends the wait with LANDED: the holder has just stored the token
    (or failed), and every waiter reads it at once instead of taking the lock in turn.
    Without a wake-up (pub/sub is best effort; a holder killed with -9 sends none) the
    lock is tried every ``poll`` seconds, so a dead holder's key is taken within its lease.
    """
    if (yield TRY):
        return LockResult.HELD
    if wait is None:
        return LockResult.BUSY
    deadline = time.monotonic() + wait
    yield LISTEN
    if (yield TRY):  # released between the first try and listening
        return LockResult.HELD
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return LockResult.TIMEOUT
        if (yield min(poll, left)):
            return LockResult.LANDED
        if (yield TRY):
            return LockResult.HELD


class RedisKeyLock:
    """One key's lock; the :class:`~.contract.KeyLock` of the Redis backend. The store's
    failure (``StorageError``) ends an acquisition in ERROR, recorded on ``error``."""

    __slots__ = ("_backend", "_digest", "_hex", "_token", "error")

    def __init__(self, backend: KeyLockHost, digest: bytes) -> None:
        self._backend = backend
        self._digest = digest
        self._hex = digest.hex()
        self._token: str | None = None
        self.error: str | None = None

    def _flow(self, wait: float | None) -> LockFlow:
        try:
            return (yield from lock_flow(wait, POLL_SECONDS))
        except StorageError as exc:
            self.error = str(exc)
            return LockResult.ERROR

    @contextlib.contextmanager
    def _listening(self, wake: Callable[[], None]) -> Iterator[Callable[[], bool]]:
        """What performs a LISTEN step; the wake-up is forgotten when the attempt ends."""
        listened = False

        def listen() -> bool:
            nonlocal listened
            listened = self._backend.wakeups.listen(self._hex, wake)
            return listened

        try:
            yield listen
        finally:
            if listened:
                self._backend.wakeups.forget(self._hex, wake)

    def _try_call(self) -> tuple[str, Call[bool]]:
        token = secrets.token_hex(16)
        return token, self._backend.codec.lock_try(self._digest, token, self._backend.lease_ms)

    def _took(self, token: str) -> bool:
        self._token = token
        self._backend.keeper.hold(self._backend.layout.lock(self._digest), token)
        return True

    def acquire(self, wait: float | None) -> LockResult:
        woken = threading.Event()
        with self._listening(woken.set) as listen:

            def perform(step: Try | Listen | float) -> bool:
                if isinstance(step, Try):
                    token, call = self._try_call()
                    return self._backend.run(call) and self._took(token)
                if isinstance(step, Listen):
                    return listen()
                found = woken.wait(step)
                woken.clear()
                return found

            return drive(self._flow(wait), perform)

    async def aacquire(self, wait: float | None) -> LockResult:
        loop = asyncio.get_running_loop()
        woken = asyncio.Event()

        def wake() -> None:
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                loop.call_soon_threadsafe(woken.set)

        with self._listening(wake) as listen:

            async def perform(step: Try | Listen | float) -> bool:
                if isinstance(step, Try):
                    token, call = self._try_call()
                    return await self._backend.arun(call) and self._took(token)
                if isinstance(step, Listen):
                    return listen()
                try:
                    await asyncio.wait_for(woken.wait(), step)
                except TimeoutError:
                    return False
                finally:
                    woken.clear()
                return True

            return await adrive(self._flow(wait), perform)

    def release(self) -> None:
        """Give the lock back: at once from a thread, through the keeper from a loop (a
        network round trip must not block the event loop)."""
        token, self._token = self._token, None
        if token is None:
            return
        key = self._backend.layout.lock(self._digest)
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            self._backend.keeper.release_now(key, token)
        else:
            self._backend.keeper.release_later(key, token)


class Keeper:
    """Renews the leases of the locks this process holds; releases locks for event loops.

    One daemon thread, running only while there is something to renew or release.
    """

    def __init__(self, backend: LockHost) -> None:
        self._backend = backend
        self._held: dict[str, str] = {}
        self._releases: queue.SimpleQueue[tuple[str, str] | None] = queue.SimpleQueue()
        self._mutex = threading.Lock()
        self._thread: threading.Thread | None = None
        self._closing = False

    def hold(self, key: str, token: str) -> None:
        with self._mutex:
            self._held[key] = token
            self._start()

    def _start(self) -> None:
        if self._thread is None and not self._closing:
            self._thread = _fork.start_thread("agw-cache-redis-lease", self._run)

    def _forget(self, key: str, token: str) -> None:
        with self._mutex:
            if self._held.get(key) == token:
                del self._held[key]

    def release_now(self, key: str, token: str) -> None:
        self._forget(key, token)
        self._release(key, token)

    def release_later(self, key: str, token: str) -> None:
        self._forget(key, token)
        with self._mutex:
            self._releases.put((key, token))
            self._start()

    def _release(self, key: str, token: str) -> None:
        # A release that fails leaves the lock to expire within one lease.
        with contextlib.suppress(StorageError):
            self._backend.run(self._backend.codec.lock_release(key, token))

    def close(self) -> None:
        """Send the releases still queued, stop renewing, and end the thread."""
        with self._mutex:
            self._closing = True
            self._held.clear()
            thread = self._thread
        self._releases.put(None)
        if thread is not None:
            thread.join(5 * self._backend.config.socket_timeout_seconds + 1)
        with self._mutex:
            self._closing = False

    def _run(self) -> None:
        interval = self._backend.lease_ms / 3000
        next_renewal = time.monotonic() + interval
        while True:
            try:
                item = self._releases.get(timeout=max(0.0, next_renewal - time.monotonic()))
            except queue.Empty:
                item = None
            if item is not None:
                self._release(*item)
            if time.monotonic() >= next_renewal:
                next_renewal = time.monotonic() + interval
                with self._mutex:
                    held = list(self._held.items())
                for key, token in held:
                    self._renew(key, token)
            with self._mutex:
                if (self._closing or not self._held) and self._releases.empty():
                    self._thread = None
                    return

    def _renew(self, key: str, token: str) -> None:
        try:
            call = self._backend.codec.lock_renew(key, token, self._backend.lease_ms)
            kept = self._backend.run(call)
        except StorageError:
            return  # try again next round; past the lease another process may take the key
        if not kept:
            self._forget(key, token)  # lost (it expired meanwhile): nothing left to renew


class Wakeups:
    """One pub/sub subscription per process while anyone waits for a key lock.

    A release published before the subscription took effect would be lost: once the server
    confirms the subscription (again after any reconnect), every waiter is woken once to
    look again. A waiter registering later is covered by its own try after registering.
    """

    def __init__(self, backend: LockHost) -> None:
        self._backend = backend
        self._waiters: dict[str, list[Callable[[], None]]] = {}
        self._mutex = threading.Lock()
        self._thread: threading.Thread | None = None
        self._closing = False

    def close(self) -> None:
        """End the subscription (waiters still waiting fall back to polling)."""
        with self._mutex:
            self._closing = True
            thread = self._thread
        if thread is not None:
            thread.join(LISTEN_SECONDS + self._backend.config.socket_timeout_seconds + 1)
        with self._mutex:
            self._closing = False

    def listen(self, hexd: str, wake: Callable[[], None]) -> bool:
        with self._mutex:
            self._waiters.setdefault(hexd, []).append(wake)
            if self._thread is None and not self._closing:
                self._thread = _fork.start_thread("agw-cache-redis-wakeups", self._run)
        return True

    def forget(self, hexd: str, wake: Callable[[], None]) -> None:
        with self._mutex:
            waiters = self._waiters.get(hexd, [])
            with contextlib.suppress(ValueError):
                waiters.remove(wake)
            if not waiters:
                self._waiters.pop(hexd, None)

    def _wake(self, hexd: str | None) -> None:
        with self._mutex:
            if hexd is None:
                wakes = [w for waiters in self._waiters.values() for w in waiters]
            else:
                wakes = list(self._waiters.get(hexd, ()))
        for wake in wakes:
            wake()

    def _run(self) -> None:
        pubsub: Any = None
        client: Any = None
        idle_since: float | None = None
        try:
            while True:
                with self._mutex:
                    if self._waiters:
                        idle_since = None
                    elif idle_since is None:
                        idle_since = time.monotonic()
                    # Linger a moment: a waiter that just woke often waits again at once, and
                    # a new subscription would cost it a reconnect and a spurious wake-up.
                    idle = idle_since is not None and time.monotonic() - idle_since > LINGER_SECONDS
                    if self._closing or idle:
                        self._thread = None
                        return
                if self._backend.unavailable:
                    time.sleep(LISTEN_SECONDS)  # waiters poll (and fail) meanwhile
                    continue
                try:
                    if pubsub is None:
                        # Typed only in newer redis-py releases: Any works with every one.
                        client = self._backend.pubsub_client()
                        pubsub = client.pubsub()
                        pubsub.subscribe(self._backend.layout.channel)
                    message = pubsub.get_message(timeout=LISTEN_SECONDS)
                except STORE_ERRORS:  # Redis away: waiters poll meanwhile
                    _close_pubsub(pubsub, client)
                    pubsub = client = None
                    time.sleep(LISTEN_SECONDS)
                    continue
                kind = message.get("type") if message else None
                if kind == "subscribe":  # in effect from now on: look again, everyone
                    self._wake(None)
                elif kind == "message":
                    data = message.get("data")
                    self._wake(data.decode("ascii", "replace") if isinstance(data, bytes) else "")
        finally:
            _close_pubsub(pubsub, client)


def _close_pubsub(pubsub: Any, client: Any) -> None:
    with contextlib.suppress(*STORE_ERRORS):
        if pubsub is not None:
            pubsub.close()
        if client is not None:
            client.close()
