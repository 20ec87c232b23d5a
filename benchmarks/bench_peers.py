"""Benchmark 7: diskcache and msal-extensions doing the same hit and set, next to the floor and
the cache; plus a hit right after another instance wrote (where whole-file stores pay)."""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from ._fixture import Fixture
from ._floor import RawStore
from ._harness import (
    LATENCY_COLUMNS,
    Ratio,
    Runner,
    Section,
    Series,
    Table,
    calls,
    interleave,
    latency_rows,
    ratio,
)
from ._peers import DiskcachePeer, MsalPeer
from ._plan import Plan


class Store(Protocol):
    """What the peer benchmark calls: get by scope, set by scope (digest for the floor)."""

    def get(self, scope: Any) -> str | None: ...
    def set(self, scope: Any, token: str, expires_at: float) -> None: ...
    def close(self) -> None: ...


class _CacheStore:
    """The cache under the peers' calling convention."""

    def __init__(self, cache: Any) -> None:
        self._cache = cache

    def get(self, scope: str) -> str | None:
        token: str | None = self._cache.get_system_token(scope)
        return token

    def set(self, scope: str, token: str, expires_at: float) -> None:
        self._cache.set_system_token(scope, token, expires_at=expires_at)

    def close(self) -> None:
        self._cache.close()


def _stores(f: Fixture) -> dict[str, tuple[Store, Callable[[], Store], bool]]:
    """name -> (store, open a second instance on the same file, keyed by digest?)."""
    assert f.cache is not None and f.diskcache is not None and f.msal is not None
    diskcache_dir, msal_path, floor_path = f.diskcache.directory, f.msal.path, f.floor.path
    return {
        "floor": (f.floor, lambda: RawStore(floor_path, f.key), True),
        "cache": (
            _CacheStore(f.cache),
            lambda: _CacheStore(f.open_cache()),
            False,
        ),
        "diskcache": (f.diskcache, lambda: DiskcachePeer(diskcache_dir), False),
        "msal-extensions": (f.msal, lambda: MsalPeer(msal_path), False),
    }


def bench_peers(fixtures: Sequence[Fixture], plan: Plan) -> Section:
    """Hit, set and hit-after-another-writer for every store, all interleaved per size."""
    hit: dict[str, Runner] = {}
    put: dict[str, Runner] = {}
    after: dict[str, Runner] = {}
    slow: dict[str, Runner] = {}
    seconds: list[Store] = []
    for f in fixtures:
        exp = f.expires_at
        reads = [(s, d) for s, d in zip(f.hit_scopes(), f.hit_digests(), strict=True)]
        writes = f.set_args()
        for name, (store, second, by_digest) in _stores(f).items():
            label = f"{name} @{f.rows}"
            key = 1 if by_digest else 0
            writer = second()
            seconds.append(writer)

            def get(a: tuple[Any, ...], s: Store = store, i: int = key) -> None:
                s.get(a[i])

            def set_(a: tuple[Any, ...], s: Store = store, i: int = key, e: float = exp) -> None:
                s.set(a[i], a[2], e)

            def other_writes(
                a: tuple[Any, ...], w: Store = writer, i: int = key, e: float = exp
            ) -> None:
                w.set(a[i], a[2], e)

            pairs = [(r[0], r[1], w[2]) for r, w in zip(reads, writes, strict=True)]
            hit[label] = calls(get, reads)
            is_slow = name == "msal-extensions" and f.rows >= plan.slow_rows
            (slow if is_slow else put)[f"Set: {label}" if is_slow else label] = calls(set_, writes)
            (slow if is_slow else after)[f"Hit after a write: {label}" if is_slow else label] = (
                calls(get, pairs, before=_shifted(other_writes, writes))
            )
    section = Section(
        key="peers",
        title="7. Peers: diskcache and msal-extensions doing the same hit and set",
        method=(
            "Same rows, same random keys. diskcache stores the token unencrypted in SQLite. "
            "msal-extensions: `PersistedTokenCache(FilePersistence(path))` with its file lock; "
            "the hit is the O(1) access-token probe of `acquire_token_for_client`, the set is "
            "`add()` of a client-credentials response (lock, reload if changed, rewrite the "
            f"whole JSON file). From {plan.slow_rows:,} rows on, msal-extensions sets and "
            f"hits-after-write take seconds each and run {plan.slow_iterations} times outside "
            "the rounds. 'Hit after a write': before each timed hit, a second instance on the "
            "same file writes another random row, untimed."
        ),
    )
    try:
        for caption, runners, iterations in (
            ("Hit", hit, plan.hit_iterations),
            ("Set", put, plan.peer_iterations),
            ("Hit right after another instance wrote a different row", after, plan.peer_iterations),
        ):
            series = interleave(
                runners, rounds=plan.rounds, iterations=iterations, warmup=min(iterations, 50)
            )
            baselines = {
                name: f"floor @{name.rsplit('@', 1)[1]}"
                for name in series
                if not name.startswith("floor")
            }
            section.tables.append(Table(caption, LATENCY_COLUMNS, latency_rows(series, baselines)))
            section.ratios.extend(_peer_ratios(caption, series))
        if slow:
            table = Table(
                f"msal-extensions at {plan.slow_rows:,}+ rows, {plan.slow_iterations} calls each, "
                "after one untimed call (not interleaved: each call takes seconds)",
                ["operation", "p50 ms", "max ms", "calls timed"],
            )
            for name, runner in slow.items():
                runner(1)
                samples = runner(plan.slow_iterations)
                table.rows.append(
                    [
                        name,
                        f"{statistics.median(samples) / 1e6:,.0f}",
                        f"{max(samples) / 1e6:,.0f}",
                        str(len(samples)),
                    ]
                )
            section.tables.append(table)
    finally:
        for writer in seconds:
            writer.close()
    return section


def _shifted(
    write: Callable[[tuple[Any, ...]], None], writes: Sequence[tuple[str, bytes, str]]
) -> Callable[[tuple[Any, ...]], None]:
    """A ``before`` hook writing the next row of ``writes`` (never the row about to be read)."""
    position = [0]

    def before(_: tuple[Any, ...]) -> None:
        write(writes[position[0] % len(writes)])
        position[0] += 1

    return before


def _peer_ratios(caption: str, series: dict[str, Series]) -> list[Ratio]:
    """Each peer over the cache at the same size (how far the cache is ahead)."""
    out = []
    for name, s in series.items():
        peer, size = name.rsplit(" @", 1)
        if peer in ("diskcache", "msal-extensions"):
            label = f"{caption.lower()} @{size}: {peer} / cache"
            out.append(ratio(label, s, series[f"cache @{size}"]))
    return out
