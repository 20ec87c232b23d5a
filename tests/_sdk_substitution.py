"""pytest plugin (``-p _sdk_substitution``): run sap-cloud-sdk's own unit tests with
agw-persist-cache's ``create_client`` in place of the SDK's.

The substitution happens before the SDK's test modules are imported, so their
``from sap_cloud_sdk.agentgateway import create_client`` gets the drop-in; each test gets an
empty cache file of its own, as each stock client starts with an empty token dict.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest


def pytest_configure(config: pytest.Config) -> None:
    import sap_cloud_sdk.agentgateway as package
    from sap_cloud_sdk.agentgateway import agw_client

    from agw_persist_cache.integrations import sap

    package.create_client = sap.create_client
    agw_client.create_client = sap.create_client


@pytest.fixture(autouse=True)
def _agw_cache_per_test(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    from agw_persist_cache.integrations import _defaults

    monkeypatch.setenv("AGW_CACHE_PATH", str(tmp_path / "agw-tokens.db"))
    yield
    with _defaults._defaults_lock:
        opened = list(_defaults._defaults.values())
        _defaults._defaults.clear()
    for cache in opened:
        cache.close()
