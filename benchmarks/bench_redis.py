"""Benchmark 8: many hosts on one Redis. A cold stampede across simulated hosts, hit latency
against a raw redis-py GET + AES-GCM floor (sync and async), a frozen Redis, and random
operations on many hosts. Needs ``redis-server`` (``apt-get install -y redis-server``) and the
``redis`` package; the suite's own test server and simulated hosts are reused."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import statistics
import threading
import time
from pathlib import Path
from typing import Any

from ._floor import bench_key, make_token
from ._harness import (
    LATENCY_COLUMNS,
    Ratio,
    Section,
    Table,
    awaited_calls,
    calls,
    interleave,
    latency_rows,
    percentile,
    ratio,
)
from ._plan import Plan
from ._subject import MAX_ROWS

TITLE = "9. Many hosts: the Redis backend"
HOSTS, PROCS_PER_HOST, COROUTINES = 4, 4, 20


def _sizes(plan: Plan) -> dict[str, Any]:
    """How much of each measure a plan runs."""
    if plan.name == "tiny":
        return {"hosts": 2, "procs": 1, "coros": 5, "soak": 1.0, "soak_hosts": 2, "frozen": 1.0}
    soak = 20.0 if plan.name == "full" else 5.0
    frozen = 8.0 if plan.name == "full" else 3.0
    return {
        "hosts": HOSTS,
        "procs": PROCS_PER_HOST,
        "coros": COROUTINES,
        "soak": soak,
        "soak_hosts": 4,
        "frozen": frozen,
    }


def bench_redis(workdir: Path, plan: Plan) -> Section:
    """The four measures of the many-hosts backend, on a redis-server started here."""
    section = Section(
        key="redis",
        title=TITLE,
        method=(
            "A `redis-server` started for the run (no persistence, loopback TCP). Hosts are "
            "spawned processes with their own HOME and cache directory, sharing only "
            "`AGW_CACHE_URL` and `AGW_CACHE_KEY`."
        ),
    )
    if shutil.which("redis-server") is None:
        section.notes.append("not run: redis-server is missing (apt-get install -y redis-server)")
        return section
    try:
        import redis  # noqa: F401  # the extra
    except ImportError:
        section.notes.append("not run: pip install 'agw-persist-cache[redis]'")
        return section
    from tests.support.redis_server import RedisServer

    sizes = _sizes(plan)
    server = RedisServer(workdir / "redis").start()
    try:
        _stampede(section, server, workdir, plan, sizes)
        _flush(server)
        _hits(section, server, plan)
        _flush(server)
        _soak(section, server, workdir, sizes)
    finally:
        server.stop()
    frozen = RedisServer(workdir / "redis-frozen").start()
    try:
        _frozen(section, frozen, sizes)
    finally:
        frozen.stop()
    return section


def _flush(server: Any) -> None:
    server.admin("FLUSHALL")


# -- 1. cold stampede across hosts ---------------------------------------------------------------


def _stampede(section: Section, server: Any, workdir: Path, plan: Plan, sizes: Any) -> None:
    from tests.support.procs import Workers
    from tests.support.redis_hosts import fetches, homes, stampede

    hosts, procs, coros = sizes["hosts"], sizes["procs"], sizes["coros"]
    delay = plan.stampede_delay
    requests: list[float] = []
    walls: list[float] = []
    errors = 0
    distinct: list[int] = []
    for r in range(plan.stampede_rounds):
        _flush(server)
        root = workdir / f"redis-stampede-{r}"
        counter, key = root / "fetches", _key()
        root.mkdir(parents=True)
        args = [
            (home, server.url, key, str(counter), coros, delay)
            for home in homes(root, hosts, procs)
        ]
        # A host that dies fails the run here (WorkerError), as in the other benchmarks.
        with Workers("spawn", timeout=180) as workers:
            workers.start(stampede, args)
            results = workers.collect()
            workers.join()
        errors += sum(1 for p in workers.procs if p.exitcode != 0)
        requests.append(float(fetches(counter)))
        walls.append(
            (max(x["end"] for x in results) - min(x["start"] for x in results)) / delay
            if results
            else float("inf")
        )
        distinct.append(len({t for x in results for t in x["tokens"]}))
    worst = max(requests, key=lambda n: abs(n - 1))
    section.ratios.append(
        Ratio(
            f"redis stampede: token requests ({hosts} hosts x {procs} procs x {coros} coroutines)",
            worst,
            tuple(requests),
            1.0,
            unit="",
            exactly=True,
        )
    )
    section.ratios.append(
        Ratio("redis stampede: wall / one fetch delay", statistics.median(walls), tuple(walls), 1.5)
    )
    section.tables.append(
        Table(
            f"Cold stampede: {hosts} hosts x {procs} processes x {coros} coroutines, fetch "
            f"delay {delay * 1000:g} ms, {plan.stampede_rounds} round(s)",
            ["token requests per round", "wall / delay", "distinct tokens", "failed processes"],
            [
                [
                    ", ".join(f"{n:g}" for n in requests),
                    ", ".join(f"{w:.2f}" for w in walls),
                    ", ".join(map(str, distinct)),
                    str(errors),
                ]
            ],
        )
    )


def _key() -> str:
    import base64

    return base64.urlsafe_b64encode(bench_key()).decode()


# -- 2. hit latency vs raw GET + AES-GCM ---------------------------------------------------------


def _hits(section: Section, server: Any, plan: Plan) -> None:
    import redis
    import redis.asyncio
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    from agw_persist_cache import CacheConfig, PersistentTokenCache

    n = min(plan.sample_keys, 200)
    scopes = [f"urn:agw:bench:redis:{i:04d}" for i in range(n)]
    key = _key()
    config = CacheConfig(
        url=server.url,
        keys=[key],
        max_system_token_cache_size=MAX_ROWS,
        last_used_interval_seconds=3600.0,  # as in benchmark 1: the LRU touch is amortized
    )
    cache = PersistentTokenCache(config=config)
    aes = AESGCM(AESGCM.generate_key(bit_length=256))
    raw = redis.Redis.from_url(server.url)
    floor_keys = []
    for i, scope in enumerate(scopes):
        token = make_token()
        cache.set_system_token(scope, token, expires_at=time.time() + 3600)
        nonce = os.urandom(12)
        k = f"floor:{i:04d}"
        raw.set(k, nonce + aes.encrypt(nonce, token.encode(), k.encode()))
        floor_keys.append(k)

    def floor_get(k: str) -> str:
        value = raw.get(k)
        assert value is not None
        return aes.decrypt(value[:12], value[12:], k.encode()).decode()

    loop = asyncio.new_event_loop()
    araw = redis.asyncio.Redis.from_url(server.url)

    async def afloor_get(k: str) -> str:
        value = await araw.get(k)
        assert value is not None
        return aes.decrypt(value[:12], value[12:], k.encode()).decode()

    try:
        sync = interleave(
            {
                "raw GET + AES-GCM": calls(floor_get, floor_keys),
                "cache": calls(cache.get_system_token, scopes),
            },
            rounds=plan.rounds,
            iterations=plan.hit_iterations,
            warmup=min(plan.warmup, 200),
        )
        asyn = interleave(
            {
                "raw async GET + AES-GCM": awaited_calls(loop, afloor_get, floor_keys),
                "cache (async)": awaited_calls(loop, cache.aget_system_token, scopes),
            },
            rounds=plan.rounds,
            iterations=plan.hit_iterations,
            warmup=min(plan.warmup, 200),
        )
    finally:
        loop.run_until_complete(araw.aclose())
        loop.run_until_complete(cache.aclose())
        loop.close()
        raw.close()
        cache.close()
    section.ratios.append(
        ratio(
            "redis sync hit / raw GET + AES-GCM",
            sync["cache"],
            sync["raw GET + AES-GCM"],
            target=1.3,
        )
    )
    section.ratios.append(
        ratio(
            "redis async hit / raw redis.asyncio GET + AES-GCM",
            asyn["cache (async)"],
            asyn["raw async GET + AES-GCM"],
            target=1.5,
        )
    )
    series = {**sync, **asyn}
    baselines = {"cache": "raw GET + AES-GCM", "cache (async)": "raw async GET + AES-GCM"}
    section.tables.append(
        Table(
            f"Hit latency on loopback TCP ({n} keys of a 1.2 KB token)",
            LATENCY_COLUMNS,
            latency_rows(series, baselines),
        )
    )


# -- 3. Redis frozen ----------------------------------------------------------------------------


def _frozen(section: Section, server: Any, sizes: Any) -> None:
    from agw_persist_cache import CacheConfig, PersistentTokenCache

    fetch_delay, seconds = 0.05, sizes["frozen"]
    config = CacheConfig(url=server.url, keys=[_key()])  # default timeout and breaker
    timeout = config.socket_timeout_seconds
    cache = PersistentTokenCache(config=config)
    cache.set_system_token("warm", "connections-open")

    fetch_times: list[float] = []

    def fetch() -> str:
        t0 = time.perf_counter()
        time.sleep(fetch_delay)
        fetch_times.append(time.perf_counter() - t0)
        return "direct"

    latencies: list[float] = []
    after_open: list[float] = []
    errors: list[str] = []
    stop = time.monotonic() + seconds
    server.freeze()

    def caller(i: int) -> None:
        j = 0
        while time.monotonic() < stop:
            circuit_open = cache._backend.unavailable is not None
            t0 = time.perf_counter()
            try:
                cache.system_token(f"frozen-{i}-{j}", fetch)
            except Exception as exc:
                errors.append(type(exc).__name__)
            spent = time.perf_counter() - t0
            latencies.append(spent)
            if circuit_open:
                after_open.append(spent)
            j += 1

    try:
        threads = [threading.Thread(target=caller, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        server.thaw()
        cache.close()
    one_fetch = percentile(fetch_times, 99)  # what a fetch took here (sleep overshoots)
    bound = timeout + one_fetch
    p99 = percentile(latencies, 99)
    section.ratios.append(
        Ratio("redis frozen: p99 call / (socket timeout + one fetch)", p99 / bound, (), 1.0)
    )
    median_fetch = statistics.median(fetch_times)
    redis_time = statistics.median(after_open) - median_fetch if after_open else float("nan")
    section.ratios.append(
        Ratio(
            "redis frozen, circuit open: median call time beyond the fetch (ms)",
            redis_time * 1000,
            (),
            1.0,
            unit=" ms",
        )
    )
    section.tables.append(
        Table(
            f"Frozen Redis (SIGSTOP) for {seconds:g} s: 8 threads of get-or-fetch, fetch "
            f"{fetch_delay * 1000:g} ms, socket timeout {timeout:g} s, breaker "
            f"{config.circuit_breaker_seconds:g} s",
            [
                "calls",
                "p50 ms",
                "p99 ms",
                "max ms",
                "one fetch p99 ms",
                "calls after the circuit opened",
                "errors",
            ],
            [
                [
                    str(len(latencies)),
                    f"{percentile(latencies, 50) * 1000:.1f}",
                    f"{p99 * 1000:.1f}",
                    f"{max(latencies, default=0) * 1000:.1f}",
                    f"{one_fetch * 1000:.1f}",
                    str(len(after_open)),
                    str(len(errors)),
                ]
            ],
        )
    )


# -- 4. nothing lost -----------------------------------------------------------------------------


def _soak(section: Section, server: Any, workdir: Path, sizes: Any) -> None:
    from tests.support.procs import Workers
    from tests.support.redis_hosts import homes, soak

    hosts, seconds = sizes["soak_hosts"], sizes["soak"]
    root = workdir / "redis-soak"
    root.mkdir(parents=True)
    key = _key()
    args = [  # 2 processes per host
        (home, server.url, key, seconds, seed) for seed, home in enumerate(homes(root, hosts, 2))
    ]
    # A host that dies fails the run here (WorkerError), as in the other benchmarks.
    with Workers("spawn", timeout=seconds + 120) as workers:
        workers.start(soak, args)
        results: list[dict[str, Any]] = workers.collect()
        workers.join()
    codes = [p.exitcode for p in workers.procs]
    wrong = sum(len(r["wrong"]) for r in results)
    raised = sum(r["n_errors"] for r in results) + sum(1 for c in codes if c != 0)
    ops = sum(r["ops"] for r in results)
    section.ratios.append(
        Ratio("redis soak: wrong tokens served", float(wrong), (), 0.0, unit="", exactly=True)
    )
    section.ratios.append(
        Ratio(
            "redis soak: exceptions reaching a caller",
            float(raised),
            (),
            0.0,
            unit="",
            exactly=True,
        )
    )
    section.tables.append(
        Table(
            f"Random get / set / get-or-fetch / invalidate / clear: {len(args)} processes on "
            f"{hosts} hosts (3 threads and an event loop each) for {seconds:g} s",
            ["operations", "wrong tokens", "exceptions to callers", "process exit codes"],
            [[f"{ops:,}", str(wrong), str(raised), ", ".join(str(c) for c in codes)]],
        )
    )
    for r in results:
        section.notes.extend(str(e)[:200] for e in r["errors"])
    with contextlib.suppress(OSError):
        shutil.rmtree(root)
