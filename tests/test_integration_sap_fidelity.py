"""The drop-in is the SDK's client to everything that inspects or wraps it: the same arguments,
the same telemetry on every call (hits included), the SDK's detection names, and an
``ImportError`` naming the SDK version when a name the drop-in relies on is gone."""

from __future__ import annotations

import inspect
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from _otel_reader import points, reader, value
from _sap_harness import SDK_SCANDIR_LEAK, SapEnv, cache, gateway, sap_env
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from sap_cloud_sdk.agentgateway import AgentGatewayClient, agw_client
from sap_cloud_sdk.agentgateway import create_client as sdk_create_client
from sap_cloud_sdk.core.telemetry import Module, metrics_decorator

from agw_persist_cache import PersistentTokenCache
from agw_persist_cache.integrations import _sap_compat
from agw_persist_cache.integrations.sap import (
    PersistentAgentGatewayClient,
    create_client,
    default_cache,
)

pytestmark = [pytest.mark.filterwarnings(SDK_SCANDIR_LEAK), pytest.mark.timeout(120)]
__all__ = ["cache", "gateway", "reader", "sap_env"]  # fixtures, imported for pytest to find


def _hints(func: Callable[..., Any]) -> dict[str, Any]:
    return {name: _norm(hint) for name, hint in typing.get_type_hints(func).items()}


def _norm(hint: Any) -> Any:
    """A comparable form: ``typing.Union[...]`` equals ``A | B``, ``typing.Callable`` equals
    ``collections.abc.Callable``."""
    if isinstance(hint, list):
        return tuple(_norm(h) for h in hint)
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return frozenset(_norm(h) for h in typing.get_args(hint))
    if origin is None:
        return hint
    return (origin, tuple(_norm(h) for h in typing.get_args(hint)))


@pytest.mark.parametrize(
    ("ours", "theirs"),
    [
        (create_client, sdk_create_client),
        (PersistentAgentGatewayClient.__init__, AgentGatewayClient.__init__),
    ],
    ids=["create_client", "AgentGatewayClient.__init__"],
)
def test_signature_matches_the_installed_sdk_parameter_by_parameter(
    ours: Callable[..., Any], theirs: Callable[..., Any]
) -> None:
    mine = list(inspect.signature(ours).parameters.values())
    sdk = list(inspect.signature(theirs).parameters.values())
    assert [p.name for p in mine[: len(sdk)]] == [p.name for p in sdk]
    for our_param, sdk_param in zip(mine, sdk, strict=False):
        assert our_param.kind == sdk_param.kind, our_param.name
        assert our_param.default == sdk_param.default, our_param.name
    our_hints, sdk_hints = _hints(ours), _hints(theirs)
    for sdk_param in sdk:
        if sdk_param.name != "self":
            assert our_hints[sdk_param.name] == sdk_hints[sdk_param.name], sdk_param.name
    extra = mine[len(sdk) :]
    assert [(p.name, p.kind, p.default) for p in extra] == [
        ("cache", inspect.Parameter.KEYWORD_ONLY, None)
    ]


def test_telemetry_source_is_accepted_and_forwarded(tmp_path: Path) -> None:
    """As the SDK's ``ExtensibilityClient`` calls ``create_client`` (a TypeError before)."""
    with PersistentTokenCache(tmp_path / "t.db") as opened:
        client = create_client("tenant", _telemetry_source=Module.EXTENSIBILITY, cache=opened)
        assert client._telemetry_source == Module.EXTENSIBILITY
        assert client.token_cache is opened


def test_the_class_alone_uses_the_default_cache(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("AGW_CACHE_PATH", str(tmp_path / "default.db"))
    client = PersistentAgentGatewayClient(tenant_subdomain="tenant")
    assert client.token_cache is default_cache()
    assert client.token_cache.path == tmp_path / "default.db"


class _MetricSpy:
    """Wraps the SDK's metric hooks (the functions its ``record_metrics`` decorator calls);
    the real ones still run."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[tuple[str, str, str | None, str]] = []
        for name in ("record_request_metric", "record_error_metric"):
            real = getattr(metrics_decorator, name)
            monkeypatch.setattr(metrics_decorator, name, self._spy(name, real))

    def _spy(self, name: str, real: Callable[..., None]) -> Callable[..., None]:
        def record(module: str, source: str | None, operation: str, *args: Any) -> None:
            self.calls.append(
                (name, str(module), None if source is None else str(source), operation)
            )
            real(module, source, operation, *args)

        return record


async def _use(client: AgentGatewayClient) -> None:
    """A session of an agent: discovery, tool calls (system and user), raw auth, twice over."""
    for _ in range(2):
        [tool] = await client.list_mcp_tools()
        await client.call_mcp_tool(tool, text="x")
        await client.call_mcp_tool(tool, user_token="alice", text="y")
        await client.get_system_auth()
        await client.get_user_auth("alice")


async def test_every_call_records_the_sdks_metrics_like_the_stock_client_hits_included(
    sap_env: SapEnv, cache: PersistentTokenCache, monkeypatch: pytest.MonkeyPatch
) -> None:
    stock_spy = _MetricSpy(monkeypatch)
    await _use(sdk_create_client(_telemetry_source=Module.EXTENSIBILITY))
    stock = list(stock_spy.calls)
    stock_spy.calls.clear()
    await _use(create_client(_telemetry_source=Module.EXTENSIBILITY, cache=cache))
    ours = stock_spy.calls
    assert cache.stats().hits >= 6  # the second round is served from the file
    assert ours == stock
    operations = [op for _, _, _, op in ours]
    assert operations.count("get_system_auth") == 2 * 3  # list, system call, raw auth
    assert operations.count("get_user_auth") == 2 * 2
    assert {source for _, _, source, _ in ours} == {str(Module.EXTENSIBILITY)}


async def test_patched_sdk_detection_reaches_the_drop_in(
    sap_env: SapEnv, cache: PersistentTokenCache, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A patch on the SDK client's name (as the SDK's own tests do) steers the drop-in too:
    with detection patched to "no customer credentials", both take the LoB path."""
    monkeypatch.setattr(agw_client, "detect_customer_agent_credentials", lambda: None)
    flow = create_client("tenant-a", cache=cache)._flow("system")
    assert flow.gateway_url is None  # the LoB flow: the URL comes with the token
    assert "tenant-a" in flow.scope_key


def test_a_missing_sdk_name_is_an_import_error_naming_version_and_name() -> None:
    needed = (*_sap_compat.REQUIRED, ("sap_cloud_sdk.agentgateway.agw_client", "gone_in_2099"))
    with pytest.raises(ImportError) as caught:
        _sap_compat.check(needed)
    message = str(caught.value)
    assert f"sap-cloud-sdk {_sap_compat.sdk_version()}" in message
    assert "sap_cloud_sdk.agentgateway.agw_client:gone_in_2099" in message
    assert _sap_compat.missing() == []  # the installed SDK has all of them


def test_an_unwrapped_sdk_method_is_reported_too(monkeypatch: pytest.MonkeyPatch) -> None:
    """A release whose method loses its telemetry decorator (no ``__wrapped__``)."""

    async def get_system_auth(self: AgentGatewayClient) -> None: ...

    monkeypatch.setattr(AgentGatewayClient, "get_system_auth", get_system_auth)
    assert _sap_compat.missing() == [
        "sap_cloud_sdk.agentgateway.agw_client:AgentGatewayClient.get_system_auth.__wrapped__"
    ]


async def test_drop_in_fetches_and_hits_reach_opentelemetry(
    reader: InMemoryMetricReader, sap_env: SapEnv, cache: PersistentTokenCache
) -> None:
    # The reader first: it starts from no cache at all (test_otel covers OpenTelemetry set
    # up after a cache exists, with nothing registering the cache again).
    client = create_client(cache=cache)
    for _ in range(3):
        await client.get_system_auth()
        await client.get_user_auth("alice")
    found = points(reader)
    for kind in ("system", "user"):
        labels = {"kind": kind, "backend": "sqlite", "outcome": "ok"}
        assert value(found, "agw_cache.fetches", **labels) == 1
        assert value(found, "agw_cache.fetch.duration", **labels) == 1
    assert value(found, "agw_cache.hits", backend="sqlite") >= 4
    assert sap_env.count() == 2
