"""Simulated hosts for the Redis tests and benchmarks: spawned processes, each with a home and
cache directory of its own (nothing shared on disk), all pointing at one Redis URL through
``AGW_CACHE_URL`` / ``AGW_CACHE_KEY``, as replicas of an agent would."""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import os
import random
import threading
import time
import traceback
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.support.fetches import count_fetch
from tests.support.fetches import fetches as fetches  # the parent counts with it too

SPAWN = multiprocessing.get_context("spawn")


def become_host(home: str, url: str, key: str) -> None:
    """This process is a host of its own: private HOME and cache dir, the shared store."""
    Path(home, ".cache").mkdir(parents=True, exist_ok=True)
    os.environ["HOME"] = home
    os.environ["XDG_CACHE_HOME"] = str(Path(home, ".cache"))
    os.environ["AGW_CACHE_URL"] = url
    os.environ["AGW_CACHE_KEY"] = key
    for name in ("AGW_CACHE_PATH",):
        os.environ.pop(name, None)


def write_result(out_dir: str, payload: Any) -> None:
    path = Path(out_dir) / f"{os.getpid()}-{uuid.uuid4().hex}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload))
    tmp.rename(path)


def read_results(out_dir: str | Path) -> list[Any]:
    return [json.loads(p.read_text()) for p in sorted(Path(out_dir).glob("*.json"))]


def start_hosts(
    target: Callable[..., None],
    hosts: int,
    per_host: int,
    root: Path,
    url: str,
    key: str,
    *args: Any,
) -> list[Any]:
    """``hosts`` x ``per_host`` spawned processes running ``target(home, url, key, *args)``."""
    procs = []
    for h in range(hosts):
        home = root / f"host-{h}"
        for _ in range(per_host):
            proc = SPAWN.Process(target=target, args=(str(home), url, key, *args))
            proc.start()
            procs.append(proc)
    return procs


def join_all(procs: list[Any], timeout: float = 120.0) -> list[int | None]:
    deadline = time.monotonic() + timeout
    for proc in procs:
        proc.join(max(0.1, deadline - time.monotonic()))
    codes = [proc.exitcode for proc in procs]
    for proc in procs:
        if proc.is_alive():
            proc.kill()
            proc.join(5)
    return codes


# -- worker bodies (run in the spawned host processes) ------------------------------------------


def stampede(
    home: str,
    url: str,
    key: str,
    counter: str,
    out: str,
    tasks: int,
    delay: float,
    barrier: Any,
) -> None:
    """``tasks`` coroutines ask for one missing token at once; records tokens and the wall."""
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

            barrier.wait()
            t0 = time.time()
            tokens = await asyncio.gather(
                *(cache.asystem_token("stampede", afetch) for _ in range(tasks))
            )
            return {"tokens": list(tokens), "start": t0, "end": time.time()}

    write_result(out, asyncio.run(main()))


def hold_in_fetch(home: str, url: str, key: str, started: str, lease: float) -> None:
    """Start a fetch that never ends, after saying so: the parent kills us mid-flight."""
    become_host(home, url, key)
    from agw_persist_cache import CacheConfig, PersistentTokenCache

    cache = PersistentTokenCache(config=CacheConfig(lock_lease_seconds=lease))

    def fetch() -> str:
        Path(started).touch()
        time.sleep(600)
        return "never"

    cache.system_token("scope", fetch)


def fetch_across_clear(home: str, url: str, key: str, started: str, go: str, out: str) -> None:
    """A slow fetch still running when another host clears the cache."""
    become_host(home, url, key)
    from agw_persist_cache import PersistentTokenCache

    cache = PersistentTokenCache()

    def fetch() -> dict[str, Any]:
        Path(started).touch()
        deadline = time.monotonic() + 60
        while not Path(go).exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        return {"access_token": "fetched-before-clear", "expires_in": 3600}

    token = cache.system_token("scope", fetch)
    write_result(out, {"token": token, "stale": cache.stats().stale_writes_skipped})


SCOPES = [f"scope-{i}" for i in range(6)]
USERS = [None, "alice-jwt", "bob-jwt"]


def token_for(scope: str, user: str | None) -> str:
    """A token that names the key it belongs to, so a wrong one is recognised."""
    return f"{scope}|{user}|{uuid.uuid4().hex}"


def belongs(token: str, scope: str, user: str | None) -> bool:
    return token.rsplit("|", 1)[0] == f"{scope}|{user}"


def soak(home: str, url: str, key: str, seconds: float, out: str, seed: int) -> None:
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
    write_result(out, summary)
