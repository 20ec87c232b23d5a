"""Single flight inside one process, in every mode: one fetch per key for threads and
coroutines together, every waiter released at once with the leader's one result, the
memory tier bounded and safe under threads, and which fetch errors back off."""

from __future__ import annotations

import asyncio
import gc
import resource
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from _core_support import make_config
from support.store_down import Requests, unusable_path

from agw_persist_cache import (
    CacheUsageError,
    FetchBackoffError,
    PersistentTokenCache,
    TokenFetchError,
)
from agw_persist_cache._expiry import CachedToken
from agw_persist_cache._memory import Kept, MemoryTier

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(params=["healthy", "unusable"])
def cache(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    """A cache on a working SQLite file, and one on a path no process can use."""
    path = tmp_path / "cache" / "tokens.db"
    if request.param == "unusable":
        path = unusable_path(tmp_path)
    opened = PersistentTokenCache(path, config=make_config())
    yield opened
    opened.close()


async def test_64_waiters_are_answered_in_one_pass_of_a_busy_loop(cache: Any) -> None:
    """The whole-agent cold start, reduced: other tasks block the loop 8 ms per step while
    64 coroutines wait for one fetch. Handing a lock from waiter to waiter costs a pass of
    the loop per waiter (63 passes); one shared result costs one."""
    blockers, step = 4, 0.008
    stop = asyncio.Event()

    async def blocker() -> None:
        while not stop.is_set():
            time.sleep(step)  # e.g. an SDK client set up synchronously
            await asyncio.sleep(0)

    fetch_ended = 0.0
    go = asyncio.Event()

    async def afetch() -> dict[str, Any]:
        nonlocal fetch_ended
        await go.wait()
        fetch_ended = time.perf_counter()
        return {"access_token": "the-token", "expires_in": 3600}

    answered: list[float] = []

    async def waiter() -> None:
        assert await cache.asystem_token("scope", afetch) == "the-token"
        answered.append(time.perf_counter() - fetch_ended)

    running = [asyncio.create_task(blocker()) for _ in range(blockers)]
    flights = cache._flights.runner.locks._flights  # the key's in-flight record
    leader = asyncio.create_task(cache.asystem_token("scope", afetch))
    while not flights:  # the leader is fetching
        await asyncio.sleep(0.01)
    waiters = [asyncio.create_task(waiter()) for _ in range(64)]
    while len(next(iter(flights.values())).waiters) < 64:  # all 64 wait for it
        await asyncio.sleep(0.01)
    go.set()
    await asyncio.gather(*waiters)
    stop.set()
    await asyncio.gather(*running)
    assert await leader == "the-token"
    assert cache.stats().fetches == 1
    one_pass = blockers * step
    first, last = answered[0], answered[-1]
    print(f"64 waiters answered {first * 1000:.1f}-{last * 1000:.1f} ms after the fetch ended")
    assert len(answered) == 64
    assert last <= 2 * one_pass + 0.05, answered  # one pass, plus a generous slack
    assert last <= 1.2 * first + 0.01, (first, last)


def test_threads_and_coroutines_of_two_loops_share_one_fetch(cache: Any) -> None:
    requests = Requests(delay=0.3)
    start = threading.Barrier(8 + 2)
    tokens: list[str] = []

    def thread_caller() -> None:
        start.wait(30)
        tokens.append(cache.system_token("scope", requests))

    def loop_caller() -> None:
        async def main() -> list[str]:
            start.wait(30)
            return list(
                await asyncio.gather(
                    *(cache.asystem_token("scope", requests.afetch) for _ in range(16))
                )
            )

        tokens.extend(asyncio.run(main()))

    callers = [threading.Thread(target=thread_caller) for _ in range(8)]
    callers += [threading.Thread(target=loop_caller) for _ in range(2)]
    for t in callers:
        t.start()
    for t in callers:
        t.join(60)
    assert requests.calls == 1
    assert tokens == ["token-1"] * (8 + 2 * 16)


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_fetch_that_is_not_callable_is_a_usage_error_before_any_lock(
    cache: Any, mode: str
) -> None:
    with pytest.raises(CacheUsageError, match="callable"):
        if mode == "sync":
            cache.system_token("scope", "not-a-function")
        else:
            asyncio.run(cache.asystem_token("scope", None))
    assert cache.stats().fetches == 0
    assert cache.system_token("scope", lambda: "works") == "works"  # nothing left locked


@pytest.mark.parametrize("bug", [TypeError, AttributeError, NameError])
def test_a_fetch_with_a_bug_propagates_and_starts_no_back_off(cache: Any, bug: type) -> None:
    def broken() -> str:
        raise bug("a programming error in the caller's fetch")

    with pytest.raises(bug):
        cache.system_token("scope", broken)
    # No back-off: the fixed fetch runs at once, in this process and in any other.
    assert cache.system_token("scope", lambda: "fixed") == "fixed"
    assert cache.stats().backoff_rejections == 0


@pytest.mark.parametrize(
    "trouble", [TokenFetchError("identity service said 503", status=503), OSError("refused")]
)
def test_the_identity_services_trouble_backs_off_the_key(cache: Any, trouble: Exception) -> None:
    def failing() -> str:
        raise trouble

    with pytest.raises(type(trouble)):
        cache.system_token("scope", failing)
    requests = Requests(delay=0.0)
    with pytest.raises(FetchBackoffError) as caught:  # held in memory, whatever the store
        cache.system_token("scope", requests)
    assert caught.value.cause_type == type(trouble).__name__
    assert requests.calls == 0
    assert cache.stats().backoff_rejections == 1


def test_waiters_of_a_failed_fetch_fail_fast_together(cache: Any) -> None:
    calls = 0

    def failing() -> str:
        nonlocal calls
        calls += 1
        time.sleep(0.3)
        raise TokenFetchError("identity service down", status=503)

    errors: list[type] = []
    start = threading.Barrier(8)

    def caller() -> None:
        start.wait(30)
        try:
            cache.system_token("scope", failing)
        except TokenFetchError as exc:
            errors.append(type(exc))

    threads = [threading.Thread(target=caller) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert calls == 1
    assert sorted(e.__name__ for e in errors) == ["FetchBackoffError"] * 7 + ["TokenFetchError"]


# -- the memory tier -------------------------------------------------------------------------


def _kept(n: int) -> Kept:
    return Kept(CachedToken(f"token-{n}", time.time() + 3600), None, 0)


def test_memory_tier_eviction_hammered_from_threads_never_raises() -> None:
    """Issue 17: evicting with ``pop(next(iter(d)))`` while other threads change the dict
    raised RuntimeError out of a hit. 8 threads put, read and drop 20,000 keys each through
    a tier of 64."""
    tier = MemoryTier(64)
    errors: list[BaseException] = []
    start = threading.Barrier(8)

    def hammer(t: int) -> None:
        start.wait(30)
        try:
            for n in range(20_000):
                ident = ("user", f"scope-{n % 512}", f"user-{t}")
                tier.put(ident, _kept(n))
                tier.get(("user", f"scope-{(n * 7) % 512}", f"user-{(t + 1) % 8}"))
                tier.usable(ident, time.time(), 30.0)
                if n % 5 == 0:
                    tier.drop(ident)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=hammer, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert errors == []
    assert len(tier) <= 64


def test_memory_tier_keeps_the_most_recently_used() -> None:
    tier = MemoryTier(2)
    a, b, c = ("system", "a", ""), ("system", "b", ""), ("system", "c", "")
    tier.put(a, _kept(1))
    tier.put(b, _kept(2))
    assert tier.get(a) is not None  # a is now the most recently used
    tier.put(c, _kept(3))
    assert (tier.get(a) is not None, tier.get(b), tier.get(c) is not None) == (True, None, True)


def test_100000_distinct_keys_leave_at_most_the_configured_tokens_in_memory(
    tmp_path: Path,
) -> None:
    size = 1000
    cache = PersistentTokenCache(unusable_path(tmp_path), config=make_config(memory_tokens=size))
    jwt = "header." + "u" * 600 + ".signature"  # a realistic user JWT size
    token = "t" * 1200
    gc.collect()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for n in range(100_000):
        cache.user_token(f"{jwt}{n}", "scope", lambda n=n: f"{token}{n}")  # distinct tokens
    gc.collect()
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    stats = cache.stats()
    assert stats.memory_tokens == size
    assert stats.fetches == 100_000
    print(f"RSS growth over 100,000 distinct keys (memory_tokens={size}): {grown_kib} KiB")
    assert grown_kib < 64 * 1024  # bounded: not 100,000 tokens of 1.2 kB plus their keys
    cache.close()


async def test_a_plain_call_inside_async_code_does_not_wait_for_its_own_loop(
    cache: Any,
) -> None:
    """A sync get-or-fetch on the thread of a loop whose coroutine leads the key's flight
    cannot wait for it (the loop is blocked by the very wait): it fetches by itself."""
    go = asyncio.Event()

    async def slow() -> str:
        await go.wait()
        return "from-the-coroutine"

    leader = asyncio.create_task(cache.asystem_token("scope", slow))
    while not cache._flights.runner.locks._flights:
        await asyncio.sleep(0.01)
    t0 = time.monotonic()
    assert cache.system_token("scope", lambda: "from-the-plain-call") == "from-the-plain-call"
    assert time.monotonic() - t0 < 5  # not the 30 s lock timeout
    go.set()
    assert await leader == "from-the-coroutine"
    assert cache.stats().lock_timeouts == 0
