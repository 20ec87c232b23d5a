"""The drop-in's own fetch path (the SDK's token request, real, in transparent mode) retries a
transient IAS failure once before the cache records its back-off; 4xx is never retried."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from _sap_harness import SDK_SCANDIR_LEAK
from _scripted_ias import ScriptedIas
from sap_cloud_sdk.agentgateway.exceptions import AgentGatewaySDKError

from agw_persist_cache import PersistentTokenCache
from agw_persist_cache.integrations.sap import create_client

pytestmark = [pytest.mark.filterwarnings(SDK_SCANDIR_LEAK), pytest.mark.timeout(60)]


@pytest.fixture
def transparent_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """No binding; the ``INTEGRATION_*`` variables of transparent mode (URL set per test)."""
    monkeypatch.setenv("SERVICE_BINDING_ROOT", str(tmp_path / "no-bindings"))
    monkeypatch.setenv("INTEGRATION_CLIENT_ID", "agent-client")
    monkeypatch.setenv("INTEGRATION_GATEWAY_URL", "https://gateway.example")
    deps = [{"ordId": "sap.test:apiResource:echo:v1", "globalTenantId": "gt-1"}]
    monkeypatch.setenv("INTEGRATION_DEPENDENCIES", json.dumps(deps))
    yield tmp_path / "tokens.db"


@pytest.mark.parametrize("first", ["reset", 503])
async def test_one_transient_failure_is_retried_within_the_one_fetch(
    transparent_env: Path, monkeypatch: pytest.MonkeyPatch, first: int | str
) -> None:
    with ScriptedIas([first, 200]) as ias, PersistentTokenCache(transparent_env) as cache:
        monkeypatch.setenv("INTEGRATION_AUTH_URL", ias.url)
        client = create_client(cache=cache)
        auth = await client.get_system_auth()
        assert auth.access_token == "token-2"
        assert ias.hits == 2
        assert cache.stats().fetches == 1
        assert (await client.get_system_auth()).access_token == "token-2"
        assert ias.hits == 2


async def test_4xx_is_not_retried_and_the_backoff_follows(
    transparent_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with ScriptedIas([400, 200]) as ias, PersistentTokenCache(transparent_env) as cache:
        monkeypatch.setenv("INTEGRATION_AUTH_URL", ias.url)
        client = create_client(cache=cache)
        with pytest.raises(AgentGatewaySDKError, match="status 400"):
            await client.get_system_auth()
        assert ias.hits == 1
        with pytest.raises(AgentGatewaySDKError, match="System auth acquisition failed"):
            await client.get_system_auth()
        assert ias.hits == 1


async def test_two_transient_failures_reach_the_cache_as_one_failed_fetch(
    transparent_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with ScriptedIas([503]) as ias, PersistentTokenCache(transparent_env) as cache:
        monkeypatch.setenv("INTEGRATION_AUTH_URL", ias.url)
        client = create_client(cache=cache)
        with pytest.raises(AgentGatewaySDKError, match="status 503") as caught:
            await client.get_system_auth()
        assert "Transient" not in repr(caught.value)  # the SDK's own error, unwrapped
        assert ias.hits == 2
        with pytest.raises(AgentGatewaySDKError, match="System auth acquisition failed"):
            await client.get_system_auth()
        assert ias.hits == 2
        assert cache.stats().fetches == 1
