"""Fetches for worker processes: counting real fetches across processes (one line per
fetch, appended atomically), and the two fetches the fault tests park a process in, shared by
the SQLite and the Redis hosts."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tests.support.procs import Worker

if TYPE_CHECKING:
    from agw_persist_cache import PersistentTokenCache


def count_fetch(counter: str | Path) -> None:
    """One line per real fetch, appended atomically, so the parent can count them."""
    fd = os.open(counter, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, f"{os.getpid()}\n".encode())
    finally:
        os.close(fd)


def fetches(counter: str | Path) -> int:
    """How many fetches were counted in ``counter`` (0 before the first)."""
    try:
        return len(Path(counter).read_text().splitlines())
    except FileNotFoundError:
        return 0


def hold_in_fetch(cache: PersistentTokenCache, worker: Worker) -> None:
    """Start a fetch that never ends, after reporting "fetching": the parent kills us in it."""

    def fetch() -> str:
        worker.report("fetching")
        time.sleep(600)
        return "never"

    cache.system_token("scope", fetch)


def fetch_across_clear(cache: PersistentTokenCache, go: str, worker: Worker) -> None:
    """A slow fetch still running when another process clears the cache: reports "fetching"
    from inside it, waits for the file ``go``, then reports the token it got and how many
    stale writes it skipped."""

    def fetch() -> dict[str, Any]:
        worker.report("fetching")
        deadline = time.monotonic() + 60
        while not Path(go).exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        return {"access_token": "fetched-before-clear", "expires_in": 3600}

    token = cache.system_token("scope", fetch)
    worker.report({"token": token, "stale": cache.stats().stale_writes_skipped})
