"""One table size, filled the same way in every store: the floor, the cache and the peers."""

from __future__ import annotations

import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._floor import RawStore, bench_key, digest_of, make_token, scope_of
from ._peers import DiskcachePeer, MsalPeer
from ._subject import open_cache, populate_cache

if TYPE_CHECKING:
    from agw_persist_cache import PersistentTokenCache

TOKEN_LIFETIME = 6 * 3600.0
"""Rows expire far beyond any run, so every timed hit is a hit."""
TOUCH_INTERVAL = 3600.0
"""``last_used_interval_seconds`` of the latency caches. A hit rewrites its row's ``last_used``
(one small write transaction) at most once per interval, 30 s by default: a hot token pays it
once per thousands of hits, but a benchmark cycling 1,000 rows a few dozen times each would
pay it every few dozen hits. Timed hits measure the read path; the touch is a write."""


def log(message: str) -> None:
    """Progress on stderr: the run takes minutes."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


@dataclass
class Fixture:
    """Stores holding the same ``rows`` tokens, plus the random rows the timed calls cycle over."""

    rows: int
    directory: Path
    key: bytes
    expires_at: float
    scopes: list[str]
    tokens: list[str]
    hit_rows: list[int]
    set_rows: list[int]
    floor: RawStore
    reference: RawStore
    cache: PersistentTokenCache | None = None
    diskcache: DiskcachePeer | None = None
    msal: MsalPeer | None = None
    fill_seconds: dict[str, float] = field(default_factory=dict)
    fill_how: str = ""

    @property
    def label(self) -> str:
        return f"{self.rows:,} rows"

    @property
    def cache_path(self) -> Path:
        return self.directory / "cache.db"

    def open_cache(self, **config: Any) -> PersistentTokenCache:
        """Another cache instance on this fixture's file (``config`` overrides fields)."""
        settings: dict[str, Any] = {"last_used_interval_seconds": TOUCH_INTERVAL, **config}
        return open_cache(self.cache_path, self.key, **settings)

    def hit_scopes(self) -> list[str]:
        return [self.scopes[i] for i in self.hit_rows]

    def hit_digests(self) -> list[bytes]:
        return [digest_of(self.scopes[i]) for i in self.hit_rows]

    def set_args(self) -> list[tuple[str, bytes, str]]:
        """``(scope, digest, fresh token)`` for each row the timed sets overwrite."""
        return [(self.scopes[i], digest_of(self.scopes[i]), make_token()) for i in self.set_rows]

    def verify(self) -> None:
        """Every store answers the sampled rows with the right token: hits, not misses."""
        for i in self.hit_rows[:20]:
            scope, token = self.scopes[i], self.tokens[i]
            answers = {
                "floor": self.floor.get(digest_of(scope)),
                "reference": self.reference.get_scope(scope),
                "cache": self.cache.get_system_token(scope) if self.cache else token,
                "diskcache": self.diskcache.get(scope) if self.diskcache else token,
                "msal-extensions": self.msal.get(scope) if self.msal else token,
            }
            wrong = sorted(name for name, answer in answers.items() if answer != token)
            if wrong:
                raise RuntimeError(f"{wrong} did not return the stored token for row {i}")

    def close(self) -> None:
        for store in (self.floor, self.reference, self.cache, self.diskcache, self.msal):
            if store is not None:
                store.close()


def _timed(fill: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fill()
    return time.perf_counter() - t0


def build_fixture(
    workdir: Path, rows: int, sample: int, *, with_cache: bool, with_peers: bool
) -> Fixture:
    """Create and fill every store for ``rows`` tokens under ``workdir/rows-N``."""
    directory = workdir / f"rows-{rows}"
    directory.mkdir(parents=True)
    rng = random.Random(rows)
    scopes = [scope_of(i) for i in range(rows)]
    tokens = [make_token() for _ in range(rows)]
    expires_at = time.time() + TOKEN_LIFETIME
    key = bench_key()
    fixture = Fixture(
        rows=rows,
        directory=directory,
        key=key,
        expires_at=expires_at,
        scopes=scopes,
        tokens=tokens,
        hit_rows=[rng.randrange(rows) for _ in range(sample)],
        set_rows=[rng.randrange(rows) for _ in range(sample)],
        floor=RawStore(directory / "floor.db", key),
        reference=RawStore(directory / "reference.db", key, envelope=True),
    )
    fill = fixture.fill_seconds
    fill["floor"] = _timed(lambda: fixture.floor.populate(scopes, tokens, expires_at))
    fill["reference"] = _timed(lambda: fixture.reference.populate(scopes, tokens, expires_at))
    if with_cache:
        fixture.cache = fixture.open_cache()
        fill["cache"], how = populate_cache(fixture.cache, scopes, tokens, expires_at)
        fixture.fill_how = how
        log(f"{rows:,} rows: cache filled in {fill['cache']:.1f} s ({how})")
    if with_peers:
        fixture.diskcache = DiskcachePeer(directory / "diskcache")
        fill["diskcache"] = _timed(lambda: _fill(fixture.diskcache, fixture))
        fixture.msal = MsalPeer(directory / "msal.json")
        fill["msal"] = _timed(lambda: _fill(fixture.msal, fixture))
    fixture.verify()
    return fixture


def _fill(peer: DiskcachePeer | MsalPeer | None, fixture: Fixture) -> None:
    assert peer is not None
    peer.populate(fixture.scopes, fixture.tokens, fixture.expires_at)
