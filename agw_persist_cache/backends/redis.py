"""The Redis (or Valkey) backend: one store shared by every replica of an agent.

Each operation of the contract is ONE command, mostly a Lua script, encoded without I/O in
``_redis_ops`` (a hit is a single ``MGET`` of the generation and the row). Two thin drivers
send it through redis-py's public API (``execute_command``; scripts through
``register_script``, which sends the source once to a server that does not know it):
:meth:`RedisBackend.run` on this process's pool and :meth:`RedisBackend.arun` on this event
loop's pool (``_redis_conn``: gates and one pool per loop; ``_redis_deadlines``:
whole-command deadlines for threads).

Never breaking the agent: every command is bounded as a whole by ``socket_timeout_seconds``,
and a circuit breaker turns the store's failures (refused, timeout, ``NOAUTH``,
``READONLY``, ``OOM``, a reply this layout did not write: ``STORE_ERRORS`` and ``Garbage``)
into ``unavailable`` for ``circuit_breaker_seconds``: ops then fail at once without touching
the network, the cache fetches directly, and after the pause one probe decides. Anything
else (a bug of ours or a changed redis-py API) propagates and leaves the breaker alone.

The key lock is ``SET {ns}:l:<hex> <random> NX PX <lease>``, renewed every lease/3 by a
keeper thread while its holder fetches and released by compare-and-delete, which also
``PUBLISH``-es the digest: a holder killed with ``kill -9`` frees the key within one lease.
Waiters of a process share one pub/sub connection (open while someone waits, and 2 s after);
a release wakes them all to read the token side by side (LANDED), and they try the lock
every 250 ms besides, since pub/sub may drop messages (``_redis_lock``). A MOVED reply
(Redis Cluster) moves the cache to the node that owns its one hash-tag slot.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any, ClassVar, TypeVar
from urllib.parse import parse_qsl, urlsplit

import redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import MovedError, ResponseError

from .. import _fork
from .._config import CacheConfig
from .._log import Warnings, log
from ._redis_conn import (
    STORE_ERRORS,
    LoopPools,
    LoopWire,
    Wire,
    check_options,
    pool_options,
)
from ._redis_lock import Keeper, RedisKeyLock, Wakeups
from ._redis_ops import Call, Codec, Garbage, Layout
from .contract import KeyLock, Op, Read, Snapshot, StorageError

T = TypeVar("T")

_FAILURES: tuple[type[BaseException], ...] = (*STORE_ERRORS, Garbage)
_SECRET_QUERY = ("password", "username", "user", "pass")


def redact(url: str) -> str:
    """``url`` with any password (userinfo or query) replaced by ``***``."""
    try:
        parts = urlsplit(url)
        netloc = parts.netloc
        if "@" in netloc:
            userinfo, host = netloc.rsplit("@", 1)
            user, sep, _ = userinfo.partition(":")
            netloc = f"{user}:***@{host}" if sep else f"***@{host}" if user else host
        query = "&".join(
            f"{k}={'***' if k.lower() in _SECRET_QUERY else v}"
            for k, v in parse_qsl(parts.query, keep_blank_values=True)
        )
        return f"{parts.scheme}://{netloc}{parts.path}" + (f"?{query}" if query else "")
    except ValueError:
        return f"{url.partition(':')[0]}://***"


def client_url(url: str) -> str:
    """What redis-py understands: ``valkey(s)://`` is the same protocol as ``redis(s)://``."""
    scheme, sep, rest = url.partition("://")
    scheme = {"valkey": "redis", "valkeys": "rediss"}.get(scheme.lower(), scheme)
    return f"{scheme}{sep}{rest}"


# -- the circuit breaker ---------------------------------------------------------------------------


class Breaker:
    """Open for ``seconds`` after a failure; then one probe closes or re-opens it."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.reason: str | None = None
        self.failures = 0
        self._until = 0.0
        self._probing = False
        self._mutex = threading.Lock()

    @property
    def blocked(self) -> str | None:
        reason = self.reason
        if reason is not None and (self._probing or time.monotonic() < self._until):
            return reason
        return None

    def enter(self) -> int:
        """Let a call through (returns the failure count it saw), or raise ``StorageError``
        at once while open."""
        if self.reason is None:
            return self.failures
        with self._mutex:
            if self.reason is not None:
                if self._probing or time.monotonic() < self._until:
                    raise StorageError(f"redis unavailable: {self.reason}")
                self._probing = True  # this call is the probe; the others keep skipping
            return self.failures

    def check(self, seen: int) -> None:
        """Raise if a failure happened since ``enter`` returned ``seen`` (e.g. while this
        call queued for a pooled connection behind calls that then timed out)."""
        if self.failures != seen:
            raise Tripped

    def succeeded(self) -> bool:
        """Close; True if it was open (the store is back)."""
        if self.reason is None:
            return False
        with self._mutex:
            was, self.reason, self._probing = self.reason, None, False
        return was is not None

    def failed(self, reason: str) -> None:
        with self._mutex:
            self.reason = reason
            self.failures += 1
            self._until = time.monotonic() + self.seconds
            self._probing = False

    def abandoned(self) -> None:
        """A call ended without an answer either way (cancelled): let the next one probe."""
        with self._mutex:
            self._probing = False


class Tripped(Exception):
    """The breaker opened while this call waited: it is skipped like the calls after it."""


def _reason(exc: BaseException) -> str:
    text = " ".join(str(exc).split())[:160]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


# -- drivers -----------------------------------------------------------------------------------


def _command(client: Any, scripts: dict[str, Any], call: Call[Any]) -> Callable[[], Any]:
    """What sends ``call`` on ``client``: its command, or its script as a redis-py Script
    (registered once per client: EVALSHA, and the source once to a server without it)."""
    if call.script is None:
        return partial(client.execute_command, *call.command)
    script = scripts.get(call.script)
    if script is None:
        script = scripts[call.script] = client.register_script(call.script)
    n = call.command[2]
    return partial(script, call.command[3 : 3 + n], call.command[3 + n :], client)


def _read(pool: Any, call: Call[Any]) -> Any:
    """The hit's read: the public calls ``execute_command`` makes, without its per-command
    machinery, and the wire bytes packed once. A connection the server closed while idle
    is tried once more (redis-py disconnects it; the pool opens a new one), as the
    ``Retry`` of every other command does."""
    for attempt in (1, 2):
        conn = pool.get_connection()
        try:
            conn.send_packed_command(_packed(conn, call))
            return conn.read_response()
        except RedisConnectionError:
            if attempt == 2:
                raise
        finally:
            pool.release(conn)


async def _aread(pool: Any, call: Call[Any]) -> Any:
    """Async twin of :func:`_read`."""
    for attempt in (1, 2):
        conn = await pool.get_connection()
        try:
            await conn.send_packed_command(_packed(conn, call))
            return await conn.read_response()
        except RedisConnectionError:
            if attempt == 2:
                raise
        finally:
            await pool.release(conn)


def _packed(conn: Any, call: Call[Any]) -> Any:
    if call.packed is None:
        call.packed = conn.pack_command(*call.command)
    return call.packed


def _moved(exc: ResponseError) -> MovedError | None:
    """The redirect in a MOVED reply (redis-py parses it only on its cluster client)."""
    if isinstance(exc, MovedError):
        return exc
    text = str(exc)
    return MovedError(text[6:]) if text.startswith("MOVED ") else None


def _send(wire: Wire, call: Call[T], breaker: Breaker, seen: int) -> Any:
    """One command on this process's pool, after its turn at the gate."""
    wire.gate.enter()
    wire.watchdog.begin()
    try:
        breaker.check(seen)
        if call.reused:
            return _read(wire.pool, call)
        return _command(wire.client, wire.scripts, call)()
    finally:
        wire.watchdog.end()
        if wire.gate.leave():
            wire.trim()


async def _asend(wire: LoopWire, call: Call[T], breaker: Breaker, seen: int, timeout: float) -> Any:
    """One command on this loop's pool, after its turn at the gate, bounded as a whole."""
    await wire.gate.enter()
    try:
        breaker.check(seen)
        async with asyncio.timeout(timeout):
            if call.reused:
                return await _aread(wire.client.connection_pool, call)
            return await _command(wire.client, wire.scripts, call)()
    finally:
        if wire.gate.leave():
            await wire.trim()


class RedisBackend:
    """The token store in one Redis/Valkey database; see the module docstring."""

    name: ClassVar[str] = "redis"

    def __init__(self, url: str, config: CacheConfig, warnings: Warnings | None = None) -> None:
        self.location = redact(url)
        self.config = config
        self.warnings = warnings or Warnings()
        self.layout = Layout(config.namespace)
        self.codec = Codec(
            self.layout,
            {
                "system": config.max_system_token_cache_size,
                "user": config.max_user_token_cache_size,
            },
        )
        self.lease_ms = max(1, int(config.lock_lease_seconds * 1000))
        self.breaker = Breaker(config.circuit_breaker_seconds)
        self._url = client_url(url)
        self._options = pool_options(self._url, config)
        self._reset()
        # A malformed URL (ValueError) or options its scheme does not take fail here,
        # before any connection is made.
        check_options(self._wire().pool)

    def _reset(self) -> None:
        """Fresh per-process state (at construction and in a forked child)."""
        self._forks = _fork.forks
        self._mutex = threading.Lock()
        self._sync: Wire | None = None
        self._loops = LoopPools(lambda: LoopWire(self._url, self._options))
        self.keeper = Keeper(self)
        self.wakeups = Wakeups(self)

    def _check_fork(self) -> None:
        # Sockets inherited across fork belong to the parent: dropped, never used or closed
        # (the threads that kept or watched them did not come along either).
        if self._forks != _fork.forks:
            self._reset()

    # -- status ------------------------------------------------------------------------------

    @property
    def unavailable(self) -> str | None:
        """Why Redis is being skipped right now (the circuit breaker is open), or None."""
        return self.breaker.blocked

    def _failed(self, exc: BaseException) -> StorageError:
        reason = _reason(exc)
        self.breaker.failed(reason)
        return StorageError(f"redis unavailable: {reason}")

    def _succeeded(self) -> None:
        if self.breaker.succeeded():
            log.info("token cache at %s is reachable again; using it", self.location)

    # -- clients -------------------------------------------------------------------------------

    def _wire(self) -> Wire:
        """This process's pool (shared by its threads)."""
        wire = self._sync
        if wire is None:
            with self._mutex:
                if self._sync is None:
                    timeout = self.config.socket_timeout_seconds
                    self._sync = Wire(self._url, self._options, timeout)
                wire = self._sync
        return wire

    def pubsub_client(self) -> redis.Redis:
        """A client of its own for one pub/sub subscription (closed with it)."""
        return redis.Redis.from_url(self._url, **self._options)

    # -- the two drivers ---------------------------------------------------------------------

    @contextlib.contextmanager
    def _guarded(self) -> Iterator[int]:
        """One call through the breaker: the store's failures become ``StorageError``; a
        call that ends normally closes the breaker; anything else propagates untouched."""
        seen = self.breaker.enter()
        try:
            yield seen
        except Tripped:
            reason = self.breaker.reason or "skipped after a failure"
            raise StorageError(f"redis unavailable: {reason}") from None
        except _FAILURES as exc:
            raise self._failed(exc) from None
        except BaseException:
            self.breaker.abandoned()
            raise
        self._succeeded()

    def run(self, call: Call[T]) -> T:
        """Send one call through the breaker; raise ``StorageError`` when the store fails."""
        self._check_fork()
        with self._guarded() as seen:
            try:
                reply = _send(self._wire(), call, self.breaker, seen)
            except ResponseError as exc:
                self._move_to(exc)
                reply = _send(self._wire(), call, self.breaker, seen)
            return call.decode(reply)

    async def arun(self, call: Call[T]) -> T:
        """Async twin of :meth:`run` (the same guard; the send awaited)."""
        self._check_fork()
        timeout = self.config.socket_timeout_seconds
        with self._guarded() as seen:
            try:
                reply = await _asend(await self._loops.get(), call, self.breaker, seen, timeout)
            except ResponseError as exc:
                self._move_to(exc)
                reply = await _asend(await self._loops.get(), call, self.breaker, seen, timeout)
            return call.decode(reply)

    def execute(self, op: Op[T]) -> T:
        """Perform ``op`` as one command; raise ``StorageError``."""
        return self.run(self.codec.encode(op))

    async def aexecute(self, op: Op[T]) -> T:
        """Perform ``op`` as one command without blocking the loop; raise ``StorageError``."""
        return await self.arun(self.codec.encode(op))

    def read_inline(self, op: Read) -> Snapshot | None:
        """Never: a read is a network round trip, which an event loop must await."""
        return None

    def prepare(self) -> None:
        """Nothing to prepare: the store is a server."""

    def key_lock(self, digest: bytes) -> KeyLock:
        """The key's leased lock in Redis."""
        self._check_fork()
        return RedisKeyLock(self, digest)

    # -- closing ----------------------------------------------------------------------------

    def _move_to(self, exc: ResponseError) -> None:
        """Every key of the cache shares one hash tag, so one Cluster node serves them all:
        talk to the node a MOVED reply names from now on (a failover or resharding moves
        the cache again the same way). Any other refusal is re-raised."""
        moved = _moved(exc)
        if moved is None:
            raise exc
        host, port = moved.host, moved.port
        log.info("token cache: Redis Cluster slot %s is served by %s:%s", moved.slot_id, host, port)
        self._url = _with_node(self._url, str(host), int(port))
        self._retire_pools()

    def _retire_pools(self) -> None:
        with self._mutex:
            wire, self._sync = self._sync, None
        if wire is not None:
            wire.close()
        self._loops.close_all()

    def close(self) -> None:
        """Close this process's connections (Redis and other processes are unaffected)."""
        self._check_fork()
        self.keeper.close()
        self.wakeups.close()
        self._retire_pools()

    async def aclose(self) -> None:
        """Close this loop's connections properly, then everything else."""
        self._check_fork()
        await self._loops.close_here()
        self.close()


def _with_node(url: str, host: str, port: int) -> str:
    """``url`` pointing at ``host:port``, with its credentials, database and options."""
    parts = urlsplit(url)
    userinfo = parts.netloc.rpartition("@")[0]
    node = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    netloc = f"{userinfo}@{node}" if userinfo else node
    query = f"?{parts.query}" if parts.query else ""
    return f"{parts.scheme}://{netloc}{parts.path}{query}"
