"""Drop-in for ``sap-cloud-sdk``: one changed import shares tokens across processes and restarts.

Replace ``from sap_cloud_sdk.agentgateway import create_client`` with
``from agw_persist_cache.integrations.sap import create_client``. Requires the ``[sap]`` extra
(sap-cloud-sdk ``>=0.62,<1``); importing this module with an SDK release that lacks a name the
drop-in relies on raises ``ImportError`` naming that release and the name.
This is the only public module that imports ``sap_cloud_sdk``.
"""

from __future__ import annotations

from collections.abc import Callable

from agw_persist_cache import PersistentTokenCache

from ._defaults import default_cache
from ._sap_adms import AdmsTokenCache
from ._sap_client import PersistentAgentGatewayClient
from ._sap_compat import ClientConfig, Module

__all__ = ["AdmsTokenCache", "PersistentAgentGatewayClient", "create_client", "default_cache"]


def create_client(
    tenant_subdomain: str | Callable[[], str] | None = None,
    config: ClientConfig | None = None,
    *,
    _telemetry_source: Module | None = None,
    cache: PersistentTokenCache | None = None,
) -> PersistentAgentGatewayClient:
    """``sap_cloud_sdk.agentgateway.create_client`` with tokens in a host-wide cache.

    Takes every argument the SDK's ``create_client`` takes (private ones such as
    ``_telemetry_source``, which the SDK's extensibility module passes, included) and forwards
    them unchanged; ``cache`` defaults to :func:`default_cache`. The client is an
    ``AgentGatewayClient`` subclass that also offers ``clear_token_cache()``.
    """
    return PersistentAgentGatewayClient(
        tenant_subdomain=tenant_subdomain,
        config=config,
        _telemetry_source=_telemetry_source,
        cache=cache,
    )
