"""The gates in front of the Redis pools (``backends/_redis_conn.py``): at most ``size``
commands in flight, the others served in order, a slot never lost to a caller that gave up
(a cancelled task, an interrupted thread), and the end of a burst reported once, with the
pool to itself while it is trimmed. No server needed."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

pytest.importorskip("redis")

from agw_persist_cache.backends._redis_conn import IDLE_CONNECTIONS, Gate, LoopGate


def test_threads_beyond_the_size_wait_their_turn_in_order() -> None:
    gate, inside, most, order = Gate(1), [0], [0], []
    lock, go = threading.Lock(), threading.Event()

    def caller(i: int) -> None:
        gate.enter()
        with lock:
            inside[0] += 1
            most[0] = max(most[0], inside[0])
            order.append(i)
        go.wait(10)
        time.sleep(0.01)
        with lock:
            inside[0] -= 1
        gate.leave()

    threads = [threading.Thread(target=caller, args=(i,)) for i in range(8)]
    for i, t in enumerate(threads):
        t.start()
        deadline = time.monotonic() + 10
        while len(order) + len(gate.slots.turns) <= i and time.monotonic() < deadline:
            time.sleep(0.001)  # in, or in the queue: the next one arrives after it
    go.set()
    for t in threads:
        t.join(10)
    assert most[0] == 1
    assert order == list(range(8))  # one at a time, first come first served
    assert gate.slots.busy == 0


async def test_a_task_cancelled_while_waiting_or_just_handed_the_slot_loses_no_slot() -> None:
    gate = LoopGate(1)
    await gate.enter()
    waiting = asyncio.ensure_future(gate.enter())
    handed = asyncio.ensure_future(gate.enter())
    await asyncio.sleep(0)
    waiting.cancel()  # gives up while waiting
    await asyncio.sleep(0)
    gate.leave()  # skips the cancelled turn: the slot goes to the next waiter...
    handed.cancel()  # ...which is cancelled before it runs again: it passes the slot on
    with pytest.raises(asyncio.CancelledError):
        await handed
    assert gate.slots.busy == 0
    await asyncio.wait_for(gate.enter(), 1)  # the slot is free
    assert gate.leave() is False


async def test_the_end_of_a_burst_is_reported_once_and_trimming_runs_alone() -> None:
    gate = LoopGate(8)
    for _ in range(IDLE_CONNECTIONS + 1):
        await gate.enter()
    assert [gate.leave() for _ in range(IDLE_CONNECTIONS)] == [False] * IDLE_CONNECTIONS
    assert gate.leave() is True  # the last one out of a burst trims the pool
    late = asyncio.ensure_future(gate.enter())
    await asyncio.sleep(0.01)
    assert not late.done()  # no command takes a connection while the pool is trimmed
    gate.trimmed()
    await asyncio.wait_for(late, 1)
    assert gate.leave() is False  # a single command is no burst
    assert gate.slots.busy == 0
