"""Single flight, written once: every multi-step decision of the cache is a generator.

A flight yields *steps* and receives their results, with no I/O of its own (the
httpx ``Auth.auth_flow`` pattern). There are four kinds of step: a storage operation
of the contract (:class:`~.backends.contract.Op`), :class:`TakeLock` (the key's
in-process lock, then its cross-process lock), :data:`UNLOCK` (give back every lock
taken so far) and :data:`FETCH` (call the caller's token fetch). Two small drivers
perform them: :func:`run` with plain calls and :func:`arun` with awaits. A step that
fails is thrown into the flight, which decides; locks are given back whatever happens.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Generator
from dataclasses import dataclass
from typing import Any, Generic, NamedTuple, Protocol, TypeAlias, TypeVar

from ._config import CacheConfig
from ._errors import FetchBackoffError, TokenFetchError
from ._expiry import CachedToken, TokenData, normalize
from ._locks import KeyLocks, Release
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
)

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Key:
    """What identifies a cached token: kind, scope and user (as a hash), and its digests."""

    kind: str
    scope_key: str
    uhash: str
    digests: tuple[bytes, ...]  # one per configured key; new rows go under the first
    read: Read  # the lookup of this key, built once

    @property
    def digest(self) -> bytes:
        return self.digests[0]

    def __repr__(self) -> str:
        return f"Key(kind={self.kind!r}, digest={self.digest.hex()[:12]}...)"


@dataclass(frozen=True, slots=True)
class TakeLock:
    """Take the key's locks within ``wait`` seconds (``None``: one try); yields a LockResult.

    ``local`` / ``cross``: the in-process lock, the cross-process lock, or both."""

    digest: bytes
    wait: float | None
    local: bool = True  # this process's lock of the key
    cross: bool = True  # every process's lock of the key


class _Marker:
    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


UNLOCK = _Marker("UNLOCK")
"""Give back every lock this flight holds (e.g. before pruning)."""
FETCH = _Marker("FETCH")
"""Call the caller's fetch; its result (or exception) comes back into the flight."""

Step: TypeAlias = "Op[Any] | TakeLock | _Marker"
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

    def judge(self, key: Key, snap: Snapshot, now: float) -> Lookup:
        """Open and check the row of a read."""

    def store(
        self, key: Key, entry: CachedToken, generation: int | None, fence: bytes | None = None
    ) -> Flight[bool]:
        """Seal and write ``entry`` unless a clear moved ``generation`` (or, with ``fence``,
        a newer row took the one read)."""

    def prune_if_due(self) -> Flight[int]:
        """Prune if this process has not for a while."""

    def storage_failed(self, exc: StorageError) -> None:
        """Count and warn once: a storage problem never fails a get-or-fetch."""

    def lock_trouble(self, result: LockResult, key: Key) -> None:
        """Count and warn about a lock that was not had (timeout or I/O error)."""

    def timed(self, what: str, key: Key, seconds: float, ok: bool = True) -> None:
        """A fetch (``what="fetch"``) or a lock wait (``"lock"``) took ``seconds``."""


def fill(shelf: Shelf, key: Key, *, refresh: bool) -> Flight[CachedToken | None]:
    """Under the key's locks: re-read, honour back-off, fetch, store unless cleared meanwhile.

    With ``refresh`` (refresh-ahead in the background): only a try of the locks, and a
    token no longer due for refresh means another process already refreshed it (None).
    """
    config = shelf.config
    wait = None if refresh else config.lock_timeout_seconds
    deadline = time.monotonic() + (wait or 0.0)
    asked = time.monotonic()
    locked = LockResult.HELD
    for cross in (False, True):  # this process's flight of the key, then every process's
        while True:
            left = None if wait is None else max(0.0, deadline - time.monotonic())
            locked = yield TakeLock(key.digest, left, local=not cross, cross=cross)
            if locked is not LockResult.LANDED:
                break
            # The flight ahead of ours has just ended: read before queueing again, so that
            # every waiter reads the token at once instead of taking the lock in turn.
            early = yield from _peek(shelf, key)
            if early is not None:
                shelf.timed("lock", key, time.monotonic() - asked)
                return None if refresh else early
        if locked is not LockResult.HELD:
            break
    shelf.timed("lock", key, time.monotonic() - asked)
    if locked is LockResult.BUSY or (refresh and locked is not LockResult.HELD):
        return None  # someone else is refreshing this very key
    if locked is not LockResult.HELD:
        shelf.lock_trouble(locked, key)
    now = time.time()
    generation: int | None = None
    fence = ABSENT  # the row this fetch replaces: a newer one written meanwhile stays
    backoff: Backoff | None = None
    cap = config.fetch_backoff_seconds
    try:
        snap: Snapshot = yield key.read  # another process may have just written it
        generation = snap.generation
        if snap.row is not None and snap.row.digest == key.digest:
            fence = snap.row.nonce
        lookup = shelf.judge(key, snap, now)
        if lookup.followup is not None:
            done = yield lookup.followup
            if isinstance(lookup.followup, Fence):  # the store had gone back: now it has not
                generation = done
        if lookup.entry is not None and not (refresh and lookup.due):
            return None if refresh else lookup.entry
        backoff = yield GetBackoff(key.digest, cap)
    except StorageError as exc:
        shelf.storage_failed(exc)
    if backoff is not None and cap > 0:
        left = backoff.until - now
        if left > cap:
            # Written under a clock ahead of ours, or planted: from now on it lasts the cap
            # at most (Redis answers by the server's clock and never comes here).
            left = cap
            try:
                yield SetBackoff(key.digest, backoff._replace(until=now + cap))
            except StorageError as exc:
                shelf.storage_failed(exc)
        if left > 0:
            shelf.counters.backoff_rejections += 1
            raise FetchBackoffError(
                retry_after=left, cause_type=cause_word(backoff.cause), status=backoff.status
            )
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
        if config.fetch_backoff_seconds > 0 and generation is not None:
            status = failure.status if isinstance(failure, TokenFetchError) else None
            until = time.time() + config.fetch_backoff_seconds
            try:
                yield SetBackoff(key.digest, Backoff(until, type(failure).__name__, status))
            except StorageError as exc:
                shelf.storage_failed(exc)
        raise failure
    entry = normalize(data, now=started, expires_at=None, config=config)
    if generation is not None:
        try:
            yield from shelf.store(key, entry, generation, fence)
        except StorageError as exc:
            shelf.storage_failed(exc)
            generation = None  # waited once already: no more writes in this call
    yield UNLOCK
    if generation is not None:
        try:
            yield from shelf.prune_if_due()  # best effort: never waits for the write lock
        except StorageError as exc:
            shelf.storage_failed(exc)
    return entry


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


# -- drivers ------------------------------------------------------------------------------------


class _Steps(Generic[T]):
    """Steps through one flight: iterate for the next step, answer or fail it.

    Used as a context manager, it gives back every lock still held when it ends.
    """

    def __init__(self, flight: Flight[T]) -> None:
        self.flight = flight
        self.held: list[Release] = []
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

    def unlock(self) -> None:
        """Give back every lock held, the last taken first."""
        self._answer = None
        while self.held:
            self.held.pop()()

    def __enter__(self) -> _Steps[T]:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.unlock()
        self.flight.close()


class Driver:
    """Performs steps for one cache: on its backend, its locks and a caller's fetch."""

    def __init__(self, backend: Backend, locks: KeyLocks) -> None:
        self.backend = backend
        self.locks = locks

    def _locked(self, steps: _Steps[Any], taken: tuple[LockResult, Release]) -> LockResult:
        steps.held.append(taken[1])
        return taken[0]

    def run(self, flight: Flight[T], fetch: Fetch | None = None) -> T:
        """Perform ``flight`` with plain calls."""
        with _Steps(flight) as steps:
            for step in steps:
                try:
                    if isinstance(step, TakeLock):
                        taken = self.locks.acquire(
                            step.digest, step.wait, local=step.local, cross=step.cross
                        )
                        steps.answer(self._locked(steps, taken))
                    elif step is UNLOCK:
                        steps.unlock()
                    else:
                        steps.answer(fetch() if step is FETCH else self.backend.execute(step))  # type: ignore[misc,arg-type]  # step is an Op here
                except Exception as exc:
                    steps.fail(exc)
        return steps.result

    async def arun(self, flight: Flight[T], afetch: AFetch | None = None) -> T:
        """Perform ``flight`` with awaits."""
        with _Steps(flight) as steps:
            for step in steps:
                try:
                    if isinstance(step, TakeLock):
                        ataken = await self.locks.aacquire(
                            step.digest, step.wait, local=step.local, cross=step.cross
                        )
                        steps.answer(self._locked(steps, ataken))
                    elif step is UNLOCK:
                        steps.unlock()
                    elif step is FETCH:
                        steps.answer(await afetch())  # type: ignore[misc]  # given with FETCH
                    else:
                        steps.answer(await self.backend.aexecute(step))  # type: ignore[arg-type]  # an Op
                except Exception as exc:
                    steps.fail(exc)
        return steps.result
