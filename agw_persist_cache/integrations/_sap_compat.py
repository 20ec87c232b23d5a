"""The sap-cloud-sdk names this integration relies on, checked once at import.

sap-cloud-sdk releases often (16 minor versions in 53 days), and some names the drop-in needs
are private. Rather than an ``AttributeError`` deep inside a token call, a release that drops
or renames one of them makes ``import agw_persist_cache.integrations.sap`` fail with an
``ImportError`` naming the SDK version and the missing name.

The typed SDK surface the other modules use is re-exported from here, imported only after the
check, so that no SDK import can fail first with a bare "cannot import name".
"""

# ruff: noqa: E402  (the SDK imports at the bottom must follow the version check)

from __future__ import annotations

import importlib
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from typing import Any, Protocol, TypeVar, cast

SUPPORTED = ">=0.62,<1"
"""The sap-cloud-sdk versions the ``[sap]`` extra accepts (keep in step with pyproject.toml)."""

# (module, dotted attribute path): a trailing ``.__wrapped__`` means the SDK method must still
# be wrapped by its telemetry decorator, whose undecorated body the drop-in calls on a miss.
REQUIRED: tuple[tuple[str, str], ...] = (
    ("sap_cloud_sdk.agentgateway", "AgentGatewayClient"),
    ("sap_cloud_sdk.agentgateway", "AuthResult"),
    ("sap_cloud_sdk.agentgateway", "ClientConfig"),
    ("sap_cloud_sdk.agentgateway", "MCPTool"),
    ("sap_cloud_sdk.agentgateway", "create_client"),
    ("sap_cloud_sdk.agentgateway.agw_client", "AgentGatewayClient.get_system_auth.__wrapped__"),
    ("sap_cloud_sdk.agentgateway.agw_client", "AgentGatewayClient.get_user_auth.__wrapped__"),
    ("sap_cloud_sdk.agentgateway.agw_client", "AgentGatewayClient.call_mcp_tool.__wrapped__"),
    ("sap_cloud_sdk.agentgateway.agw_client", "AgentGatewayClient._resolve_value"),
    ("sap_cloud_sdk.agentgateway.agw_client", "AgentGatewayClient._resolve_tenant_subdomain"),
    ("sap_cloud_sdk.agentgateway.agw_client", "detect_customer_agent_credentials"),
    ("sap_cloud_sdk.agentgateway.agw_client", "detect_transparent_credentials"),
    ("sap_cloud_sdk.agentgateway.agw_client", "load_customer_credentials"),
    ("sap_cloud_sdk.agentgateway.agw_client", "load_customer_credentials_from_env"),
    ("sap_cloud_sdk.agentgateway.agw_client", "get_system_token_mtls"),
    ("sap_cloud_sdk.agentgateway.agw_client", "exchange_user_token"),
    ("sap_cloud_sdk.agentgateway._customer", "_cache_scope_key"),
    ("sap_cloud_sdk.agentgateway._lob", "_system_scope_key"),
    ("sap_cloud_sdk.agentgateway._lob", "_user_scope_key"),
    ("sap_cloud_sdk.agentgateway._token_cache", "_TokenCache"),
    ("sap_cloud_sdk.agentgateway.exceptions", "AgentGatewaySDKError"),
    ("sap_cloud_sdk.core.telemetry", "record_metrics"),
    ("sap_cloud_sdk.core.telemetry", "Module.AGENTGATEWAY"),
    ("sap_cloud_sdk.core.telemetry", "Operation.AGENTGATEWAY_GET_SYSTEM_AUTH"),
    ("sap_cloud_sdk.core.telemetry", "Operation.AGENTGATEWAY_GET_USER_AUTH"),
    ("sap_cloud_sdk.core.telemetry", "Operation.AGENTGATEWAY_CALL_MCP_TOOL"),
    ("sap_cloud_sdk.adms", "TokenCache"),
)


def sdk_version() -> str:
    """The installed sap-cloud-sdk version, or ``"unknown"``."""
    try:
        return version("sap-cloud-sdk")
    except PackageNotFoundError:
        return "unknown"


def missing(required: tuple[tuple[str, str], ...] = REQUIRED) -> list[str]:
    """The ``module:attribute`` names of ``required`` that the installed SDK lacks."""
    absent = []
    for module_name, path in required:
        try:
            obj: object = importlib.import_module(module_name)
            for part in path.split("."):
                obj = getattr(obj, part)
        except (ImportError, AttributeError):
            absent.append(f"{module_name}:{path}")
    return absent


def check(required: tuple[tuple[str, str], ...] = REQUIRED) -> None:
    """Raise ``ImportError`` naming the SDK version and every missing name, if any."""
    absent = missing(required)
    if absent:
        raise ImportError(
            f"agw_persist_cache.integrations.sap does not support sap-cloud-sdk {sdk_version()}: "
            f"it lacks {', '.join(absent)}. Install a supported release "
            f"(pip install 'sap-cloud-sdk{SUPPORTED}', tested in CI: the minimum and the newest) "
            "or upgrade agw-persist-cache."
        )


check()

from sap_cloud_sdk.adms import TokenCache
from sap_cloud_sdk.agentgateway import (
    AgentGatewayClient,
    AuthResult,
    ClientConfig,
    MCPTool,
)
from sap_cloud_sdk.agentgateway._customer import _cache_scope_key
from sap_cloud_sdk.agentgateway._lob import _system_scope_key, _user_scope_key
from sap_cloud_sdk.agentgateway._models import CustomerCredentials
from sap_cloud_sdk.agentgateway._token_cache import _TokenCache
from sap_cloud_sdk.agentgateway.exceptions import AgentGatewaySDKError
from sap_cloud_sdk.core.telemetry import (  # type: ignore[import-untyped]  # no py.typed in core
    Module,
    Operation,
)
from sap_cloud_sdk.core.telemetry import record_metrics as _record_metrics

_F = TypeVar("_F", bound=Callable[..., Any])


def record_metrics(module: str, operation: str) -> Callable[[_F], _F]:
    """The SDK's own metrics decorator (``sap.cloud_sdk.capability.requests`` and errors)."""
    return cast(Callable[[_F], _F], _record_metrics(module, operation))


class _SdkClientModule(Protocol):
    """The names ``sap_cloud_sdk.agentgateway.agw_client`` resolves at call time."""

    def detect_customer_agent_credentials(self) -> str | None: ...
    def detect_transparent_credentials(self) -> bool: ...
    def load_customer_credentials(self, path: str) -> CustomerCredentials: ...
    def load_customer_credentials_from_env(self) -> CustomerCredentials: ...
    def get_system_token_mtls(
        self, credentials: CustomerCredentials, timeout: float, token_cache: _TokenCache | None
    ) -> str: ...
    def exchange_user_token(
        self,
        credentials: CustomerCredentials,
        user_token: str,
        timeout: float,
        token_cache: _TokenCache | None,
    ) -> str: ...


sdk_client_module = cast(
    _SdkClientModule, importlib.import_module("sap_cloud_sdk.agentgateway.agw_client")
)
"""The SDK client's module: patches and wrappers users put on its names reach the drop-in."""

__all__ = [
    "REQUIRED",
    "SUPPORTED",
    "AgentGatewayClient",
    "AgentGatewaySDKError",
    "AuthResult",
    "ClientConfig",
    "CustomerCredentials",
    "MCPTool",
    "Module",
    "Operation",
    "TokenCache",
    "_TokenCache",
    "_cache_scope_key",
    "_system_scope_key",
    "_user_scope_key",
    "check",
    "missing",
    "record_metrics",
    "sdk_client_module",
    "sdk_version",
]
