"""The agent of the whole-agent benchmark: a small ASGI app that gunicorn serves with
UvicornWorkers (``gunicorn -k uvicorn.workers.UvicornWorker benchmarks._agent_app:app``).

Each worker builds one ``AgentGatewayClient`` at startup with the ``create_client`` named by
``$AGW_BENCH_CLIENT`` (``stock``: the SDK's own; ``drop-in``: this package's), as an agent
would. A request carries its user's JWT as a bearer token; the agent discovers the tools with
the system token (``list_mcp_tools``) and calls one with the user's (``call_mcp_tool``), both
through the real SDK. Time-in-auth is measured here: the client's ``get_system_auth`` and
``get_user_auth`` (where every SDK call gets its token, hit or fetch) are wrapped with a timer,
and the response reports their summed seconds for this request.
"""

from __future__ import annotations

import contextvars
import importlib
import json
import logging
import os
import time
import warnings
from collections.abc import Awaitable, Callable
from typing import Any

CLIENTS = {"stock": "sap_cloud_sdk.agentgateway", "drop-in": "agw_persist_cache.integrations.sap"}
CLIENT_ENV = "AGW_BENCH_CLIENT"

Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

_spent: contextvars.ContextVar[list[float]] = contextvars.ContextVar("agw_bench_auth_seconds")


def _timed(method: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    """``method`` with its duration added to this request's time-in-auth."""

    async def timed(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return await method(*args, **kwargs)
        finally:
            _spent.get().append(time.perf_counter() - t0)

    return timed


def make_client() -> Any:
    """This worker's client, its two token seams timed (instance attributes shadow the
    methods, so the SDK's own ``list_mcp_tools`` and ``call_mcp_tool`` go through them)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # traceloop, at import
        module = importlib.import_module(CLIENTS[os.environ[CLIENT_ENV]])
    client = module.create_client()
    client.get_system_auth = _timed(client.get_system_auth)
    client.get_user_auth = _timed(client.get_user_auth)
    return client


async def _respond(send: Send, status: int, body: dict[str, Any]) -> None:
    raw = json.dumps(body).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(raw))]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": raw})


class Agent:
    """The ASGI app: lifespan builds the client; ``GET /`` with a bearer user JWT serves."""

    def __init__(self) -> None:
        self.client: Any = None

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    for name in ("sap_cloud_sdk", "mcp", "httpx"):  # a line per call
                        logging.getLogger(name).setLevel(logging.ERROR)
                    self.client = make_client()
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        headers = dict(scope["headers"])
        user_jwt = headers.get(b"authorization", b"").decode().removeprefix("Bearer ")
        spent: list[float] = []
        _spent.set(spent)
        try:
            tools = await self.client.list_mcp_tools()
            answer = await self.client.call_mcp_tool(tools[0], user_token=user_jwt, text="hi")
        except Exception as exc:  # reason: the benchmark counts failures, it must not hang
            await _respond(send, 500, {"error": f"{type(exc).__name__}: {exc}"[:200]})
            return
        await _respond(
            send, 200, {"pid": os.getpid(), "auth_seconds": sum(spent), "answer": answer}
        )


app = Agent()
