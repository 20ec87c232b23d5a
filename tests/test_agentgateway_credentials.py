"""CustomerCredentials: found where, and read as, sap-cloud-sdk's customer flow does."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import pytest
from _tls import TlsMaterial, make_tls

import agw_persist_cache.agentgateway as agw
from agw_persist_cache import CacheConfigError
from agw_persist_cache.agentgateway import CredentialsError, CustomerCredentials

DEPS = [{"ordId": "sap.demo:apiResource:tools:v1", "globalTenantId": "gt-1"}]


@pytest.fixture(scope="module")
def tls() -> TlsMaterial:
    return make_tls()


def binding_data(tls: TlsMaterial, **changes: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "tokenServiceUrl": "https://tenant.accounts.example/oauth2/token",
        "clientid": "client-123",
        "certificate": tls.client_cert_pem,
        "privateKey": tls.client_key_pem,
        "gatewayUrl": "https://gateway.example/",
        "integrationDependencies": DEPS,
    }
    data.update(changes)
    return {k: v for k, v in data.items() if v is not None}


def write_binding(root: Path, name: str, data: dict[str, Any] | str, kind: str) -> Path:
    directory = root / name
    directory.mkdir(parents=True)
    (directory / "type").write_text(kind + "\n")
    path = directory / "credentials"
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def test_exports_are_sorted_and_complete() -> None:
    assert agw.__all__ == sorted(agw.__all__)
    public = {n for n in dir(agw) if not n.startswith("_") and n[0].isupper()}
    assert public <= set(agw.__all__)
    assert all(hasattr(agw, name) for name in agw.__all__)


def test_binding_root_is_scanned_for_the_integration_credentials_type(
    tmp_path: Path, tls: TlsMaterial, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_binding(tmp_path, "a-other", binding_data(tls, clientid="wrong"), "destination")
    path = write_binding(tmp_path, "b-agw", binding_data(tls), "integration-credentials")
    monkeypatch.setenv("SERVICE_BINDING_ROOT", str(tmp_path))
    creds = CustomerCredentials.from_binding()
    assert creds.client_id == "client-123"
    assert creds.gateway_url == "https://gateway.example"
    assert creds.mtls
    assert creds.scope_key == "customer::client-123"
    assert creds.source == str(path)
    assert creds.integration_dependencies == (
        agw.IntegrationDependency("sap.demo:apiResource:tools:v1", "gt-1"),
    )
    assert CustomerCredentials.from_binding(tmp_path) == creds
    assert CustomerCredentials.detect() == creds


def test_matches_what_sap_cloud_sdk_loads(
    tmp_path: Path, tls: TlsMaterial, monkeypatch: pytest.MonkeyPatch
) -> None:
    customer = pytest.importorskip("sap_cloud_sdk.agentgateway._customer")
    write_binding(tmp_path, "agw", binding_data(tls), "integration-credentials")
    monkeypatch.setenv("SERVICE_BINDING_ROOT", str(tmp_path))
    with warnings.catch_warnings():
        # sap-cloud-sdk 0.62 returns from inside an unclosed os.scandir() loop.
        warnings.simplefilter("ignore", ResourceWarning)
        sdk_path = customer.detect_customer_agent_credentials()
    assert sdk_path is not None
    sdk = customer.load_customer_credentials(sdk_path)
    ours = CustomerCredentials.from_binding()
    for name in ("token_service_url", "client_id", "gateway_url", "certificate", "private_key"):
        assert getattr(ours, name) == getattr(sdk, name), name
    assert ours.scope_key == customer._cache_scope_key(sdk)
    assert [(d.ord_id, d.global_tenant_id) for d in ours.integration_dependencies] == [
        (d.ord_id, d.global_tenant_id) for d in sdk.integration_dependencies
    ]


def test_transparent_mode_from_env_matches_sap_cloud_sdk(monkeypatch: pytest.MonkeyPatch) -> None:
    customer = pytest.importorskip("sap_cloud_sdk.agentgateway._customer")
    monkeypatch.setenv("SERVICE_BINDING_ROOT", "/nonexistent-binding-root")
    monkeypatch.setenv("INTEGRATION_CLIENT_ID", "client-t")
    monkeypatch.setenv("INTEGRATION_AUTH_URL", "https://tenant.accounts.example/oauth2/token")
    monkeypatch.setenv("INTEGRATION_GATEWAY_URL", "https://gateway.example/")
    monkeypatch.setenv("INTEGRATION_DEPENDENCIES", json.dumps(DEPS))
    ours = CustomerCredentials.detect()
    sdk = customer.load_customer_credentials_from_env()
    assert not ours.mtls
    assert ours.source == "env"
    assert (ours.token_service_url, ours.client_id, ours.gateway_url) == (
        sdk.token_service_url,
        sdk.client_id,
        sdk.gateway_url,
    )
    assert ours.certificate is None and ours.private_key is None
    assert ours.scope_key == customer._cache_scope_key(sdk)


def test_missing_env_vars_are_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INTEGRATION_CLIENT_ID", "client-t")
    monkeypatch.delenv("INTEGRATION_AUTH_URL", raising=False)
    monkeypatch.delenv("INTEGRATION_GATEWAY_URL", raising=False)
    with pytest.raises(CredentialsError, match="INTEGRATION_AUTH_URL, INTEGRATION_GATEWAY_URL"):
        CustomerCredentials.from_env()
    env = {
        "INTEGRATION_CLIENT_ID": "c",
        "INTEGRATION_AUTH_URL": "https://a",
        "INTEGRATION_GATEWAY_URL": "https://g",
    }
    with pytest.raises(CredentialsError, match="INTEGRATION_DEPENDENCIES"):
        CustomerCredentials.from_env(env)
    with pytest.raises(CredentialsError, match=r"INTEGRATION_DEPENDENCIES\[0\]\.globalTenantId"):
        CustomerCredentials.from_env({**env, "INTEGRATION_DEPENDENCIES": '[{"ordId": "x"}]'})


def test_detect_says_where_it_looked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("INTEGRATION_CLIENT_ID", "INTEGRATION_AUTH_URL", "INTEGRATION_GATEWAY_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SERVICE_BINDING_ROOT", str(tmp_path))
    with pytest.raises(CredentialsError, match="integration-credentials") as info:
        CustomerCredentials.detect()
    assert str(tmp_path) in str(info.value)
    assert isinstance(info.value, CacheConfigError) and isinstance(info.value, ValueError)
    with pytest.raises(CredentialsError, match="SERVICE_BINDING_ROOT"):
        CustomerCredentials.from_binding()


@pytest.mark.parametrize(
    ("changes", "named"),
    [
        ({"clientid": None}, "clientid"),
        ({"privateKey": None, "gatewayUrl": None}, "privateKey, gatewayUrl"),
        ({"integrationDependencies": None}, "integrationDependencies"),
        ({"tokenServiceUrl": ""}, "tokenServiceUrl"),
        ({"certificate": 42}, "certificate"),
        ({"integrationDependencies": {"ordId": "x"}}, "integrationDependencies"),
    ],
)
def test_invalid_binding_fields_are_named_without_values(
    tmp_path: Path, tls: TlsMaterial, changes: dict[str, Any], named: str
) -> None:
    path = write_binding(tmp_path, "agw", binding_data(tls, **changes), "integration-credentials")
    with pytest.raises(CredentialsError, match=named) as info:
        CustomerCredentials.from_file(path)
    assert "PRIVATE KEY" not in str(info.value)
    assert tls.client_key_pem.splitlines()[1] not in str(info.value)


def test_malformed_pem_and_json_do_not_echo_content(tmp_path: Path, tls: TlsMaterial) -> None:
    secret = "s3cr3t-value-that-must-not-leak"
    path = write_binding(
        tmp_path, "a", binding_data(tls, privateKey=secret), "integration-credentials"
    )
    with pytest.raises(CredentialsError, match="privateKey") as info:
        CustomerCredentials.from_file(path)
    assert secret not in str(info.value)
    broken = write_binding(
        tmp_path, "b", '{"privateKey": "' + secret + '", oops}', "integration-credentials"
    )
    with pytest.raises(CredentialsError, match="not valid JSON") as info:
        CustomerCredentials.from_file(broken)
    assert secret not in str(info.value)
    assert info.value.__cause__ is None and info.value.__context__ is not None


def test_repr_hides_certificate_and_private_key(tls: TlsMaterial) -> None:
    creds = CustomerCredentials(
        token_service_url="https://ias.example/oauth2/token",
        client_id="c",
        gateway_url="https://g",
        certificate=tls.client_cert_pem,
        private_key=tls.client_key_pem,
    )
    text = repr(creds) + str(creds)
    assert "BEGIN" not in text
    assert "client_id='c'" in text
    with pytest.raises(CredentialsError, match="together"):
        CustomerCredentials("https://i", "c", "https://g", certificate=tls.client_cert_pem)
