"""The Redis backend under the ways agents really call it (issue 20, items 1-3): many
threads each running ``asyncio.run``, loops that stop between calls, connections the server
closed while idle, thousands of cold keys in one loop, many processes of many users; and a
bug inside the backend, which must propagate instead of passing for an outage (issue 17).

Sizes follow ``AGW_TEST_SCALE`` (see ``support.redis_loads``): 1 runs the issue's full
figures (2,000 keys x 2 callers; 16 processes x 100 users)."""

from __future__ import annotations

import asyncio
import gc
import threading
import time
import weakref
from pathlib import Path
from typing import Any

import pytest
from _core_support import new_key
from support.procs import Workers
from support.redis_hosts import fetches, homes
from support.redis_loads import client_count, many_users, scaled
from support.redis_server import (  # noqa: F401  # fixtures
    RedisServer,
    own_redis_fixture,
    redis_server_fixture,
    redis_url_fixture,
)

from agw_persist_cache import CacheConfig, PersistentTokenCache
from agw_persist_cache.backends import _redis_ops

pytestmark = pytest.mark.timeout(300)


def _cache(url: str, **config: Any) -> PersistentTokenCache:
    return PersistentTokenCache(url=url, config=CacheConfig(keys=[new_key()], **config))


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_bug_inside_the_backend_propagates_and_leaves_the_breaker_closed(
    redis_url: str, mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = _cache(redis_url)
    cache.set_system_token("scope", "stored")

    def broken(digest: bytes, value: object) -> Any:
        raise TypeError("a bug of ours")

    def get() -> str | None:
        if mode == "sync":
            return cache.get_system_token("scope")
        return asyncio.run(cache.aget_system_token("scope"))

    with monkeypatch.context() as patch:
        patch.setattr(_redis_ops, "unpack_row", broken)
        with pytest.raises(TypeError, match="a bug of ours"):
            get()
    assert cache._backend.unavailable is None
    assert get() == "stored"  # the next call goes to Redis and hits
    stats = cache.stats()
    assert (stats.storage_errors, stats.hits) == (0, 1)
    cache.close()


def test_asyncio_run_from_eight_threads_keeps_every_hit(
    redis_server: RedisServer, redis_url: str
) -> None:
    cache = _cache(redis_url)
    keys = [f"scope-{i}" for i in range(8)]
    for k in keys:
        cache.set_system_token(k, f"tok-{k}")
    wrong: list[Any] = []
    loops: list[weakref.ref[asyncio.AbstractEventLoop]] = []

    async def get(k: str) -> str | None:
        loops.append(weakref.ref(asyncio.get_running_loop()))
        return await cache.aget_system_token(k)

    def thread(k: str) -> None:
        for _ in range(100):
            try:
                token = asyncio.run(get(k))
            except BaseException as exc:
                wrong.append(exc)
            else:
                if token != f"tok-{k}":
                    wrong.append(token)

    threads = [threading.Thread(target=thread, args=(k,)) for k in keys]
    for t in threads:
        t.start()
    for t in threads:
        t.join(240)
    stats = cache.stats()
    assert wrong == []
    assert (stats.hits, stats.misses, stats.storage_errors) == (800, 0, 0)
    assert cache._backend.unavailable is None
    # Each loop closed its own pool at its shutdown: nothing is left open or remembered.
    assert client_count(redis_server) == 1  # the threads' pool: its one idle connection
    gc.collect()
    assert len(loops) == 800 and [ref for ref in loops if ref() is not None] == []
    cache.close()


@pytest.mark.parametrize("how", ["client-kill", "server-timeout"])
def test_a_loop_that_stops_between_calls_reconnects_a_connection_the_server_closed(
    own_redis: RedisServer, how: str
) -> None:
    cache = _cache(own_redis.url)
    cache.set_system_token("scope", "stored")
    loop = asyncio.new_event_loop()  # the Celery pattern: one loop, run per call
    try:
        for _ in range(3):
            assert loop.run_until_complete(cache.aget_system_token("scope")) == "stored"
            assert cache.get_system_token("scope") == "stored"  # and the threads' pool
            if how == "client-kill":
                assert own_redis.admin("CLIENT", "KILL", "TYPE", "normal").startswith(b":")
            else:
                own_redis.admin("CONFIG", "SET", "timeout", "1")
                time.sleep(2.5)  # the server's idle sweep closes both pools' connections
            assert client_count(own_redis) == 0
        assert loop.run_until_complete(cache.aget_system_token("scope")) == "stored"
        assert cache.get_system_token("scope") == "stored"
        stats = cache.stats()
        assert (stats.hits, stats.storage_errors) == (8, 0)
        assert cache._backend.unavailable is None
    finally:
        loop.run_until_complete(cache.aclose())
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()


def test_loops_that_shut_down_close_their_pools_and_others_are_forgotten(
    redis_server: RedisServer, redis_url: str
) -> None:
    cache = _cache(redis_url)
    loops = []
    for _ in range(5):
        loop = asyncio.new_event_loop()
        assert loop.run_until_complete(cache.aget_system_token("none")) is None
        loop.run_until_complete(loop.shutdown_asyncgens())  # asgiref and Runner do this
        loop.close()
        loops.append(weakref.ref(loop))
    del loop
    assert client_count(redis_server) == 0
    gc.collect()
    assert [ref for ref in loops if ref() is not None] == []  # none is remembered
    cache.close()


def test_two_thousand_cold_keys_in_one_loop_make_one_request_each(redis_url: str) -> None:
    keys = scaled(2000, 1.0)
    cache = _cache(redis_url)
    counts: dict[str, int] = {}

    def afetch_for(k: str) -> Any:
        async def afetch() -> str:
            counts[k] = counts.get(k, 0) + 1
            await asyncio.sleep(0.05)
            return f"tok-{k}"

        return afetch

    async def main() -> list[str]:
        calls = [cache.asystem_token(f"k{i}", afetch_for(f"k{i}")) for i in range(keys)] * 2
        return list(await asyncio.gather(*calls))

    t0 = time.monotonic()
    tokens = asyncio.run(main())
    took = time.monotonic() - t0
    assert tokens == [f"tok-k{i}" for i in range(keys)] * 2
    assert sum(counts.values()) == keys and set(counts.values()) == {1}
    stats = cache.stats()
    assert stats.storage_errors == 0, (stats, took)
    assert cache._backend.unavailable is None
    cache.close()


def test_many_processes_of_many_users_make_one_request_per_user(
    redis_url: str, tmp_path: Path
) -> None:
    procs, users = scaled(16, 0.5), scaled(100, 0.5)
    counter, key = tmp_path / "fetches", new_key()
    with Workers("spawn", timeout=240) as workers:
        workers.start(
            many_users,
            [(home, redis_url, key, str(counter), users, 0.2) for home in homes(tmp_path, procs)],
        )
        results = workers.collect()
        workers.join()
    assert [r["wrong"] for r in results] == [[]] * procs
    assert [r["storage_errors"] for r in results] == [0] * procs
    assert fetches(counter) == users
