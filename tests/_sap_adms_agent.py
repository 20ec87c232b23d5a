"""One ADMS client process for the cross-process tests (kept light: spawned children import it)."""

from __future__ import annotations

import warnings

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)  # traceloop, at sap-cloud-sdk import
    from sap_cloud_sdk.adms import AdmsConfig
    from sap_cloud_sdk.adms._ias_fetcher import IasTokenFetcher

from agw_persist_cache import PersistentTokenCache
from agw_persist_cache.integrations.sap import AdmsTokenCache

NAMESPACE = "adms-test-client"


def adms_token(ias_url: str, cache_path: str) -> str:
    """What ``IasTokenFetcher.get_token()`` returns with the persistent cache plugged in."""
    config = AdmsConfig(
        service_url="https://adm.invalid",
        ias_url=ias_url,
        client_id=NAMESPACE,
        client_secret="not-a-secret",
    )
    with PersistentTokenCache(cache_path) as cache:
        fetcher = IasTokenFetcher(config, cache=AdmsTokenCache(cache, namespace=NAMESPACE))
        return fetcher.get_token()
