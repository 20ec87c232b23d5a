"""The one way a multi-step decision runs: a generator of steps and two tiny drivers.

A *flow* is a generator that yields the steps it needs (a storage operation, an SQL
statement, a lock attempt, an HTTP request, seconds to sleep) and receives each step's
result, or has the step's exception thrown in where it can decide (the httpx
``Auth.auth_flow`` pattern). It performs no I/O of its own. :func:`drive` performs the steps
with plain calls, :func:`adrive` with awaits; nothing else in the package steps a
generator by hand.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Generator
from typing import Any, Generic, TypeVar

S = TypeVar("S")
T = TypeVar("T")

Flow = Generator[S, Any, T]


class _Steps(Generic[S, T]):
    """Iterates a flow's steps; each step's answer (or error) goes in before the next."""

    __slots__ = ("answer", "error", "flow", "result")

    def __init__(self, flow: Flow[S, T]) -> None:
        self.flow = flow
        self.answer: Any = None
        self.error: Exception | None = None

    def __iter__(self) -> _Steps[S, T]:
        return self

    def __next__(self) -> S:
        error, self.error = self.error, None
        try:
            return self.flow.send(self.answer) if error is None else self.flow.throw(error)
        except StopIteration as done:
            self.result: T = done.value
            raise StopIteration from None

    def __enter__(self) -> _Steps[S, T]:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.flow.close()


def drive(flow: Flow[S, T], perform: Callable[[S], Any]) -> T:
    """Run ``flow``, each step performed by ``perform``; return what the flow returns.

    An ``Exception`` of a step is thrown into the flow (which may handle it); whatever the
    flow does not handle propagates, and the flow is closed either way.
    """
    with _Steps(flow) as steps:
        for step in steps:
            try:
                steps.answer = perform(step)
            except Exception as exc:
                steps.answer, steps.error = None, exc
    return steps.result


async def adrive(flow: Flow[S, T], perform: Callable[[S], Awaitable[Any]]) -> T:
    """Async twin of :func:`drive`: each step's performance is awaited."""
    with _Steps(flow) as steps:
        for step in steps:
            try:
                steps.answer = await perform(step)
            except Exception as exc:
                steps.answer, steps.error = None, exc
    return steps.result
