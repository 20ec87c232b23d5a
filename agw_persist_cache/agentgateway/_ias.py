"""IAS token requests over one pooled httpx client, with sap-cloud-sdk's exact parameters.

STANDARD mode authenticates with the binding's client certificate (mTLS); TRANSPARENT mode
uses plain HTTPS. The request/response logic is one sans-I/O generator
(:func:`_token_flow`) that yields the ``httpx.Request`` to send and receives the response
(or has the transport error thrown in); ``_steps.drive`` / ``adrive`` run it with the pooled
client's ``send``, inside the retry policy.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import re
import ssl
import tempfile
import threading
import time
from collections.abc import Callable, Generator
from functools import partial
from typing import Any
from urllib.parse import urlsplit

import httpx

from .. import _fork
from .._closing import Closing
from .._errors import TokenFetchError
from .._steps import adrive, drive
from ._credentials import CredentialsError, CustomerCredentials
from ._retry import TRANSIENT_STATUSES, retry_policy, transient_transport_error

logger = logging.getLogger(__name__)

AGW_RESOURCE_URN = "urn:sap:identity:application:provider:name:agent-gateway"
GRANT_CLIENT_CREDENTIALS = "client_credentials"
GRANT_JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"
_HEADERS = {"Content-Type": "application/x-www-form-urlencoded", "Accept": "application/json"}
_BODY_LIMIT = 200
# JWTs, long base64/hex runs (opaque tokens, PEM lines): redacted from error bodies.
_TOKENISH = re.compile(r"eyJ[A-Za-z0-9_\-.]+|[A-Za-z0-9_\-+/=.~]{24,}")

TokenDict = dict[str, Any]
"""What a fetch returns to the cache: ``access_token``, ``expires_at`` (epoch) when the
response said ``expires_in``, and ``id_token`` when present."""

_Flow = Generator[httpx.Request, httpx.Response, TokenDict]


def safe_url(url: str) -> str:
    """``scheme://host[:port]/path`` of ``url``: no user info, query or fragment in messages."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}{parts.path}"


def _scrub(text: str, secrets: tuple[str, ...]) -> str:
    for secret in secrets:
        if secret:
            text = text.replace(secret, "[redacted]")
    return text


def redact(text: str, secrets: tuple[str, ...] = ()) -> str:
    """``text`` with known secrets and anything token-shaped replaced, cut to a short snippet."""
    result = " ".join(_TOKENISH.sub("[redacted]", _scrub(text, secrets)).split())
    return result if len(result) <= _BODY_LIMIT else result[:_BODY_LIMIT] + "..."


def _describe_body(response: httpx.Response, secrets: tuple[str, ...]) -> str:
    """The OAuth ``error``/``error_description`` of an error body, else a redacted snippet."""
    try:
        body = response.json()
    except (ValueError, UnicodeDecodeError):
        return redact(response.text, secrets)
    if isinstance(body, dict):
        parts = [
            str(body[k]) for k in ("error", "error_description") if isinstance(body.get(k), str)
        ]
        if parts:
            return redact(": ".join(parts), secrets)
        return f"JSON object with keys {sorted(str(k) for k in body)[:10]}"
    return f"JSON {type(body).__name__}"


def _expires_at(body: dict[str, Any], sent_at: float) -> float | None:
    """``sent_at + expires_in`` when the response gives a usable ``expires_in``."""
    raw = body.get("expires_in")
    if isinstance(raw, bool) or raw is None:
        return None
    try:
        seconds = float(raw)
    except (TypeError, ValueError):
        return None
    return sent_at + seconds if math.isfinite(seconds) and seconds > 0 else None


def _token_flow(
    credentials: CustomerCredentials, timeout: float, grant_type: str, extra: dict[str, str]
) -> _Flow:
    """Build the token request, send it (by yielding), and turn the response into TokenDict."""
    url = credentials.token_service_url
    data = {"client_id": credentials.client_id, "grant_type": grant_type}
    data.update({"resource": AGW_RESOURCE_URN, **extra})
    secrets = tuple(v for k, v in extra.items() if k == "assertion")
    mode = "mTLS" if credentials.mtls else "transparent mode, no client certificate"
    what = f"IAS token request ({_grant_label(grant_type)}, {mode}) to {safe_url(url)}"
    logger.debug("sending %s", what)
    sent_at = time.time()
    extensions = {"timeout": httpx.Timeout(timeout).as_dict()}
    request = httpx.Request("POST", url, data=data, headers=_HEADERS, extensions=extensions)
    try:
        result = yield request
    except httpx.HTTPError as exc:
        # Transport errors describe the connection (e.g. a TLS alert), not the payload.
        detail = _scrub(str(exc), secrets) or "no detail"
        raise TokenFetchError(f"{what} failed: {type(exc).__name__}: {detail}") from exc
    status = result.status_code
    if status != 200:
        detail = _describe_body(result, secrets)
        raise TokenFetchError(f"{what} failed with HTTP {status}: {detail}", status=status)
    try:
        body = result.json()
    except (ValueError, UnicodeDecodeError):
        raise TokenFetchError(f"{what}: HTTP 200 but the body is not JSON", status=status) from None
    token = body.get("access_token") if isinstance(body, dict) else None
    if not isinstance(token, str) or not token:
        keys = sorted(str(k) for k in body)[:10] if isinstance(body, dict) else []
        raise TokenFetchError(f"{what}: response has no access_token (keys: {keys})", status=status)
    token_data: TokenDict = {"access_token": token}
    expires_at = _expires_at(body, sent_at)
    if expires_at is not None:
        token_data["expires_at"] = expires_at
    if isinstance(body.get("id_token"), str):
        token_data["id_token"] = body["id_token"]
    logger.debug("%s succeeded (token length %d)", what, len(token))
    return token_data


def _transient(exc: Exception) -> bool:
    """Worth a second attempt: a transport failure, or IAS answering 502/503/504."""
    if not isinstance(exc, TokenFetchError):
        return False
    return exc.status in TRANSIENT_STATUSES or transient_transport_error(exc.__cause__)


def _grant_label(grant_type: str) -> str:
    return "jwt-bearer" if grant_type == GRANT_JWT_BEARER else grant_type


def _system_request() -> tuple[str, dict[str, str]]:
    return GRANT_CLIENT_CREDENTIALS, {"response_type": "token"}


def _user_request(user_jwt: str) -> tuple[str, dict[str, str]]:
    if not isinstance(user_jwt, str) or not user_jwt.strip():
        raise TokenFetchError("a non-empty user JWT is required for the token exchange")
    return GRANT_JWT_BEARER, {"assertion": user_jwt, "token_format": "jwt"}


def _load_client_cert(ctx: ssl.SSLContext, certificate: str, private_key: str) -> None:
    """Load an in-memory PEM cert/key into ``ctx``.

    ``ssl`` only loads from paths: on Linux an anonymous memory file (memfd, never on
    disk) is used, elsewhere a 0600 temp file that exists only while it is being loaded.
    """
    pem = (private_key.rstrip("\n") + "\n" + certificate).encode()
    memfd_create = getattr(os, "memfd_create", None)
    if memfd_create is not None:
        fd = memfd_create("agw-client-cert", getattr(os, "MFD_CLOEXEC", 0))
        try:
            os.write(fd, pem)
            ctx.load_cert_chain(f"/proc/self/fd/{fd}")
            return
        except FileNotFoundError:
            pass  # no /proc: fall through to a temp file
        finally:
            os.close(fd)
    fd, path = tempfile.mkstemp(prefix="agw-", suffix=".pem")  # mode 0600
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(pem)
        ctx.load_cert_chain(path)
    finally:
        os.unlink(path)


class IasTokenClient(Closing):
    """Fetches Agent Gateway tokens from IAS for one set of customer credentials.

    One pooled ``httpx.Client`` and one ``httpx.AsyncClient`` per instance, created on first
    use with one SSL context; after a fork the child drops the inherited clients (never
    closing the parent's connections) and makes its own. ``ca_file`` replaces the default
    trust store (e.g. a private CA); by default the SDK's choice is kept.
    """

    def __init__(
        self,
        credentials: CustomerCredentials,
        *,
        timeout: float = 60.0,
        ca_file: str | os.PathLike[str] | None = None,
    ) -> None:
        self.credentials = credentials
        self.timeout = timeout
        self.ca_file = None if ca_file is None else os.fspath(ca_file)
        self._reset()

    def _reset(self) -> None:
        """Fresh per-process state (at construction and in a forked child)."""
        self._forks = _fork.forks
        self._lock = threading.Lock()
        self._verify: ssl.SSLContext | bool | None = None
        self._client: httpx.Client | None = None
        self._aclient: httpx.AsyncClient | None = None
        self._aloop: asyncio.AbstractEventLoop | None = None

    def _check_fork(self) -> None:
        # Clients inherited across fork hold the parent's sockets: dropped, never closed.
        if self._forks != _fork.forks:
            self._reset()

    def __repr__(self) -> str:
        mode = "mtls" if self.credentials.mtls else "transparent"
        url = safe_url(self.credentials.token_service_url)
        return f"IasTokenClient({url!r}, client_id={self.credentials.client_id!r}, mode={mode})"

    # -- public API -----------------------------------------------------------------------

    def fetch_system_token(self) -> TokenDict:
        """client_credentials grant: a system-scoped Agent Gateway token."""
        return self._run(partial(_token_flow, self.credentials, self.timeout, *_system_request()))

    def exchange_user_token(self, user_jwt: str) -> TokenDict:
        """jwt-bearer grant: exchange ``user_jwt`` for a user-scoped Agent Gateway token."""
        request = _user_request(user_jwt)
        return self._run(partial(_token_flow, self.credentials, self.timeout, *request))

    async def afetch_system_token(self) -> TokenDict:
        """Async :meth:`fetch_system_token`."""
        return await self._arun(
            partial(_token_flow, self.credentials, self.timeout, *_system_request())
        )

    async def aexchange_user_token(self, user_jwt: str) -> TokenDict:
        """Async :meth:`exchange_user_token`."""
        request = _user_request(user_jwt)
        return await self._arun(partial(_token_flow, self.credentials, self.timeout, *request))

    def close(self) -> None:
        """Close the sync client (the async one needs :meth:`aclose`)."""
        self._check_fork()
        with self._lock:
            client, self._client = self._client, None
        if client is not None:
            client.close()

    async def aclose(self) -> None:
        """Close both clients."""
        self.close()
        with self._lock:
            aclient, self._aclient, self._aloop = self._aclient, None, None
        if aclient is not None:
            await aclient.aclose()

    # -- drivers --------------------------------------------------------------------------

    def _run(self, make_flow: Callable[[], _Flow]) -> TokenDict:
        """Run a fresh flow per attempt; a transient failure is retried (see ``_retry``)."""
        for attempt in retry_policy(on=_transient):
            with attempt:
                return drive(make_flow(), self._send)
        raise AssertionError("unreachable: the last failed attempt re-raises")  # pragma: no cover

    async def _arun(self, make_flow: Callable[[], _Flow]) -> TokenDict:
        """Async :meth:`_run`."""
        async for attempt in retry_policy(on=_transient):
            with attempt:
                return await adrive(make_flow(), self._asend)
        raise AssertionError("unreachable: the last failed attempt re-raises")  # pragma: no cover

    def _send(self, request: httpx.Request) -> httpx.Response:
        return self._sync_client().send(request)

    async def _asend(self, request: httpx.Request) -> httpx.Response:
        return await self._async_client().send(request)

    # -- pooled clients -------------------------------------------------------------------

    def _verify_setting(self) -> ssl.SSLContext | bool:
        if self._verify is None:
            creds = self.credentials
            if creds.certificate is not None and creds.private_key is not None:
                ctx = ssl.create_default_context(cafile=self.ca_file)
                try:
                    _load_client_cert(ctx, creds.certificate, creds.private_key)
                except ssl.SSLError as exc:
                    raise CredentialsError(
                        "certificate/privateKey cannot be loaded as a client certificate "
                        f"(ssl: {exc.reason or type(exc).__name__})"
                    ) from None
                self._verify = ctx
            elif self.ca_file is not None:
                self._verify = ssl.create_default_context(cafile=self.ca_file)
            else:
                self._verify = True
        return self._verify

    def _sync_client(self) -> httpx.Client:
        self._check_fork()
        with self._lock:
            if self._client is None:
                self._client = httpx.Client(verify=self._verify_setting(), timeout=self.timeout)
            return self._client

    def _async_client(self) -> httpx.AsyncClient:
        loop = asyncio.get_running_loop()
        self._check_fork()
        with self._lock:
            if self._aloop is not loop:
                # Connections belong to the loop that opened them; a new loop needs a new
                # pool. The old one cannot be closed from here: call aclose() per loop.
                self._aclient = None
            if self._aclient is None:
                self._aclient = httpx.AsyncClient(
                    verify=self._verify_setting(), timeout=self.timeout
                )
                self._aloop = loop
            return self._aclient
