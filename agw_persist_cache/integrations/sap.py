"""Drop-in for ``sap-cloud-sdk``: one changed import shares tokens across processes and restarts.

Replace ``from sap_cloud_sdk.agentgateway import create_client`` with
``from agw_persist_cache.integrations.sap import create_client``. Requires the ``[sap]`` extra.
This is the only public module that imports ``sap_cloud_sdk``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

from sap_cloud_sdk.agentgateway import ClientConfig

from agw_persist_cache import PersistentTokenCache
from agw_persist_cache._config import resolve_path, split_location

from ._sap_adms import AdmsTokenCache
from ._sap_client import PersistentAgentGatewayClient

__all__ = ["AdmsTokenCache", "PersistentAgentGatewayClient", "create_client", "default_cache"]

_defaults: dict[Path | str, PersistentTokenCache] = {}
_defaults_lock = threading.Lock()


def default_cache() -> PersistentTokenCache:
    """This process's cache at the default location: ``$AGW_CACHE_URL`` (a store shared by
    many hosts), else ``$AGW_CACHE_PATH`` or the user cache dir."""
    _, url = split_location(None, None)
    where: Path | str = url if url is not None else resolve_path(None)
    with _defaults_lock:
        cache = _defaults.get(where)
        if cache is None:
            cache = _defaults[where] = PersistentTokenCache()
        return cache


def create_client(
    tenant_subdomain: str | Callable[[], str] | None = None,
    config: ClientConfig | None = None,
    *,
    cache: PersistentTokenCache | None = None,
) -> PersistentAgentGatewayClient:
    """``sap_cloud_sdk.agentgateway.create_client`` with tokens in a host-wide cache.

    Same arguments and behaviour; ``cache`` defaults to :func:`default_cache`. The client is an
    ``AgentGatewayClient`` subclass that also offers ``clear_token_cache()``.
    """
    return PersistentAgentGatewayClient(
        tenant_subdomain, config, cache=cache if cache is not None else default_cache()
    )
