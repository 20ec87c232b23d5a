"""Simulated hosts for the Redis tests and benchmarks: spawned processes, each with a home and
cache directory of its own (nothing shared on disk), all pointing at one Redis URL through
``AGW_CACHE_URL`` / ``AGW_CACHE_KEY``, as replicas of an agent would.

They run through :class:`tests.support.procs.Workers` (spawn): each body below takes
``home, url, key`` first and its :class:`~tests.support.procs.Worker` last, and sends what it
saw with ``worker.report()``."""

from __future__ import annotations

import asyncio
import os
import random
import threading
import time
import traceback
import uuid
from pathlib import Path
from typing import Any

from tests.support import fetches as parked
from tests.support.fetches import count_fetch
from tests.support.fetches import fetches as fetches  # the parent counts with it too
from tests.support.procs import Worker


def homes(root: Path, hosts: int, per_host: int = 1) -> list[str]:
    """The HOME of each of ``hosts`` x ``per_host`` processes: a host's processes share one."""
    return [str(root / f"host-{h}") for h in range(hosts) for _ in range(per_host)]


def become_host(home: str, url: str, key: str) -> None:
    """This process is a host of its own: private HOME and cache dir, the shared store."""
    Path(home, ".cache").mkdir(parents=True, exist_ok=True)
    os.environ["HOME"] = home
    os.environ["XDG_CACHE_HOME"] = str(Path(home, ".cache"))
    os.environ["AGW_CACHE_URL"] = url
    os.environ["AGW_CACHE_KEY"] = key
    for name in ("AGW_CACHE_PATH",):
        os.environ.pop(name, None)


# -- worker bodies (run in the spawned host processes) ------------------------------------------


def stampede(
    home: str,
    url: str,
    key: str,
    counter: str,
    tasks: int,
    delay: float,
    worker: Worker,
) -> None:
    """``tasks`` coroutines ask for one missing token at once; reports tokens and the wall."""
    become_host(home, url, key)
    from agw_persist_cache import PersistentTokenCache

    async def main() -> dict[str, Any]:
        async with PersistentTokenCache() as cache:
            # A running worker: its pool already holds connections from earlier requests.
            await asyncio.gather(*(cache.aget_system_token("warm-up") for _ in range(8)))

            async def afetch() -> dict[str, Any]:
                count_fetch(counter)
                await asyncio.sleep(delay)
                return {"access_token": f"tok-{uuid.uuid4().hex}", "expires_in": 3600}

            worker.wait()  # every host of the batch is warm
            t0 = time.time()
            tokens = await asyncio.gather(
                *(cache.asystem_token("stampede", afetch) for _ in range(tasks))
            )
            return {"tokens": list(tokens), "start": t0, "end": time.time()}

    worker.report(asyncio.run(main()))


def hold_in_fetch(home: str, url: str, key: str, lease: float, worker: Worker) -> None:
    """Start a fetch that never ends, after reporting "fetching": the parent kills us in it."""
    become_host(home, url, key)
    from agw_persist_cache import CacheConfig, PersistentTokenCache

    parked.hold_in_fetch(PersistentTokenCache(config=CacheConfig(lock_lease_seconds=lease)), worker)


def fetch_across_clear(home: str, url: str, key: str, go: str, worker: Worker) -> None:
    """A slow fetch still running when another host clears the cache (see
    :func:`tests.support.fetches.fetch_across_clear`)."""
    become_host(home, url, key)
    from agw_persist_cache import PersistentTokenCache

    parked.fetch_across_clear(PersistentTokenCache(), go, worker)


SCOPES = [f"scope-{i}" for i in range(6)]
USERS = [None, "alice-jwt", "bob-jwt"]


def token_for(scope: str, user: str | None) -> str:
    """A token that names the key it belongs to, so a wrong one is recognised."""
    return f"{scope}|{user}|{uuid.uuid4().hex}"


def belongs(token: str, scope: str, user: str | None) -> bool:
    return token.rsplit("|", 1)[0] == f"{scope}|{user}"


def soak(home: str, url: str, key: str, seconds: float, seed: int, worker: Worker) -> None:
    """Random get / set / get-or-fetch / invalidate / clear from threads and a loop."""
    become_host(home, url, key)
    from agw_persist_cache import PersistentTokenCache

    rng = random.Random(seed)
    wrong: list[str] = []
    errors: list[str] = []
    ops = [0]
    cache = PersistentTokenCache()
    deadline = time.monotonic() + seconds

    def check(token: str | None, scope: str, user: str | None) -> None:
        if token is not None and not belongs(token, scope, user):
            wrong.append(f"{scope}/{user}")

    def one(r: random.Random) -> None:
        scope, user = r.choice(SCOPES), r.choice(USERS)
        kind = "system" if user is None else "user"
        op = r.random()
        if op < 0.45:
            entry = cache.fetch_entry(kind, scope, lambda: token_for(scope, user), user_jwt=user)
            check(entry.token, scope, user)
        elif op < 0.75:
            check(getattr(cache.get_entry(kind, scope, user_jwt=user), "token", None), scope, user)
        elif op < 0.9:
            cache.set_entry(kind, scope, token_for(scope, user), user_jwt=user)
        elif op < 0.995:
            current = cache.get_entry(kind, scope, user_jwt=user)
            cache.invalidate_entry(
                kind, scope, user_jwt=user, token=current.token if current else None
            )
        else:
            cache.clear()
        ops[0] += 1

    def thread_main(seed: int) -> None:
        r = random.Random(seed)
        while time.monotonic() < deadline:
            try:
                one(r)
            except Exception:
                errors.append(traceback.format_exc(limit=3))

    async def loop_main() -> None:
        while time.monotonic() < deadline:
            scope, user = rng.choice(SCOPES), rng.choice(USERS)
            kind = "system" if user is None else "user"

            async def afetch(scope: str = scope, user: str | None = user) -> str:
                return token_for(scope, user)

            try:
                entry = await cache.afetch_entry(kind, scope, afetch, user_jwt=user)
                check(entry.token, scope, user)
                got = await cache.aget_entry(kind, scope, user_jwt=user)
                check(getattr(got, "token", None), scope, user)
                ops[0] += 2
            except Exception:
                errors.append(traceback.format_exc(limit=3))
        for t in threads:
            await asyncio.to_thread(t.join)
        await cache.aclose()

    threads = [threading.Thread(target=thread_main, args=(seed * 10 + i,)) for i in range(3)]
    for t in threads:
        t.start()
    asyncio.run(loop_main())
    summary = {"wrong": wrong, "errors": errors[:5], "n_errors": len(errors), "ops": ops[0]}
    worker.report(summary)
