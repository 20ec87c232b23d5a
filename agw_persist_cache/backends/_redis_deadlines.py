"""Whole-command deadlines for the Redis connections of a process's threads.

A socket timeout bounds each read, not a command: a server or proxy that drips its reply
passes every one. A thread's connection is armed with the :class:`Watchdog` from a command's
first send to its last reply; the watchdog disconnects a connection whose command outlived
its deadline, and the command fails with :class:`Overran` (a redis-py ``TimeoutError``, so
it counts as the store's trouble). Event loops need none of this: ``asyncio.timeout``.
"""

from __future__ import annotations

import contextlib
import threading
import time
from typing import Any, ClassVar

import redis
import redis.connection
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from .. import _fork

WATCHDOG_IDLE_SECONDS = 5.0
"""The deadline thread ends after this long with no command in flight (and comes back)."""


class Overran(RedisTimeoutError):
    """A command ran past its deadline; the watchdog closed its connection."""


class Watchdog:
    """Disconnects a thread's connection whose command outlived its deadline.

    Arming and disarming are one dict operation each (atomic under the GIL; a hit must not
    pay for a lock or a thread switch). One thread looks every quarter of ``seconds``, and
    only while commands are being sent.
    """

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.armed: dict[Any, float] = {}
        self.calls = threading.local()  # .deadline: of the call this thread is making
        self._mutex = threading.Lock()
        self._running = False

    def begin(self) -> None:
        """This thread starts a call: its commands (a new connection's AUTH, SELECT and
        CLIENT SETINFO included) share one deadline."""
        self.calls.deadline = time.monotonic() + self.seconds

    def end(self) -> None:
        self.calls.deadline = None

    def arm(self, conn: Any) -> None:
        deadline = getattr(self.calls, "deadline", None)
        self.armed[conn] = deadline or time.monotonic() + self.seconds
        if not self._running:
            with self._mutex:
                if not self._running:
                    self._running = True
                    _fork.start_thread("agw-cache-redis-deadlines", self._run)

    def _run(self) -> None:
        step = self.seconds / 4
        quiet_since = time.monotonic()
        while True:
            time.sleep(step)
            now = time.monotonic()
            due = []
            for conn, deadline in list(self.armed.items()):  # (one C call: a snapshot)
                if deadline <= now:
                    due.append((conn, deadline))
            for conn, deadline in due:
                current = self.armed.pop(conn, None)
                if current is not deadline:  # its command ended, and maybe another began
                    if current is not None:
                        self.armed[conn] = current
                    continue
                # The reader fails (with whatever redis-py raises for a socket closed under
                # it) and reports Overran instead.
                conn.agw_overran = True
                with contextlib.suppress(OSError):
                    conn.disconnect()
            if self.armed:
                quiet_since = now
            elif now - quiet_since > WATCHDOG_IDLE_SECONDS:
                with self._mutex:
                    self._running = False
                if not self.armed:
                    return
                with self._mutex:  # armed just now: keep watching, unless a new watcher does
                    if self._running:
                        return
                    self._running = True


class _Watched:
    """Mixed into a redis-py connection class: a command, from its first send to its last
    reply (a fresh connection's AUTH/SELECT included), is armed with the watchdog."""

    agw_watchdog: ClassVar[Watchdog]
    agw_pending = 0
    agw_overran = False

    def send_packed_command(self, *args: Any, **kwargs: Any) -> None:
        if self.agw_pending == 0:
            self.agw_overran = False
            self.agw_watchdog.arm(self)
        self.agw_pending += 1
        try:
            super().send_packed_command(*args, **kwargs)  # type: ignore[misc]  # a mixin
        except BaseException:
            self._agw_failed()
            raise

    def read_response(self, *args: Any, **kwargs: Any) -> Any:
        try:
            reply = super().read_response(*args, **kwargs)  # type: ignore[misc]  # a mixin
        except ResponseError:  # an answer: the command is over, the connection is fine
            self._agw_answered()
            raise
        except BaseException:
            self._agw_failed()
            raise
        self._agw_answered()
        return reply

    def _agw_answered(self) -> None:
        self.agw_pending -= 1
        if self.agw_pending <= 0:
            self.agw_pending = 0
            self.agw_watchdog.armed.pop(self, None)

    def _agw_failed(self) -> None:
        self.agw_pending = 0
        self.agw_watchdog.armed.pop(self, None)
        if self.agw_overran:
            raise Overran(f"command took over {self.agw_watchdog.seconds:g} s") from None


def watched_class(url: str, watchdog: Watchdog) -> type:
    """The connection class redis-py picks for ``url`` (TCP, TLS, unix), armed by ``watchdog``."""
    options = redis.connection.parse_url(url)  # type: ignore[no-untyped-call]  # untyped in 5.x
    base = options.get("connection_class", redis.Connection)
    return type(f"Watched{base.__name__}", (_Watched, base), {"agw_watchdog": watchdog})
