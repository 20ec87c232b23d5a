"""Faults of a real ``redis-server`` and of the hosts using it: killed (SIGKILL) under load and
restarted, frozen (SIGSTOP), dripping its replies through a proxy, a lock holder killed with
``kill -9``, a clear during another host's fetch, a cold stampede across hosts, a burst of
threads, a TLS certificate for another host, and URLs that name no server. Hosts are spawned
processes with homes and cache directories of their own, sharing only the Redis URL, run
through :class:`support.procs.Workers`."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from _core_support import new_key
from support.procs import Workers
from support.redis_hosts import (
    fetch_across_clear,
    fetches,
    hold_in_fetch,
    homes,
    soak,
    stampede,
)
from support.redis_loads import DripProxy, client_count
from support.redis_server import (  # noqa: F401  # fixtures
    RedisServer,
    count_commands,
    own_redis_fixture,
    redis_server_fixture,
    redis_url_fixture,
    tls_server,
)

from agw_persist_cache import CacheConfig, CacheConfigError, PersistentTokenCache

pytestmark = pytest.mark.timeout(120)


def test_killed_redis_under_load_never_fails_a_caller_and_restart_resumes(
    own_redis: RedisServer,
) -> None:
    config = CacheConfig(keys=[new_key()], circuit_breaker_seconds=0.5)
    cache = PersistentTokenCache(url=own_redis.url, config=config)
    stop = threading.Event()
    errors: list[BaseException] = []
    served: list[str] = []

    def caller(i: int) -> None:
        while not stop.is_set():
            try:
                served.append(cache.system_token(f"scope-{i % 4}", lambda: f"tok-{i % 4}"))
            except BaseException as exc:
                errors.append(exc)

    threads = [threading.Thread(target=caller, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    time.sleep(0.3)
    before_kill = len(served)
    own_redis.kill()
    time.sleep(1.0)
    during = len(served) - before_kill
    own_redis.start()
    time.sleep(1.0)  # the breaker's pause, then a probe: the cache uses Redis again
    stop.set()
    for t in threads:
        t.join(10)
    assert errors == []
    assert during > 50  # callers kept getting tokens while Redis was gone
    assert all(tok.startswith("tok-") for tok in served)
    assert cache._backend.unavailable is None
    hits = cache.stats().hits
    assert cache.get_system_token("scope-0") == "tok-0"  # written again after the restart
    assert cache.stats().hits == hits + 1
    cache.close()


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_frozen_redis_bounds_every_call_then_costs_no_redis_time(
    own_redis: RedisServer, mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    timeout, fetch_delay = 0.3, 0.05
    config = CacheConfig(
        keys=[new_key()], socket_timeout_seconds=timeout, circuit_breaker_seconds=30
    )
    cache = PersistentTokenCache(url=own_redis.url, config=config)
    cache.set_system_token("warm", "connections-open")
    own_redis.freeze()
    try:
        if mode == "sync":

            def fetch() -> str:
                time.sleep(fetch_delay)
                return "direct"

            def one(i: int) -> float:
                t0 = time.monotonic()
                assert cache.system_token(f"s{i}", fetch) == "direct"
                return time.monotonic() - t0

            first: list[float] = []
            threads = [threading.Thread(target=lambda i=i: first.append(one(i))) for i in range(8)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(10)
            counted = count_commands(monkeypatch)
            after = [one(i) for i in range(20)]
            during = counted()
        else:

            async def afetch() -> str:
                await asyncio.sleep(fetch_delay)
                return "direct"

            async def aone(i: int) -> float:
                t0 = time.monotonic()
                assert await cache.asystem_token(f"s{i}", afetch) == "direct"
                return time.monotonic() - t0

            counted = count_commands(monkeypatch)

            async def main() -> tuple[list[float], list[float], int]:
                first = await asyncio.gather(*(aone(i) for i in range(20)))  # > 8 per loop
                before = counted()
                after = [await aone(i) for i in range(20)]
                return list(first), after, counted() - before

            first, after, during = asyncio.run(main())

        assert len(first) >= 8
        # Within the socket timeout plus the fetch (and scheduling slack on a busy machine).
        assert max(first) <= timeout + fetch_delay + 0.3
        assert during == 0  # the breaker is open: not one command reaches Redis
        assert max(after) <= fetch_delay + 0.2
        assert cache.stats().disabled_reason is not None
    finally:
        own_redis.thaw()
        cache.close()


def test_killed_lock_holder_frees_the_key_within_one_lease(redis_url: str, tmp_path: Path) -> None:
    key, lease = new_key(), 1.5
    # The holder is killed on purpose: no join() (it would fail on the -9), the exit reaps it.
    with Workers("spawn", timeout=60) as workers:
        (holder,) = workers.start(hold_in_fetch, [(*homes(tmp_path, 1), redis_url, key, lease)])
        assert workers.collect() == ["fetching"]
        config = CacheConfig(keys=[key], lock_lease_seconds=lease)
        waiter = PersistentTokenCache(url=redis_url, config=config)
        got: list[tuple[str, float]] = []

        def wait() -> None:
            token = waiter.system_token("scope", lambda: "from-waiter")
            got.append((token, time.monotonic()))

        t = threading.Thread(target=wait)
        t.start()
        time.sleep(2 * lease)  # the holder is alive: its lease is renewed, the waiter waits
        assert got == []
        os.kill(holder.pid, signal.SIGKILL)
        killed = time.monotonic()
        t.join(30)
        ((token, at),) = got
        assert token == "from-waiter"
        assert at - killed <= lease + 0.5
        waiter.close()


def test_clear_on_one_host_during_a_fetch_on_another_is_not_undone(
    redis_url: str, tmp_path: Path
) -> None:
    key, go = new_key(), tmp_path / "go"
    with Workers("spawn", timeout=60) as workers:
        workers.start(fetch_across_clear, [(*homes(tmp_path, 1), redis_url, key, str(go))])
        assert workers.collect() == ["fetching"]
        with PersistentTokenCache(url=redis_url, config=CacheConfig(keys=[key])) as other:
            other.set_system_token("scope", "set-before-clear")
            other.clear()
            go.touch()
            assert workers.collect() == [{"token": "fetched-before-clear", "stale": 1}]
            workers.join()
            assert other.get_system_token("scope") is None


def test_a_cold_stampede_across_hosts_makes_one_fetch(redis_url: str, tmp_path: Path) -> None:
    hosts, per_host, tasks = 3, 2, 10
    counter, key = tmp_path / "fetches", new_key()
    with Workers("spawn", timeout=60) as workers:
        workers.start(
            stampede,
            [
                (home, redis_url, key, str(counter), tasks, 0.2)
                for home in homes(tmp_path, hosts, per_host)
            ],
        )
        results = workers.collect()
        workers.join()
    tokens = {t for r in results for t in r["tokens"]}
    assert fetches(counter) == 1
    assert len(tokens) == 1
    for h in range(hosts):  # nothing on any host's disk: the store is Redis
        assert not Path(tmp_path, f"host-{h}", ".cache", "agw-persist-cache").exists()


def test_random_operations_on_many_hosts_never_serve_a_wrong_token(
    redis_url: str, tmp_path: Path
) -> None:
    key = new_key()
    # Four hosts, each a process with three threads and an event loop.
    with Workers("spawn", timeout=60) as workers:
        workers.start(
            soak,
            [(home, redis_url, key, 3.0, seed) for seed, home in enumerate(homes(tmp_path, 4))],
        )
        results: list[dict[str, Any]] = workers.collect()
        workers.join()
    assert [r["wrong"] for r in results] == [[]] * 4
    assert [r["n_errors"] for r in results] == [0] * 4, results
    assert all(r["ops"] > 50 for r in results)


def test_a_read_only_replica_and_an_out_of_memory_server_degrade_to_fetching(
    own_redis: RedisServer, tmp_path: Path
) -> None:
    replica = RedisServer(
        tmp_path / "replica", args=["--replicaof", "127.0.0.1", str(own_redis.port)]
    ).start()
    try:
        for url, setup in ((replica.url, None), (own_redis.url, ("maxmemory", "1"))):
            if setup is not None:
                own_redis.admin("CONFIG", "SET", *setup)  # every write now answers OOM
            with PersistentTokenCache(url=url, config=CacheConfig(keys=[new_key()])) as cache:
                assert cache.set_system_token("scope", "not-stored") is False
                assert cache.system_token("other", lambda: "direct") == "direct"
                stats = cache.stats()
                assert stats.storage_errors >= 1
                reason = stats.disabled_reason or ""
                assert ("ReadOnly" in reason) if setup is None else ("maxmemory" in reason)
    finally:
        replica.stop()


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_dripping_server_cannot_stretch_a_command_past_its_timeout(
    redis_server: RedisServer, redis_url: str, mode: str
) -> None:
    timeout = 0.5
    writer = PersistentTokenCache(url=redis_url, config=CacheConfig(keys=[key := new_key()]))
    writer.set_system_token("scope", "x" * 1200)  # a reply of ~1.3 KB: 4 s at 32 B / 100 ms
    writer.close()
    proxy = DripProxy(redis_server.port)
    config = CacheConfig(keys=[key], socket_timeout_seconds=timeout, circuit_breaker_seconds=30)
    cache = PersistentTokenCache(url=proxy.url, config=config)
    try:
        t0 = time.monotonic()
        if mode == "sync":
            token = cache.get_system_token("scope")
        else:
            token = asyncio.run(cache.aget_system_token("scope"))
        took = time.monotonic() - t0
        assert token is None  # a miss: Redis took too long to answer
        assert took < timeout + 0.6, took  # not the 4 s the reply takes to drip in
        assert "took over" in (cache.stats().disabled_reason or "") or mode == "async"
        assert cache._backend.unavailable is not None
    finally:
        cache.close()
        proxy.close()


def test_a_burst_of_a_hundred_threads_leaves_a_small_idle_pool(
    redis_server: RedisServer, redis_url: str
) -> None:
    from agw_persist_cache.backends._redis_conn import IDLE_CONNECTIONS, MAX_CONNECTIONS

    cache = PersistentTokenCache(url=redis_url, config=CacheConfig(keys=[new_key()]))
    for i in range(10):
        cache.set_system_token(f"scope-{i}", f"tok-{i}")
    start, peak, errors, over = threading.Barrier(101), [0], [], threading.Event()

    def burst(i: int) -> None:
        start.wait(30)
        for _ in range(20):
            if cache.get_system_token(f"scope-{i % 10}") != f"tok-{i % 10}":
                errors.append(i)

    def sample() -> None:  # while the burst runs: at its end the surplus is closed already
        start.wait(30)
        while not over.is_set():
            peak[0] = max(peak[0], client_count(redis_server))

    threads = [threading.Thread(target=burst, args=(i,)) for i in range(100)]
    sampler = threading.Thread(target=sample)
    for t in [sampler, *threads]:
        t.start()
    for t in threads:
        t.join(120)
    over.set()
    sampler.join(30)
    assert errors == []
    assert 0 < peak[0] <= MAX_CONNECTIONS
    assert client_count(redis_server) <= IDLE_CONNECTIONS  # the burst's surplus is closed
    stats = cache.stats()
    assert (stats.hits, stats.storage_errors) == (2000, 0)
    cache.close()


def test_rediss_refuses_a_certificate_issued_to_another_host(tmp_path: Path) -> None:
    server = tls_server(tmp_path / "tls", names=("redis.other.example",)).start()
    try:
        cache = PersistentTokenCache(url=server.url, config=CacheConfig(keys=[new_key()]))
        assert cache.set_system_token("scope", "t") is False
        reason = cache.stats().disabled_reason or ""
        assert "certificate" in reason.lower() or "hostname" in reason.lower(), reason
        cache.close()
    finally:
        server.stop()


@pytest.mark.parametrize(
    "url",
    [
        "redis://",
        "redis://:@",
        "rediss://",
        "valkey://",
        "redis://:secret@/0",
        "redis://127.0.0.1:6379/0?ssl_cert_reqs=none",
        "unix://",
    ],
)
def test_a_url_without_a_host_or_with_tls_options_without_tls_is_refused_at_once(
    url: str,
) -> None:
    with pytest.raises(CacheConfigError) as refused:
        PersistentTokenCache(url=url, config=CacheConfig(keys=[new_key()]))
    assert "None" not in str(refused.value)
    assert "secret" not in str(refused.value)


def test_a_call_skipped_by_a_breaker_closed_meanwhile_still_says_why(redis_url: str) -> None:
    from agw_persist_cache.backends.contract import StorageError
    from agw_persist_cache.backends.redis import Tripped

    cache = PersistentTokenCache(url=redis_url, config=CacheConfig(keys=[new_key()]))
    backend = cache._backend
    with pytest.raises(StorageError) as skipped, backend._guarded():
        backend.breaker.failed("TimeoutError")  # another call failed while this one waited
        backend.breaker.succeeded()  # and a probe closed the breaker again
        raise Tripped
    assert str(skipped.value) == "redis unavailable: skipped after a failure"
    cache.close()
