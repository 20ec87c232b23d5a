"""Test support: TLS material made at test time (trustme) and Agent Gateway helpers.

Import as ``from _tls import make_tls, ...`` (pytest puts ``tests/`` on ``sys.path``; spawn
workers inherit it). Everything is made in memory; :meth:`TlsMaterial.write_ca` puts the CA
on disk for processes that need a path.
"""

from __future__ import annotations

import ssl
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import trustme

from agw_persist_cache import CacheConfig, PersistentTokenCache
from agw_persist_cache.agentgateway import AgentGatewayTokens, CustomerCredentials, IasTokenClient
from tests.support.tokenserver import TokenServer


@dataclass(frozen=True)
class TlsMaterial:
    """A CA, a server leaf for 127.0.0.1/localhost, a trusted client leaf and a rogue one."""

    ca: trustme.CA
    server: trustme.LeafCert
    client: trustme.LeafCert
    rogue_client: trustme.LeafCert
    """Issued by a different CA: the server must refuse it."""

    @property
    def ca_pem(self) -> str:
        return self.ca.cert_pem.bytes().decode()

    @property
    def client_cert_pem(self) -> str:
        return b"".join(blob.bytes() for blob in self.client.cert_chain_pems).decode()

    @property
    def client_key_pem(self) -> str:
        return self.client.private_key_pem.bytes().decode()

    @property
    def rogue_cert_pem(self) -> str:
        return b"".join(blob.bytes() for blob in self.rogue_client.cert_chain_pems).decode()

    @property
    def rogue_key_pem(self) -> str:
        return self.rogue_client.private_key_pem.bytes().decode()

    def server_context(self, *, require_client_cert: bool) -> ssl.SSLContext:
        """Server-side context; with ``require_client_cert`` it demands a cert from our CA."""
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.server.configure_cert(ctx)
        if require_client_cert:
            ctx.verify_mode = ssl.CERT_REQUIRED
            self.ca.configure_trust(ctx)
        return ctx

    def client_context(self, *, with_cert: bool = False) -> ssl.SSLContext:
        """Client-side context trusting our CA, optionally presenting the trusted client cert."""
        ctx = ssl.create_default_context()
        self.ca.configure_trust(ctx)
        if with_cert:
            self.client.configure_cert(ctx)
        return ctx

    def write_ca(self, directory: Path) -> Path:
        """Write the CA certificate to ``directory/ca.pem`` and return its path."""
        path = directory / "ca.pem"
        self.ca.cert_pem.write_to_path(str(path))
        return path


def make_tls() -> TlsMaterial:
    """Fresh CA and leaves (ECDSA, quick to make)."""
    ca = trustme.CA()
    server = ca.issue_cert("127.0.0.1", "localhost", common_name="token-server")
    client = ca.issue_cert("agent.example", common_name="agw-test-client")
    rogue = trustme.CA().issue_cert("agent.example", common_name="rogue-client")
    return TlsMaterial(ca=ca, server=server, client=client, rogue_client=rogue)


# -- Agent Gateway helpers (shared by tests/test_agentgateway_*.py) -------------------------

USER_JWT = (
    "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0."
    "eyJzdWIiOiJhbGljZUBleGFtcGxlLmNvbSIsImV4cCI6NDEwMjQ0NDgwMH0.c2lnbmF0dXJlLW9mLWFsaWNl"
)
"""A user JWT (sub alice@example.com) used as the jwt-bearer assertion; treated as secret."""


def mtls_credentials(
    tls: TlsMaterial, token_url: str, *, client_id: str = "agent-client", rogue: bool = False
) -> CustomerCredentials:
    """STANDARD-mode credentials with the trusted (or, with ``rogue``, an untrusted) client cert."""
    return CustomerCredentials(
        token_service_url=token_url,
        client_id=client_id,
        gateway_url="https://gateway.example/",
        certificate=tls.rogue_cert_pem if rogue else tls.client_cert_pem,
        private_key=tls.rogue_key_pem if rogue else tls.client_key_pem,
    )


def transparent_credentials(
    token_url: str, *, client_id: str = "agent-client"
) -> CustomerCredentials:
    """TRANSPARENT-mode credentials (no client certificate)."""
    return CustomerCredentials(
        token_service_url=token_url, client_id=client_id, gateway_url="https://gateway.example"
    )


TEST_CACHE_KEY = "vY1kq0mJ8F3bXo2b3d8x1pQe7Q5u6n0Xw4c2r9s8t0E="


def cache_config(**overrides: Any) -> CacheConfig:
    """A CacheConfig with a fixed key (no key file races between test processes)."""
    return CacheConfig(keys=[TEST_CACHE_KEY], **overrides)


@contextmanager
def mtls_token_server(tls: TlsMaterial, **options: Any) -> Iterator[TokenServer]:
    """A TokenServer on 127.0.0.1 that requires our client certificate."""
    with TokenServer(ssl_context=tls.server_context(require_client_cert=True), **options) as srv:
        yield srv


def make_driver(mode: str, tls: TlsMaterial, server: TokenServer, tmp_path: Path) -> Driver:
    """A :class:`Driver` over a fresh cache file and an mTLS IasTokenClient for ``server``."""
    ias = IasTokenClient(mtls_credentials(tls, server.token_url), ca_file=tls.write_ca(tmp_path))
    cache = PersistentTokenCache(tmp_path / "tokens.db", config=cache_config())
    return Driver(mode, AgentGatewayTokens(cache, ias), tls.client_context(with_cert=True))


class Driver:
    """Runs the same behaviour through the sync or the async API (``mode``), so one test
    proves both twins."""

    def __init__(self, mode: str, tokens: AgentGatewayTokens, verify: ssl.SSLContext) -> None:
        self.mode = mode
        self.tokens = tokens
        self.verify = verify

    async def token(self, user_jwt: str | None = None) -> str:
        if self.mode == "sync":
            return self.tokens.token(user_jwt)
        return await self.tokens.atoken(user_jwt)

    async def invalidate(self, token: str, user_jwt: str | None = None) -> bool:
        if self.mode == "sync":
            return self.tokens.invalidate_token(token, user_jwt)
        return await self.tokens.ainvalidate_token(token, user_jwt)

    async def get(self, url: str, auth: httpx.Auth) -> httpx.Response:
        if self.mode == "sync":
            with httpx.Client(verify=self.verify, auth=auth) as client:
                return client.get(url)
        async with httpx.AsyncClient(verify=self.verify, auth=auth) as aclient:
            return await aclient.get(url)

    async def close(self) -> None:
        if self.mode == "async":
            await self.tokens.cache.aclose()
            await self.tokens.ias_client.aclose()
        self.tokens.cache.close()
        self.tokens.ias_client.close()


def eventually(predicate: Callable[[], bool], timeout: float = 10.0) -> bool:
    """Poll ``predicate``: server threads record a failed handshake just after the client saw it."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.01)
    return True
