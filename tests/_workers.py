"""Worker-process bodies for the multi-process tests (importable by spawned children).

Each takes a :class:`~tests.support.procs.Worker` last: it waits at ``worker.wait()`` and
sends its result with ``worker.report()``.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from agw_persist_cache import CacheConfig, PersistentTokenCache
from tests.support import fetches as parked
from tests.support.fetches import count_fetch
from tests.support.fetches import fetches as fetches  # the parent counts with it too
from tests.support.procs import Worker


def make_fetch(counter: str | Path, delay: float = 0.2, ttl: int = 3600) -> Any:
    def fetch() -> dict[str, Any]:
        count_fetch(counter)
        time.sleep(delay)
        return {"access_token": f"tok-{os.getpid()}-{uuid.uuid4().hex}", "expires_in": ttl}

    return fetch


def make_afetch(counter: str | Path, delay: float = 0.2, fail: bool = False) -> Any:
    async def afetch() -> dict[str, Any]:
        count_fetch(counter)
        await asyncio.sleep(delay)
        if fail:
            raise RuntimeError("identity service is down")
        return {"access_token": f"tok-{os.getpid()}-{uuid.uuid4().hex}", "expires_in": 3600}

    return afetch


def config(**overrides: Any) -> CacheConfig:
    return CacheConfig(**overrides)


def stampede_threads(db: str, counter: str, threads: int, worker: Worker) -> None:
    cache = PersistentTokenCache(db)
    fetch = make_fetch(counter)
    local = threading.Barrier(threads)
    tokens: list[str] = []

    def one() -> None:
        local.wait()
        tokens.append(cache.system_token("scope", fetch))

    workers = [threading.Thread(target=one) for _ in range(threads)]
    worker.wait()
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    worker.report(tokens)


def stampede_coroutines(db: str, counter: str, tasks: int, worker: Worker) -> None:
    async def main() -> list[str]:
        async with PersistentTokenCache(db) as cache:
            afetch = make_afetch(counter)
            return list(
                await asyncio.gather(*(cache.asystem_token("scope", afetch) for _ in range(tasks)))
            )

    worker.wait()
    worker.report(asyncio.run(main()))


def backoff_coroutines(db: str, counter: str, tasks: int, worker: Worker) -> None:
    async def main() -> list[str]:
        async with PersistentTokenCache(db, config=CacheConfig(fetch_backoff_seconds=60)) as cache:
            afetch = make_afetch(counter, delay=0.3, fail=True)
            outcomes = await asyncio.gather(
                *(cache.asystem_token("scope", afetch) for _ in range(tasks)),
                return_exceptions=True,
            )
            return [type(o).__name__ for o in outcomes]

    worker.wait()
    worker.report(asyncio.run(main()))


def hold_in_fetch(db: str, worker: Worker) -> None:
    """Start a fetch that never ends, after reporting "fetching": the parent kills us in it."""
    parked.hold_in_fetch(
        PersistentTokenCache(db, config=CacheConfig(lock_timeout_seconds=30.0)), worker
    )


def fetch_across_clear(db: str, go: str, worker: Worker) -> None:
    """A slow fetch that is still running when another process clears the cache."""
    parked.fetch_across_clear(PersistentTokenCache(db), go, worker)


def set_token(db: str, scope: str, token: str, worker: Worker) -> None:
    with PersistentTokenCache(db) as cache:
        cache.set_system_token(scope, {"access_token": token, "expires_in": 3600})


def get_token(db: str, scope: str, worker: Worker) -> None:
    with PersistentTokenCache(db) as cache:
        worker.report(cache.get_system_token(scope))


def clear_cache(db: str, worker: Worker) -> None:
    with PersistentTokenCache(db) as cache:
        cache.clear()


def open_and_write(db: str, worker: Worker) -> None:
    worker.wait()
    index = worker.index
    with PersistentTokenCache(db) as cache:
        if not cache.set_system_token(f"scope-{index}", f"token-{index}"):
            stats = cache.stats()  # the memory tier would answer the get: say why instead
            raise SystemExit(f"not stored: {stats.degraded_reason or stats.disabled_reason}")
        if cache.get_system_token(f"scope-{index}") != f"token-{index}":
            raise SystemExit(3)


def write_loop(db: str, ack: str, run: str, worker: Worker) -> None:
    """Set tokens forever, acknowledging each one only after set() returned."""
    cache = PersistentTokenCache(db)
    fd = os.open(ack, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    i = 0
    while True:
        cache.set_system_token(f"k{i}", {"access_token": f"{run}-{i}", "expires_in": 3600})
        os.write(fd, f"{i}\n".encode())
        i += 1


def refresh_callers(db: str, counter: str, worker: Worker) -> None:
    """Callers hitting a token inside its refresh window: all get the old one at once."""
    cache = PersistentTokenCache(db, config=CacheConfig(refresh_ahead_ratio=0.5))
    fetch = make_fetch(counter, delay=1.0)
    worker.wait()
    tokens = [cache.system_token("scope", fetch) for _ in range(20)]
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # let a background refresh finish before exiting
        if not any(t.name == "agw-cache-refresh" for t in threading.enumerate()):
            break
        time.sleep(0.05)
    worker.report({"tokens": tokens, "refreshes": cache.stats().refreshes})
