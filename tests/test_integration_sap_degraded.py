"""The sap-cloud-sdk drop-in with its store unusable: the real SDK, a real MCP server and the
counting IAS stand-in; the drop-in makes no more token requests than the stock SDK."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from _sap_harness import SDK_SCANDIR_LEAK, SapEnv, gateway, sap_env
from sap_cloud_sdk.agentgateway import create_client as stock_create_client
from support.store_down import unusable_path

from agw_persist_cache import CacheConfig, PersistentTokenCache
from agw_persist_cache.integrations.sap import create_client

pytestmark = [pytest.mark.filterwarnings(SDK_SCANDIR_LEAK), pytest.mark.timeout(120)]
__all__ = ["gateway", "sap_env"]  # fixtures, imported for pytest to find


async def _agent_traffic(client: Any) -> None:
    """A cold burst of 20 discoveries, then 5 more, then 3 tool calls of 2 users."""
    await asyncio.gather(*(client.list_mcp_tools() for _ in range(20)))
    for _ in range(5):
        await client.list_mcp_tools()
    [tool] = await client.list_mcp_tools()
    for user in ("alice", "bob", "alice"):
        assert await client.call_mcp_tool(tool, user_token=user, text=user) == user


async def test_with_the_store_unusable_the_drop_in_asks_no_more_than_the_stock_sdk(
    sap_env: SapEnv, tmp_path: Path
) -> None:
    before = sap_env.count()
    await _agent_traffic(stock_create_client())
    stock = sap_env.count() - before

    cache = PersistentTokenCache(unusable_path(tmp_path), config=CacheConfig(keys=[b"k" * 32]))
    before = sap_env.count()
    await _agent_traffic(create_client(cache=cache))
    drop_in = sap_env.count() - before
    assert cache.stats().mode == "degraded"
    assert drop_in == 3  # one system token, one exchange per user
    print(f"token requests with the store unusable: drop-in {drop_in}, stock SDK {stock}")
    assert drop_in <= stock, (drop_in, stock)
    cache.close()
