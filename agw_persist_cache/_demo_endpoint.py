"""The token endpoint ``agw-cache demo`` measures against: 127.0.0.1, a fixed delay, a count.

``POST /oauth2/token`` answers every request, after ``delay`` seconds, with a fresh unsigned
JWT (pyjwt, ``alg: none``) and its ``expires_in``; :attr:`DemoTokenEndpoint.token_requests` counts
them. Nothing else: the demo needs no grant types, errors or TLS.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import jwt

from . import _fork

TOKEN_TTL_SECONDS = 3600


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"  # keep-alive, as a real identity service allows
    wbufsize = -1  # headers and body leave in one write: no delayed-ACK stall per request

    def log_message(self, format: str, *args: Any) -> None:
        """No per-request line on stderr."""

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.path == "/oauth2/token":
            status, body = 200, self.server.owner.issue()
        else:
            status, body = 404, {"error": "not_found"}
        raw = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    # socketserver's default backlog is 5: 64 workers that miss at once overflowed it, and
    # the kernel reset the connections it could not queue (httpx ReadError in the demo).
    request_queue_size = 1024
    owner: DemoTokenEndpoint


class DemoTokenEndpoint:
    """A counting token endpoint in a daemon thread; use it as a context manager."""

    def __init__(self, *, delay: float) -> None:
        self.delay = delay
        self._count = 0
        self._lock = threading.Lock()
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.owner = self
        self.token_url = f"http://127.0.0.1:{self._server.server_address[1]}/oauth2/token"

    @property
    def token_requests(self) -> int:
        """Token requests received so far."""
        return self._count

    def issue(self) -> dict[str, Any]:
        """Count one request, wait ``delay``, and hand out a fresh token."""
        with self._lock:
            self._count += 1
        time.sleep(self.delay)
        now = int(time.time())
        claims = {
            "sub": "demo",
            "iat": now,
            "exp": now + TOKEN_TTL_SECONDS,
            "jti": uuid.uuid4().hex,
        }
        token = jwt.encode(claims, "", algorithm="none")  # unsigned: "" is the none-key
        return {"access_token": token, "expires_in": TOKEN_TTL_SECONDS, "token_type": "bearer"}

    def __enter__(self) -> DemoTokenEndpoint:
        _fork.start_thread("agw-cache-demo-endpoint", self._server.serve_forever)
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._server.shutdown()
        self._server.server_close()
