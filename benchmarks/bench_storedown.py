"""Benchmark 11: the store down. Processes make get-or-fetch calls for one key against a
counting token endpoint while the store is unusable: the stock SDK's per-process
``_TokenCache`` (the floor: one request per process), this cache on a SQLite path that cannot
be created, on a Redis URL where nothing listens, and on a real ``redis-server`` frozen with SIGSTOP
after the token was cached."""

from __future__ import annotations

import logging
import shutil
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from ._floor import bench_key
from ._harness import Ratio, Section, Table
from ._plan import Plan
from ._subject import open_cache
from .bench_stampede import TokenEndpoint

TITLE = "11. Store down: token requests per 1,000 calls"
SCOPE = "urn:agw:bench:store-down"
STOCK = "stock SDK `_TokenCache` (a dict per process)"
UNUSABLE = "cache, SQLite unusable (its directory is a regular file)"
REDIS_DOWN = "cache, Redis down (nothing listens on the port)"
REDIS_FROZEN = "cache, Redis frozen (SIGSTOP after the token was cached)"


@dataclass(frozen=True)
class Seen:
    """What one process saw after the warm-up call."""

    seconds: float
    errors: tuple[str, ...]
    fetches: int
    """Token requests this process made, its first call included."""


def _stock_get(fetch: Callable[[], Any]) -> Callable[[], str]:
    """The SDK's own customer-flow logic (``get_system_token_mtls``): read the per-client
    ``_TokenCache``, on a miss fetch and store."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # traceloop, at import
        from sap_cloud_sdk.agentgateway._token_cache import _TokenCache
        from sap_cloud_sdk.agentgateway.config import ClientConfig

    cache = _TokenCache(ClientConfig())

    def get() -> str:
        token = cache.get_system_token(SCOPE)
        if token is None:
            data = fetch()
            token = data["access_token"]
            cache.set_system_token(token, cache.compute_expires_at(data), SCOPE)
        return token

    return get


def _worker(
    subject: str, where: str, key: bytes, url: str, calls: int, go: Any, worker: Any
) -> None:
    """One process: one warm-up call (the store may still work), then, once ``go`` is set,
    the rest of its ``calls``, one after another."""
    logging.disable(logging.WARNING)  # the cache warns once per transition; not the subject
    from agw_persist_cache import CacheConfig, PersistentTokenCache

    fetches = 0
    with httpx.Client(timeout=60.0) as http:

        def fetch() -> Any:
            nonlocal fetches
            fetches += 1
            response = http.post(url + "/token", data={"grant_type": "client_credentials"})
            response.raise_for_status()
            return response.json()

        cache = None
        if subject == STOCK:
            get = _stock_get(fetch)
        else:
            if where.startswith("redis://"):
                cache = PersistentTokenCache(config=CacheConfig(url=where, keys=[key]))
            else:
                cache = open_cache(Path(where), key)

            def get() -> str:
                assert cache is not None
                return cache.system_token(SCOPE, fetch)

        get()
        worker.report("warm")
        if not go.wait(worker.timeout):
            raise TimeoutError("the parent never said go")
        errors = []
        t0 = time.perf_counter()
        for _ in range(calls - 1):
            try:
                get()
            except Exception as exc:  # reason: counted and shown; the agent must not see any
                errors.append(type(exc).__name__)
        seconds = time.perf_counter() - t0
        if cache is not None:
            cache.close()
    worker.report(Seen(seconds, tuple(sorted(set(errors))), fetches))


@dataclass(frozen=True)
class Row:
    """One store state: requests over calls, the slowest process's time, errors seen."""

    subject: str
    requests: int
    calls: int
    seconds: float
    errors: tuple[str, ...]
    per_process: tuple[int, ...]

    @property
    def per_thousand(self) -> float:
        return self.requests * 1000 / self.calls


def _measure(
    subject: str, where: str, endpoint: TokenEndpoint, plan: Plan, freeze: Any = None
) -> Row:
    """Spawn the processes, let them warm up, ``freeze()`` the store if asked, then go."""
    from tests.support.procs import Workers

    per_process = plan.down_calls // plan.down_procs
    before = endpoint.requests
    with Workers("spawn", timeout=300) as workers:
        go = workers.ctx.Event()
        args = (subject, where, bench_key(), endpoint.url, per_process, go)
        workers.start(_worker, [args] * plan.down_procs)
        workers.collect()  # every process made its first call
        if freeze is not None:
            freeze()
        go.set()
        seen: list[Seen] = workers.collect()
        workers.join()
    return Row(
        subject,
        endpoint.requests - before,
        per_process * plan.down_procs,
        max(s.seconds for s in seen),
        tuple(sorted({e for s in seen for e in s.errors})),
        tuple(sorted(s.fetches for s in seen)),
    )


def _rows(workdir: Path, plan: Plan, endpoint: TokenEndpoint, notes: list[str]) -> list[Row]:
    # Under a regular file, no process can create the directory. (A missing directory the
    # cache just creates. A foreign file at the path was, when this was written, refused by
    # the first process only: the next one moved it aside and started a new database.)
    blocker = workdir / "a-file"
    blocker.write_text("not a directory\n")
    rows = [
        _measure(STOCK, "", endpoint, plan),
        _measure(UNUSABLE, str(blocker / "tokens.db"), endpoint, plan),
    ]
    if shutil.which("redis-server") is None:
        notes.append("Redis rows not run: redis-server is missing (apt-get install redis-server)")
        return rows
    from tests.support.redis_server import RedisServer, free_port

    rows.append(_measure(REDIS_DOWN, f"redis://127.0.0.1:{free_port()}/0", endpoint, plan))
    server = RedisServer(workdir / "redis").start()
    try:
        rows.append(_measure(REDIS_FROZEN, server.url, endpoint, plan, freeze=server.freeze))
    finally:
        server.stop()  # thaws it first
    return rows


def bench_storedown(workdir: Path, plan: Plan) -> Section:
    """One row per store state, each a fresh set of processes against one counting endpoint."""
    directory = workdir / "store-down"
    directory.mkdir()
    per_process = plan.down_calls // plan.down_procs
    section = Section(
        key="storedown",
        title=TITLE,
        method=(
            f"{plan.down_procs} spawned processes each make {per_process} get-or-fetch calls for "
            "one system token, one after another (`cache.system_token(scope, fetch)`; for the "
            "stock SDK its own `_TokenCache` read / fetch / store, as `get_system_token_mtls` "
            "does). The fetch is an HTTP POST to a local token endpoint that answers after "
            f"{plan.down_delay * 1000:g} ms and counts requests. Each process makes its first "
            "call, the processes wait for each other, the store is frozen if the row says so, "
            "then they make the rest. Requests are counted over all calls, first ones "
            "included, and scaled to 1,000 calls. Target (issue 18): at most one request per "
            "process, the stock SDK's floor."
        ),
    )
    endpoint = TokenEndpoint(plan.down_delay)
    try:
        rows = _rows(directory, plan, endpoint, section.notes)
    finally:
        endpoint.close()
    section.tables.append(
        Table(
            f"{plan.down_procs} processes x {per_process} calls, one key, fetch "
            f"{plan.down_delay * 1000:g} ms",
            [
                "store",
                "token requests",
                "per 1,000 calls",
                "per process",
                "slowest process s",
                "errors",
            ],
            [
                [
                    r.subject,
                    f"{r.requests:,} / {r.calls:,} calls",
                    f"{r.per_thousand:,.1f}".removesuffix(".0"),
                    ", ".join(str(n) for n in r.per_process),
                    f"{r.seconds:.1f}",
                    ", ".join(r.errors) or "0",
                ]
                for r in rows
            ],
        )
    )
    for r in rows:
        target = None if r.subject == STOCK else plan.down_procs * 1000 / r.calls
        label = f"store down: token requests per 1,000 calls, {r.subject}"
        section.ratios.append(Ratio(label, round(r.per_thousand, 1), (), target, unit=""))
    return section
