"""The one way tests and benchmarks run worker processes: start them together behind a
barrier, collect one report from each, fail fast when one dies, and always reap them.

    with Workers("spawn", timeout=60) as workers:
        workers.start(target, [(db, 16)] * 4)   # each runs target(db, 16, worker)
        results = workers.collect()             # one worker.report(...) from each
        workers.join()                          # every exit code 0, or WorkerError

A target is a module-level function (spawn pickles it) whose last argument is its
:class:`Worker`: ``worker.wait()`` is the start line shared by the batch, ``worker.report(x)``
sends ``x`` to the parent.
"""

from __future__ import annotations

import multiprocessing
import queue
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.connection import wait
from multiprocessing.process import BaseProcess
from typing import Any, Literal

Method = Literal["spawn", "fork", "forkserver"]


class WorkerError(RuntimeError):
    """A worker process died, exited non-zero, or did not answer in time."""


@dataclass(frozen=True)
class Worker:
    """A worker's handle on its batch: its index, the shared start line and the outbox."""

    index: int
    barrier: Any
    outbox: Any
    timeout: float

    def wait(self) -> None:
        """Block until every worker started with this one is here too."""
        self.barrier.wait(self.timeout)

    def report(self, value: Any) -> None:
        """Send ``value`` to the parent's :meth:`Workers.collect`."""
        self.outbox.put((self.index, value))


class Workers:
    """Worker processes of one start method; leaving the ``with`` block reaps every one."""

    def __init__(self, method: Method = "spawn", *, timeout: float = 120.0) -> None:
        self.ctx = multiprocessing.get_context(method)
        self.timeout = timeout
        self.procs: list[BaseProcess] = []
        self._outbox = self.ctx.Queue()
        self._inbox: list[deque[Any]] = []
        self._barriers: list[Any] = []  # alive until reaped: spawned children unpickle them late

    def start(
        self, target: Callable[..., None], per_worker: Sequence[tuple[Any, ...]]
    ) -> list[BaseProcess]:
        """One process per argument tuple, run as ``target(*args, worker)``; all share a barrier."""
        barrier = self.ctx.Barrier(len(per_worker))
        self._barriers.append(barrier)
        started = []
        for args in per_worker:
            worker = Worker(len(self.procs), barrier, self._outbox, self.timeout)
            proc = self.ctx.Process(target=target, args=(*args, worker), daemon=True)
            proc.start()
            self.procs.append(proc)
            self._inbox.append(deque())
            started.append(proc)
        return started

    def collect(self, procs: Sequence[BaseProcess] | None = None) -> list[Any]:
        """The next report of each of ``procs`` (default: every worker), in their order.

        Raises :class:`WorkerError` as soon as one of them has exited without reporting.
        """
        wanted = [self.procs.index(p) for p in (self.procs if procs is None else procs)]
        deadline = time.monotonic() + self.timeout
        while missing := [i for i in wanted if not self._inbox[i]]:
            if self._receive(timeout=0.1):
                continue
            # Exited before the drain below: whatever it sent is in the pipe by now.
            gone = [i for i in missing if self.procs[i].exitcode is not None]
            while self._receive(timeout=0):
                pass
            silent = [self.procs[i].exitcode for i in gone if not self._inbox[i]]
            if silent:
                raise WorkerError(f"worker(s) exited without a report, codes {silent}")
            if time.monotonic() > deadline:
                raise WorkerError(f"{len(missing)} worker(s) did not report in time")
        return [self._inbox[i].popleft() for i in wanted]

    def _receive(self, timeout: float) -> bool:
        """File one report into its worker's inbox; False when none came within ``timeout``."""
        try:
            index, value = (
                self._outbox.get(timeout=timeout) if timeout else self._outbox.get_nowait()
            )
        except queue.Empty:
            return False
        self._inbox[index].append(value)
        return True

    def join(self) -> None:
        """Wait for every worker to exit; raise :class:`WorkerError` at the first failure."""
        deadline = time.monotonic() + self.timeout
        running = list(self.procs)
        while running:
            wait([p.sentinel for p in running], timeout=max(0.0, deadline - time.monotonic()))
            for proc in [p for p in running if p.exitcode is not None]:
                running.remove(proc)
                proc.join()
                if proc.exitcode != 0:
                    raise WorkerError(f"worker {proc.pid} exited with {proc.exitcode}")
            if running and time.monotonic() > deadline:
                raise WorkerError(f"{len(running)} worker(s) still running after {self.timeout}s")

    def reap(self) -> None:
        """Kill whatever still runs and join every process (safe to call twice)."""
        for proc in self.procs:
            if proc.is_alive():
                proc.kill()
            proc.join()

    def __enter__(self) -> Workers:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.reap()


def run_together(
    target: Callable[..., None],
    per_worker: Sequence[tuple[Any, ...]],
    *,
    method: Method = "spawn",
    timeout: float = 120.0,
) -> list[Any]:
    """Start one worker per argument tuple, return one report from each, reap them all."""
    with Workers(method, timeout=timeout) as workers:
        workers.start(target, per_worker)
        results = workers.collect()
        workers.join()
    return results
