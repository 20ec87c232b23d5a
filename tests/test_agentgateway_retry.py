"""Transient identity-service failures are retried inside the one fetch (2 attempts, jittered),
4xx never; the cache's host-wide back-off is recorded only after both attempts failed.
A real HTTP server on 127.0.0.1 plays each answer in turn and counts the requests it saw."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from _scripted_ias import ScriptedIas
from _tls import cache_config

from agw_persist_cache import FetchBackoffError, PersistentTokenCache, TokenFetchError
from agw_persist_cache.agentgateway import (
    AgentGatewayTokens,
    CustomerCredentials,
    IasTokenClient,
)
from agw_persist_cache.agentgateway._retry import transient_transport_error


@pytest.fixture(params=["sync", "async"])
def mode(request: pytest.FixtureRequest) -> str:
    return str(request.param)


MakeTokens = Callable[[list[int | str]], tuple[ScriptedIas, AgentGatewayTokens]]


@pytest.fixture
async def tokens_for(tmp_path: Path) -> AsyncIterator[MakeTokens]:
    """Make (server playing ``script``, tokens from it through a fresh cache file)."""
    made: list[tuple[ScriptedIas, PersistentTokenCache, IasTokenClient]] = []

    def make(script: list[int | str]) -> tuple[ScriptedIas, AgentGatewayTokens]:
        server = ScriptedIas(script).__enter__()
        creds = CustomerCredentials(server.url, "agent-client", "https://gateway.example")
        cache = PersistentTokenCache(tmp_path / "tokens.db", config=cache_config())
        client = IasTokenClient(creds, timeout=5.0)
        made.append((server, cache, client))
        return server, AgentGatewayTokens(cache, client)

    yield make
    for server, cache, client in made:
        await client.aclose()
        await cache.aclose()
        server.__exit__()


async def _token(tokens: AgentGatewayTokens, mode: str) -> str:
    return tokens.system_token() if mode == "sync" else await tokens.asystem_token()


@pytest.mark.parametrize("first", ["reset", 503, 502, 504])
async def test_one_transient_failure_is_retried_within_the_one_fetch(
    tokens_for: MakeTokens, mode: str, first: int | str
) -> None:
    server, tokens = tokens_for([first, 200])
    assert await _token(tokens, mode) == "token-2"
    assert server.hits == 2
    stats = tokens.cache.stats()
    assert (stats.fetches, stats.backoff_rejections) == (1, 0)
    assert await _token(tokens, mode) == "token-2"  # stored: no back-off was recorded
    assert server.hits == 2


@pytest.mark.parametrize("status", [400, 401, 403, 429])
async def test_4xx_is_never_retried(tokens_for: MakeTokens, mode: str, status: int) -> None:
    server, tokens = tokens_for([status, 200])
    with pytest.raises(TokenFetchError) as caught:
        await _token(tokens, mode)
    assert caught.value.status == status
    assert server.hits == 1


async def test_backoff_is_recorded_only_after_both_attempts_failed(
    tokens_for: MakeTokens, mode: str
) -> None:
    server, tokens = tokens_for([503])
    with pytest.raises(TokenFetchError) as caught:
        await _token(tokens, mode)
    assert caught.value.status == 503
    assert server.hits == 2  # two attempts, then the error reaches the cache
    with pytest.raises(FetchBackoffError):
        await _token(tokens, mode)
    assert server.hits == 2  # the back-off now answers for the host
    assert tokens.cache.stats().fetches == 1


def test_transport_errors_are_found_through_the_cause_chain() -> None:
    import httpx

    try:
        try:
            raise httpx.ReadTimeout("slow")
        except httpx.ReadTimeout as inner:
            raise TokenFetchError("IAS token request failed") from inner
    except TokenFetchError as outer:
        assert transient_transport_error(outer)
    assert not transient_transport_error(TokenFetchError("HTTP 400"))
    assert not transient_transport_error(httpx.UnsupportedProtocol("ftp://"))
