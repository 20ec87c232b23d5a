"""Worker-process bodies for the multi-process tests (importable by spawned children)."""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from agw_persist_cache import CacheConfig, PersistentTokenCache


def count_fetch(counter: str | Path) -> None:
    """One line per real fetch, appended atomically, so the parent can count them."""
    fd = os.open(counter, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, f"{os.getpid()}\n".encode())
    finally:
        os.close(fd)


def fetches(counter: str | Path) -> int:
    try:
        return len(Path(counter).read_text().splitlines())
    except FileNotFoundError:
        return 0


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


def write_result(out_dir: str, payload: Any) -> None:
    path = Path(out_dir) / f"{os.getpid()}-{uuid.uuid4().hex}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload))
    tmp.rename(path)


def read_results(out_dir: str | Path) -> list[Any]:
    return [json.loads(p.read_text()) for p in sorted(Path(out_dir).glob("*.json"))]


def config(**overrides: Any) -> CacheConfig:
    return CacheConfig(**overrides)


def stampede_threads(db: str, counter: str, out: str, threads: int, barrier: Any) -> None:
    cache = PersistentTokenCache(db)
    fetch = make_fetch(counter)
    local = threading.Barrier(threads)
    tokens: list[str] = []

    def one() -> None:
        local.wait()
        tokens.append(cache.system_token("scope", fetch))

    workers = [threading.Thread(target=one) for _ in range(threads)]
    barrier.wait()
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    write_result(out, tokens)


def stampede_coroutines(db: str, counter: str, out: str, tasks: int, barrier: Any) -> None:
    async def main() -> list[str]:
        async with PersistentTokenCache(db) as cache:
            afetch = make_afetch(counter)
            return list(
                await asyncio.gather(*(cache.asystem_token("scope", afetch) for _ in range(tasks)))
            )

    barrier.wait()
    write_result(out, asyncio.run(main()))


def backoff_coroutines(db: str, counter: str, out: str, tasks: int, barrier: Any) -> None:
    async def main() -> list[str]:
        async with PersistentTokenCache(db, config=CacheConfig(fetch_backoff_seconds=60)) as cache:
            afetch = make_afetch(counter, delay=0.3, fail=True)
            outcomes = await asyncio.gather(
                *(cache.asystem_token("scope", afetch) for _ in range(tasks)),
                return_exceptions=True,
            )
            return [type(o).__name__ for o in outcomes]

    barrier.wait()
    write_result(out, asyncio.run(main()))


def hold_in_fetch(db: str, started: str, lock_timeout: float = 30.0) -> None:
    """Start a fetch that never ends, after saying so: the parent kills us mid-flight."""
    cache = PersistentTokenCache(db, config=CacheConfig(lock_timeout_seconds=lock_timeout))

    def fetch() -> str:
        Path(started).touch()
        time.sleep(600)
        return "never"

    cache.system_token("scope", fetch)


def fetch_across_clear(db: str, started: str, go: str, out: str) -> None:
    """A slow fetch that is still running when another process clears the cache."""
    cache = PersistentTokenCache(db)

    def fetch() -> dict[str, Any]:
        Path(started).touch()
        deadline = time.monotonic() + 60
        while not Path(go).exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        return {"access_token": "fetched-before-clear", "expires_in": 3600}

    token = cache.system_token("scope", fetch)
    write_result(out, {"token": token, "stale": cache.stats().stale_writes_skipped})


def set_token(db: str, scope: str, token: str) -> None:
    with PersistentTokenCache(db) as cache:
        cache.set_system_token(scope, {"access_token": token, "expires_in": 3600})


def get_token(db: str, scope: str, out: str) -> None:
    with PersistentTokenCache(db) as cache:
        write_result(out, cache.get_system_token(scope))


def clear_cache(db: str) -> None:
    with PersistentTokenCache(db) as cache:
        cache.clear()


def open_and_write(db: str, barrier: Any, index: int) -> None:
    barrier.wait()
    with PersistentTokenCache(db) as cache:
        cache.set_system_token(f"scope-{index}", f"token-{index}")
        if cache.get_system_token(f"scope-{index}") != f"token-{index}":
            raise SystemExit(3)


def write_loop(db: str, ack: str, run: str) -> None:
    """Set tokens forever, acknowledging each one only after set() returned."""
    cache = PersistentTokenCache(db)
    fd = os.open(ack, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    i = 0
    while True:
        cache.set_system_token(f"k{i}", {"access_token": f"{run}-{i}", "expires_in": 3600})
        os.write(fd, f"{i}\n".encode())
        i += 1


def refresh_callers(db: str, counter: str, out: str, barrier: Any) -> None:
    """Callers hitting a token inside its refresh window: all get the old one at once."""
    cache = PersistentTokenCache(db, config=CacheConfig(refresh_ahead_ratio=0.5))
    fetch = make_fetch(counter, delay=1.0)
    barrier.wait()
    tokens = [cache.system_token("scope", fetch) for _ in range(20)]
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # let a background refresh finish before exiting
        if not any(t.name == "agw-cache-refresh" for t in threading.enumerate()):
            break
        time.sleep(0.05)
    write_result(out, {"tokens": tokens, "refreshes": cache.stats().refreshes})
