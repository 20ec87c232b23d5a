"""The Redis (or Valkey) backend: one store shared by every replica of an agent.

Each operation of the contract is ONE command, mostly a Lua script, encoded without I/O in
``_redis_ops`` (a hit is a single ``MGET`` of the generation and the row). Two thin drivers
send it: :meth:`RedisBackend.execute` on this process's ``redis.Redis`` pool and
:meth:`RedisBackend.aexecute` on this event loop's ``redis.asyncio.Redis`` pool.

Never breaking the agent: every call is bounded by ``socket_timeout_seconds`` with no
client-side retries, and a circuit breaker turns the first failure (refused, timeout,
``NOAUTH``, ``READONLY``, ``OOM``, a reply this layout did not write) into
``unavailable`` for ``circuit_breaker_seconds``: ops then fail at once without touching
the network, the cache fetches directly, and after the pause one probe decides.

The key lock is ``SET {ns}:l:<hex> <random> NX PX <lease>``, renewed every lease/3 by a
keeper thread while its holder fetches and released by compare-and-delete, which also
``PUBLISH``-es the digest: a holder killed with ``kill -9`` frees the key within one lease.
Waiters of a process share one pub/sub connection (open while someone waits, and 2 s after);
a release wakes them all to read the token side by side (LANDED), and they try the lock
every 250 ms besides, since pub/sub may drop messages. A MOVED reply (Redis Cluster) moves
the cache to the node that owns its one hash-tag slot.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
import queue
import secrets
import threading
import time
from collections.abc import Callable, Generator, Iterator
from typing import Any, ClassVar, TypeVar, cast
from urllib.parse import parse_qsl, urlsplit

import redis
import redis.asyncio
import redis.connection
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import NoBackoff
from redis.exceptions import MovedError, NoScriptError, RedisError, ResponseError
from redis.retry import Retry

from .._config import CacheConfig
from .._log import Warnings, log
from ._redis_ops import Call, Codec, Garbage, Layout
from .contract import KeyLock, LockResult, Op, Read, Snapshot, StorageError

T = TypeVar("T")

POLL_SECONDS = 0.25
"""Waiters re-try the lock this often even without a wake-up (pub/sub is best effort)."""
LISTEN_SECONDS = 0.25
"""How often the pub/sub thread looks up from its subscription (to stop when idle)."""
LINGER_SECONDS = 2.0
"""The subscription stays this long after its last waiter left, then closes."""
MAX_CONNECTIONS = 64
"""Connections of this process's sync pool (its threads share it)."""
MAX_LOOP_CONNECTIONS = 8
"""Connections of each event loop's pool: tasks queue briefly for one instead of opening
dozens at once when a stampede starts."""
_FAILURES = (RedisError, Garbage, OSError)
# No CLIENT SETINFO round trips on each new connection (older servers refuse them anyway).
_NO_SETINFO: dict[str, None] = (
    {"driver_info": None}
    if "driver_info" in inspect.signature(redis.connection.AbstractConnection.__init__).parameters
    else {"lib_name": None, "lib_version": None}
)
# redis-py can also fail with AttributeError/ValueError on a connection closed under it;
# none of it may reach the agent.
_ANY_FAILURE = (Exception,)
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


# One command on one pooled connection, without redis-py's per-command machinery (retry
# wrapper, response callbacks, metrics): replies come back raw and ``Call.decode`` reads
# them. A connection that failed mid-command is dropped, never reused with a reply pending.
# redis-py before 5.3 wants a command name here; later versions warn about one.
_VERSION = tuple(int(p) for p in redis.__version__.split(".")[:2] if p.isdigit())
_NAME_ARG: tuple[str, ...] = ("EVALSHA",) if _VERSION < (5, 3) else ()
# (redis-py leaves send_command, disconnect and the async get_connection untyped.)


def _packed(conn: Any, call: Call[T]) -> list[bytes]:
    packed = call.packed
    if packed is None:
        packed = conn.pack_command(*call.command)
        if call.reused:
            call.packed = packed
    return cast(list[bytes], packed)


def _send(pool: redis.ConnectionPool, call: Call[T], breaker: Breaker, seen: int) -> Any:
    conn = pool.get_connection(*_NAME_ARG)
    try:
        breaker.check(seen)
        try:
            conn.send_packed_command(_packed(conn, call))  # type: ignore[no-untyped-call]  # see above
            return conn.read_response()
        except NoScriptError:  # a restarted or new server: send the source once
            conn.send_command(*call.fallback())  # type: ignore[no-untyped-call]  # see above
            return conn.read_response()
    except (ResponseError, Tripped):
        raise  # the server answered (or was never asked): the connection is clean
    except BaseException:
        conn.disconnect()  # type: ignore[no-untyped-call]  # see above
        raise
    finally:
        pool.release(conn)


async def _asend(
    pool: redis.asyncio.ConnectionPool, call: Call[T], breaker: Breaker, seen: int
) -> Any:
    conn = await pool.get_connection(*_NAME_ARG)  # type: ignore[no-untyped-call]  # see above
    try:
        breaker.check(seen)
        try:
            await conn.send_packed_command(_packed(conn, call))
            return await conn.read_response()
        except NoScriptError:
            await conn.send_command(*call.fallback())
            return await conn.read_response()
    except (ResponseError, Tripped):
        raise
    except BaseException:  # also cancelled: a reply may still be on its way
        await conn.disconnect(nowait=True)
        raise
    finally:
        await pool.release(conn)


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
        timeout = config.socket_timeout_seconds
        self._options: dict[str, Any] = {
            "socket_timeout": timeout,
            "socket_connect_timeout": timeout,
            "retry": Retry(NoBackoff(), 0),  # one attempt: the breaker decides what is next
            "health_check_interval": 0,
            "max_connections": MAX_CONNECTIONS,
            "timeout": timeout,  # waiting for a free pooled connection
            **_NO_SETINFO,
        }
        self._url = client_url(url)
        # Fails here on a malformed URL, before any connection is made.
        redis.BlockingConnectionPool.from_url(self._url, **self._options).disconnect()
        self._reset()

    def _reset(self) -> None:
        """Fresh per-process state (at construction and in a forked child)."""
        self._pid = os.getpid()
        self._mutex = threading.Lock()
        self._pool: redis.ConnectionPool | None = None
        self._loops: dict[asyncio.AbstractEventLoop, redis.asyncio.ConnectionPool] = {}
        self.keeper = _Keeper(self)
        self.wakeups = _Wakeups(self)

    def _check_fork(self) -> None:
        # Sockets inherited across fork belong to the parent: dropped, never used or closed.
        if self._pid != os.getpid():
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

    def pool(self) -> redis.ConnectionPool:
        """This process's connection pool (shared by its threads; redis-py's pool resets
        itself in a forked child)."""
        pool = self._pool
        if pool is None:
            with self._mutex:
                if self._pool is None:
                    self._pool = redis.BlockingConnectionPool.from_url(self._url, **self._options)
                pool = self._pool
        return pool

    def client(self) -> redis.Redis:
        """A client on this process's pool (for pub/sub)."""
        return redis.Redis(connection_pool=self.pool())

    def _apool(self) -> redis.asyncio.ConnectionPool:
        loop = asyncio.get_running_loop()
        pool = self._loops.get(loop)
        if pool is None:
            for other, stale in list(self._loops.items()):
                if other.is_closed():  # asyncio.run() per task: drop what closed loops held
                    del self._loops[other]
                    _drop_on_closed_loop(stale)
            options = {
                **self._options,
                "max_connections": MAX_LOOP_CONNECTIONS,
                "retry": AsyncRetry(NoBackoff(), 0),  # the asyncio pool's own Retry type
            }
            pool = redis.asyncio.BlockingConnectionPool.from_url(self._url, **options)
            self._loops[loop] = pool
        return pool

    # -- the two drivers ---------------------------------------------------------------------

    @contextlib.contextmanager
    def _guarded(self) -> Iterator[int]:
        """One call through the breaker: its failures become ``StorageError``; a call that
        ends normally closes the breaker."""
        seen = self.breaker.enter()
        try:
            yield seen
        except Tripped:
            raise StorageError(f"redis unavailable: {self.breaker.reason}") from None
        except _ANY_FAILURE as exc:
            raise self._failed(exc) from None
        except BaseException:
            self.breaker.abandoned()
            raise
        self._succeeded()

    def run(self, call: Call[T]) -> T:
        """Send one call through the breaker; raise ``StorageError`` on any failure."""
        with self._guarded() as seen:
            try:
                reply = _send(self.pool(), call, self.breaker, seen)
            except MovedError as moved:  # a Cluster: the cache's slot lives on another node
                self._move_to(moved)
                reply = _send(self.pool(), call, self.breaker, seen)
            return call.decode(reply)

    async def arun(self, call: Call[T]) -> T:
        """Async twin of :meth:`run` (the same guard; the send awaited)."""
        self._check_fork()
        with self._guarded() as seen:
            try:
                reply = await _asend(self._apool(), call, self.breaker, seen)
            except MovedError as moved:
                self._move_to(moved)
                reply = await _asend(self._apool(), call, self.breaker, seen)
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

    def key_lock(self, digest: bytes) -> KeyLock:
        """The key's leased lock in Redis."""
        self._check_fork()
        return RedisKeyLock(self, digest)

    # -- closing ----------------------------------------------------------------------------

    def _move_to(self, moved: MovedError) -> None:
        """Every key of the cache shares one hash tag, so one Cluster node serves them all:
        talk to the node a MOVED reply names from now on (a failover or resharding moves
        the cache again the same way)."""
        host, port = moved.host, moved.port
        log.info("token cache: Redis Cluster slot %s is served by %s:%s", moved.slot_id, host, port)
        self._url = _with_node(self._url, str(host), int(port))
        self._retire_pools()

    def _retire_pools(self) -> None:
        with self._mutex:
            pool, self._pool = self._pool, None
            loops, self._loops = self._loops, {}
        if pool is not None:  # connections in use by other threads close when returned
            with contextlib.suppress(*_FAILURES):
                pool.disconnect(inuse_connections=False)
        for loop, apool in loops.items():
            if loop.is_closed():
                _drop_on_closed_loop(apool)
            else:
                with contextlib.suppress(RuntimeError):
                    loop.call_soon_threadsafe(_close_soon, apool)

    def close(self) -> None:
        """Close this process's connections (Redis and other processes are unaffected)."""
        self._check_fork()
        self.keeper.close()
        self.wakeups.close()
        self._retire_pools()

    async def aclose(self) -> None:
        """Close this loop's client properly, then everything else."""
        self._check_fork()
        apool = self._loops.pop(asyncio.get_running_loop(), None)
        if apool is not None:
            with contextlib.suppress(*_FAILURES):
                await apool.disconnect()
        self.close()


def _with_node(url: str, host: str, port: int) -> str:
    """``url`` pointing at ``host:port``, with its credentials, database and options."""
    parts = urlsplit(url)
    userinfo = parts.netloc.rpartition("@")[0]
    node = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    netloc = f"{userinfo}@{node}" if userinfo else node
    query = f"?{parts.query}" if parts.query else ""
    return f"{parts.scheme}://{netloc}{parts.path}{query}"


def _close_soon(pool: redis.asyncio.ConnectionPool) -> None:
    task = asyncio.get_running_loop().create_task(pool.disconnect())
    _CLOSING.add(task)
    task.add_done_callback(_CLOSING.discard)


_CLOSING: set[asyncio.Task[Any]] = set()


def _drop_on_closed_loop(pool: redis.asyncio.ConnectionPool) -> None:
    """Close the sockets of an async pool whose event loop is already closed.

    Nothing can be awaited on that loop any more, and its transports would warn about
    being unclosed when collected: close their sockets directly.
    """
    conns = [
        *getattr(pool, "_available_connections", ()),
        *getattr(pool, "_in_use_connections", ()),
    ]
    for conn in conns:
        writer = getattr(conn, "_writer", None)
        if writer is None:
            continue
        transport = writer.transport
        sock = getattr(transport, "_sock", None)
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.close()
            transport._sock = None
        transport._closing = True  # what a closed transport says (no "unclosed" warning)
        conn._writer = conn._reader = None


# -- the key lock ----------------------------------------------------------------------------------


class _Try:
    """Step: one ``SET NX PX`` attempt; answered with True if it took the lock."""


class _Listen:
    """Step: start receiving wake-ups for this key."""


TRY = _Try()
LISTEN = _Listen()
LockFlow = Generator["_Try | _Listen | float", bool, LockResult]


def lock_flow(wait: float | None, poll: float | None = None) -> LockFlow:
    """The waiting logic of a key lock, without I/O: yields a try, a listen, or the seconds
    to sleep (answered with whether a release woke it); returns the outcome. Written once
    for both drivers.

    A release of the key ends the wait with LANDED: the holder has just stored the token
    (or failed), and every waiter reads it at once instead of taking the lock in turn.
    Without a wake-up (pub/sub is best effort; a holder killed with -9 sends none) the
    lock is tried every ``poll`` seconds, so a dead holder's key is taken within its lease.
    """
    poll = POLL_SECONDS if poll is None else poll
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


class _Attempt:
    """One acquisition, stepped by a driver: iterate for the lock flow's next step, set
    ``answer``; on leaving, the wake-up is forgotten and a ``StorageError`` ends it in ERROR."""

    def __init__(self, lock: RedisKeyLock, wait: float | None, wake: Callable[[], None]) -> None:
        self.lock = lock
        self.flow = lock_flow(wait)
        self.wake = wake
        self.answer = False
        self.started = False
        self.listening = False
        self.result = LockResult.ERROR

    def __iter__(self) -> _Attempt:
        return self

    def __next__(self) -> _Try | _Listen | float:
        try:
            if not self.started:
                self.started = True
                return next(self.flow)
            return self.flow.send(self.answer)
        except StopIteration as done:
            self.result = cast(LockResult, done.value)
            raise StopIteration from None

    def listen(self) -> None:
        self.listening = self.lock._backend.wakeups.listen(self.lock._hex, self.wake)

    def __enter__(self) -> _Attempt:
        return self

    def __exit__(self, exc_type: object, exc: BaseException | None, tb: object) -> bool:
        if self.listening:
            self.lock._backend.wakeups.forget(self.lock._hex, self.wake)
        if isinstance(exc, StorageError):
            self.lock.error = str(exc)
            self.result = LockResult.ERROR
            return True
        return False


class RedisKeyLock:
    """One key's lock; the :class:`~.contract.KeyLock` of the Redis backend."""

    __slots__ = ("_backend", "_digest", "_hex", "_token", "error")

    def __init__(self, backend: RedisBackend, digest: bytes) -> None:
        self._backend = backend
        self._digest = digest
        self._hex = digest.hex()
        self._token: str | None = None
        self.error: str | None = None

    def _try_call(self) -> tuple[str, Call[bool]]:
        token = secrets.token_hex(16)
        return token, self._backend.codec.lock_try(self._digest, token, self._backend.lease_ms)

    def _took(self, token: str) -> bool:
        self._token = token
        self._backend.keeper.hold(self._backend.layout.lock(self._digest), token)
        return True

    def acquire(self, wait: float | None) -> LockResult:
        woken = threading.Event()
        with _Attempt(self, wait, woken.set) as attempt:
            for step in attempt:
                if isinstance(step, _Try):
                    token, call = self._try_call()
                    attempt.answer = self._backend.run(call) and self._took(token)
                elif isinstance(step, _Listen):
                    attempt.listen()
                else:
                    attempt.answer = woken.wait(step)
                    woken.clear()
        return attempt.result

    async def aacquire(self, wait: float | None) -> LockResult:
        loop = asyncio.get_running_loop()
        woken = asyncio.Event()

        def wake() -> None:
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                loop.call_soon_threadsafe(woken.set)

        with _Attempt(self, wait, wake) as attempt:
            for step in attempt:
                if isinstance(step, _Try):
                    token, call = self._try_call()
                    attempt.answer = await self._backend.arun(call) and self._took(token)
                elif isinstance(step, _Listen):
                    attempt.listen()
                else:
                    try:
                        attempt.answer = await asyncio.wait_for(woken.wait(), step)
                    except TimeoutError:
                        attempt.answer = False
                    woken.clear()
        return attempt.result

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


class _Keeper:
    """Renews the leases of the locks this process holds; releases locks for event loops.

    One daemon thread, running only while there is something to renew or release.
    """

    def __init__(self, backend: RedisBackend) -> None:
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
            self._thread = threading.Thread(
                target=self._run, name="agw-cache-redis-lease", daemon=True
            )
            self._thread.start()

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
        with contextlib.suppress(Exception):
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
        except Exception:
            return  # try again next round; past the lease another process may take the key
        if not kept:
            self._forget(key, token)  # lost (it expired meanwhile): nothing left to renew


class _Wakeups:
    """One pub/sub subscription per process while anyone waits for a key lock.

    A release published before the subscription took effect would be lost: once the server
    confirms the subscription (again after any reconnect), every waiter is woken once to
    look again. A waiter registering later is covered by its own try after registering.
    """

    def __init__(self, backend: RedisBackend) -> None:
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
                self._thread = threading.Thread(
                    target=self._run, name="agw-cache-redis-wakeups", daemon=True
                )
                self._thread.start()
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
                        client: Any = self._backend.client()
                        pubsub = client.pubsub()
                        pubsub.subscribe(self._backend.layout.channel)
                    message = pubsub.get_message(timeout=LISTEN_SECONDS)
                except Exception:  # Redis away or the pool closed: waiters poll meanwhile
                    _close_pubsub(pubsub)
                    pubsub = None
                    time.sleep(LISTEN_SECONDS)
                    continue
                kind = message.get("type") if message else None
                if kind == "subscribe":  # in effect from now on: look again, everyone
                    self._wake(None)
                elif kind == "message":
                    data = message.get("data")
                    self._wake(data.decode("ascii", "replace") if isinstance(data, bytes) else "")
        finally:
            _close_pubsub(pubsub)


def _close_pubsub(pubsub: Any) -> None:
    if pubsub is not None:
        with contextlib.suppress(Exception):
            pubsub.close()
