"""A real MCP streamable-HTTP server on 127.0.0.1 standing in for Agent Gateway, for SAP tests.

The ``mcp`` package's own server, served by uvicorn in a thread, mounted at the path the SDK
builds from a binding (``{gatewayUrl}/v1/mcp/{ordId}/{globalTenantId}``), behind a bearer gate
that records every token it sees and answers 401 to tokens the test has revoked. The same
server answers ``POST /oauth2/token`` as a counting IAS token endpoint (for the ADMS fetcher,
which speaks plain HTTP through ``requests``).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import uvicorn
from mcp.server.mcpserver import MCPServer
from starlette.types import ASGIApp, Receive, Scope, Send

from tests.support.tokenserver import mint_jwt

ORD_ID = "sap.test:apiResource:echo:v1"
GLOBAL_TENANT_ID = "gt-0001"
SERVER_NAME = "agw-test-echo"


async def _send_json(send: Send, status: int, payload: object) -> None:
    body = json.dumps(payload).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


@dataclass
class BearerGate:
    """ASGI middleware: remember each bearer token, 401 for missing or revoked ones (or all,
    with ``reject_all``); ``POST /oauth2/token`` is a counting token endpoint instead."""

    app: ASGIApp
    seen: list[str] = field(default_factory=list)
    revoked: set[str] = field(default_factory=set)
    reject_all: bool = False
    token_requests: int = 0

    def reset(self) -> None:
        """Forget what earlier tests saw and revoked."""
        self.seen.clear()
        self.revoked.clear()
        self.reject_all = False
        self.token_requests = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
        elif scope["path"] == "/oauth2/token":
            self.token_requests += 1
            token = mint_jwt("adms-client", ttl_seconds=3600)
            await _send_json(send, 200, {"access_token": token, "expires_in": 3600})
        else:
            headers = dict(scope["headers"])
            token = headers.get(b"authorization", b"").decode().removeprefix("Bearer ").strip()
            self.seen.append(token)
            if not token or self.reject_all or token in self.revoked:
                await _send_json(send, 401, {"error": "invalid_token"})
            else:
                await self.app(scope, receive, send)


@dataclass
class LocalGateway:
    """A running gate + MCP server; ``url`` is what goes into the binding's ``gatewayUrl``."""

    url: str
    gate: BearerGate


def _mcp_app() -> ASGIApp:
    server = MCPServer(SERVER_NAME)

    @server.tool()
    def echo(text: str) -> str:
        """Return the text unchanged."""
        return text

    return server.streamable_http_app(
        streamable_http_path=f"/v1/mcp/{ORD_ID}/{GLOBAL_TENANT_ID}",
        stateless_http=True,
        json_response=True,
    )


@contextmanager
def local_gateway() -> Iterator[LocalGateway]:
    """Serve the gated MCP app on an ephemeral loopback port for the duration of the block."""
    gate = BearerGate(_mcp_app())
    config = uvicorn.Config(
        gate, host="127.0.0.1", port=0, log_level="warning", lifespan="on", ws="none"
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="local-mcp-gateway", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("local MCP gateway did not start")
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield LocalGateway(url=f"http://127.0.0.1:{port}", gate=gate)
    finally:
        server.should_exit = True
        thread.join(30)
