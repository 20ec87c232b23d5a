"""AgentGatewayAuth in the real MCP client (mcp 2.x streamable HTTP) against a real MCP server
behind a bearer gate: tools work, and a revoked token costs one 401 and one new token."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("mcp")

from _sap_mcp import GLOBAL_TENANT_ID, ORD_ID, LocalGateway, local_gateway
from _tls import USER_JWT, cache_config, transparent_credentials
from mcp import ClientSession
from mcp.client.streamable_http import streamable_http_client

from agw_persist_cache import PersistentTokenCache
from agw_persist_cache.agentgateway import (
    AgentGatewayAuth,
    AgentGatewayTokens,
    IasTokenClient,
)
from tests.support.tokenserver import TokenServer


@pytest.fixture(scope="module")
def gateway() -> Iterator[LocalGateway]:
    with local_gateway() as gw:
        yield gw


async def call_echo(client_module: Any, url: str, auth: AgentGatewayAuth) -> str:
    async with (
        client_module.AsyncClient(auth=auth, timeout=30) as http,
        streamable_http_client(url, http_client=http) as (read, write, *_),
        ClientSession(read, write) as session,
    ):
        await session.initialize()
        assert [t.name for t in (await session.list_tools()).tools] == ["echo"]
        result = await session.call_tool("echo", {"text": "hello"})
        return str(result.content[0].text)  # type: ignore[union-attr]  # echo returns text


@pytest.mark.parametrize("client_lib", ["httpx", "httpx2"])
@pytest.mark.parametrize("user_jwt", [None, USER_JWT], ids=["system", "user"])
async def test_mcp_client_uses_the_shared_token_and_survives_a_revoked_one(
    gateway: LocalGateway, tmp_path: Path, client_lib: str, user_jwt: str | None
) -> None:
    client_module = pytest.importorskip(client_lib)
    gateway.gate.reset()
    url = f"{gateway.url}/v1/mcp/{ORD_ID}/{GLOBAL_TENANT_ID}"
    with TokenServer() as srv:
        cache = PersistentTokenCache(tmp_path / "tokens.db", config=cache_config())
        tokens = AgentGatewayTokens(cache, IasTokenClient(transparent_credentials(srv.token_url)))
        auth = AgentGatewayAuth(tokens, user_token=user_jwt)
        try:
            assert await call_echo(client_module, url, auth) == "hello"
            first_round = list(gateway.gate.seen)
            assert set(first_round) == {srv.issued_tokens[0]}
            gateway.gate.revoked.update(first_round)
            assert await call_echo(client_module, url, auth) == "hello"
        finally:
            await tokens.ias_client.aclose()
            await cache.aclose()
        second_round = gateway.gate.seen[len(first_round) :]
        old, new = srv.issued_tokens
        assert second_round.count(old) == 1  # one 401, then ...
        assert set(second_round) == {old, new}  # ... only the replacement
        assert srv.requests == 2
        grants = {f["grant_type"].rsplit(":", 1)[-1] for f in srv.forms}
        assert grants == ({"client_credentials"} if user_jwt is None else {"jwt-bearer"})
