"""Fixtures for the sap-cloud-sdk integration tests: binding, counting IAS, local gateway, cache.

Importing sap-cloud-sdk emits a DeprecationWarning from one of its dependencies (traceloop's
pydantic-v1 style config), which ``filterwarnings = error`` would turn into a collection error;
it is imported here once with that warning silenced.
"""

from __future__ import annotations

import warnings
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)  # traceloop, at import; not our code
    import sap_cloud_sdk.agentgateway  # noqa: F401  (imported for the side effect above)
    from sap_cloud_sdk.agentgateway import _customer

from _sap_mcp import GLOBAL_TENANT_ID, ORD_ID, LocalGateway, local_gateway

from agw_persist_cache import PersistentTokenCache
from tests.support.sap_standin import (
    TokenRequest,
    install_counting_token_endpoint,
    read_token_requests,
    write_customer_binding,
)
from tests.support.tokenserver import mint_jwt

# sap-cloud-sdk 0.62's detect_customer_agent_credentials() returns from inside an unclosed
# os.scandir() loop, so every call leaks an iterator that CPython closes with a ResourceWarning.
SDK_SCANDIR_LEAK = "ignore:unclosed scandir iterator:ResourceWarning"
DROP_IN = "agw_persist_cache.integrations.sap"
STOCK = "sap_cloud_sdk.agentgateway"


@dataclass
class SapEnv:
    """One agent's world: its binding, the stand-in's request log and the shared cache file."""

    root: Path
    counter: Path
    cache_path: Path
    gateway: LocalGateway

    def requests(self) -> list[TokenRequest]:
        """Every token request any process made so far."""
        return read_token_requests(self.counter)

    def count(self) -> int:
        """How many token requests any process made so far."""
        return len(self.requests())


@pytest.fixture(scope="module")
def gateway() -> Iterator[LocalGateway]:
    """A real MCP streamable-HTTP server on 127.0.0.1, shared by a module's tests."""
    with local_gateway() as running:
        yield running


@pytest.fixture
def sap_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, gateway: LocalGateway) -> SapEnv:
    """A customer binding pointing at the local gateway, counting IAS in this process (and,
    through the inherited environment, in spawned agents), and the cache path in the env."""
    gateway.gate.reset()
    bindings = tmp_path / "bindings"
    write_customer_binding(
        bindings, gateway_url=gateway.url, dependencies=[(ORD_ID, GLOBAL_TENANT_ID)]
    )
    env = SapEnv(tmp_path, tmp_path / "token-requests.log", tmp_path / "tokens.db", gateway)
    monkeypatch.setenv("SERVICE_BINDING_ROOT", str(bindings))
    monkeypatch.setenv("AGW_CACHE_PATH", str(env.cache_path))
    for name in ("INTEGRATION_CLIENT_ID", "INTEGRATION_AUTH_URL", "INTEGRATION_GATEWAY_URL"):
        monkeypatch.delenv(name, raising=False)
    for name in ("_request_token_mtls", "_request_token_transparent"):
        monkeypatch.setattr(_customer, name, getattr(_customer, name))  # restored afterwards
    install_counting_token_endpoint(env.counter, latency_seconds=0.0)
    return env


@pytest.fixture
async def cache(sap_env: SapEnv) -> AsyncIterator[PersistentTokenCache]:
    """This process's handle on the env's cache file, closed afterwards."""
    async with PersistentTokenCache(sap_env.cache_path) as opened:
        yield opened


@dataclass
class LobEnv:
    """A LoB agent's world: destination-service fetches counted, one gateway URL per tenant."""

    cache_path: Path
    fetches: list[tuple[str, str]]  # (tenant, "system" | "user")

    @staticmethod
    def gateway_url(tenant: str) -> str:
        """The gateway URL the stand-in destination service hands out for ``tenant``."""
        return f"https://agw.{tenant}.invalid"


@pytest.fixture
def lob_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> LobEnv:
    """No customer binding, a landscape, and the destination service replaced by a counter
    (like IAS, it cannot run here); the SDK's LoB token logic around it is real."""
    from sap_cloud_sdk.agentgateway import _lob

    env = LobEnv(tmp_path / "tokens.db", [])
    monkeypatch.setenv("SERVICE_BINDING_ROOT", str(tmp_path / "no-bindings"))
    monkeypatch.setenv("APPFND_CONHOS_LANDSCAPE", "test")
    for name in ("INTEGRATION_CLIENT_ID", "INTEGRATION_AUTH_URL", "INTEGRATION_GATEWAY_URL"):
        monkeypatch.delenv(name, raising=False)

    def fetch_auth_token(dest_name: str, tenant: str, options: object = None) -> tuple[str, str]:
        kind = "user" if getattr(options, "user_token", None) else "system"
        env.fetches.append((tenant, kind))
        return mint_jwt(f"{tenant}-{kind}", ttl_seconds=3600), env.gateway_url(tenant)

    monkeypatch.setattr(_lob, "get_ias_fragment_name", lambda tenant: "ias")
    monkeypatch.setattr(_lob, "get_ias_user_fragment_name", lambda tenant: "ias-user")
    monkeypatch.setattr(_lob, "_fetch_auth_token", fetch_auth_token)
    return env
