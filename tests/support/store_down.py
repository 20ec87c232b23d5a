"""The store-down scenarios of the "degrade, never amplify" issue: a store that cannot be used
(an unusable SQLite path, a Redis that is down, killed or frozen) and how many token requests
callers make through it. The tests assert on them; run as a script it prints the table:

    python -m tests.support.store_down
"""

from __future__ import annotations

import asyncio
import base64
import os
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.support.fetches import count_fetch
from tests.support.procs import Worker
from tests.support.redis_server import free_port

FETCH_SECONDS = 0.02
"""How long a token request takes: long enough for concurrent callers to overlap."""


class Requests:
    """A token fetch (sync and async) that counts its calls, thread-safe."""

    def __init__(self, delay: float = FETCH_SECONDS) -> None:
        self.delay = delay
        self.calls = 0
        self._mutex = threading.Lock()

    def _next(self) -> dict[str, Any]:
        with self._mutex:
            self.calls += 1
            n = self.calls
        return {"access_token": f"token-{n}", "expires_in": 3600}

    def __call__(self) -> dict[str, Any]:
        time.sleep(self.delay)
        return self._next()

    async def afetch(self) -> dict[str, Any]:
        await asyncio.sleep(self.delay)
        return self._next()


def unusable_path(root: Path) -> Path:
    """A cache path no process can use: its directory would have to live inside a file."""
    blocker = root / "not-a-directory"
    blocker.write_text("a file where the cache directory should be\n")
    return blocker / "cache" / "tokens.db"


def down_url() -> str:
    """A Redis URL where nothing listens."""
    return f"redis://127.0.0.1:{free_port()}/0"


def new_key() -> str:
    return base64.urlsafe_b64encode(os.urandom(32)).decode("ascii")


def sequential(cache: Any, requests: Requests, calls: int = 100) -> int:
    """``calls`` get-or-fetches of one key, one after another; the requests they made."""
    before = requests.calls
    for _ in range(calls):
        cache.system_token("scope", requests)
    return requests.calls - before


def coroutines(cache: Any, requests: Requests, tasks: int = 50) -> int:
    """``tasks`` coroutines ask for one key at once."""
    before = requests.calls

    async def main() -> None:
        await asyncio.gather(*(cache.asystem_token("scope", requests.afetch) for _ in range(tasks)))

    asyncio.run(main())
    return requests.calls - before


def threads(cache: Any, requests: Requests, count: int = 8, calls: int = 25) -> int:
    """``count`` threads x ``calls`` get-or-fetches of one key, started together."""
    before = requests.calls
    start = threading.Barrier(count)

    def body() -> None:
        start.wait(30)
        for _ in range(calls):
            cache.system_token("scope", requests)

    workers = [threading.Thread(target=body) for _ in range(count)]
    for t in workers:
        t.start()
    for t in workers:
        t.join(120)
    return requests.calls - before


def bursts(open_cache: Callable[[], Any]) -> tuple[int, int, int]:
    """The three bursts of the table, each on a fresh cache object of ``open_cache``."""
    counts = []
    for burst in (sequential, coroutines, threads):
        cache = open_cache()
        try:
            counts.append(burst(cache, Requests()))
        finally:
            cache.close()
    return counts[0], counts[1], counts[2]


def calls_with_store_down(url: str, key: str, counter: str, calls: int, worker: Worker) -> None:
    """A worker process: ``calls`` get-or-fetches of one key against ``url``; reports its
    requests (each also counted in ``counter``)."""
    from agw_persist_cache import CacheConfig, PersistentTokenCache

    requests = Requests(delay=0.0)

    def fetch() -> dict[str, Any]:
        count_fetch(counter)
        return requests()

    cache = PersistentTokenCache(url=url, config=CacheConfig(keys=[key]))
    worker.wait()
    for _ in range(calls):
        cache.system_token("scope", fetch)
    cache.close()
    worker.report(requests.calls)


def _table() -> None:  # pragma: no cover - run by hand, before and after a change
    from agw_persist_cache import CacheConfig, PersistentTokenCache
    from tests.support.fetches import fetches
    from tests.support.procs import run_together
    from tests.support.redis_server import RedisServer
    from tests.support.store_down import calls_with_store_down as worker_body

    root = Path(tempfile.mkdtemp(prefix="agw-store-down-"))
    key = new_key()
    config = CacheConfig(keys=[key])
    path = unusable_path(root)
    print("SQLite path unusable: 100 seq / 50 coroutines / 8x25 threads:", end=" ")
    print(bursts(lambda: PersistentTokenCache(path, config=config)))
    url = down_url()
    print("Redis down from the start: same bursts:", end=" ")
    print(bursts(lambda: PersistentTokenCache(url=url, config=config)))
    server = RedisServer(root / "redis").start()
    try:
        cache = PersistentTokenCache(url=server.url, config=config)
        requests = Requests(delay=0.0)
        cache.system_token("scope", requests)
        server.kill()
        print("Redis killed after caching: 200 calls:", sequential(cache, requests, 200))
        cache.close()
        server.start()
        cache = PersistentTokenCache(url=server.url, config=config)
        requests = Requests(delay=0.0)
        cache.system_token("scope", requests)
        server.freeze()
        t0 = time.monotonic()
        n = sequential(cache, requests, 100)
        print(f"Redis frozen after caching: 100 calls: {n} in {time.monotonic() - t0:.2f} s")
        server.thaw()
        cache.close()
    finally:
        server.stop()
    counter = str(root / "fetches")
    run_together(worker_body, [(down_url(), key, counter, 50)] * 4, method="spawn")
    print("Redis down, 4 processes x 50 calls:", fetches(counter))


if __name__ == "__main__":
    _table()
