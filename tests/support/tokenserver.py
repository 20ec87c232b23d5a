"""A local IAS-like token endpoint for the tests and benchmarks.

:class:`TokenServer` serves, in a daemon thread on ``127.0.0.1`` (ephemeral port):

* ``POST /oauth2/token`` -- form ``grant_type=client_credentials`` or
  ``grant_type=urn:ietf:params:oauth:grant-type:jwt-bearer`` (with ``assertion``);
  answers JSON ``access_token`` (a unique unsigned JWT carrying ``exp``), ``expires_in``
  and ``token_type``, or the configured error ``status``.
* ``GET /resource`` -- a protected resource: 200 for a currently valid token it issued,
  401 for an unknown, expired or revoked one (see :meth:`TokenServer.revoke_all`).

HTTPS when an ``ssl.SSLContext`` is given; requiring a client certificate (mTLS) is the
caller's choice through that context (``CERT_REQUIRED`` plus a trusted CA). Counters live
in the process that runs the server; other processes reach it over HTTP(S) only.
Tokens are unsigned JWTs minted with pyjwt (nothing here verifies signatures).
"""

from __future__ import annotations

import json
import socket
import ssl
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs

import jwt

__all__ = [
    "GRANT_CLIENT_CREDENTIALS",
    "GRANT_JWT_BEARER",
    "TokenServer",
    "make_unsigned_jwt",
    "mint_jwt",
]

GRANT_CLIENT_CREDENTIALS = "client_credentials"
GRANT_JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"
_HANDSHAKE_TIMEOUT = 10.0


def make_unsigned_jwt(claims: dict[str, Any]) -> str:
    """An unsecured (``alg: none``) JWT with ``claims``; readable by any unverified decoder."""
    return jwt.encode(claims, "", algorithm="none")


def mint_jwt(subject: str, *, ttl_seconds: float, jti: str | None = None, **claims: Any) -> str:
    """An unsigned JWT for ``subject`` whose ``exp`` is ``ttl_seconds`` from now."""
    now = int(time.time())
    return make_unsigned_jwt(
        {
            "sub": subject,
            "iat": now,
            "exp": now + int(ttl_seconds),
            "jti": jti or uuid.uuid4().hex,
            **claims,
        }
    )


def _jwt_subject(assertion: str) -> str | None:
    """The ``sub`` claim of an (unverified) JWT, or None when it cannot be read."""
    try:
        claims = jwt.decode(assertion, options={"verify_signature": False})
    except jwt.PyJWTError:
        return None
    sub = claims.get("sub")
    return sub if isinstance(sub, str) else None


class _Server(ThreadingHTTPServer):
    """ThreadingHTTPServer that runs the TLS handshake in the request thread, not in accept()."""

    daemon_threads = True
    allow_reuse_address = False
    owner: TokenServer

    def finish_request(self, request: Any, client_address: Any) -> None:
        self.owner._count_connection()
        request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        ssl_context = self.owner.ssl_context
        if ssl_context is not None:
            request.settimeout(_HANDSHAKE_TIMEOUT)
            try:
                request = ssl_context.wrap_socket(request, server_side=True)
            except (OSError, ssl.SSLError):
                # A client without the required certificate, or a plain-HTTP client.
                self.owner._count_handshake_failure()
                return
            request.settimeout(None)
            try:
                super().finish_request(request, client_address)
            finally:
                # socketserver closes the raw socket, which wrap_socket has detached.
                request.close()
            return
        super().finish_request(request, client_address)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Stay quiet: a client hanging up mid-request is normal in tests."""


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"
    # Buffer the response so headers and body leave in one write (handle_one_request
    # flushes): two small writes would meet the peer's delayed ACK and cost ~40 ms.
    wbufsize = -1

    def log_message(self, format: str, *args: Any) -> None:
        """Silence the per-request stderr line of BaseHTTPRequestHandler."""

    def _send_json(self, status: int, body: dict[str, Any] | str) -> None:
        raw = (body if isinstance(body, str) else json.dumps(body)).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    def _peer_subject(self) -> str | None:
        """The client certificate's commonName (or first subject value), if one was presented."""
        getpeercert = getattr(self.connection, "getpeercert", None)
        cert = getpeercert() if getpeercert is not None else None
        if not cert:
            return None
        for rdn in cert.get("subject", ()):
            for key, value in rdn:
                if key == "commonName":
                    return str(value)
        sans = cert.get("subjectAltName", ())
        return str(sans[0][1]) if sans else "client-certificate"

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length).decode("utf-8", "replace") if length else ""
        if self.path.split("?", 1)[0] != "/oauth2/token":
            self._send_json(404, {"error": "not_found"})
            return
        form = {k: v[0] for k, v in parse_qs(raw, keep_blank_values=True).items()}
        status, body = self.server.owner._issue(form, self._peer_subject())
        self._send_json(status, body)

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/health":
            self._send_json(200, {"ok": True})
            return
        if path != "/resource":
            self._send_json(404, {"error": "not_found"})
            return
        auth = self.headers.get("Authorization") or ""
        token = auth[7:] if auth.lower().startswith("bearer ") else ""
        sub = self.server.owner._check(token)
        forced = self.server.owner.resource_status
        if forced is not None:
            self._send_json(forced, {"forced": True})
        elif sub is None:
            self._send_json(401, {"error": "invalid_token"})
        else:
            self._send_json(200, {"ok": True, "sub": sub})


class TokenServer:
    """An IAS-like token endpoint plus a protected resource, on 127.0.0.1 in a daemon thread.

    ``delay`` (seconds each token request sleeps), ``status`` (HTTP status of token
    responses; 200 issues a token) and ``token_ttl`` are settable at runtime.
    :meth:`hold` / :meth:`release` keep token requests in flight until released.
    """

    def __init__(
        self,
        *,
        ssl_context: ssl.SSLContext | None = None,
        delay: float = 0.0,
        token_ttl: int = 3600,
        status: int = 200,
    ) -> None:
        self.ssl_context = ssl_context
        self.delay = delay
        self.token_ttl = token_ttl
        self.status = status
        self.url = ""
        self.token_url = ""
        self.resource_url = ""
        self.forms: list[dict[str, str]] = []
        """Every token request's form fields, in arrival order (test inspection only)."""
        self.client_subjects: list[str | None] = []
        """Client certificate subject (commonName) per token request; None without a cert."""
        self.issued_tokens: list[str] = []
        """Every access token handed out, in order (for leak checks)."""
        self.presented: list[str] = []
        """Every bearer token presented at ``/resource``, in order."""
        self.override: tuple[int, str] | None = None
        """When set, token requests get exactly this (status, raw body)."""
        self.resource_status: int | None = None
        """When set, ``/resource`` answers this status whatever the token."""
        self._cond = threading.Condition()
        self._requests = 0
        self._completed = 0
        self._resource_requests = 0
        self._handshake_failures = 0
        self._connections = 0
        self._valid: dict[str, tuple[float, str]] = {}
        self._released = threading.Event()
        self._released.set()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # -- counters (single int reads need no lock; writers hold self._cond) ----------------

    @property
    def requests(self) -> int:
        """Token requests received so far, failed ones included."""
        return self._requests

    @property
    def completed(self) -> int:
        """Token requests fully answered so far (after any delay or hold)."""
        return self._completed

    @property
    def in_flight(self) -> int:
        """Token requests received but not yet answered."""
        with self._cond:
            return self._requests - self._completed

    @property
    def resource_requests(self) -> int:
        """Requests to ``/resource`` so far (200 and 401 alike)."""
        return self._resource_requests

    @property
    def handshake_failures(self) -> int:
        """TLS handshakes that failed (e.g. a missing client certificate under mTLS)."""
        return self._handshake_failures

    @property
    def connections(self) -> int:
        """TCP connections accepted so far (keep-alive reuse shows as fewer connections)."""
        return self._connections

    @property
    def issued(self) -> int:
        """Tokens currently valid at ``/resource`` (issued, not revoked)."""
        with self._cond:
            return len(self._valid)

    def wait_for_requests(self, count: int, timeout: float = 30.0) -> bool:
        """Block until at least ``count`` token requests arrived; False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: self._requests >= count, timeout)

    def wait_for_completed(self, count: int, timeout: float = 30.0) -> bool:
        """Block until at least ``count`` token requests were answered; False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: self._completed >= count, timeout)

    def reset_counters(self) -> None:
        """Zero the request counters and forget recorded forms (issued tokens stay valid)."""
        with self._cond:
            self._requests = self._completed = self._resource_requests = 0
            self._handshake_failures = self._connections = 0
            self.forms.clear()
            self.client_subjects.clear()

    # -- control --------------------------------------------------------------------------

    def hold(self) -> None:
        """Keep every token request that arrives from now on in flight until :meth:`release`."""
        self._released.clear()

    def release(self) -> None:
        """Let held token requests proceed."""
        self._released.set()

    def revoke_all(self) -> None:
        """Make every token issued so far answer 401 at ``/resource``."""
        with self._cond:
            self._valid.clear()

    # -- request handling (called from handler threads) -----------------------------------

    def _count_connection(self) -> None:
        with self._cond:
            self._connections += 1

    def _count_handshake_failure(self) -> None:
        with self._cond:
            self._handshake_failures += 1

    def _issue(
        self, form: dict[str, str], client_subject: str | None
    ) -> tuple[int, dict[str, Any] | str]:
        with self._cond:
            self._requests += 1
            self.forms.append(dict(form))
            self.client_subjects.append(client_subject)
            self._cond.notify_all()
        try:
            return self._answer(form, client_subject)
        finally:
            with self._cond:
                self._completed += 1
                self._cond.notify_all()

    def _answer(
        self, form: dict[str, str], client_subject: str | None
    ) -> tuple[int, dict[str, Any] | str]:
        self._released.wait()
        if self.delay > 0:
            time.sleep(self.delay)
        override = self.override
        if override is not None:
            return override
        status = self.status
        if status != 200:
            return status, {"error": "server_error", "error_description": "injected failure"}
        grant = form.get("grant_type", "")
        if grant == GRANT_CLIENT_CREDENTIALS:
            sub = form.get("client_id") or client_subject or "client"
        elif grant == GRANT_JWT_BEARER:
            assertion = form.get("assertion", "")
            if not assertion:
                return 400, {"error": "invalid_request", "error_description": "assertion missing"}
            sub = _jwt_subject(assertion) or "user"
        else:
            return 400, {"error": "unsupported_grant_type"}
        now = time.time()
        ttl = self.token_ttl
        token = mint_jwt(sub, ttl_seconds=ttl, grant_type=grant)
        with self._cond:
            self._valid[token] = (now + ttl, sub)
            self.issued_tokens.append(token)
        return 200, {"access_token": token, "expires_in": ttl, "token_type": "bearer"}

    def _check(self, token: str) -> str | None:
        with self._cond:
            self._resource_requests += 1
            self.presented.append(token)
            entry = self._valid.get(token)
        if entry is None or entry[0] <= time.time():
            return None
        return entry[1]

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> TokenServer:
        """Bind 127.0.0.1 on an ephemeral port and serve in a daemon thread."""
        if self._server is not None:
            return self
        server = _Server(("127.0.0.1", 0), _Handler)
        server.owner = self
        port = server.server_address[1]
        scheme = "https" if self.ssl_context is not None else "http"
        self.url = f"{scheme}://127.0.0.1:{port}"
        self.token_url = self.url + "/oauth2/token"
        self.resource_url = self.url + "/resource"
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"TokenServer:{port}",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the listening socket; held requests are released."""
        server, thread = self._server, self._thread
        self._server = self._thread = None
        self.release()
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if thread is not None:
            thread.join(timeout=10)

    def __enter__(self) -> TokenServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"TokenServer(url={self.url!r}, requests={self.requests})"
