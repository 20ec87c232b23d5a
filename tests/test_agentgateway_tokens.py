"""AgentGatewayTokens (IAS tokens through the persistent cache) and AgentGatewayAuth (bearer
token from it; on 401 one retry with a new token), each behaviour over sync and async."""

from __future__ import annotations

import http.server
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import ClassVar

import httpx
import pytest
from _tls import (
    USER_JWT,
    Driver,
    TlsMaterial,
    cache_config,
    make_driver,
    make_tls,
    mtls_credentials,
    mtls_token_server,
)

from agw_persist_cache import PersistentTokenCache, TokenFetchError
from agw_persist_cache.agentgateway import AgentGatewayAuth, AgentGatewayTokens, IasTokenClient
from tests.support.tokenserver import TokenServer, make_unsigned_jwt

SCOPE = "customer::agent-client"


@pytest.fixture(scope="module")
def tls() -> TlsMaterial:
    return make_tls()


@pytest.fixture
def server(tls: TlsMaterial) -> Iterator[TokenServer]:
    with mtls_token_server(tls) as srv:
        yield srv


@pytest.fixture(params=["sync", "async"])
async def driver(
    request: pytest.FixtureRequest, tls: TlsMaterial, server: TokenServer, tmp_path: Path
) -> AsyncIterator[Driver]:
    drv = make_driver(request.param, tls, server, tmp_path)
    yield drv
    await drv.close()


async def test_system_token_is_fetched_once_and_shared_through_the_file(
    driver: Driver, server: TokenServer, tmp_path: Path
) -> None:
    first = await driver.token()
    assert await driver.token() == first
    assert server.requests == 1
    with PersistentTokenCache(tmp_path / "tokens.db", config=cache_config()) as other:
        assert other.get_system_token("customer::agent-client") == first


async def test_user_tokens_are_per_user_and_use_the_sdk_scope_key(
    driver: Driver, server: TokenServer, tmp_path: Path
) -> None:
    bob = make_unsigned_jwt({"sub": "bob", "exp": 4102444800})
    alice_token = await driver.token(USER_JWT)
    bob_token = await driver.token(bob)
    assert await driver.token(USER_JWT) == alice_token
    assert alice_token != bob_token
    assert server.requests == 2
    assert [f["assertion"] for f in server.forms] == [USER_JWT, bob]
    assert driver.tokens.scope_key == "customer::agent-client"
    with PersistentTokenCache(tmp_path / "tokens.db", config=cache_config()) as other:
        assert other.get_user_token(bob, "customer::agent-client") == bob_token
        assert other.get_system_token("customer::agent-client") is None


async def test_invalidate_keeps_a_token_another_process_already_replaced(
    driver: Driver, server: TokenServer, tmp_path: Path
) -> None:
    stale = await driver.token(USER_JWT)
    with PersistentTokenCache(tmp_path / "tokens.db", config=cache_config()) as other:
        other.set_user_token(USER_JWT, "customer::agent-client", "replaced-by-another-process")
    assert await driver.invalidate(stale, USER_JWT) is False
    assert await driver.token(USER_JWT) == "replaced-by-another-process"
    assert await driver.invalidate("replaced-by-another-process", USER_JWT) is True
    fresh = await driver.token(USER_JWT)
    assert fresh not in (stale, "replaced-by-another-process")
    assert server.requests == 2


def test_properties_and_repr_show_no_secrets(tls: TlsMaterial, tmp_path: Path) -> None:
    creds = mtls_credentials(tls, "https://127.0.0.1:9/oauth2/token")
    with (
        PersistentTokenCache(tmp_path / "t.db", config=cache_config()) as cache,
        IasTokenClient(creds) as ias,
    ):
        tokens = AgentGatewayTokens(cache, ias)
        assert tokens.gateway_url == "https://gateway.example/"
        text = repr(tokens) + repr(ias)
        assert "BEGIN" not in text and "customer::agent-client" in text


# -- AgentGatewayAuth ------------------------------------------------------------------------


def bearer(request: httpx.Request) -> str:
    return request.headers["Authorization"].removeprefix("Bearer ")


async def test_sets_the_bearer_token_and_reuses_it(driver: Driver, server: TokenServer) -> None:
    auth = AgentGatewayAuth(driver.tokens)
    first = await driver.get(server.resource_url, auth)
    second = await driver.get(server.resource_url, auth)
    assert (first.status_code, second.status_code) == (200, 200)
    assert bearer(first.request) == bearer(second.request) == server.issued_tokens[0]
    assert server.requests == 1


async def test_401_invalidates_for_every_process_and_retries_once_with_a_new_token(
    driver: Driver, server: TokenServer, tmp_path: Path
) -> None:
    auth = AgentGatewayAuth(driver.tokens)
    old = await driver.token()
    server.revoke_all()
    response = await driver.get(server.resource_url, auth)
    assert response.status_code == 200
    assert [r.status_code for r in response.history] == [401]
    new = bearer(response.request)
    assert server.presented == [old, new]
    assert new != old
    assert server.requests == 2  # the warm-up and exactly one replacement
    assert server.resource_requests == 2  # the 401 and exactly one retry
    with PersistentTokenCache(tmp_path / "tokens.db", config=cache_config()) as other:
        assert other.get_system_token(SCOPE) == new


async def test_a_second_401_is_returned_to_the_caller(driver: Driver, server: TokenServer) -> None:
    server.resource_status = 401
    response = await driver.get(server.resource_url, AgentGatewayAuth(driver.tokens))
    assert response.status_code == 401
    assert len(response.history) == 1
    assert server.resource_requests == 2
    assert server.requests == 2


async def test_user_token_may_be_a_callable_resolved_per_request(
    driver: Driver, server: TokenServer
) -> None:
    users = [USER_JWT, make_unsigned_jwt({"sub": "bob"})]
    auth = AgentGatewayAuth(driver.tokens, user_token=lambda: users[0])
    alice = await driver.get(server.resource_url, auth)
    users.reverse()
    bob = await driver.get(server.resource_url, auth)
    assert alice.json()["sub"] == "alice@example.com"
    assert bob.json()["sub"] == "bob"
    assert [f.get("assertion") for f in server.forms] == [USER_JWT, users[0]]


async def test_empty_user_token_fails_before_any_request(
    driver: Driver, server: TokenServer
) -> None:
    with pytest.raises(TokenFetchError, match="empty"):
        await driver.get(server.resource_url, AgentGatewayAuth(driver.tokens, user_token=""))
    assert server.requests == server.resource_requests == 0


class _Answers401Once(http.server.BaseHTTPRequestHandler):
    """POST /: 401 to the first request, then 200; records (bearer, body) of every request.
    Reads chunked bodies, which is how httpx sends a generator body."""

    seen: ClassVar[list[tuple[str, bytes]]] = []

    def do_POST(self) -> None:
        if self.headers.get("Transfer-Encoding") == "chunked":
            body = b""
            while size := int(self.rfile.readline().strip(), 16):
                body += self.rfile.read(size)
                self.rfile.readline()
            self.rfile.readline()
        else:
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.seen.append((self.headers.get("Authorization", ""), body))
        status = 401 if len(self.seen) == 1 else 200
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def answers_401_once() -> Iterator[tuple[str, list[tuple[str, bytes]]]]:
    seen: list[tuple[str, bytes]] = []
    handler = type("Handler", (_Answers401Once,), {"seen": seen})
    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler) as srv:
        thread = threading.Thread(target=srv.serve_forever, daemon=True)
        thread.start()
        yield f"http://127.0.0.1:{srv.server_address[1]}/", seen
        srv.shutdown()
        thread.join()


async def test_streamed_post_body_is_read_first_and_resent_after_a_401(
    driver: Driver, answers_401_once: tuple[str, list[tuple[str, bytes]]]
) -> None:
    url, seen = answers_401_once
    auth = AgentGatewayAuth(driver.tokens)
    parts = [b'{"order": ', b'"4711"}']
    if driver.mode == "sync":
        with httpx.Client(auth=auth) as client:
            response = client.post(url, content=iter(parts))
    else:

        async def body() -> AsyncIterator[bytes]:
            for part in parts:
                yield part

        async with httpx.AsyncClient(auth=auth) as aclient:
            response = await aclient.post(url, content=body())
    assert response.status_code == 200
    assert [r.status_code for r in response.history] == [401]
    assert [body for _, body in seen] == [b'{"order": "4711"}'] * 2
    first, retry = (bearer for bearer, _ in seen)
    assert first != retry  # the 401 made it fetch a new token before resending


def test_repr_names_the_mode_not_the_user_token(tls: TlsMaterial, tmp_path: Path) -> None:
    with (
        PersistentTokenCache(tmp_path / "t.db", config=cache_config()) as cache,
        IasTokenClient(mtls_credentials(tls, "https://127.0.0.1:9/t")) as ias,
    ):
        auth = AgentGatewayAuth(AgentGatewayTokens(cache, ias), user_token=USER_JWT)
        assert "user" in repr(auth) and USER_JWT not in repr(auth)
