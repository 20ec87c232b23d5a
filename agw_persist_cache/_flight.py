"""Get-or-fetch with single flight, and the runs of every flow of one cache.

:class:`Flights` is what ``PersistentTokenCache`` calls, once per call. A get or a
get-or-fetch derives the key once (``_shelf``), reads the store once: a clean hit returns
from there. Anything else becomes one *flow* (a generator of steps, see ``_steps``) run by
:meth:`Flights.run`-style drivers: the lookup's follow-up write, or the single flight of a
miss (:meth:`Flights._fill`): join the key's flight in this process (``_locks``), take the
key's cross-process lock (the backend's), read again under it, honour back-off, call the
caller's fetch, hand the token to this process's waiters, store it (``_writes``), let go.
Sets, invalidations, clears, prunes and reports are flows of ``_writes`` and ``_survey``,
run the same way. The steps: a storage operation (``backends.contract.Op``), :class:`Join`,
:class:`TakeLock`, :class:`Land`, :data:`UNLOCK` and :data:`FETCH`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeAlias, TypeVar

from . import _fork, _survey, _writes
from ._errors import FetchBackoffError, TokenFetchError
from ._expiry import CachedToken, TokenData, normalize
from ._locks import Joined
from ._run import FETCH, UNLOCK, Join, Land, Runner, TakeLock
from ._shelf import Key, Lookup, TokenShelf
from ._steps import Flow
from .backends.contract import (
    ABSENT,
    Backend,
    Backoff,
    Fence,
    GetBackoff,
    LockResult,
    OpFlow,
    Read,
    SetBackoff,
    Snapshot,
    StorageError,
)

T = TypeVar("T")
Fetch: TypeAlias = Callable[[], TokenData]
AFetch: TypeAlias = Callable[[], Awaitable[TokenData]]
KeyFlow: TypeAlias = Callable[..., OpFlow[T]]
"""A flow of one key: called with the shelf, the key and its own arguments."""

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

CAUSE_WORD_MAX = 64


class Flights:
    """One cache's calls: the hot read, the single flight, and the drivers of every flow."""

    def __init__(self, shelf: TokenShelf, backend: Backend) -> None:
        self.shelf = shelf
        self.backend = backend
        self.config = shelf.config
        self.runner = Runner(backend, shelf.health)
        self.tasks: set[asyncio.Task[Any]] = set()  # this loop's background refreshes
        _fork.in_child(self.runner.after_fork)

    # -- per key: derive the key once, read once ------------------------------------------------

    def get(self, kind: str, scope_key: str, user_jwt: str | None) -> CachedToken | None:
        key = self.shelf.key(kind, scope_key, user_jwt)
        seen = self._look(key, self.backend.execute)
        if _settled(seen, self.shelf.keys_compared):
            return seen.entry  # type: ignore[union-attr]  # _settled: not None
        return self.runner.drive(self._lookup(key, seen)).entry

    async def aget(self, kind: str, scope_key: str, user_jwt: str | None) -> CachedToken | None:
        key = await self._akey(kind, scope_key, user_jwt)
        seen = self._look(key, self.backend.read_inline)  # a hit stays on the loop's thread
        if _settled(seen, self.shelf.keys_compared):
            return seen.entry  # type: ignore[union-attr]  # _settled: not None
        return (await self.runner.adrive(self._lookup(key, seen))).entry

    def fetch(self, kind: str, scope_key: str, user_jwt: str | None, fetch: Fetch) -> CachedToken:
        key = self.shelf.key(kind, scope_key, user_jwt)
        seen = self._look(key, self.backend.execute)
        if _fresh(seen):
            return seen.entry  # type: ignore[union-attr, return-value]  # _fresh: a token
        entry, refresh = self.runner.drive(self._get_or_fetch(key, seen), fetch)
        if refresh:
            _fork.start_thread("agw-cache-refresh", self._refresh, key, fetch)
        return entry

    async def afetch(
        self, kind: str, scope_key: str, user_jwt: str | None, afetch: AFetch
    ) -> CachedToken:
        key = await self._akey(kind, scope_key, user_jwt)
        seen = self._look(key, self.backend.read_inline)
        if _fresh(seen):
            return seen.entry  # type: ignore[union-attr, return-value]  # _fresh: a token
        entry, refresh = await self.runner.adrive(self._get_or_fetch(key, seen), afetch)
        if refresh:  # a task of this loop
            task = asyncio.get_running_loop().create_task(self._arefresh(key, afetch))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
        return entry

    def on_key(self, flow: KeyFlow[T], kind: str, scope: str, jwt: str | None, *args: Any) -> T:
        """Run ``flow(shelf, key, *args)`` (a set, an invalidation) for the key."""
        key = self.shelf.key(kind, scope, jwt)
        return self.runner.drive(flow(self.shelf, key, *args))

    async def aon_key(self, flow: KeyFlow[T], kind: str, scope: str, jwt: str | None, *a: Any) -> T:
        """Async twin of :meth:`on_key`."""
        key = await self._akey(kind, scope, jwt)
        return await self.runner.adrive(flow(self.shelf, key, *a))

    def run(self, flow: Callable[..., OpFlow[T]], *args: Any) -> T:
        """Run ``flow(shelf, *args)``: a whole-store flow (clear, prune, stats, ...)."""
        return self.runner.drive(flow(self.shelf, *args))

    async def arun(self, flow: Callable[..., OpFlow[T]], *args: Any) -> T:
        """Async twin of :meth:`run`."""
        await self._aring()
        return await self.runner.adrive(flow(self.shelf, *args))

    async def _akey(self, kind: str, scope_key: str, user_jwt: str | None) -> Key:
        await self._aring()
        return self.shelf.key(kind, scope_key, user_jwt)

    async def _aring(self) -> None:
        if self.shelf.needs_key_file:  # read or create it off the event loop's thread
            await asyncio.to_thread(self.shelf.ring)

    def _look(self, key: Key, read: Callable[[Read], Snapshot | None]) -> Lookup | None:
        """The one read before any lock, judged and counted; None when ``read`` could not
        answer at once (then the flow reads) or the key is local (memory only)."""
        if key.local:
            return None
        try:
            snap = read(key.read)
        except StorageError as exc:
            self.runner.failed(key.read, exc)
            return self.shelf.unreadable(key, exc)
        if snap is None:
            return None
        if self.shelf.down:
            self.runner.done(key.read, snap)
        return self.shelf.seen(key, snap)

    # -- the flows of a get and a get-or-fetch --------------------------------------------------

    def _lookup(self, key: Key, seen: Lookup | None) -> Flow[Any, Lookup]:
        """Finish a read: make it if not made yet, write what it calls for, and at the
        process's first miss compare the keys."""
        shelf = self.shelf
        if seen is None:
            if key.local:
                return shelf.unreadable(key, None)
            try:
                seen = shelf.seen(key, (yield key.read))
            except StorageError as exc:
                return shelf.unreadable(key, exc)
        try:
            if seen.followup is not None:
                yield seen.followup
            if seen.entry is None and not shelf.keys_compared and shelf.uses_store(key):
                yield from _survey.compare_keys(shelf)
        except StorageError as exc:
            shelf.storage_failed(exc)
        return seen

    def _get_or_fetch(self, key: Key, seen: Lookup | None) -> Flow[Any, tuple[CachedToken, bool]]:
        """A hit (and whether to refresh it in the background), or the single flight."""
        lookup = yield from self._lookup(key, seen)
        if lookup.entry is not None:
            return lookup.entry, lookup.due and self.shelf.may_refresh(key)
        entry = yield from self._fill(key, refresh=False)
        assert entry is not None  # only a refresh ends without a token
        yield Land(entry)  # (if the fill returned early, e.g. the store had it under the lock)
        return entry, False

    def _fill(self, key: Key, *, refresh: bool) -> Flow[Any, CachedToken | None]:
        """The single flight of a miss: join the key's flight in this process; its leader
        takes the cross-process lock, reads again, honours back-off, fetches and stores
        (unless a clear came meanwhile), then hands the token to every waiter at once.

        With ``refresh`` (refresh-ahead in the background): only tries, never waits, and a
        token no longer due for refresh means another process already refreshed it (None).
        """
        shelf, config = self.shelf, self.config
        wait = None if refresh else config.lock_timeout_seconds
        asked = time.monotonic()
        deadline = asked + (wait or 0.0)
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
        if joined is Joined.TIMEOUT:
            shelf.lock_trouble(LockResult.TIMEOUT)
        elif joined is Joined.LEAD and shelf.uses_store(key):  # every process's flight
            while True:
                locked = yield TakeLock(key.digest, _left(wait, deadline))
                if locked is not LockResult.LANDED:
                    break
                # The flight ahead of ours has just ended: read before queueing again.
                try:
                    early = (yield from self._stored(key))[2].entry
                except StorageError:
                    early = None  # met again, and counted, under the lock
                if early is not None:
                    shelf.timed("lock", key, time.monotonic() - asked)
                    return None if refresh else early
            if locked is LockResult.BUSY or (refresh and locked is not LockResult.HELD):
                return None  # someone else is refreshing this very key
            if locked is not LockResult.HELD:
                shelf.lock_trouble(locked)
        shelf.timed("lock", key, time.monotonic() - asked)
        now = time.time()
        generation: int | None = None
        fence = ABSENT  # the row this fetch replaces: a newer one written meanwhile stays
        backoff: Backoff | None = None
        if shelf.uses_store(key):
            try:  # another process may have just written it
                generation, fence, lookup = yield from self._stored(key)
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
            yield from self._back_off(key, failure, stored=generation is not None)
            raise failure
        entry = normalize(data, now=started, expires_at=None, config=config)
        if generation is None:
            shelf.keep(key, entry)  # before the waiters go: a caller after them finds it
        yield Land(entry)  # this process's waiters have it now, before the store is written
        if generation is not None:
            try:
                yield from _writes.store(shelf, key, entry, generation, fence)
            except StorageError as exc:
                shelf.storage_failed(exc)
                generation = None  # waited once already: no more writes in this call
                shelf.keep(key, entry)
        yield UNLOCK  # other processes' waiters read it from the store now
        if generation is not None:
            try:
                yield from _writes.prune_if_due(shelf)  # best effort: never waits
            except StorageError as exc:
                shelf.storage_failed(exc)
        return entry

    def _stored(self, key: Key) -> Flow[Any, tuple[int, bytes, Lookup]]:
        """What the store holds for ``key`` now: the generation, the nonce of the row a
        fetch would replace (``ABSENT``: none), and what it means (its follow-up done)."""
        snap: Snapshot = yield key.read
        generation = snap.generation
        row = snap.row
        fence = row.nonce if row is not None and row.digest == key.digest else ABSENT
        lookup = self.shelf.judge(key, snap, time.time())
        if lookup.followup is not None:
            done = yield lookup.followup
            if isinstance(lookup.followup, Fence):  # the store had gone back: now not
                generation = done
        return generation, fence, lookup

    def _back_off(self, key: Key, failure: Exception, *, stored: bool) -> Flow[Any, None]:
        """A failed fetch: unless it is the caller's bug, every caller of the key in this
        process (and, ``stored``, in every process) fails fast for a while."""
        seconds = self.config.fetch_backoff_seconds
        if seconds <= 0 or isinstance(failure, CALLERS_BUGS):
            return
        status = failure.status if isinstance(failure, TokenFetchError) else None
        mark = Backoff(time.time() + seconds, type(failure).__name__, status)
        self.shelf.memory.mark(key.ident, mark)
        if stored:
            try:
                yield SetBackoff(key.digest, mark)
            except StorageError as exc:
                self.shelf.storage_failed(exc)

    # -- refresh-ahead ---------------------------------------------------------------------------

    def _refresh(self, key: Key, fetch: Fetch) -> None:
        try:
            self.shelf.refreshed(self.runner.drive(self._fill(key, refresh=True), fetch))
        except Exception as exc:
            self.shelf.refreshed(exc)

    async def _arefresh(self, key: Key, afetch: AFetch) -> None:
        try:
            outcome = await self.runner.adrive(self._fill(key, refresh=True), afetch)
        except Exception as exc:
            self.shelf.refreshed(exc)
        else:
            self.shelf.refreshed(outcome)

    # -- the drivers -----------------------------------------------------------------------------


def _fresh(seen: Lookup | None) -> bool:
    """A get-or-fetch's read needs no flow: a token, nothing to write, no refresh due."""
    return seen is not None and seen.entry is not None and seen.followup is None and not seen.due


def _settled(seen: Lookup | None, keys_compared: bool) -> bool:
    """A get's read needs no flow: nothing to write, and no first miss to look into."""
    return seen is not None and seen.followup is None and (seen.entry is not None or keys_compared)


def _capped(shelf: TokenShelf, key: Key, backoff: Backoff, now: float) -> OpFlow[Backoff]:
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


def _raise_if_backing_off(shelf: TokenShelf, backoff: Backoff | None) -> None:
    if backoff is None or shelf.config.fetch_backoff_seconds <= 0:
        return
    # Capped on read too: a stepped clock never blocks a key for longer.
    left = min(backoff.until - time.time(), shelf.config.fetch_backoff_seconds)
    if left > 0:
        shelf.counters.backoff_rejections += 1
        raise FetchBackoffError(
            retry_after=left, cause_type=cause_word(backoff.cause), status=backoff.status
        )


def cause_word(text: str) -> str:
    """A mark's cause as shown in errors and logs: a Python class name, else ``"error"``
    (a mark is written by anyone with access to the store: its text is never echoed raw)."""
    ok = len(text) <= CAUSE_WORD_MAX and text.isascii() and text.isidentifier()
    return text if ok else "error"


def _left(wait: float | None, deadline: float) -> float | None:
    return None if wait is None else max(0.0, deadline - time.monotonic())
