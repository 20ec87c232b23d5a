"""The steps of a cache's flows, and how one cache performs them.

A flow (see ``_steps``) yields: a storage operation of the contract (``Op``), performed on
the backend, the cache's health hearing how it went; :class:`Join` (the key's flight in
this process: lead it, or wait for its leader's one result) and :class:`Land` (hand the
token to every waiter of it at once), performed on ``_locks``; :class:`TakeLock` (the key's
cross-process lock, the backend's); :data:`UNLOCK` (give back the locks); :data:`FETCH`
(call the caller's token fetch). :class:`Runner` performs them with plain calls
(:meth:`~Runner.drive`) or awaits (:meth:`~Runner.adrive`); locks are given back and
waiters released whatever happens.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from ._expiry import CachedToken
from ._health import READ, WRITE, Health
from ._locks import InFlight, KeyLocks, Release
from ._memory import Ident
from ._steps import Flow, adrive, drive
from .backends.contract import Backend, LockResult, Op, StorageError, StorageUnavailable

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Join:
    """Join the key's flight in this process within ``wait`` seconds (``None``: only lead,
    never wait); answered with the leader's token or a :class:`~._locks.Joined`."""

    ident: Ident
    wait: float | None


@dataclass(frozen=True, slots=True)
class TakeLock:
    """Take the key's cross-process lock within ``wait`` seconds (``None``: one try);
    answered with a LockResult."""

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
"""Give back every lock this flow holds (other processes' waiters then read the store)."""
FETCH = _Marker("FETCH")
"""Call the caller's fetch; its result (or exception) comes back into the flow."""


class Runner:
    """Performs the steps of one cache's flows: on its backend, its in-process flights and
    locks (rebuilt in a forked child: :meth:`after_fork`), and a caller's fetch."""

    def __init__(self, backend: Backend, health: Health) -> None:
        self.backend = backend
        self.health = health
        self.after_fork()

    def after_fork(self) -> None:
        """Fresh in-process flights (a forked child's are not the parent's)."""
        self.locks = KeyLocks(self.backend)

    def drive(self, flow: Flow[Any, T], fetch: Callable[[], Any] | None = None) -> T:
        """Run ``flow`` with plain calls; ``fetch`` answers its FETCH."""
        with _Run(self, fetch) as run:
            run.result = drive(flow, run.perform)
        return run.result  # type: ignore[no-any-return]  # what the flow returned

    async def adrive(self, flow: Flow[Any, T], afetch: Callable[[], Any] | None = None) -> T:
        """Run ``flow`` with awaits; ``afetch`` answers its FETCH."""
        with _Run(self, afetch) as run:
            run.result = await adrive(flow, run.aperform)
        return run.result  # type: ignore[no-any-return]  # what the flow returned

    def execute(self, op: Op[T]) -> T:
        """``op`` on the store; the health hears how it went."""
        try:
            result = self.backend.execute(op)
        except StorageError as exc:
            raise self.failed(op, exc) from None
        return self.done(op, result)

    async def aexecute(self, op: Op[T]) -> T:
        """Async twin of :meth:`execute`."""
        try:
            result = await self.backend.aexecute(op)
        except StorageError as exc:
            raise self.failed(op, exc) from None
        return self.done(op, result)

    def failed(self, op: Op[Any], exc: StorageError) -> StorageError:
        """The health hears that ``op`` failed; returns ``exc`` to raise."""
        quiet = isinstance(exc, StorageUnavailable)  # the store said why when it gave up
        self.health.failed(str(exc), WRITE if op.writes else READ, quiet=quiet)
        return exc

    def done(self, op: Op[Any], result: T) -> T:
        """The health hears that ``op`` succeeded; returns ``result``."""
        if self.health.state:
            self.health.succeeded(WRITE if op.writes else READ)
        return result


class _Run:
    """One flow's run: performs its steps; on leaving, gives back the locks it still holds
    and ends the key's flight in this process if it still leads one (its waiters then look
    again: a flow that has a token for them lands it with a Land step)."""

    __slots__ = ("fetch", "held", "leading", "result", "runner")

    def __init__(self, runner: Runner, fetch: Callable[[], Any] | None) -> None:
        self.runner = runner
        self.fetch = fetch
        self.held: list[Release] = []
        self.leading: tuple[Ident, InFlight] | None = None
        self.result: Any = None

    def perform(self, step: Any) -> Any:
        locks = self.runner.locks
        if isinstance(step, Op):
            return self.runner.execute(step)
        if isinstance(step, Join):
            return self._joined(step.ident, locks.join(step.ident, step.wait))
        if isinstance(step, TakeLock):
            return self._locked(locks.acquire(step.digest, step.wait))
        if step is FETCH:
            return self.fetch()  # type: ignore[misc]  # given with every flow that fetches
        return self._local(step)

    async def aperform(self, step: Any) -> Any:
        locks = self.runner.locks
        if isinstance(step, Op):
            return await self.runner.aexecute(step)
        if isinstance(step, Join):
            return self._joined(step.ident, await locks.ajoin(step.ident, step.wait))
        if isinstance(step, TakeLock):
            return self._locked(await locks.aacquire(step.digest, step.wait))
        if step is FETCH:
            return await self.fetch()  # type: ignore[misc]  # given with every flow that fetches
        return self._local(step)

    def _joined(self, ident: Ident, outcome: tuple[Any, InFlight | None]) -> Any:
        if outcome[1] is not None:
            self.leading = (ident, outcome[1])
        return outcome[0]

    def _locked(self, taken: tuple[LockResult, Release]) -> LockResult:
        self.held.append(taken[1])
        return taken[0]

    def _local(self, step: Any) -> None:
        """The steps with nothing to wait for: land the flight, give back the locks."""
        if isinstance(step, Land):
            self._land(step.entry)
        elif step is UNLOCK:
            self._unlock()
        else:
            raise TypeError(f"not a step: {step!r}")

    def _land(self, entry: CachedToken | None) -> None:
        leading, self.leading = self.leading, None
        if leading is not None:
            self.runner.locks.land(leading[0], leading[1], entry)

    def _unlock(self) -> None:
        while self.held:  # the last taken first
            self.held.pop()()

    def __enter__(self) -> _Run:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._unlock()
        self._land(None)  # a flight not landed by its flow: its waiters look again
