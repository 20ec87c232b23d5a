"""Degrade, never amplify: with the store unusable (a SQLite path no process can use, a Redis
that is down, killed or frozen) every process still makes at most one token request per key,
and none while it holds a valid token; the store is used again once it is back; the mode is
visible; a clear() made while the store is away is honoured when it returns."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import pytest
from _core_support import new_key, warnings_of
from support.fetches import fetches
from support.procs import run_together
from support.redis_server import (  # noqa: F401  # fixtures
    RedisServer,
    own_redis_fixture,
    redis_server_fixture,
    redis_url_fixture,
)
from support.store_down import (
    Requests,
    bursts,
    calls_with_store_down,
    down_url,
    sequential,
    unusable_path,
)

from agw_persist_cache import CacheConfig, CacheStorageError, PersistentTokenCache

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(params=["sqlite", "redis"])
def two_caches(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    """Two cache objects on one healthy store (as two processes would have)."""
    config = CacheConfig(keys=[new_key()])
    if request.param == "redis":
        url = request.getfixturevalue("redis_url")
        caches = [PersistentTokenCache(url=url, config=config) for _ in range(2)]
    else:
        caches = [PersistentTokenCache(tmp_path / "tokens.db", config=config) for _ in range(2)]
    yield caches
    for cache in caches:
        cache.close()


def test_a_healthy_store_stays_coherent_through_the_memory_tier(two_caches: Any) -> None:
    mine, other = two_caches
    assert mine.system_token("scope", lambda: "first") == "first"
    assert mine.get_system_token("scope") == "first"  # in this process's memory tier now
    other.set_system_token("scope", "replaced")
    assert mine.get_system_token("scope") == "replaced"
    other.invalidate_system_token("scope")
    assert mine.get_system_token("scope") is None
    assert mine.system_token("scope", lambda: "again") == "again"
    other.clear()
    assert mine.get_system_token("scope") is None
    assert mine.system_token("scope", lambda: "after-clear") == "after-clear"
    assert mine.stats().served_from_memory == 0
    assert mine.stats().mode == other.stats().mode == "healthy"


def test_an_unusable_sqlite_path_costs_one_request_per_burst(tmp_path: Path) -> None:
    config = CacheConfig(keys=[new_key()])
    path = unusable_path(tmp_path)
    # 100 sequential calls, 50 coroutines, 8 threads x 25 calls: one key each time.
    assert bursts(lambda: PersistentTokenCache(path, config=config)) == (1, 1, 1)


def test_redis_down_from_the_start_costs_one_request_per_burst() -> None:
    url = down_url()
    config = CacheConfig(keys=[new_key()])
    assert bursts(lambda: PersistentTokenCache(url=url, config=config)) == (1, 1, 1)


def test_four_processes_with_redis_down_make_at_most_four_requests(tmp_path: Path) -> None:
    counter = str(tmp_path / "fetches")
    reports = run_together(
        calls_with_store_down, [(down_url(), new_key(), counter, 50)] * 4, method="spawn"
    )
    assert reports == [1, 1, 1, 1]
    assert fetches(counter) == 4


def _on(
    server: RedisServer, *, breaker: float
) -> tuple[CacheConfig, PersistentTokenCache, Requests]:
    """A config, a cache on ``server`` and a counting fetch."""
    config = CacheConfig(keys=[new_key()], circuit_breaker_seconds=breaker)
    return config, PersistentTokenCache(url=server.url, config=config), Requests(delay=0.0)


def _until_healthy(cache: PersistentTokenCache) -> None:
    """Poke ``cache`` (a get) until it uses its store again; fails after 30 s."""
    deadline = time.monotonic() + 30
    while cache.stats().mode != "healthy":
        assert time.monotonic() < deadline, "the cache never used its store again"
        cache.get_system_token("poke")
        time.sleep(0.05)


def test_killed_redis_costs_no_request_for_a_cached_token_and_comes_back(
    own_redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    config, cache, requests = _on(own_redis, breaker=0.3)
    cache.system_token("scope", requests)
    own_redis.kill()
    assert sequential(cache, requests, 200) == 0
    stats = cache.stats()
    assert stats.mode == "degraded" and stats.degraded_since is not None
    assert stats.served_from_memory >= 199
    assert cache.system_token("outage-scope", requests) == "token-2"  # fetched once...
    assert cache.system_token("outage-scope", requests) == "token-2"  # ...then from memory
    own_redis.start()  # the same port, empty
    _until_healthy(cache)
    # Back on Redis: a token fetched there is shared; the outage token was not written back.
    other = PersistentTokenCache(url=own_redis.url, config=config)
    assert other.get_system_token("outage-scope") is None
    assert cache.system_token("outage-scope", requests) == "token-2"  # still this process's
    cache.system_token("new-scope", requests)
    assert other.get_system_token("new-scope") == f"token-{requests.calls}"
    texts = [r.getMessage() for r in warnings_of(caplog)]
    assert sum("is unusable" in t for t in texts) == 1, texts  # one warning per transition
    assert sum("usable again" in t for t in texts) == 1, texts
    other.close()
    cache.close()


def test_a_clear_made_during_the_outage_is_honoured_when_redis_returns(
    own_redis: RedisServer,
) -> None:
    config, cache, requests = _on(own_redis, breaker=0.3)
    cache.set_system_token("warm", "connections-open")
    own_redis.freeze()  # gone for this process only: the others can still reach it
    try:
        assert cache.system_token("scope", requests) == "token-1"  # held in memory only
        other = PersistentTokenCache(url=own_redis.url, config=config)
    finally:
        own_redis.thaw()
    other.clear()  # elsewhere, while this process could not be told
    _until_healthy(cache)
    assert cache.system_token("scope", requests) == "token-2"  # the clear won
    other.close()
    cache.close()


def test_clear_and_invalidate_during_an_outage_raise_and_empty_this_process(
    own_redis: RedisServer,
) -> None:
    _, cache, requests = _on(own_redis, breaker=30)
    cache.system_token("a", requests)
    cache.system_token("b", requests)
    own_redis.kill()
    assert cache.get_system_token("a") == "token-1"
    with pytest.raises(CacheStorageError):
        cache.invalidate_system_token("a")
    assert cache.get_system_token("a") is None
    assert cache.get_system_token("b") == "token-2"
    with pytest.raises(CacheStorageError):
        cache.clear()
    assert cache.get_system_token("b") is None
    assert cache.stats().memory_tokens == 0
    cache.close()


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_frozen_redis_with_a_cached_token_costs_no_request_and_no_waiting(
    own_redis: RedisServer, mode: str
) -> None:
    timeout = 0.5
    config = CacheConfig(
        keys=[new_key()], socket_timeout_seconds=timeout, circuit_breaker_seconds=30
    )
    cache = PersistentTokenCache(url=own_redis.url, config=config)
    requests = Requests(delay=0.0)
    cache.system_token("scope", requests)
    own_redis.freeze()
    try:
        durations = _timed_calls(cache, requests, mode, 100)
    finally:
        own_redis.thaw()
    assert requests.calls == 1
    assert sum(durations) < 3.0, sum(durations)
    # The first call met the socket timeout and opened the breaker; none waited after it.
    assert max(durations[1:]) < timeout / 2, max(durations[1:])
    cache.close()


def _timed_calls(cache: PersistentTokenCache, requests: Requests, mode: str, n: int) -> list[float]:
    import asyncio

    async def main() -> list[float]:
        out = []
        for _ in range(n):
            t0 = time.monotonic()
            if mode == "sync":
                assert cache.system_token("scope", requests) == "token-1"
            else:
                assert await cache.asystem_token("scope", requests.afetch) == "token-1"
            out.append(time.monotonic() - t0)
        return out

    return asyncio.run(main())


def test_a_full_disk_costs_one_request_per_key(tmp_path: Path) -> None:
    config = CacheConfig(keys=[new_key()], max_db_bytes=65536)
    cache = PersistentTokenCache(tmp_path / "cache" / "tokens.db", config=config)
    requests = Requests(delay=0.0)
    big = "x" * 9000
    for i in range(12):  # fills the 64 kB file: later writes fail
        cache.system_token(f"scope-{i}", lambda i=i: big + str(i))
    assert cache.stats().storage_errors > 0
    for _ in range(3):
        for i in range(12):
            assert cache.system_token(f"scope-{i}", requests) == big + str(i)
    assert requests.calls == 0
    assert cache.stats().mode == "degraded"
    cache.close()
