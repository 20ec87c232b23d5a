"""Single flight, written once: every multi-step decision of the cache is a generator.

A flight yields *steps* and receives their results, with no I/O of its own (the
httpx ``Auth.auth_flow`` pattern). The steps: a storage operation of the contract
(:class:`~.backends.contract.Op`), :class:`Join` (the key's flight in this process: lead
it, or wait for its leader's one result), :class:`TakeLock` (the key's cross-process
lock), :class:`Land` (hand the token to every waiter of the key in this process at once),
:data:`UNLOCK` (give back the locks) and :data:`FETCH` (call the caller's token fetch).
Two small drivers perform them: :meth:`Driver.run` with plain calls and
:meth:`Driver.arun` with awaits. A step that fails is thrown into the flight, which
decides; locks are given back and waiters released whatever happens.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Generator
from dataclasses import dataclass
from typing import Any, Generic, NamedTuple, Protocol, TypeAlias, TypeVar

from ._config import CacheConfig
from ._errors import FetchBackoffError, TokenFetchError
from ._expiry import CachedToken, TokenData, normalize
from ._health import READ, WRITE, Health
from ._locks import InFlight, Joined, KeyLocks, Release
from ._memory import Ident, MemoryTier
from ._stats import Counters
from .backends.contract import (
    ABSENT,
    Backend,
    Backoff,
    Fence,
    GetBackoff,
    LockResult,
    Op,
    Read,
    SetBackoff,
    Snapshot,
    StorageError,
    StorageUnavailable,
)

T = TypeVar("T")

CALLERS_BUGS: tuple[type[BaseException], ...] = (
    TypeError,  # also CacheUsageError: a fetch returning something that is not a token
    AttributeError,
    NameError,
    AssertionError,
    ImportError,
    NotImplementedError,
    RecursionError,
    SyntaxError,
)
"""Exceptions of a fetch that are the caller's bug: they propagate with no back-off. Any
other exception of a fetch is the identity service's trouble (bad credentials, a 5xx, a
timeout, a response that does not parse): every process backs off the key for a while."""


@dataclass(frozen=True, slots=True)
class Key:
    """What identifies a cached token: kind, scope and user (as a hash), and its digests.

    A ``local`` key has no digests: the process has no usable key for the store, so the
    token lives in its memory tier only."""

    kind: str
    scope_key: str
    uhash: str
    digests: tuple[bytes, ...]  # one per configured key; new rows go under the first
    read: Read  # the lookup of this key, built once
    ident: Ident  # (kind, scope_key, uhash): the memory tier's and the flights' key
    local: bool = False

    @property
    def digest(self) -> bytes:
        return self.digests[0]

    def __repr__(self) -> str:
        shown = self.digest.hex()[:12] + "..." if self.digests else "local"
        return f"Key(kind={self.kind!r}, digest={shown})"


@dataclass(frozen=True, slots=True)
class Join:
    """Join the key's flight in this process within ``wait`` seconds (``None``: only lead,
    never wait); yields the leader's token or a :class:`~._locks.Joined`."""

    ident: Ident
    wait: float | None


@dataclass(frozen=True, slots=True)
class TakeLock:
    """Take the key's cross-process lock within ``wait`` seconds (``None``: one try);
    yields a LockResult."""

    digest: bytes
    wait: float | None


@dataclass(frozen=True, slots=True)
class Land:
    """Hand ``entry`` to every waiter of the key's flight in this process at once."""

    entry: CachedToken


class _Marker:
    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


UNLOCK = _Marker("UNLOCK")
"""Give back every lock this flight holds (other processes' waiters then read the store)."""
FETCH = _Marker("FETCH")
"""Call the caller's fetch; its result (or exception) comes back into the flight."""

Step: TypeAlias = "Op[Any] | Join | TakeLock | Land | _Marker"
Flight: TypeAlias = Generator[Step, Any, T]
Fetch: TypeAlias = Callable[[], TokenData]
AFetch: TypeAlias = Callable[[], Awaitable[TokenData]]


class Lookup(NamedTuple):
    """What a stored row means now: a usable entry (or None), a write to do, refresh due."""

    entry: CachedToken | None
    followup: Op[Any] | None
    due: bool


class Hit(NamedTuple):
    """A clean hit: the token, and whether it is due for a refresh ahead of its expiry."""

    entry: CachedToken
    due: bool


class Shelf(Protocol):
    """What a flight needs of the cache around it."""

    config: CacheConfig
    counters: Counters
    memory: MemoryTier

    def uses_store(self, key: Key) -> bool:
        """Whether ``key``'s flight goes through the store now (else: memory only)."""

    def judge(self, key: Key, snap: Snapshot, now: float) -> Lookup:
        """Open and check the row of a read."""

    def remembered(self, key: Key, now: float) -> CachedToken | None:
        """The token the memory tier holds for ``key`` (the store could not answer)."""

    def keep(self, key: Key, entry: CachedToken) -> None:
        """Remember a token the store did not take (this process serves it from memory)."""

    def store(
        self, key: Key, entry: CachedToken, generation: int | None, fence: bytes | None = None
    ) -> Flight[bool]:
        """Seal and write ``entry`` unless a clear moved ``generation`` (or, with ``fence``,
        a newer row took the one read)."""

    def prune_if_due(self) -> Flight[int]:
        """Prune if this process has not for a while."""

    def storage_failed(self, exc: StorageError) -> None:
        """Count a storage problem: it never fails a get-or-fetch."""

    def lock_trouble(self, result: LockResult, key: Key) -> None:
        """Count and warn about a lock that was not had (timeout or I/O error)."""

    def timed(self, what: str, key: Key, seconds: float, ok: bool = True) -> None:
        """A fetch (``what="fetch"``) or a lock wait (``"lock"``) took ``seconds``."""


def fill(shelf: Shelf, key: Key, *, refresh: bool) -> Flight[CachedToken | None]:
    """The single flight of a miss: join the key's flight in this process; its leader takes
    the cross-process lock, re-reads, honours back-off, fetches and stores (unless a clear
    came meanwhile), then hands the token to every waiter at once.

    With ``refresh`` (refresh-ahead in the background): only tries, never waits, and a
    token no longer due for refresh means another process already refreshed it (None).
    """
    config = shelf.config
    wait = None if refresh else config.lock_timeout_seconds
    deadline = time.monotonic() + (wait or 0.0)
    asked = time.monotonic()
    while True:  # this process's flight of the key
        _raise_if_backing_off(shelf, shelf.memory.backoff(key.ident, time.time()))
        joined = yield Join(key.ident, _left(wait, deadline))
        if isinstance(joined, CachedToken):  # the leader's token, handed to all at once
            shelf.timed("lock", key, time.monotonic() - asked)
            return None if refresh else joined
        if joined is Joined.BUSY:
            return None  # this process is fetching it already
        if joined is not Joined.AGAIN:  # LEAD, or TIMEOUT / ALONE: fetch anyway
            break
    locked = LockResult.HELD
    if joined is Joined.TIMEOUT:
        shelf.lock_trouble(LockResult.TIMEOUT, key)
    elif joined is Joined.LEAD and shelf.uses_store(key):  # every process's flight of the key
        while True:
            locked = yield TakeLock(key.digest, _left(wait, deadline))
            if locked is not LockResult.LANDED:
                break
            # The flight ahead of ours has just ended: read before queueing again.
            early = yield from _peek(shelf, key)
            if early is not None:
                shelf.timed("lock", key, time.monotonic() - asked)
                return None if refresh else early
        if locked is LockResult.BUSY or (refresh and locked is not LockResult.HELD):
            return None  # someone else is refreshing this very key
        if locked is not LockResult.HELD:
            shelf.lock_trouble(locked, key)
    shelf.timed("lock", key, time.monotonic() - asked)
    now = time.time()
    generation: int | None = None
    fence = ABSENT  # the row this fetch replaces: a newer one written meanwhile stays
    backoff: Backoff | None = None
    if shelf.uses_store(key):
        try:
            snap: Snapshot = yield key.read  # another process may have just written it
            generation = snap.generation
            if snap.row is not None and snap.row.digest == key.digest:
                fence = snap.row.nonce
            lookup = shelf.judge(key, snap, now)
            if lookup.followup is not None:
                done = yield lookup.followup
                if isinstance(lookup.followup, Fence):  # the store had gone back: now not
                    generation = done
            if lookup.entry is not None and not (refresh and lookup.due):
                return None if refresh else lookup.entry
            backoff = yield GetBackoff(key.digest, config.fetch_backoff_seconds)
            if backoff is not None:
                backoff = yield from _capped(shelf, key, backoff, now)
        except StorageError as exc:
            shelf.storage_failed(exc)
    if generation is None:  # the store could not answer: the memory tier is the cache
        kept = shelf.remembered(key, now)
        if kept is not None:
            return None if refresh else kept
    _raise_if_backing_off(shelf, backoff)
    shelf.counters.fetches += 1
    started = time.time()
    try:
        data = yield FETCH
    except Exception as exc:
        failure: Exception | None = exc
    else:
        failure = None
    shelf.timed("fetch", key, time.time() - started, ok=failure is None)
    if failure is not None:  # not raised inside the except: a storage error stays unchained
        if config.fetch_backoff_seconds > 0 and not isinstance(failure, CALLERS_BUGS):
            status = failure.status if isinstance(failure, TokenFetchError) else None
            until = time.time() + config.fetch_backoff_seconds
            mark = Backoff(until, type(failure).__name__, status)
            shelf.memory.mark(key.ident, mark)
            if generation is not None:
                try:
                    yield SetBackoff(key.digest, mark)
                except StorageError as exc:
                    shelf.storage_failed(exc)
        raise failure
    entry = normalize(data, now=started, expires_at=None, config=config)
    if generation is None:
        shelf.keep(key, entry)  # before the waiters go: a caller after them finds it
    yield Land(entry)  # this process's waiters have it now, before the store is written
    if generation is not None:
        try:
            yield from shelf.store(key, entry, generation, fence)
        except StorageError as exc:
            shelf.storage_failed(exc)
            generation = None  # waited once already: no more writes in this call
            shelf.keep(key, entry)
    yield UNLOCK  # other processes' waiters read it from the store now
    if generation is not None:
        try:
            yield from shelf.prune_if_due()  # best effort: never waits for the write lock
        except StorageError as exc:
            shelf.storage_failed(exc)
    return entry


def _capped(shelf: Shelf, key: Key, backoff: Backoff, now: float) -> Flight[Backoff]:
    """A stored mark honoured at most ``fetch_backoff_seconds`` from ``now``: one written
    under a clock ahead of ours, or planted, is cut to that in the store too (Redis answers by
    the server's clock and never needs it)."""
    cap = shelf.config.fetch_backoff_seconds
    if cap <= 0 or backoff.until - now <= cap:
        return backoff
    backoff = backoff._replace(until=now + cap)
    try:
        yield SetBackoff(key.digest, backoff)
    except StorageError as exc:
        shelf.storage_failed(exc)
    return backoff


def _raise_if_backing_off(shelf: Shelf, backoff: Backoff | None) -> None:
    if backoff is None or shelf.config.fetch_backoff_seconds <= 0:
        return
    # Capped on read too: a stepped clock never blocks a key for longer.
    left = min(backoff.until - time.time(), shelf.config.fetch_backoff_seconds)
    if left > 0:
        shelf.counters.backoff_rejections += 1
        raise FetchBackoffError(
            retry_after=left, cause_type=cause_word(backoff.cause), status=backoff.status
        )


CAUSE_WORD_MAX = 64


def cause_word(text: str) -> str:
    """A mark's cause as shown in errors and logs: a Python class name, else ``"error"``
    (a mark is written by anyone with access to the store: its text is never echoed raw)."""
    ok = len(text) <= CAUSE_WORD_MAX and text.isascii() and text.isidentifier()
    return text if ok else "error"


def _peek(shelf: Shelf, key: Key) -> Flight[CachedToken | None]:
    """The usable token stored now, without the cross-process lock (None on any trouble:
    it is met again, and counted, under the lock)."""
    try:
        snap: Snapshot = yield key.read
    except StorageError:
        return None
    return shelf.judge(key, snap, time.time()).entry


def _left(wait: float | None, deadline: float) -> float | None:
    return None if wait is None else max(0.0, deadline - time.monotonic())


# -- drivers ------------------------------------------------------------------------------------


class _Steps(Generic[T]):
    """Steps through one flight: iterate for the next step, answer or fail it.

    Used as a context manager, it gives back every lock still held when it ends, and lands
    the key's flight in this process if this flight leads it.
    """

    def __init__(self, flight: Flight[T], locks: KeyLocks) -> None:
        self.flight = flight
        self.locks = locks
        self.held: list[Release] = []
        self.leading: tuple[Ident, InFlight] | None = None
        self.result: T
        self._answer: Any = None
        self._error: BaseException | None = None

    def __iter__(self) -> _Steps[T]:
        return self

    def __next__(self) -> Step:
        error, self._error = self._error, None
        try:
            if error is not None:
                return self.flight.throw(error)
            return self.flight.send(self._answer)
        except StopIteration as done:
            self.result = done.value
            raise StopIteration from None

    def answer(self, value: Any) -> None:
        self._answer = value

    def fail(self, error: BaseException) -> None:
        self._answer, self._error = None, error

    def joined(self, ident: Ident, outcome: tuple[Any, InFlight | None]) -> None:
        if outcome[1] is not None:
            self.leading = (ident, outcome[1])
        self.answer(outcome[0])

    def locked(self, taken: tuple[LockResult, Release]) -> None:
        self.held.append(taken[1])
        self.answer(taken[0])

    def land(self, entry: CachedToken | None) -> None:
        """Release every waiter of the key's flight in this process with ``entry``."""
        self._answer = None
        leading, self.leading = self.leading, None
        if leading is not None:
            self.locks.land(leading[0], leading[1], entry)

    def unlock(self) -> None:
        """Give back every lock held, the last taken first."""
        self._answer = None
        while self.held:
            self.held.pop()()

    def __enter__(self) -> _Steps[T]:
        return self

    def __exit__(self, exc_type: object, *exc_info: object) -> None:
        self.unlock()
        result = getattr(self, "result", None) if exc_type is None else None
        self.land(result if isinstance(result, CachedToken) else None)
        self.flight.close()


class Driver:
    """Performs steps for one cache: on its backend, its locks and a caller's fetch; tells
    ``health`` how each storage operation went."""

    def __init__(self, backend: Backend, locks: KeyLocks, health: Health) -> None:
        self.backend = backend
        self.locks = locks
        self.health = health

    def _failed(self, op: Op[Any], exc: StorageError) -> None:
        quiet = isinstance(exc, StorageUnavailable)  # the store said why when it gave up
        self.health.failed(str(exc), WRITE if op.writes else READ, quiet=quiet)

    def _done(self, op: Op[Any]) -> None:
        if self.health.state:
            self.health.succeeded(WRITE if op.writes else READ)

    def run(self, flight: Flight[T], fetch: Fetch | None = None) -> T:
        """Perform ``flight`` with plain calls."""
        with _Steps(flight, self.locks) as steps:
            for step in steps:
                try:
                    if isinstance(step, Join):
                        steps.joined(step.ident, self.locks.join(step.ident, step.wait))
                    elif isinstance(step, TakeLock):
                        steps.locked(self.locks.acquire(step.digest, step.wait))
                    elif isinstance(step, Land):
                        steps.land(step.entry)
                    elif step is UNLOCK:
                        steps.unlock()
                    elif step is FETCH:
                        steps.answer(fetch())  # type: ignore[misc]  # given with FETCH
                    else:
                        op: Op[Any] = step  # type: ignore[assignment]  # the only step left
                        try:
                            steps.answer(self.backend.execute(op))
                        except StorageError as exc:
                            self._failed(op, exc)
                            raise
                        self._done(op)
                except Exception as exc:
                    steps.fail(exc)
        return steps.result

    async def arun(self, flight: Flight[T], afetch: AFetch | None = None) -> T:
        """Perform ``flight`` with awaits."""
        with _Steps(flight, self.locks) as steps:
            for step in steps:
                try:
                    if isinstance(step, Join):
                        steps.joined(step.ident, await self.locks.ajoin(step.ident, step.wait))
                    elif isinstance(step, TakeLock):
                        steps.locked(await self.locks.aacquire(step.digest, step.wait))
                    elif isinstance(step, Land):
                        steps.land(step.entry)
                    elif step is UNLOCK:
                        steps.unlock()
                    elif step is FETCH:
                        steps.answer(await afetch())  # type: ignore[misc]  # given with FETCH
                    else:
                        op: Op[Any] = step  # type: ignore[assignment]  # the only step left
                        try:
                            steps.answer(await self.backend.aexecute(op))
                        except StorageError as exc:
                            self._failed(op, exc)
                            raise
                        self._done(op)
                except Exception as exc:
                    steps.fail(exc)
        return steps.result
