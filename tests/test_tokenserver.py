"""The local IAS-like TokenServer (tests/support) that the other tests rely on."""

from __future__ import annotations

import ssl
import threading
import time
from collections.abc import Iterator

import httpx
import jwt
import pytest
from _tls import TlsMaterial, eventually, make_tls

from tests.support.tokenserver import GRANT_CLIENT_CREDENTIALS, GRANT_JWT_BEARER, TokenServer

CC_FORM = {"grant_type": GRANT_CLIENT_CREDENTIALS, "client_id": "client-a"}


@pytest.fixture(scope="module")
def tls() -> TlsMaterial:
    return make_tls()


@pytest.fixture
def server() -> Iterator[TokenServer]:
    with TokenServer(token_ttl=600) as srv:
        yield srv


def test_client_credentials_issue_unique_jwts_with_exp(server: TokenServer) -> None:
    assert server.url.startswith("http://127.0.0.1:")
    assert server.token_url == server.url + "/oauth2/token"
    before = time.time()
    bodies = [httpx.post(server.token_url, data=CC_FORM).json() for _ in range(3)]
    tokens = {body["access_token"] for body in bodies}
    assert len(tokens) == 3
    for body in bodies:
        assert body["expires_in"] == 600
        assert body["token_type"].lower() == "bearer"
        claims = jwt.decode(body["access_token"], options={"verify_signature": False})
        assert claims["sub"] == "client-a"
        assert before + 590 <= claims["exp"] <= time.time() + 601
    assert server.requests == 3
    assert server.forms[0] == CC_FORM


def test_jwt_bearer_needs_an_assertion_and_takes_its_subject(server: TokenServer) -> None:
    missing = httpx.post(server.token_url, data={"grant_type": GRANT_JWT_BEARER})
    assert missing.status_code == 400
    assertion = jwt.encode({"sub": "alice"}, "k" * 32, algorithm="HS256")
    ok = httpx.post(server.token_url, data={"grant_type": GRANT_JWT_BEARER, "assertion": assertion})
    assert ok.status_code == 200
    claims = jwt.decode(ok.json()["access_token"], options={"verify_signature": False})
    assert claims["sub"] == "alice"
    bad = httpx.post(server.token_url, data={"grant_type": "password"})
    assert bad.status_code == 400
    assert server.requests == 3


def test_status_is_settable_and_failed_requests_count(server: TokenServer) -> None:
    server.status = 500
    failed = httpx.post(server.token_url, data=CC_FORM)
    assert failed.status_code == 500
    assert "access_token" not in failed.json()
    server.status = 200
    assert httpx.post(server.token_url, data=CC_FORM).status_code == 200
    assert server.requests == 2
    assert server.completed == 2


def test_resource_accepts_issued_tokens_until_revoked(server: TokenServer) -> None:
    token = httpx.post(server.token_url, data=CC_FORM).json()["access_token"]
    headers = {"Authorization": f"Bearer {token}"}
    assert httpx.get(server.resource_url, headers=headers).status_code == 200
    assert httpx.get(server.resource_url).status_code == 401
    server.revoke_all()
    assert httpx.get(server.resource_url, headers=headers).status_code == 401
    assert server.resource_requests == 3


def test_hold_keeps_requests_in_flight_until_release(server: TokenServer) -> None:
    server.hold()
    results: list[int] = []
    thread = threading.Thread(
        target=lambda: results.append(httpx.post(server.token_url, data=CC_FORM).status_code)
    )
    thread.start()
    try:
        assert server.wait_for_requests(1, timeout=10)
        assert server.in_flight == 1
        assert results == []
    finally:
        server.release()
        thread.join(timeout=10)
    assert results == [200]
    assert server.wait_for_completed(1, timeout=10)
    assert server.in_flight == 0


def test_mtls_server_sees_client_cert_and_refuses_clients_without_one(tls: TlsMaterial) -> None:
    with TokenServer(ssl_context=tls.server_context(require_client_cert=True)) as srv:
        assert srv.url.startswith("https://")
        with httpx.Client(verify=tls.client_context(with_cert=True)) as client:
            assert client.post(srv.token_url, data=CC_FORM).status_code == 200
        assert srv.client_subjects == ["agw-test-client"]
        with (
            httpx.Client(verify=tls.client_context(with_cert=False)) as client,
            pytest.raises(httpx.TransportError),
        ):
            client.post(srv.token_url, data=CC_FORM)
        assert srv.requests == 1
        assert eventually(lambda: srv.handshake_failures >= 1)


def test_plain_tls_server_serves_clients_without_cert(tls: TlsMaterial) -> None:
    with TokenServer(ssl_context=tls.server_context(require_client_cert=False)) as srv:
        ctx = tls.client_context()
        assert ctx.verify_mode == ssl.CERT_REQUIRED
        with httpx.Client(verify=ctx) as client:
            assert client.post(srv.token_url, data=CC_FORM).status_code == 200
        assert srv.client_subjects == [None]


def test_stop_frees_the_port() -> None:
    srv = TokenServer().start()
    url = srv.token_url
    srv.stop()
    with pytest.raises(httpx.TransportError):
        httpx.post(url, data=CC_FORM, timeout=5)
