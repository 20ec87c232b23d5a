"""Benchmarks 1, 2, 3 and 6: hit (sync and async), set and prune latency at each table size,
every size and subject interleaved in the same rounds."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import aiosqlite

from agw_persist_cache.backends.sqlite import SqliteBackend

from ._fixture import Fixture
from ._floor import KIND, SELECT, RawStore
from ._harness import (
    LATENCY_COLUMNS,
    Ratio,
    Runner,
    Section,
    Series,
    Table,
    awaited_calls,
    calls,
    interleave,
    latency_rows,
    ratio,
    us,
)
from ._plan import Plan

if TYPE_CHECKING:
    from agw_persist_cache import PersistentTokenCache


def _cache(fixture: Fixture) -> Any:
    if fixture.cache is None:
        raise RuntimeError("this benchmark needs the core cache (agw_persist_cache)")
    return fixture.cache


def _size_ratios(
    series: dict[str, Series],
    fixtures: Sequence[Fixture],
    what: str,
    subject: str,
    baseline: str,
    target: float | None,
) -> list[Ratio]:
    """``subject @size / baseline @size`` per size (against ``target``), then largest/smallest."""
    out = [
        ratio(
            f"{what} {f.label}: {subject} / {baseline}",
            series[f"{subject} @{f.rows}"],
            series[f"{baseline} @{f.rows}"],
            target=target,
        )
        for f in fixtures
    ]
    if len(fixtures) > 1:
        small, large = fixtures[0], fixtures[-1]
        out.append(
            ratio(
                f"{what}: {subject} {large.label} / {small.label}",
                series[f"{subject} @{large.rows}"],
                series[f"{subject} @{small.rows}"],
            )
        )
    return out


def bench_hit(fixtures: Sequence[Fixture], plan: Plan) -> Section:
    """1. Sync hit: ``get_system_token`` vs the floor, and a floor that also hashes the scope key
    and parses a JSON envelope (what a straightforward implementation adds)."""
    extra: list[Any] = []
    runners: dict[str, Runner] = {}
    baselines: dict[str, str] = {}
    for f in fixtures:
        digests, scopes, cache = f.hit_digests(), f.hit_scopes(), _cache(f)
        floor, reference = f.floor, f.reference
        n = f.rows
        runners[f"floor @{n}"] = calls(floor.get, digests)
        runners[f"floor+sha256+JSON @{n}"] = calls(reference.get_scope, scopes)
        runners[f"cache @{n}"] = calls(cache.get_system_token, scopes)
        # Its own instance: emptying the memos of `cache` would slow that row's next round.
        forgetful = f.open_cache()
        extra.append(forgetful)
        runners[f"cache, first open @{n}"] = calls(
            forgetful.get_system_token, scopes, before=_forget(forgetful)
        )
        for name in ("floor+sha256+JSON", "cache", "cache, first open"):
            baselines[f"{name} @{n}"] = f"floor @{n}"
    try:
        series = interleave(
            runners, rounds=plan.rounds, iterations=plan.hit_iterations, warmup=plan.warmup
        )
    finally:
        for instance in extra:
            instance.close()
    return Section(
        key="hit",
        title="1. Sync hit: get_system_token vs the raw sqlite3 + AES-GCM floor",
        method=(
            "Each call reads a random row of the table (the same rows for every subject). "
            "Floor: `SELECT ... WHERE digest = ?` on a WAL database with synchronous=NORMAL, an "
            "expiry check, AES-256-GCM open of the 1.2 KB token with associated data, decode. "
            "The digest is precomputed for the floor; the cache computes it from the scope key. "
            "`cache` is the steady state: the cache remembers the token it last opened per row "
            "(keyed by the row's nonce) and skips AES-GCM while the row is unchanged. "
            "Each connection also remembers its last read of a key and answers it again after "
            "one `PRAGMA data_version` (it moves on any other connection's commit) while "
            "nothing was written. `cache, first open` empties both memories before each call "
            "(untimed): a row this process has not read nor opened yet, e.g. just after "
            "another process wrote it. "
            "The caches here rewrite a row's `last_used` at most hourly instead of every 30 s "
            "(the LRU touch, a small write, is amortized over a hot token's hits; timed hits "
            "measure the read path)."
        ),
        tables=[Table("Hit latency", LATENCY_COLUMNS, latency_rows(series, baselines))],
        ratios=[
            *_size_ratios(series, fixtures, "sync hit", "cache", "floor", 1.3),
            *_size_ratios(series, fixtures, "sync hit", "cache, first open", "floor", 1.5)[
                : len(fixtures)
            ],
        ],
    )


def _forget(cache: PersistentTokenCache) -> Callable[[object], None]:
    """An untimed hook: ``cache`` forgets what it opened and read (private names: a missing
    one fails here, instead of quietly timing the steady state)."""
    opened, backend = cache._shelf.memory, cache._backend
    assert isinstance(backend, SqliteBackend)

    def forget(_: object) -> None:
        opened.clear()
        backend.forget_reads()

    return forget


def bench_async_hit(fixtures: Sequence[Fixture], plan: Plan) -> Section:
    """2. Async hit: ``await aget_system_token`` vs the sync floor, and aiosqlite's own cost."""
    loop = asyncio.new_event_loop()
    caches = [f.open_cache() for f in fixtures]
    connections = [loop.run_until_complete(aiosqlite.connect(f.floor.path)) for f in fixtures]
    runners: dict[str, Runner] = {}
    baselines: dict[str, str] = {}
    try:
        for f, cache, conn in zip(fixtures, caches, connections, strict=True):
            digests, scopes, floor, n = f.hit_digests(), f.hit_scopes(), f.floor, f.rows

            async def aio_floor(
                digest: bytes, conn: aiosqlite.Connection = conn, floor: RawStore = floor
            ) -> str:
                rows = await conn.execute_fetchall(SELECT, (digest,))
                key_id, nonce, sealed, _ = next(iter(rows))
                return floor.open(digest, KIND, key_id, nonce, sealed)

            runners[f"floor @{n}"] = calls(floor.get, digests)
            runners[f"aiosqlite floor @{n}"] = awaited_calls(loop, aio_floor, digests)
            runners[f"cache async @{n}"] = awaited_calls(loop, cache.aget_system_token, scopes)
            baselines[f"aiosqlite floor @{n}"] = baselines[f"cache async @{n}"] = f"floor @{n}"
        series = interleave(
            runners, rounds=plan.rounds, iterations=plan.hit_iterations, warmup=plan.warmup
        )
    finally:
        for conn in connections:
            loop.run_until_complete(conn.close())
        for cache in caches:
            loop.run_until_complete(cache.aclose())
        loop.close()
    return Section(
        key="async",
        title="2. Async hit: await aget_system_token vs the same floor",
        method=(
            "One event loop; each sample spans one `await`. `aiosqlite floor` is the floor run "
            "through aiosqlite (`execute_fetchall`): the price of a thread hop per call."
        ),
        tables=[Table("Async hit latency", LATENCY_COLUMNS, latency_rows(series, baselines))],
        ratios=_size_ratios(series, fixtures, "async hit", "cache async", "floor", 2.0),
    )


def bench_set(fixtures: Sequence[Fixture], plan: Plan) -> Section:
    """3 (and the set half of 6). ``set_system_token`` vs seal + INSERT OR REPLACE."""
    runners: dict[str, Runner] = {}
    baselines: dict[str, str] = {}
    for f in fixtures:
        args, cache, floor, n, exp = f.set_args(), _cache(f), f.floor, f.rows, f.expires_at

        def cache_set(a: tuple[str, bytes, str], c: Any = cache, exp: float = exp) -> None:
            c.set_system_token(a[0], a[2], expires_at=exp)

        def floor_set(a: tuple[str, bytes, str], s: Any = floor, exp: float = exp) -> None:
            s.set(a[1], a[2], exp)

        runners[f"floor @{n}"] = calls(floor_set, args)
        runners[f"cache @{n}"] = calls(cache_set, args)
        baselines[f"cache @{n}"] = f"floor @{n}"
    series = interleave(
        runners,
        rounds=plan.rounds,
        iterations=plan.set_iterations,
        warmup=max(20, plan.set_iterations // 4),
    )
    return Section(
        key="set",
        title="3. Set: set_system_token vs raw seal + INSERT OR REPLACE",
        method=(
            "Each call overwrites a random existing row with a fresh 1.2 KB token. Floor: "
            "AES-256-GCM seal, then `BEGIN IMMEDIATE; INSERT OR REPLACE ...; COMMIT` (WAL, "
            "synchronous=NORMAL, same indexes). The cache is given `expires_at`, so no JWT "
            "parsing is involved."
        ),
        tables=[Table("Set latency", LATENCY_COLUMNS, latency_rows(series, baselines))],
        ratios=_size_ratios(series, fixtures, "set", "cache", "floor", 2.0),
    )


def bench_prune(fixtures: Sequence[Fixture], plan: Plan) -> Section:
    """6. ``prune()`` when nothing is due, and when 1% of rows are over the LRU limit."""
    runners: dict[str, Runner] = {}
    baselines: dict[str, str] = {}
    for f in fixtures:
        cache, floor, n = _cache(f), f.floor, f.rows
        runners[f"floor DELETE expired @{n}"] = calls(RawStore.delete_expired, [floor])
        runners[f"cache prune @{n}"] = calls(lambda c: c.prune(), [cache])
        baselines[f"cache prune @{n}"] = f"floor DELETE expired @{n}"
    series = interleave(runners, rounds=plan.rounds, iterations=plan.prune_iterations, warmup=2)
    evict = Table(
        "prune() evicting 1% of the rows (LRU over a lowered limit), one call per size",
        ["rows", "rows removed", "ms", "µs per removed row"],
    )
    for f in fixtures:
        surplus = max(1, f.rows // 100)
        with f.open_cache(max_system_token_cache_size=f.rows - surplus) as c:
            c.get_system_token(f.scopes[0])  # opens the connection outside the timing
            t0 = time.perf_counter_ns()
            removed = c.prune()
            elapsed = time.perf_counter_ns() - t0
        per_row = us(elapsed / removed) if removed else "-"
        evict.rows.append([f"{f.rows:,}", f"{removed:,}", f"{elapsed / 1e6:.1f}", per_row])
    return Section(
        key="prune",
        title="6. Prune at each size (and set latency at each size: see 3)",
        method=(
            "`prune()` with nothing expired and nothing over the limits, repeated; the floor "
            "reference is one `DELETE FROM tokens WHERE expires_at <= ?` on the expiry index. "
            "Then one prune per size through a second cache whose row limit is 1% below the "
            "row count."
        ),
        tables=[
            Table(
                "prune() with nothing to remove", LATENCY_COLUMNS, latency_rows(series, baselines)
            ),
            evict,
        ],
        ratios=_size_ratios(series, fixtures, "prune", "cache prune", "floor DELETE expired", None),
    )
