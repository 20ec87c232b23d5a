"""IasTokenClient against a real HTTPS token endpoint on 127.0.0.1 (mTLS and transparent)."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from _tls import (
    USER_JWT,
    TlsMaterial,
    eventually,
    make_tls,
    mtls_credentials,
    transparent_credentials,
)

from agw_persist_cache import TokenFetchError
from agw_persist_cache.agentgateway import AGW_RESOURCE_URN, IasTokenClient
from tests.support.tokenserver import TokenServer


@pytest.fixture(scope="module")
def tls() -> TlsMaterial:
    return make_tls()


@pytest.fixture(scope="module")
def ca_file(tls: TlsMaterial, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tls.write_ca(tmp_path_factory.mktemp("ca"))


@pytest.fixture
def mtls_server(tls: TlsMaterial) -> Iterator[TokenServer]:
    with TokenServer(ssl_context=tls.server_context(require_client_cert=True)) as srv:
        yield srv


@pytest.fixture
def tls_server(tls: TlsMaterial) -> Iterator[TokenServer]:
    with TokenServer(ssl_context=tls.server_context(require_client_cert=False)) as srv:
        yield srv


@pytest.fixture
def ias(tls: TlsMaterial, ca_file: Path, mtls_server: TokenServer) -> Iterator[IasTokenClient]:
    with IasTokenClient(mtls_credentials(tls, mtls_server.token_url), ca_file=ca_file) as client:
        yield client


def test_request_parameters_are_exactly_the_sdks(
    tls: TlsMaterial,
    ca_file: Path,
    mtls_server: TokenServer,
    ias: IasTokenClient,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    customer = pytest.importorskip("sap_cloud_sdk.agentgateway._customer")
    models = pytest.importorskip("sap_cloud_sdk.agentgateway._models")
    monkeypatch.setenv("SSL_CERT_FILE", str(ca_file))  # the SDK trusts only the default store
    creds = ias.credentials
    sdk_creds = models.CustomerCredentials(
        token_service_url=creds.token_service_url,
        client_id=creds.client_id,
        gateway_url=creds.gateway_url,
        integration_dependencies=[],
        certificate=creds.certificate,
        private_key=creds.private_key,
    )
    customer.get_system_token_mtls(sdk_creds, 30.0, None)
    ias.fetch_system_token()
    customer.exchange_user_token(sdk_creds, USER_JWT, 30.0, None)
    ias.exchange_user_token(USER_JWT)
    sdk_system, ours_system, sdk_user, ours_user = mtls_server.forms
    assert ours_system == sdk_system
    assert ours_user == sdk_user
    assert ours_system["resource"] == AGW_RESOURCE_URN
    assert ours_system["response_type"] == "token"
    assert ours_user["assertion"] == USER_JWT and ours_user["token_format"] == "jwt"
    assert mtls_server.client_subjects == ["agw-test-client"] * 4


async def test_async_twins_send_the_same_requests(
    mtls_server: TokenServer, ias: IasTokenClient
) -> None:
    sync_data = ias.fetch_system_token(), ias.exchange_user_token(USER_JWT)
    async_data = await ias.afetch_system_token(), await ias.aexchange_user_token(USER_JWT)
    await ias.aclose()
    forms = mtls_server.forms
    assert forms[:2] == forms[2:]
    assert {k for d in sync_data for k in d} == {k for d in async_data for k in d}
    assert len({d["access_token"] for d in (*sync_data, *async_data)}) == 4


def test_expires_at_counts_from_when_the_request_was_sent(
    mtls_server: TokenServer, ias: IasTokenClient
) -> None:
    mtls_server.token_ttl = 600
    mtls_server.delay = 0.3
    before = time.time()
    data = ias.fetch_system_token()
    after = time.time()
    sent_at = data["expires_at"] - 600
    # The response came back at least `delay` after the request was sent.
    assert before <= sent_at <= after - 0.3
    assert set(data) == {"access_token", "expires_at"}


async def test_one_pooled_connection_per_client(
    mtls_server: TokenServer, ias: IasTokenClient
) -> None:
    for _ in range(3):
        ias.fetch_system_token()
    assert mtls_server.connections == 1
    for _ in range(3):
        await ias.afetch_system_token()
    await ias.aclose()
    assert mtls_server.connections == 2
    assert mtls_server.requests == 6


def test_mtls_fails_clearly_without_the_client_certificate(
    tls: TlsMaterial, ca_file: Path, mtls_server: TokenServer
) -> None:
    plain = IasTokenClient(transparent_credentials(mtls_server.token_url), ca_file=ca_file)
    with plain, pytest.raises(TokenFetchError) as info:
        plain.fetch_system_token()
    message = str(info.value)
    assert "no client certificate" in message
    assert "certificate required" in message.lower()
    assert info.value.status is None
    rogue = mtls_credentials(tls, mtls_server.token_url, rogue=True)
    with IasTokenClient(rogue, ca_file=ca_file) as client, pytest.raises(TokenFetchError):
        client.fetch_system_token()
    assert mtls_server.requests == 0
    assert eventually(lambda: mtls_server.handshake_failures >= 2)


def test_transparent_mode_against_a_server_without_client_cert(
    ca_file: Path, tls_server: TokenServer
) -> None:
    with IasTokenClient(transparent_credentials(tls_server.token_url), ca_file=ca_file) as client:
        assert client.fetch_system_token()["access_token"]
        assert client.exchange_user_token(USER_JWT)["access_token"]
    assert tls_server.client_subjects == [None, None]
    assert [f["grant_type"] for f in tls_server.forms] == [
        "client_credentials",
        "urn:ietf:params:oauth:grant-type:jwt-bearer",
    ]


def test_untrusted_server_certificate_is_refused(tls_server: TokenServer) -> None:
    client = IasTokenClient(transparent_credentials(tls_server.token_url))
    with client, pytest.raises(TokenFetchError, match="CERTIFICATE_VERIFY_FAILED"):
        client.fetch_system_token()


@pytest.mark.parametrize(
    ("override", "status", "expected"),
    [
        (
            (
                400,
                '{"error": "invalid_grant", "error_description": "bad assertion ' + USER_JWT + '"}',
            ),
            400,
            "invalid_grant: bad assertion [redacted]",
        ),
        ((500, '{"error": "server_error"}'), 500, "HTTP 500: server_error"),
        (
            (502, "<html>upstream gave eyJabcdefghijklmnopqrstuvwxyz0123456789.x.y</html>"),
            502,
            "502",
        ),
        ((200, '{"token_type": "bearer"}'), 200, "no access_token (keys: ['token_type'])"),
        ((200, "not json"), 200, "not JSON"),
    ],
)
def test_failures_raise_token_fetch_error_with_status_and_redacted_body(
    mtls_server: TokenServer,
    ias: IasTokenClient,
    override: tuple[int, str],
    status: int,
    expected: str,
) -> None:
    mtls_server.override = override
    with pytest.raises(TokenFetchError) as info:
        ias.exchange_user_token(USER_JWT)
    assert info.value.status == status
    assert expected in str(info.value)
    assert USER_JWT not in str(info.value)
    assert "eyJabcdefghijklmnop" not in str(info.value)


def test_empty_user_jwt_is_rejected_before_any_request(
    mtls_server: TokenServer, ias: IasTokenClient
) -> None:
    with pytest.raises(TokenFetchError, match="user JWT"):
        ias.exchange_user_token("  ")
    assert mtls_server.requests == 0


def test_private_key_never_touches_disk_even_without_memfd(
    tls: TlsMaterial,
    ca_file: Path,
    mtls_server: TokenServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    creds = mtls_credentials(tls, mtls_server.token_url)
    with IasTokenClient(creds, ca_file=ca_file) as client:
        client.fetch_system_token()
    assert list(tmp_path.iterdir()) == []
    monkeypatch.delattr(os, "memfd_create", raising=False)
    with IasTokenClient(creds, ca_file=ca_file) as client:
        client.fetch_system_token()  # via a 0600 temp file, removed right after loading
    assert list(tmp_path.iterdir()) == []
    assert mtls_server.client_subjects == ["agw-test-client"] * 2


def _fetch_in_child(client: IasTokenClient, queue: Any) -> None:
    queue.put(client.fetch_system_token()["access_token"])


def test_a_forked_child_drops_the_inherited_client(
    mtls_server: TokenServer, ias: IasTokenClient
) -> None:
    parent_token = ias.fetch_system_token()["access_token"]
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_fetch_in_child, args=(ias, queue))
    child.start()
    try:
        child_token = queue.get(timeout=60)
    finally:
        child.join(timeout=60)
        if child.is_alive():
            child.kill()
            child.join()
    assert child.exitcode == 0
    assert child_token != parent_token
    ias.fetch_system_token()  # the parent's pooled connection still works
    assert mtls_server.connections == 2  # parent: 1 (reused), child: its own
    assert mtls_server.requests == 3


def test_a_new_event_loop_gets_a_new_async_pool(
    mtls_server: TokenServer, ias: IasTokenClient
) -> None:
    async def fetch() -> str:
        token: str = (await ias.afetch_system_token())["access_token"]
        await ias.aclose()
        return token

    assert asyncio.run(fetch()) != asyncio.run(fetch())
    assert mtls_server.requests == 2
