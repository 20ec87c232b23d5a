"""The one fork and thread policy of the package.

**Fork.** Whatever a process built before ``fork()`` (SQLite and aiosqlite connections,
lock descriptors, Redis pools, the IAS client's ``httpx`` pools, the in-process flights)
belongs to the parent: a child never uses it and never closes it (closing could checkpoint
the parent's WAL or shut its sockets). Each component remembers :data:`forks` when it
builds its per-process state and builds it anew when the number has moved: the hot path
compares one integer, no system call. What must happen in the child before any other code
runs there (closing inherited lock descriptors without unlocking) registers with
:func:`in_child`.

**The SQLite gate.** No thread may be inside SQLite at the moment of ``fork()``: a child
forked mid-operation inherits SQLite's process-wide mutexes and WAL-index locks half
updated and can hang or fail every write. :func:`enter` / :func:`leave` bracket an
operation; ``fork()`` waits (briefly: operations are short) until none is in flight and
lets none start until it is done. Entering costs two set operations (atomic under the
GIL): a thread adds its token, then checks for a fork in progress; the forking thread
raises the flag, then waits for the set to drain. Whichever comes first, the other sees it.

**Threads.** Every thread the package starts is started by :func:`start_thread` under one
of the names in :data:`THREADS` (README's resource model lists them with their owners).
All are daemons: only committed data matters, and it is on disk before any returns.
"""

from __future__ import annotations

import inspect
import os
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

forks = 0
"""Bumped in every forked child: per-process state built under another value is the
parent's."""

inside: set[object] = set()
forking = False
_resume = threading.Event()
_resume.set()
# How long fork() waits for operations in flight; past it, fork goes ahead (an
# operation stuck that long is waiting on a lock, not using SQLite's memory).
_DRAIN_SECONDS = 10.0
_CHILD_HOOKS: list[Callable[[], Callable[[], None] | None]] = []
_prune_at = 64

THREADS: dict[str, str] = {
    "agw-cache-refresh": "PersistentTokenCache: one per background refresh-ahead fetch of a "
    "sync caller; ends when that fetch is stored or failed",
    "agw-cache-lock-wait": "SQLite OFD key lock: one per acquisition waiting for a key another "
    "descriptor holds; ends when the holder lets go",
    "agw-cache-aiosqlite-stop": "SQLite: closes an event loop's aiosqlite connection from "
    "outside that loop; ends when it has stopped",
    "agw-cache-redis-lease": "Redis key lock: renews held leases and sends event loops' "
    "releases; ends when nothing is held or queued",
    "agw-cache-redis-wakeups": "Redis key lock: the pub/sub subscription that wakes waiters; "
    "ends 2 s after the last waiter left",
    "agw-cache-redis-deadlines": "Redis: disconnects a thread's command past its deadline; "
    "ends 5 s after the last command",
    "agw-cache-demo-caller": "`agw-cache demo` only: one per simulated caller of a demo worker "
    "process; ends when its calls are made",
    "agw-cache-demo-endpoint": "`agw-cache demo` only: the stand-in token endpoint; ends when "
    "the demo is over",
}
"""Every thread the package can start, by name, with its owner and purpose."""


def start_thread(name: str, target: Callable[..., Any], *args: Any) -> threading.Thread:
    """Start daemon thread ``name`` (one of :data:`THREADS`) running ``target(*args)``."""
    if name not in THREADS:
        raise ValueError(f"unknown thread kind {name!r}: add it to _fork.THREADS and README")
    thread = threading.Thread(target=target, args=args, name=name, daemon=True)
    thread.start()
    return thread


def in_child(hook: Callable[[], None]) -> None:
    """Call ``hook`` in every forked child, right after the fork (no-op where no fork).

    A bound method is held weakly: registering does not keep its object alive."""
    global _prune_at
    if len(_CHILD_HOOKS) >= _prune_at:  # forget the hooks of objects gone meanwhile
        _CHILD_HOOKS[:] = [ref for ref in _CHILD_HOOKS if ref() is not None]
        _prune_at = max(64, 2 * len(_CHILD_HOOKS))
    if inspect.ismethod(hook):
        _CHILD_HOOKS.append(weakref.WeakMethod(hook))
    else:
        _CHILD_HOOKS.append(lambda: hook)


def enter() -> object:
    """Mark an SQLite operation in flight; returns the token to pass to :func:`leave`."""
    token = object()
    while True:
        inside.add(token)
        if not forking:
            return token
        inside.discard(token)
        _resume.wait(_DRAIN_SECONDS)


def leave(token: object) -> None:
    """The operation is over."""
    inside.discard(token)


def _before_fork() -> None:
    global forking
    _resume.clear()
    forking = True
    deadline = time.monotonic() + _DRAIN_SECONDS
    while inside and time.monotonic() < deadline:
        time.sleep(0.0005)


def _after_in_parent() -> None:
    global forking
    forking = False
    _resume.set()


def _after_in_child() -> None:
    global forking, _resume, inside, forks
    forks += 1
    forking = False
    inside = set()
    _resume = threading.Event()
    _resume.set()
    live = [(ref, hook) for ref in _CHILD_HOOKS if (hook := ref()) is not None]
    _CHILD_HOOKS[:] = [ref for ref, _hook in live]
    for _ref, hook in live:
        hook()


if hasattr(os, "register_at_fork"):  # not on Windows: no fork there, nothing to guard
    os.register_at_fork(
        before=_before_fork, after_in_parent=_after_in_parent, after_in_child=_after_in_child
    )
