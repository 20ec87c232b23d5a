"""Several real processes (spawn) share one cache file against one counting token endpoint:
cold stampede, outage back-off and refresh-ahead, as seen by the endpoint."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Iterator
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
from tests.support.procs import Worker, Workers
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


def _stampede_worker(db: str, creds: CustomerCredentials, ca: str, worker: Worker) -> None:
    tokens = _tokens(db, creds, ca, {})
    worker.wait()
    worker.report((tokens.system_token(), tokens.user_token(USER_JWT)))
    _close(tokens)


def _outage_worker(db: str, creds: CustomerCredentials, callers: int, worker: Worker) -> None:
    async def main() -> list[tuple[str, int | None]]:
        tokens = _tokens(db, creds, None, {"fetch_backoff_seconds": 120.0})
        worker.wait()
        outcomes = await asyncio.gather(
            *(tokens.asystem_token() for _ in range(callers)), return_exceptions=True
        )
        await tokens.cache.aclose()
        await tokens.ias_client.aclose()
        return [(type(o).__name__, getattr(o, "status", None)) for o in outcomes]

    worker.report(asyncio.run(main()))


def _refresh_worker(db: str, creds: CustomerCredentials, commands: Any, worker: Worker) -> None:
    tokens = _tokens(db, creds, None, REFRESH_CONFIG)
    while commands.get(timeout=TIMEOUT) == "get":
        worker.report(tokens.system_token())
    _close(tokens)


@pytest.fixture
def workers() -> Iterator[Workers]:
    with Workers("spawn", timeout=TIMEOUT) as pool:
        yield pool


@pytest.fixture(scope="module")
def tls() -> TlsMaterial:
    return make_tls()


def test_cold_stampede_of_four_processes_makes_one_request_per_token(
    workers: Workers, tls: TlsMaterial, tmp_path: Path
) -> None:
    with TokenServer(ssl_context=tls.server_context(require_client_cert=True), delay=0.5) as srv:
        creds = mtls_credentials(tls, srv.token_url)
        ca = str(tls.write_ca(tmp_path))
        workers.start(_stampede_worker, [(str(tmp_path / "tokens.db"), creds, ca)] * WORKERS)
        results = workers.collect()
        workers.join()
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
        workers.start(_outage_worker, [(str(tmp_path / "tokens.db"), creds, 20)] * WORKERS)
        outcomes = [o for batch in workers.collect() for o in batch]
        workers.join()
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
        workers.start(_refresh_worker, [(db, creds, command) for command in commands])

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
        workers.join()
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
