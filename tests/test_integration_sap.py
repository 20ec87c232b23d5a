"""The sap-cloud-sdk drop-in: real SDK, real MCP server, real processes; only IAS is a stand-in."""

from __future__ import annotations

import asyncio
import time
from collections import Counter

import httpx
import jwt
import pytest
from _sap_harness import (
    DROP_IN,
    SDK_SCANDIR_LEAK,
    LobEnv,
    SapEnv,
    cache,
    gateway,
    lob_env,
    sap_env,
)
from _sap_mcp import GLOBAL_TENANT_ID, ORD_ID
from sap_cloud_sdk.agentgateway import AgentGatewayClient, ClientConfig, _customer
from sap_cloud_sdk.agentgateway.exceptions import AgentGatewaySDKError

from agw_persist_cache import CacheConfig, PersistentTokenCache
from agw_persist_cache.integrations._sap_client import shared_scope_key
from agw_persist_cache.integrations._sap_unauthorized import http_status
from agw_persist_cache.integrations.sap import PersistentAgentGatewayClient, create_client
from tests.support.sap_standin import (
    install_counting_token_endpoint,
    run_agents,
    write_customer_binding,
)

pytestmark = [pytest.mark.filterwarnings(SDK_SCANDIR_LEAK), pytest.mark.timeout(120)]
__all__ = ["cache", "gateway", "lob_env", "sap_env"]  # fixtures, imported for pytest to find

USERS = ("alice", "bob", "carol")


def _exp(token: str) -> float:
    return float(jwt.decode(token, options={"verify_signature": False})["exp"])


async def test_discovery_fetches_once_then_hits_until_cleared(
    sap_env: SapEnv, cache: PersistentTokenCache
) -> None:
    client = create_client(cache=cache)
    assert isinstance(client, AgentGatewayClient)
    assert isinstance(client, PersistentAgentGatewayClient)

    tools = await client.list_mcp_tools()
    assert [t.name for t in tools] == ["echo"]
    assert sap_env.count() == 1
    await client.list_mcp_tools()
    assert sap_env.count() == 1

    client.clear_token_cache()
    await client.list_mcp_tools()
    assert sap_env.count() == 2
    assert cache.stats().entries_system == 1


async def test_user_calls_exchange_once_per_user(
    sap_env: SapEnv, cache: PersistentTokenCache
) -> None:
    client = create_client(cache=cache)
    [tool] = await client.list_mcp_tools()
    for user in ("alice", "bob", "alice", "bob"):
        assert await client.call_mcp_tool(tool, user_token=user, text=user) == user
    exchanges = [r for r in sap_env.requests() if r.is_exchange]
    assert len(exchanges) == 2
    auth = await client.get_user_auth(lambda: "alice")
    assert auth.gateway_url == sap_env.gateway.url
    assert len(sap_env.requests()) == 3


async def test_restarted_process_fetches_nothing(
    sap_env: SapEnv, cache: PersistentTokenCache
) -> None:
    client = create_client(cache=cache)
    await client.list_mcp_tools()
    await client.list_mcp_tools(user_token="alice")
    assert sap_env.count() == 2

    assert run_agents(DROP_IN, sap_env.counter, coroutines=3, users=["alice"]) == []


async def test_cold_start_of_4_processes_x_20_coroutines_fetches_once_per_key(
    sap_env: SapEnv, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A binding without MCP servers: list_mcp_tools() still takes its tokens, but the 160
    # discoveries need no HTTP round trips to the local gateway.
    bindings = sap_env.root / "no-servers"
    write_customer_binding(bindings, gateway_url=sap_env.gateway.url)
    monkeypatch.setenv("SERVICE_BINDING_ROOT", str(bindings))
    requests = run_agents(
        DROP_IN, sap_env.counter, processes=4, coroutines=20, users=USERS, latency=0.2
    )
    system = [r for r in requests if not r.is_exchange]
    per_user = Counter(r.user_digest for r in requests if r.is_exchange)
    assert len(system) == 1
    assert sorted(per_user.values()) == [1, 1, 1]


async def test_clear_in_one_process_makes_the_next_call_in_another_fetch(
    sap_env: SapEnv, cache: PersistentTokenCache
) -> None:
    client = create_client(cache=cache)
    await client.list_mcp_tools()
    await client.list_mcp_tools()
    assert sap_env.count() == 1

    assert run_agents(DROP_IN, sap_env.counter, action="clear") == []
    await client.list_mcp_tools()
    assert sap_env.count() == 2


async def test_401_from_mcp_server_invalidates_for_every_process_and_retries(
    sap_env: SapEnv, cache: PersistentTokenCache
) -> None:
    client = create_client(cache=cache)
    [tool] = await client.list_mcp_tools()
    assert await client.call_mcp_tool(tool, user_token="alice", text="one") == "one"
    old = (await client.get_user_auth("alice")).access_token
    assert sap_env.count() == 2

    sap_env.gateway.gate.revoked.add(old)
    assert await client.call_mcp_tool(tool, user_token="alice", text="two") == "two"
    assert sap_env.count() == 3
    new = (await client.get_user_auth("alice")).access_token
    assert new != old
    assert sap_env.gateway.gate.seen[-1] == new

    # A restarted process gets the replacement from the file, not the revoked token.
    assert run_agents(DROP_IN, sap_env.counter, users=["alice"]) == []


async def test_401_is_retried_once_only(sap_env: SapEnv, cache: PersistentTokenCache) -> None:
    client = create_client(cache=cache)
    [tool] = await client.list_mcp_tools()
    sap_env.gateway.gate.reject_all = True
    with pytest.raises(AgentGatewaySDKError):
        await client.call_mcp_tool(tool, text="x")
    assert sap_env.count() == 2  # the first token and one replacement


async def test_other_tool_failures_keep_the_token(
    sap_env: SapEnv, cache: PersistentTokenCache
) -> None:
    client = create_client(cache=cache)
    [tool] = await client.list_mcp_tools()
    with pytest.raises(AgentGatewaySDKError):
        await client.call_mcp_tool(tool, wrong_argument="x")
    assert sap_env.count() == 1
    assert await client.call_mcp_tool(tool, text="still fine") == "still fine"
    assert sap_env.count() == 1


async def test_sdk_deadline_is_stored_as_epoch_with_the_sdks_margin(
    sap_env: SapEnv, cache: PersistentTokenCache
) -> None:
    margin = 600.0
    config = ClientConfig(token_expiry_buffer_seconds=margin, fallback_token_ttl_seconds=900)
    client = create_client(config=config, cache=cache)
    auth = await client.get_system_auth()
    [info] = cache.list_entries()
    # The SDK serves the token until exp - margin; so does the cache (its own buffer added back).
    usable_until = info.expires_at - cache.config.token_expiry_buffer_seconds
    assert abs(usable_until - (_exp(auth.access_token) - margin)) < 5
    assert abs(info.expires_at - time.time() - (3600 - margin + 30)) < 60


async def test_default_cache_follows_agw_cache_path(sap_env: SapEnv) -> None:
    client = create_client()
    try:
        assert client.token_cache.path == sap_env.cache_path
        assert create_client().token_cache is client.token_cache  # one per process and path
        await client.get_system_auth()
    finally:
        await client.token_cache.aclose()
    with PersistentTokenCache(sap_env.cache_path) as other:
        assert other.stats().entries_system == 1


async def test_lob_gateway_url_persists_with_the_token(lob_env: LobEnv) -> None:
    async with PersistentTokenCache(lob_env.cache_path) as first_cache:
        client = create_client("tenant-a", cache=first_cache)
        system = await client.get_system_auth()
        user = await client.get_user_auth("alice")
        assert system.gateway_url == user.gateway_url == lob_env.gateway_url("tenant-a")
        assert lob_env.fetches == [("tenant-a", "system"), ("tenant-a", "user")]

    # A restarted agent: new cache handle, new client, nothing in memory.
    async with PersistentTokenCache(lob_env.cache_path) as second_cache:
        restarted = create_client(lambda: "tenant-a", cache=second_cache)
        assert await restarted.get_system_auth() == system
        assert await restarted.get_user_auth("alice") == user
        assert len(lob_env.fetches) == 2

        other = await create_client("tenant-b", cache=second_cache).get_system_auth()
        assert other.gateway_url == lob_env.gateway_url("tenant-b")
        assert lob_env.fetches[-1] == ("tenant-b", "system")


async def test_refresh_ahead_really_refetches_through_the_sdk(sap_env: SapEnv) -> None:
    # 60 s tokens: the SDK keeps them 30 s, all of which lies in a 90% refresh window.
    install_counting_token_endpoint(sap_env.counter, latency_seconds=0.0, ttl_seconds=60)
    config = CacheConfig(refresh_ahead_ratio=0.9)
    async with PersistentTokenCache(sap_env.cache_path, config=config) as cache:
        client = create_client(cache=cache)
        first = (await client.get_system_auth()).access_token
        assert (await client.get_system_auth()).access_token == first  # served at once
        deadline = time.monotonic() + 30
        while sap_env.count() < 2 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert sap_env.count() == 2
        while (await client.get_system_auth()).access_token == first:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)


async def test_failing_identity_service_is_asked_once_per_backoff(
    sap_env: SapEnv, cache: PersistentTokenCache, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []

    def failing(*args: object, **kwargs: object) -> dict[str, str]:
        calls.append(1)
        raise AgentGatewaySDKError("Token request failed with status 503: unavailable")

    monkeypatch.setattr(_customer, "_request_token_mtls", failing)
    client = create_client(cache=cache)
    with pytest.raises(AgentGatewaySDKError, match="status 503"):
        await client.get_system_auth()
    with pytest.raises(AgentGatewaySDKError, match="System auth acquisition failed"):
        await client.get_system_auth()
    assert calls == [1, 1]  # a 503 is retried once within the fetch, then the back-off holds


async def test_sdk_errors_are_the_sdks(lob_env: LobEnv) -> None:
    async with PersistentTokenCache(lob_env.cache_path) as cache:
        client = create_client(cache=cache)
        with pytest.raises(AgentGatewaySDKError, match="tenant_subdomain is required"):
            await client.get_system_auth()
        with pytest.raises(AgentGatewaySDKError, match="user_token is required"):
            await create_client("tenant-a", cache=cache).get_user_auth("  ")
    assert lob_env.fetches == []


async def test_transparent_mode_shares_tokens_too(
    sap_env: SapEnv, cache: PersistentTokenCache, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SERVICE_BINDING_ROOT", str(sap_env.root / "no-bindings"))
    monkeypatch.setenv("INTEGRATION_CLIENT_ID", "transparent-client")
    monkeypatch.setenv("INTEGRATION_AUTH_URL", "https://ias.invalid/oauth2/token")
    monkeypatch.setenv("INTEGRATION_GATEWAY_URL", sap_env.gateway.url)
    deps = f'[{{"ordId": "{ORD_ID}", "globalTenantId": "{GLOBAL_TENANT_ID}"}}]'
    monkeypatch.setenv("INTEGRATION_DEPENDENCIES", deps)
    client = create_client(cache=cache)
    [tool] = await client.list_mcp_tools()
    assert await client.call_mcp_tool(tool, user_token="alice", text="t") == "t"
    assert await create_client(cache=cache).call_mcp_tool(tool, user_token="alice", text="u") == "u"
    assert [r.is_exchange for r in sap_env.requests()] == [False, True]


async def test_lob_row_without_gateway_url_is_fetched_again(lob_env: LobEnv) -> None:
    async with PersistentTokenCache(lob_env.cache_path) as cache:
        scope = shared_scope_key("lob-system::tenant-a")
        cache.set_entry("system", scope, {"access_token": "no-url", "expires_in": 3600})
        auth = await create_client("tenant-a", cache=cache).get_system_auth()
        assert auth.gateway_url == lob_env.gateway_url("tenant-a")
        assert auth.access_token != "no-url"
        assert lob_env.fetches == [("tenant-a", "system")]


def test_http_status_is_found_inside_exception_groups_and_causes() -> None:
    # mcp 1.x raises httpx.HTTPStatusError inside anyio task-group exception groups.
    request = httpx.Request("POST", "http://127.0.0.1/v1/mcp")
    inner = httpx.HTTPStatusError("401", request=request, response=httpx.Response(401))
    try:
        try:
            raise ExceptionGroup("outer", [ExceptionGroup("inner", [inner])])
        except ExceptionGroup as group:
            raise AgentGatewaySDKError("Tool invocation failed") from group
    except AgentGatewaySDKError as exc:
        assert http_status(exc) == 401
    assert http_status(AgentGatewaySDKError("no response at all")) is None
