"""A counting stand-in for the SAP identity service and a driver of agent processes.

For the tests and ``examples/sap_request_counts.py``; it patches the SDK process-wide, so it
lives here and never in the package. The real IAS token endpoint cannot run here,
so, as the sap-cloud-sdk's own contributors do, this replaces
``sap_cloud_sdk.agentgateway._customer._request_token_mtls`` with a function that mints a fresh
JWT after a simulated round trip and appends one line per request to a counter file, opened with
``O_APPEND`` so the lines of every process on the host add up to one count. Everything else
(binding discovery, the SDK's token logic, the MCP calls) is the real SDK.
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib
import json
import logging
import os
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from tests.support.procs import Worker, Workers
from tests.support.tokenserver import mint_jwt

__all__ = [
    "TokenRequest",
    "install_counting_token_endpoint",
    "read_token_requests",
    "run_agents",
    "write_customer_binding",
]

_BINDING_DIR = "agw-credentials"
_JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"


@dataclass(frozen=True, slots=True)
class TokenRequest:
    """One request seen by the stand-in: grant, a digest of the user assertion, and who asked."""

    grant_type: str
    user_digest: str
    pid: int
    jti: str

    @property
    def is_exchange(self) -> bool:
        """True for a jwt-bearer (user token exchange) request."""
        return self.grant_type == _JWT_BEARER


def write_customer_binding(
    root: Path,
    *,
    gateway_url: str,
    dependencies: Iterable[tuple[str, str]] = (),
    client_id: str = "agw-test-client",
    token_service_url: str = "https://ias.invalid/oauth2/token",
) -> Path:
    """Write a servicebinding.io ``integration-credentials`` binding under ``root``.

    Point ``SERVICE_BINDING_ROOT`` at ``root`` and the SDK detects a customer agent. The
    certificate and key are placeholders: the counting stand-in never opens a TLS connection.
    """
    binding = root / _BINDING_DIR
    binding.mkdir(parents=True, exist_ok=True)
    (binding / "type").write_text("integration-credentials\n")
    credentials = {
        "tokenServiceUrl": token_service_url,
        "clientid": client_id,
        "certificate": "-----BEGIN CERTIFICATE-----\nstand-in\n-----END CERTIFICATE-----\n",
        "privateKey": "-----BEGIN PRIVATE KEY-----\nstand-in\n-----END PRIVATE KEY-----\n",
        "gatewayUrl": gateway_url,
        "integrationDependencies": [
            {"ordId": ord_id, "globalTenantId": gtid} for ord_id, gtid in dependencies
        ],
    }
    path = binding / "credentials"
    path.write_text(json.dumps(credentials))
    return path


def _user_digest(extra_data: Mapping[str, Any] | None) -> str:
    assertion = (extra_data or {}).get("assertion")
    if not assertion:
        return "-"
    return hashlib.sha256(str(assertion).encode()).hexdigest()[:12]


def install_counting_token_endpoint(
    counter_file: Path, *, latency_seconds: float = 0.2, ttl_seconds: float = 3600.0
) -> None:
    """Replace the SDK's token requests (mTLS and transparent) with a counting stand-in.

    Call it in every process that should count (spawned workers included). ``latency_seconds``
    simulates the 100-300 ms mTLS round trip, which is what lets concurrent callers race.
    """
    from sap_cloud_sdk.agentgateway import _customer

    path = os.fspath(counter_file)

    def _counting_token_request(
        credentials: Any,
        grant_type: str,
        timeout: float,
        extra_data: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        jti = uuid.uuid4().hex
        user = _user_digest(extra_data)
        line = f"{grant_type}\t{user}\t{os.getpid()}\t{jti}\n".encode()
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, line)
        finally:
            os.close(fd)
        time.sleep(latency_seconds)
        subject = credentials.client_id if user == "-" else f"user-{user}"
        token = mint_jwt(subject, ttl_seconds=ttl_seconds, jti=jti)
        return {"access_token": token, "token_type": "bearer", "expires_in": int(ttl_seconds)}

    _customer._request_token_mtls = _counting_token_request
    _customer._request_token_transparent = _counting_token_request


def read_token_requests(counter_file: Path) -> list[TokenRequest]:
    """Every request the stand-in served, across processes, in arrival order."""
    try:
        text = Path(counter_file).read_text()
    except FileNotFoundError:
        return []
    requests = []
    for line in text.splitlines():
        grant_type, user, pid, jti = line.split("\t")
        requests.append(TokenRequest(grant_type, user, int(pid), jti))
    return requests


Action = Literal["discover", "clear"]


def _agent(
    module_name: str,
    counter: str,
    coroutines: int,
    users: Sequence[str],
    latency: float,
    action: Action,
    worker: Worker,
) -> None:
    """One agent process: one client from ``module_name``'s ``create_client``, then either
    ``coroutines`` concurrent tool discoveries (system token, then a user's) or a cache clear."""
    logging.disable(logging.CRITICAL)  # the SDK logs each discovery at INFO/WARNING
    install_counting_token_endpoint(Path(counter), latency_seconds=latency)
    create_client = importlib.import_module(module_name).create_client

    async def main() -> None:
        client = create_client()
        if action == "clear":
            client.clear_token_cache()
        else:

            async def one(i: int) -> None:
                await client.list_mcp_tools()
                if users:
                    await client.list_mcp_tools(user_token=users[i % len(users)])

            await asyncio.to_thread(worker.wait)
            await asyncio.gather(*(one(i) for i in range(coroutines)))
        # No cleanup on purpose: like most agents, this one just exits.

    asyncio.run(main())


def run_agents(
    module_name: str,
    counter: Path,
    *,
    processes: int = 1,
    coroutines: int = 1,
    users: Sequence[str] = (),
    latency: float = 0.2,
    action: Action = "discover",
    timeout: float = 120.0,
) -> list[TokenRequest]:
    """Spawn ``processes`` agents that start together, reap them all, return their requests.

    The environment (``SERVICE_BINDING_ROOT``, ``AGW_CACHE_PATH``) is inherited by the agents.
    Raises :class:`~tests.support.procs.WorkerError` if an agent fails or hangs.
    """
    before = len(read_token_requests(counter))
    args = (module_name, os.fspath(counter), coroutines, tuple(users), latency, action)
    with Workers("spawn", timeout=timeout) as agents:
        agents.start(_agent, [args] * processes)
        agents.join()
    return read_token_requests(counter)[before:]
