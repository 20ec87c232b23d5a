"""Fork safety for SQLite: no thread may be inside SQLite at the moment of ``fork()``.

SQLite keeps process-wide state (mutexes, per-inode lock bookkeeping, the WAL-index
locks of each connection). A child forked while another thread is inside SQLite
inherits that state mid-update: it can hang in ``sqlite3.connect`` on a mutex that
will never be released, or believe it holds a WAL write lock it does not hold, so
every write waits out the busy timeout and fails. The gate makes ``fork()`` wait
(briefly: operations are short) until no operation of any cache is in flight, and
lets none start until the fork is done. A child starts with a fresh gate.

Entering costs two set operations (atomic under the GIL): a thread adds its token,
then checks for a fork in progress; the forking thread raises the flag, then waits
for the set to drain. Whichever comes first, the other one sees it.
"""

from __future__ import annotations

import os
import threading
import time

inside: set[object] = set()
forking = False
forks = 0
"""Bumped in every forked child: state built before it (connections, locks) is the
parent's. Cheaper to compare than ``os.getpid()`` (a system call) on every hit."""
_resume = threading.Event()
_resume.set()
# How long fork() waits for operations in flight; past it, fork goes ahead (an
# operation stuck that long is waiting on a lock, not using SQLite's memory).
_DRAIN_SECONDS = 10.0


def enter() -> object:
    """Mark an operation in flight; returns the token to pass to :func:`leave`."""
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


if hasattr(os, "register_at_fork"):  # not on Windows: no fork there, nothing to guard
    os.register_at_fork(
        before=_before_fork, after_in_parent=_after_in_parent, after_in_child=_after_in_child
    )
