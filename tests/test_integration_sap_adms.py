"""AdmsTokenCache: the SDK's ADMS TokenCache protocol on the persistent cache, across processes."""

from __future__ import annotations

import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest
from _sap_adms_agent import NAMESPACE, adms_token
from _sap_harness import gateway
from _sap_mcp import LocalGateway
from sap_cloud_sdk.adms import TokenCache

from agw_persist_cache import PersistentTokenCache
from agw_persist_cache.integrations.sap import AdmsTokenCache

pytestmark = pytest.mark.timeout(120)
__all__ = ["gateway"]  # fixture, imported for pytest to find


def _in_new_process(ias_url: str, cache_path: Path) -> str:
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(adms_token, ias_url, str(cache_path)).result(timeout=90)


def test_adms_fetcher_shares_its_token_across_processes(
    tmp_path: Path, gateway: LocalGateway
) -> None:
    gateway.gate.reset()
    path = tmp_path / "tokens.db"
    first = _in_new_process(gateway.url, path)
    assert gateway.gate.token_requests == 1
    assert _in_new_process(gateway.url, path) == first
    assert gateway.gate.token_requests == 1

    with PersistentTokenCache(path) as cache:
        AdmsTokenCache(cache, namespace=NAMESPACE).delete("cc")
    assert _in_new_process(gateway.url, path) != first
    assert gateway.gate.token_requests == 2


def test_get_set_delete_clear(tmp_path: Path) -> None:
    with PersistentTokenCache(tmp_path / "tokens.db") as cache:
        adms = AdmsTokenCache(cache)
        assert isinstance(adms, TokenCache)
        assert adms.get("cc") is None
        adms.set("cc", "token-1", 3600)
        assert adms.get("cc") == "token-1"
        adms.delete("cc")
        assert adms.get("cc") is None
        adms.set("cc", "token-2", 3600)
        adms.clear()
        assert adms.get("cc") is None


def test_ttl_is_honoured_and_epoch_based(tmp_path: Path) -> None:
    with PersistentTokenCache(tmp_path / "tokens.db") as cache:
        adms = AdmsTokenCache(cache)
        adms.set("cc", "token", 600)
        [info] = cache.list_entries()
        usable_until = info.expires_at - cache.config.token_expiry_buffer_seconds
        assert abs(usable_until - (time.time() + 600)) < 30
        adms.set("cc", "expired", 0)
        assert adms.get("cc") is None


def test_namespaces_do_not_share_the_fixed_cc_key(tmp_path: Path) -> None:
    with PersistentTokenCache(tmp_path / "tokens.db") as cache:
        AdmsTokenCache(cache, namespace="client-a").set("cc", "token-a", 3600)
        assert AdmsTokenCache(cache, namespace="client-b").get("cc") is None
        assert AdmsTokenCache(cache, namespace="client-a").get("cc") == "token-a"
