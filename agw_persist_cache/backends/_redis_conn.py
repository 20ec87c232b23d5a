"""How the Redis backend reaches its server: options from the URL, a gate in front of each
pool, whole-command deadlines, and one pool per event loop. redis-py's public API only.

Back-pressure, never an outage: a gate lets at most ``size`` commands of a process (its
threads) or of an event loop (its tasks) through at once; the others wait their turn, in
order, with no time limit of their own (each command ahead of them is bounded), and are then
let through, or turned away at once when the circuit breaker opened meanwhile. The pool
behind a gate never waits: it may open as many connections as the gate lets through.

A whole command is bounded by ``socket_timeout_seconds``, not each read (a server or proxy
that drips its reply passes every socket timeout): a loop wraps it in ``asyncio.timeout``; a
thread's connection is armed with the ``_redis_deadlines`` watchdog.

When a burst is over (nothing in flight after more than ``IDLE_CONNECTIONS`` were), the
pool's idle connections are closed: a process keeps no more connections than it uses.

Each event loop gets its pool on its first call, from any thread (:class:`LoopPools`). A
loop shut down the standard way (``asyncio.run``, ``asyncio.Runner``, asgiref's
``async_to_sync``, or ``loop.shutdown_asyncgens()`` before ``loop.close()``) closes its pool
itself, through a sentinel async generator; a loop found closed otherwise is forgotten.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import threading
from collections.abc import AsyncGenerator, Callable
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import redis
import redis.asyncio
import redis.connection
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import InvalidResponse, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry

from .._config import CacheConfig
from .._errors import CacheConfigError
from ._redis_deadlines import Watchdog, watched_class

MAX_CONNECTIONS = 16
"""Commands (and so connections) of a process's threads in flight at once."""
MAX_LOOP_CONNECTIONS = 8
"""Commands (and so connections) of one event loop's tasks in flight at once."""
IDLE_CONNECTIONS = 4
"""A burst above this many commands in flight closes the idle connections when it is over."""

STORE_ERRORS: tuple[type[BaseException], ...] = (
    RedisConnectionError,  # refused, reset, NOAUTH, LOADING, MaxConnections...
    RedisTimeoutError,
    ResponseError,  # the server said no: READONLY, OOM, NOPERM, WRONGTYPE, a script's error
    InvalidResponse,  # not the protocol (a proxy, another service on the port)
    OSError,  # sockets, TLS, and asyncio.timeout's TimeoutError
)
"""What the store's unavailability looks like; anything else is a bug and propagates."""

_HOSTED = ("redis", "rediss")


def pool_options(url: str, config: CacheConfig) -> dict[str, Any]:
    """The pool options for ``url`` (in redis-py's spelling: ``redis(s)://`` or ``unix://``).

    Raises ``CacheConfigError`` for a URL that names no server, or TLS options on a URL
    without TLS (redis-py would only fail when it first connects, or talk to localhost).
    """
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme in _HOSTED and not parts.hostname:
        raise CacheConfigError(
            "cache URL names no host; expected redis://host:6379/0 or rediss://host:6380/0"
        )
    if scheme == "unix" and not parts.path:
        raise CacheConfigError("cache URL names no socket; expected unix:///path/to/redis.sock")
    query = {k.lower(): v for k, v in parse_qsl(parts.query, keep_blank_values=True)}
    tls = scheme == "rediss"
    if not tls and any(k.startswith("ssl") for k in query):
        raise CacheConfigError("ssl_* options in the cache URL need a rediss:// URL")
    timeout = config.socket_timeout_seconds
    options: dict[str, Any] = {
        "socket_timeout": timeout,
        "socket_connect_timeout": timeout,
        "health_check_interval": 0,
        # One retry, on a connection error only: a pooled connection the server closed
        # while idle is reconnected; a timeout is never retried (the breaker decides).
        "retry_on_error": [RedisConnectionError],
    }
    if tls and query.get("ssl_cert_reqs", "required").lower() != "none":
        options["ssl_check_hostname"] = True  # redis-py 5 did not check it by default
    return options


def _retry() -> Retry:
    return Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,))


def _aretry() -> AsyncRetry:
    return AsyncRetry(NoBackoff(), 1, supported_errors=(RedisConnectionError,))


def check_options(pool: Any) -> None:
    """Raise ``CacheConfigError`` when the URL's options do not fit its connection class
    (a connection object is made, nothing is connected)."""
    try:
        pool.connection_class(**pool.connection_kwargs)
    except TypeError as exc:  # an option this kind of connection does not take
        raise CacheConfigError(
            f"the cache URL has an option redis-py does not take ({exc})"
        ) from None


# -- gates -------------------------------------------------------------------------------------


class _Slots:
    """A gate's bookkeeping: commands in flight, the peak of this burst, who waits, and
    whether the pool is being trimmed (alone: no command gets a connection meanwhile)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.busy = 0
        self.peak = 0
        self.trimming = False
        self.turns: collections.deque[Any] = collections.deque()

    def admit(self) -> bool:
        if self.busy < self.size and not self.turns and not self.trimming:
            self.busy += 1
            self.peak = max(self.peak, self.busy)
            return True
        return False

    def freed(self) -> bool:
        """The last holder leaves and nobody waits. True when that ends a burst: it then
        keeps its slot, alone, to trim the pool, and calls the gate's ``trimmed()``."""
        if self.busy == 1 and self.peak > IDLE_CONNECTIONS:
            self.peak = 0
            self.trimming = True
            return True
        self.busy -= 1
        return False


class Gate:
    """The gate of a process's threads (see the module docstring)."""

    def __init__(self, size: int) -> None:
        self.slots = _Slots(size)
        self._mutex = threading.Lock()

    def enter(self) -> None:
        with self._mutex:
            if self.slots.admit():
                return
            turn = threading.Lock()
            turn.acquire()
            self.slots.turns.append(turn)
        try:
            turn.acquire()  # released by the leave() that hands its slot over
        except BaseException:
            with self._mutex:
                waiting = turn in self.slots.turns
                if waiting:
                    self.slots.turns.remove(turn)
            if not waiting:  # the slot was handed over just now: pass it on
                self.leave()
            raise

    def leave(self) -> bool:
        """Give the slot to the next waiter, or free it; True when a burst just ended (then
        trim the pool and call :meth:`trimmed`)."""
        with self._mutex:
            if self.slots.turns:
                self.slots.turns.popleft().release()
                return False
            return self.slots.freed()

    def trimmed(self) -> None:
        with self._mutex:
            self.slots.trimming = False
        self.leave()


class LoopGate:
    """The gate of one event loop's tasks (see the module docstring)."""

    def __init__(self, size: int) -> None:
        self.slots = _Slots(size)

    async def enter(self) -> None:
        if self.slots.admit():
            return
        turn = asyncio.get_running_loop().create_future()
        self.slots.turns.append(turn)
        try:
            await turn
        except BaseException:
            if turn.done() and not turn.cancelled():
                self.leave()  # handed over just as this task was cancelled: pass it on
            else:
                with contextlib.suppress(ValueError):
                    self.slots.turns.remove(turn)
            raise

    def leave(self) -> bool:
        while self.slots.turns:
            turn = self.slots.turns.popleft()
            if not turn.done():  # (a cancelled waiter leaves its turn behind a moment)
                turn.set_result(None)
                return False
        return self.slots.freed()

    def trimmed(self) -> None:
        self.slots.trimming = False
        self.leave()


# -- pools -------------------------------------------------------------------------------------


class Wire:
    """This process's pool for its threads: gate, watchdog, client, registered scripts."""

    def __init__(self, url: str, options: dict[str, Any], timeout: float) -> None:
        self.watchdog = Watchdog(timeout)
        self.pool = redis.ConnectionPool.from_url(
            url,
            connection_class=watched_class(url, self.watchdog),
            max_connections=MAX_CONNECTIONS,
            retry=_retry(),
            **options,
        )
        self.client = redis.Redis(connection_pool=self.pool)
        self.gate = Gate(MAX_CONNECTIONS)
        self.scripts: dict[str, Any] = {}

    def trim(self) -> None:
        """Close the idle connections (a burst is over; no command runs meanwhile)."""
        try:
            self.close()
        finally:
            self.gate.trimmed()

    def close(self) -> None:
        """Close the idle connections; those in use by other threads close when dropped."""
        with contextlib.suppress(*STORE_ERRORS):
            self.pool.disconnect(inuse_connections=False)


class LoopWire:
    """One event loop's pool: gate, client, registered scripts, and the sentinel that
    closes them when the loop shuts down."""

    def __init__(self, url: str, options: dict[str, Any]) -> None:
        pool = redis.asyncio.ConnectionPool.from_url(
            url, max_connections=MAX_LOOP_CONNECTIONS, retry=_aretry(), **options
        )
        self.client = redis.asyncio.Redis(connection_pool=pool)
        self.gate = LoopGate(MAX_LOOP_CONNECTIONS)
        self.scripts: dict[str, Any] = {}
        self.sentinel: AsyncGenerator[None, None] | None = None

    async def trim(self) -> None:
        """Close the idle connections (a burst is over; no task gets one meanwhile)."""
        try:
            with contextlib.suppress(*STORE_ERRORS):
                await self.client.connection_pool.disconnect(inuse_connections=False)
        finally:
            self.gate.trimmed()

    async def close(self) -> None:
        with contextlib.suppress(*STORE_ERRORS):
            await self.client.connection_pool.disconnect()


_CLOSING: set[asyncio.Task[Any]] = set()


class LoopPools:
    """The :class:`LoopWire` of each event loop, safe to use from any thread."""

    def __init__(self, make: Callable[[], LoopWire]) -> None:
        self._make = make
        self._wires: dict[asyncio.AbstractEventLoop, LoopWire] = {}
        self._mutex = threading.Lock()

    async def get(self) -> LoopWire:
        loop = asyncio.get_running_loop()
        wire = self._wires.get(loop)
        if wire is None:
            wire = self._make()
            with self._mutex:
                for other in [other for other in self._wires if other.is_closed()]:
                    del self._wires[other]  # closed without shutting down: forgotten
                self._wires[loop] = wire
            wire.sentinel = self._sentinel(loop, wire)
            await wire.sentinel.asend(None)  # the loop now tracks it (shutdown_asyncgens)
        return wire

    async def _sentinel(
        self, loop: asyncio.AbstractEventLoop, wire: LoopWire
    ) -> AsyncGenerator[None, None]:
        try:
            yield
        finally:
            with self._mutex:
                if self._wires.get(loop) is wire:
                    del self._wires[loop]
            await wire.close()

    async def close_here(self) -> None:
        """Close the running loop's pool now."""
        wire = self._wires.get(asyncio.get_running_loop())
        if wire is not None and wire.sentinel is not None:
            await wire.sentinel.aclose()

    def close_all(self) -> None:
        """Forget every loop's pool; each running loop closes its own soon."""
        with self._mutex:
            wires, self._wires = self._wires, {}
        for loop, wire in wires.items():
            if wire.sentinel is not None and not loop.is_closed():
                with contextlib.suppress(RuntimeError):  # it closed meanwhile
                    loop.call_soon_threadsafe(_close_soon, wire.sentinel)


def _close_soon(sentinel: AsyncGenerator[None, None]) -> None:
    task = asyncio.get_running_loop().create_task(sentinel.aclose())
    _CLOSING.add(task)
    task.add_done_callback(_CLOSING.discard)
