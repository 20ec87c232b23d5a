"""Several real processes (spawn) share one cache file against one counting token endpoint:
cold stampede, outage back-off and refresh-ahead, as seen by the endpoint."""

from __future__ import annotations

import asyncio
import multiprocessing
import queue
import time
from collections import Counter
from collections.abc import Callable, Iterator
from multiprocessing.context import SpawnContext
from pathlib import Path
from typing import Any

import pytest
from _tls import (
    USER_JWT,
    TlsMaterial,
    cache_config,
    make_tls,
    mtls_credentials,
    transparent_credentials,
)

from agw_persist_cache import PersistentTokenCache
from agw_persist_cache.agentgateway import AgentGatewayTokens, CustomerCredentials, IasTokenClient
from tests.support.tokenserver import TokenServer

WORKERS = 4
TIMEOUT = 90.0
REFRESH_CONFIG = {"token_expiry_buffer_seconds": 70.0, "refresh_ahead_ratio": 0.5}
"""With a 100 s token: still valid for ~30 s, and due for refresh from the first hit."""


def _tokens(
    db: str, creds: CustomerCredentials, ca: str | None, config: dict[str, Any]
) -> AgentGatewayTokens:
    cache = PersistentTokenCache(db, config=cache_config(**config))
    return AgentGatewayTokens(cache, IasTokenClient(creds, ca_file=ca))


def _close(tokens: AgentGatewayTokens) -> None:
    tokens.ias_client.close()
    tokens.cache.close()


def _stampede_worker(
    index: int, db: str, creds: CustomerCredentials, ca: str, barrier: Any, results: Any
) -> None:
    tokens = _tokens(db, creds, ca, {})
    barrier.wait(timeout=TIMEOUT)
    results.put((index, (tokens.system_token(), tokens.user_token(USER_JWT))))
    _close(tokens)


def _outage_worker(
    index: int, db: str, creds: CustomerCredentials, barrier: Any, callers: int, results: Any
) -> None:
    async def main() -> list[tuple[str, int | None]]:
        tokens = _tokens(db, creds, None, {"fetch_backoff_seconds": 120.0})
        barrier.wait(timeout=TIMEOUT)
        outcomes = await asyncio.gather(
            *(tokens.asystem_token() for _ in range(callers)), return_exceptions=True
        )
        await tokens.cache.aclose()
        await tokens.ias_client.aclose()
        return [(type(o).__name__, getattr(o, "status", None)) for o in outcomes]

    results.put((index, asyncio.run(main())))


def _refresh_worker(
    index: int, db: str, creds: CustomerCredentials, commands: Any, results: Any
) -> None:
    tokens = _tokens(db, creds, None, REFRESH_CONFIG)
    while commands.get(timeout=TIMEOUT) == "get":
        results.put((index, tokens.system_token()))
    _close(tokens)


class Workers:
    """Start N spawn processes, collect one result per worker per round, always reap."""

    def __init__(self, ctx: SpawnContext) -> None:
        self.ctx = ctx
        self.results = ctx.Queue()
        self.procs: list[multiprocessing.process.BaseProcess] = []

    def start(self, target: Callable[..., None], *args: Any) -> None:
        for index in range(WORKERS):
            proc = self.ctx.Process(target=target, args=(index, *args, self.results))
            proc.start()
            self.procs.append(proc)

    def collect(self) -> list[Any]:
        """One result from every worker; fails fast if a worker died instead."""
        got: dict[int, Any] = {}
        deadline = time.monotonic() + TIMEOUT
        while len(got) < len(self.procs):
            try:
                index, value = self.results.get(timeout=0.2)
            except queue.Empty:
                dead = [p.exitcode for p in self.procs if p.exitcode not in (None, 0)]
                assert not dead, f"worker(s) died with exit codes {dead}"
                assert time.monotonic() < deadline, "workers did not answer in time"
                continue
            got[index] = value
        return [got[i] for i in range(len(self.procs))]

    def reap(self) -> list[int | None]:
        for proc in self.procs:
            proc.join(timeout=TIMEOUT)
        for proc in self.procs:
            if proc.is_alive():
                proc.kill()
                proc.join()
        return [proc.exitcode for proc in self.procs]


@pytest.fixture
def workers() -> Iterator[Workers]:
    pool = Workers(multiprocessing.get_context("spawn"))
    try:
        yield pool
    finally:
        pool.reap()


@pytest.fixture(scope="module")
def tls() -> TlsMaterial:
    return make_tls()


def test_cold_stampede_of_four_processes_makes_one_request_per_token(
    workers: Workers, tls: TlsMaterial, tmp_path: Path
) -> None:
    with TokenServer(ssl_context=tls.server_context(require_client_cert=True), delay=0.5) as srv:
        creds = mtls_credentials(tls, srv.token_url)
        barrier = workers.ctx.Barrier(WORKERS)
        ca = str(tls.write_ca(tmp_path))
        workers.start(_stampede_worker, str(tmp_path / "tokens.db"), creds, ca, barrier)
        results = workers.collect()
        assert workers.reap() == [0] * WORKERS
        assert len(set(results)) == 1  # everyone got the same system and user token
        assert srv.requests == 2  # one client_credentials, one jwt-bearer, for the whole host
        assert sorted(f["grant_type"] for f in srv.forms) == [
            "client_credentials",
            "urn:ietf:params:oauth:grant-type:jwt-bearer",
        ]


def test_outage_backoff_four_processes_of_twenty_coroutines_make_one_request(
    workers: Workers, tmp_path: Path
) -> None:
    with TokenServer(status=500, delay=0.3) as srv:
        creds = transparent_credentials(srv.token_url)
        barrier = workers.ctx.Barrier(WORKERS)
        workers.start(_outage_worker, str(tmp_path / "tokens.db"), creds, barrier, 20)
        outcomes = [o for batch in workers.collect() for o in batch]
        assert workers.reap() == [0] * WORKERS
        assert srv.requests == 1  # not 80
    assert len(outcomes) == 80
    assert Counter(name for name, _ in outcomes) == {
        "TokenFetchError": 1,
        "FetchBackoffError": 79,
    }
    assert {status for _, status in outcomes} == {500}


def test_refresh_ahead_one_refresh_for_the_host_and_no_caller_waits_for_it(
    workers: Workers, tmp_path: Path
) -> None:
    db = str(tmp_path / "tokens.db")
    with TokenServer(token_ttl=100) as srv:
        creds = transparent_credentials(srv.token_url)
        warm = _tokens(db, creds, None, REFRESH_CONFIG)
        old = warm.system_token()
        assert srv.requests == 1
        srv.token_ttl = 1000  # the replacement is not due for refresh again
        srv.hold()  # the refresh stays in flight until released: an unbounded injected delay
        commands = [workers.ctx.Queue() for _ in range(WORKERS)]
        for index in range(WORKERS):
            proc = workers.ctx.Process(
                target=_refresh_worker, args=(index, db, creds, commands[index], workers.results)
            )
            proc.start()
            workers.procs.append(proc)

        def round_of_calls() -> list[str]:
            for command in commands:
                command.put("get")
            return list(workers.collect())

        try:
            assert round_of_calls() == [old] * WORKERS  # every caller answered at once ...
            assert srv.wait_for_requests(2, timeout=TIMEOUT)  # ... and one refresh started
            assert round_of_calls() == [old] * WORKERS  # callers still answered meanwhile
            assert srv.in_flight == 1 and srv.completed == 1  # while it was still held
        finally:
            srv.release()
        assert srv.wait_for_completed(2, timeout=TIMEOUT)
        deadline = time.monotonic() + TIMEOUT
        while warm.cache.get_system_token(warm.scope_key) == old:
            assert time.monotonic() < deadline, "the refreshed token never reached the cache"
            time.sleep(0.05)
        new = warm.cache.get_system_token(warm.scope_key)
        assert round_of_calls() == [new] * WORKERS
        for command in commands:
            command.put("stop")
        assert workers.reap() == [0] * WORKERS
        _close(warm)
        assert srv.requests == 2  # the warm-up and exactly one refresh for the whole host


async def test_async_refresh_ahead_answers_twenty_coroutines_while_the_refresh_is_held(
    tmp_path: Path,
) -> None:
    with TokenServer(token_ttl=100) as srv:
        creds = transparent_credentials(srv.token_url)
        tokens = _tokens(str(tmp_path / "t.db"), creds, None, REFRESH_CONFIG)
        old = await tokens.asystem_token()
        srv.token_ttl = 1000
        srv.hold()
        try:
            answers = await asyncio.gather(*(tokens.asystem_token() for _ in range(20)))
            assert answers == [old] * 20
            assert await asyncio.to_thread(srv.wait_for_requests, 2, TIMEOUT)
            assert await tokens.asystem_token() == old
            assert srv.in_flight == 1
        finally:
            srv.release()
        assert await asyncio.to_thread(srv.wait_for_completed, 2, TIMEOUT)
        deadline = time.monotonic() + TIMEOUT
        while (new := await tokens.cache.aget_system_token(tokens.scope_key)) == old:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        assert await tokens.asystem_token() == new
        await tokens.cache.aclose()
        await tokens.ias_client.aclose()
        assert srv.requests == 2
