"""No secret in the ``repr`` or ``str`` of anything the package exports.

Every class in ``agw_persist_cache.__all__`` and ``agw_persist_cache.agentgateway.__all__`` is
built the way a user gets one (errors are raised by real calls), with known secrets inside:
the cache key, a token, a user JWT, a scope, a client secret and private key text. A class
added to ``__all__`` without an entry here fails the completeness test.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import sqlite3
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from types import MappingProxyType
from typing import Any

import pytest
from _tls import transparent_credentials

import agw_persist_cache
import agw_persist_cache.agentgateway as agentgateway
from agw_persist_cache import (
    CacheConfig,
    CachedToken,
    PersistentTokenCache,
)
from agw_persist_cache.agentgateway import (
    AgentGatewayAuth,
    AgentGatewayTokens,
    CustomerCredentials,
    IasTokenClient,
    IntegrationDependency,
)
from tests.support.tokenserver import TokenServer, mint_jwt

KEY = os.urandom(32)
KEY_TEXT = base64.urlsafe_b64encode(KEY).decode()
TOKEN = f"tok-{secrets.token_hex(16)}"
USER_JWT = mint_jwt(f"user-{secrets.token_hex(8)}", ttl_seconds=3600)
SCOPE = f"scope-{secrets.token_hex(8)}"
CLIENT_SECRET = f"client-secret-{secrets.token_hex(8)}"
PRIVATE_KEY_TEXT = secrets.token_hex(24)
SECRETS = {
    "key (base64)": KEY_TEXT,
    "key (bytes repr)": repr(KEY)[2:-1],
    "key (hex)": KEY.hex(),
    "token": TOKEN,
    "user JWT": USER_JWT,
    "scope": SCOPE,
    "client secret": CLIENT_SECRET,
    "private key text": PRIVATE_KEY_TEXT,
}
PEM_KEY = f"-----BEGIN PRIVATE KEY-----\n{PRIVATE_KEY_TEXT}\n-----END PRIVATE KEY-----\n"
PEM_CERT = f"-----BEGIN CERTIFICATE-----\n{PRIVATE_KEY_TEXT}\n-----END CERTIFICATE-----\n"


def _raised(call: Callable[[], object]) -> BaseException:
    with pytest.raises(Exception) as info:
        call()
    return info.value


def _refused_change(path: Path) -> BaseException:
    """What ``invalidate`` raises while another connection holds the file's write lock."""
    config = CacheConfig(keys=[KEY], busy_timeout_seconds=0.1)
    with PersistentTokenCache(path, config=config) as cache:
        cache.set_system_token(SCOPE, TOKEN)
        holder = sqlite3.connect(path, isolation_level=None)
        holder.execute("BEGIN EXCLUSIVE")
        try:
            return _raised(lambda: cache.invalidate_system_token(SCOPE))
        finally:
            holder.execute("ROLLBACK")
            holder.close()


@pytest.fixture
def cache(tmp_path: Path) -> Iterator[PersistentTokenCache]:
    config = CacheConfig(keys=[KEY], fetch_backoff_seconds=60)
    with PersistentTokenCache(tmp_path / "tokens.db", config=config) as opened:
        opened.set_system_token(SCOPE, {"access_token": TOKEN, "expires_in": 600})
        opened.set_user_token(USER_JWT, SCOPE, {"access_token": TOKEN, "extra": {"k": TOKEN}})
        yield opened


@pytest.fixture
def instances(cache: PersistentTokenCache, tmp_path: Path) -> dict[str, list[object]]:
    """One or more instances of every exported class, each holding the secrets."""
    creds = CustomerCredentials(
        token_service_url="https://ias.invalid/oauth2/token",
        client_id="agent-client",
        gateway_url="https://gateway.invalid",
        integration_dependencies=(IntegrationDependency("sap.test:mcp:v1", "tenant-1"),),
        certificate=PEM_CERT,
        private_key=PEM_KEY,
    )
    ias = IasTokenClient(creds)
    tokens = AgentGatewayTokens(cache, ias)
    bad_file = tmp_path / "credentials"
    bad_file.write_text(json.dumps({"clientid": CLIENT_SECRET, "privateKey": PEM_KEY}))

    def failing_fetch() -> str:
        raise RuntimeError(TOKEN)

    _raised(lambda: cache.system_token("down", failing_fetch))
    with TokenServer() as server:
        server.override = (401, json.dumps({"error": TOKEN, "error_description": CLIENT_SECRET}))
        client = IasTokenClient(transparent_credentials(server.token_url))
        refused = _raised(client.fetch_system_token)
        client.close()
    locked = _refused_change(tmp_path / "locked.db")
    return {
        "CacheConfig": [CacheConfig(keys=[KEY]), CacheConfig(keys=[KEY_TEXT])],
        "PersistentTokenCache": [cache],
        "CacheStats": [cache.stats()],
        "EntryInfo": cache.list_entries(),
        "KeyVerdict": [cache.check_keys()],
        "CachedToken": [
            CachedToken(TOKEN, 1.0, MappingProxyType({"client_secret": CLIENT_SECRET})),
            cache.get_entry("user", SCOPE, user_jwt=USER_JWT),
        ],
        "CacheError": [refused],
        "CacheConfigError": [
            _raised(lambda: CacheConfig(keys=KEY_TEXT)),
            _raised(
                lambda: PersistentTokenCache(tmp_path / "x.db", config=CacheConfig(keys=[TOKEN]))
            ),
        ],
        "CacheUsageError": [
            _raised(
                lambda: cache.set_system_token(SCOPE, {"access_token": TOKEN, "expires_in": TOKEN})
            ),
            _raised(
                lambda: cache.set_system_token(SCOPE, {"extra": {"k": 1}, "access_token": TOKEN})
            ),
        ],
        "CacheStorageError": [locked],
        "TokenFetchError": [refused],
        "FetchBackoffError": [_raised(lambda: cache.system_token("down", failing_fetch))],
        "AgentGatewayAuth": [AgentGatewayAuth(tokens, USER_JWT), AgentGatewayAuth(tokens)],
        "AgentGatewayTokens": [tokens],
        "CredentialsError": [
            _raised(lambda: CustomerCredentials.from_file(bad_file)),
            _raised(lambda: replace(creds, certificate=f"not a PEM {PRIVATE_KEY_TEXT}")),
        ],
        "CustomerCredentials": [creds],
        "IasTokenClient": [ias],
        "IntegrationDependency": list(creds.integration_dependencies),
    }


def _exported_classes() -> set[str]:
    return {
        name
        for module in (agw_persist_cache, agentgateway)
        for name in module.__all__
        if isinstance(getattr(module, name), type)
    }


def test_every_exported_class_is_checked(instances: dict[str, list[object]]) -> None:
    assert set(instances) == _exported_classes()
    for name, objects in instances.items():
        cls: Any = getattr(agw_persist_cache, name, None) or getattr(agentgateway, name)
        assert objects and all(isinstance(o, cls) for o in objects), name


def test_no_secret_in_any_repr_or_str(instances: dict[str, list[object]]) -> None:
    leaks = [
        f"{type(obj).__name__} {how} shows the {what}"
        for objects in instances.values()
        for obj in objects
        for how, text in (("repr", repr(obj)), ("str", str(obj)))
        for what, secret in SECRETS.items()
        if secret in text
    ]
    assert leaks == []


def test_cached_token_repr_names_extra_keys_only() -> None:
    token = CachedToken(TOKEN, 5.0, MappingProxyType({"gateway_url": CLIENT_SECRET}))
    assert "gateway_url" in repr(token) and "expires_at=5.0" in repr(token)
    assert CLIENT_SECRET not in repr(token) and TOKEN not in repr(token)


def test_cache_config_repr_hides_its_keys() -> None:
    text = repr(CacheConfig(keys=[KEY, KEY_TEXT], lock_stripes=7))
    assert "lock_stripes=7" in text
    assert KEY_TEXT not in text and repr(KEY)[2:-1] not in text
