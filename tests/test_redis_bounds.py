"""What the Redis backend costs the server, and fencing (issue 20, items 6 and 11): stats()
at 100,000 rows measured with SLOWLOG, a lock holder whose lease lapsed cannot overwrite the
newer token, a planted lock with no expiry does not make a miss wait.

``AGW_TEST_STATS_ROWS`` scales the row count (default 100,000)."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator

import pytest
import redis
from _core_support import Counting, make_config, new_key
from support.procs import Worker, Workers
from support.redis_server import (  # noqa: F401  # fixtures
    RedisServer,
    own_redis_fixture,
    redis_server_fixture,
    redis_url_fixture,
)

from agw_persist_cache import CacheConfig, PersistentTokenCache
from agw_persist_cache._survey import LIST_PAGE
from agw_persist_cache.backends._redis_ops import Layout, pack_row
from agw_persist_cache.backends.contract import SealedRow, Sweep

pytestmark = pytest.mark.timeout(600)

ROWS = int(os.environ.get("AGW_TEST_STATS_ROWS", "100000"))
SCRIPT_BUDGET_US = 5_000  # server time of one stats() script
SLOWLOG_LEN = 2_000_000


def median(times: list[tuple[int, bytes]]) -> int:
    return sorted(t for t, _ in times)[len(times) // 2]


def fill(url: str, rows: int, namespace: str = "agw-persist-cache") -> None:
    """``rows`` user rows as the cache lays them out, written in pipelined batches."""
    layout = Layout(namespace)
    r = redis.Redis.from_url(url)
    now = time.time()
    pipe = r.pipeline(transaction=False)
    for i in range(rows):
        digest = i.to_bytes(32, "big")
        kid = "kid-old" if i < 10 else "kid-new"
        row = SealedRow(
            digest, "user", kid, os.urandom(12), os.urandom(200), now + 3600, 0, now + i, now
        )
        pipe.set(layout.row(digest), pack_row(row), px=3_600_000)
        pipe.zadd(layout.lru["user"], {digest.hex(): now + i})
        pipe.zadd(layout.exp, {digest.hex(): now + 3600})
        if i % 5000 == 4999:
            pipe.execute()
    pipe.execute()
    r.close()


def script_times(r: redis.Redis) -> list[tuple[int, bytes]]:
    """(microseconds, command) of every script the SLOWLOG holds, longest first."""
    found = []
    for entry in r.slowlog_get(SLOWLOG_LEN):
        command = entry["command"]
        if command.split(b" ")[0].upper() in (b"EVALSHA", b"EVAL"):
            found.append((int(entry["duration"]), command[:60]))
    return sorted(found, reverse=True)


@pytest.fixture
def big(own_redis: RedisServer) -> Iterator[tuple[PersistentTokenCache, redis.Redis]]:
    fill(own_redis.url, ROWS)
    cache = PersistentTokenCache(
        config=make_config(url=own_redis.url, max_user_token_cache_size=ROWS + 10)
    )
    r = redis.Redis.from_url(own_redis.url)
    r.config_set("slowlog-log-slower-than", 0)
    r.config_set("slowlog-max-len", SLOWLOG_LEN)  # scripts' own commands are logged too
    r.slowlog_reset()
    yield cache, r
    r.close()
    cache.close()


def test_stats_at_100k_rows_costs_the_server_milliseconds(
    big: tuple[PersistentTokenCache, redis.Redis],
) -> None:
    cache, r = big
    for _ in range(5):
        stats = cache.stats()
        assert stats.entries_user == ROWS
        assert set(stats.key_ids_in_use) == {"kid-old", "kid-new"}  # sampled at both ends
    times = script_times(r)  # the first is sent again as EVAL: the server had not seen it
    assert len(times) >= 5, times
    print(f"\nstats() at {ROWS} rows: scripts {[t for t, _ in times]} us")
    assert median(times) < SCRIPT_BUDGET_US, times
    assert times[0][0] < 10 * SCRIPT_BUDGET_US, times  # a busy test box, at worst


def test_listing_100k_rows_runs_in_short_steps(
    big: tuple[PersistentTokenCache, redis.Redis],
) -> None:
    cache, r = big
    assert len(cache.list_entries()) == ROWS
    times = script_times(r)
    print(f"\nlist_entries() at {ROWS} rows: {len(times)} scripts, median {median(times)} us")
    assert len(times) >= ROWS // LIST_PAGE
    assert median(times) < SCRIPT_BUDGET_US


def test_resealing_100k_rows_runs_in_short_steps(
    big: tuple[PersistentTokenCache, redis.Redis],
) -> None:
    cache, r = big
    assert cache.reseal() == 0  # none of these rows opens under the cache's key
    times = script_times(r)
    print(f"\nreseal() at {ROWS} rows: {len(times)} scripts, median {median(times)} us")
    assert len(times) >= ROWS // 256
    assert median(times) < SCRIPT_BUDGET_US


def test_clear_at_100k_rows_runs_in_short_steps(
    big: tuple[PersistentTokenCache, redis.Redis],
) -> None:
    cache, r = big
    started = time.monotonic()
    cache.clear()
    took = time.monotonic() - started
    times = script_times(r)
    assert cache.stats().entries_user == 0
    assert not list(r.scan_iter(match="{agw-persist-cache}:t:*", count=5000))
    p99 = times[len(times) // 100][0]
    print(
        f"\nclear() at {ROWS} rows: {took:.2f} s, {len(times)} scripts, median "
        f"{median(times)} us, p99 {p99} us, longest {times[0][0]} us"
    )
    assert len(times) >= ROWS // Sweep().limit  # the clear, then its sweep in steps
    assert median(times) < SCRIPT_BUDGET_US / 2
    assert p99 < 4 * SCRIPT_BUDGET_US  # a test box shared with other work, at worst


def frozen_holder(url: str, key: str, worker: Worker) -> None:
    """Fetch ``scope`` and, holding its lock, stop this whole process (SIGSTOP) mid-fetch."""
    config = CacheConfig(url=url, keys=[key], lock_lease_seconds=0.5)
    with PersistentTokenCache(config=config) as cache:

        def fetch() -> str:
            os.kill(os.getpid(), signal.SIGSTOP)  # frozen: its lease renewals stop too
            return "older"

        token = cache.system_token("scope", fetch)
        worker.report((token, cache.stats().stale_writes_skipped))


def _stopped(pid: int) -> bool:
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().rpartition(")")[2].split()[0] == "T"


def test_a_process_frozen_past_its_lease_does_not_overwrite_the_newer_token(
    redis_url: str,
) -> None:
    key = new_key()
    config = CacheConfig(url=redis_url, keys=[key], lock_lease_seconds=0.5)
    newer = Counting("newer")
    with Workers("spawn", timeout=120) as workers, PersistentTokenCache(config=config) as host:
        (proc,) = workers.start(frozen_holder, [(redis_url, key)])
        deadline = time.monotonic() + 60
        while not _stopped(proc.pid or 0):
            assert time.monotonic() < deadline, "the holder never froze"
            time.sleep(0.05)
        time.sleep(1.5)  # three leases: the frozen holder's lock has lapsed
        assert host.system_token("scope", newer) == "newer-1"
        os.kill(proc.pid or 0, signal.SIGCONT)
        ((token, skipped),) = workers.collect()
        workers.join()
        assert (token, skipped) == ("older", 1)  # its caller got its token; the store kept ours
        assert host.get_system_token("scope") == "newer-1"
        fresh = PersistentTokenCache(config=config)
        assert fresh.get_system_token("scope") == "newer-1" and newer.calls == 1
        fresh.close()


def test_a_planted_lock_with_no_expiry_does_not_make_a_miss_wait(redis_url: str) -> None:
    config = make_config(url=redis_url, lock_timeout_seconds=20.0)
    r = redis.Redis.from_url(redis_url)
    with PersistentTokenCache(config=config) as cache:
        digest = cache._shelf.key("system", "scope", None).digest  # type: ignore[union-attr]  # a key exists
        r.set(Layout(config.namespace).lock(digest), "planted")  # no PX: never expires
        fetch = Counting()
        started = time.monotonic()
        assert cache.system_token("scope", fetch) == "fetched-1"
        assert time.monotonic() - started < config.lock_timeout_seconds / 2
        assert fetch.calls == 1 and cache.stats().lock_timeouts == 0
    r.close()
