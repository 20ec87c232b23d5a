"""``httpx.Auth`` for Agent Gateway: bearer token from the shared cache, one retry on 401.

The decisions live in one generator (:meth:`AgentGatewayAuth._flow`) that yields either a
request to send or a :class:`_NeedToken` marker. ``sync_auth_flow`` and ``async_auth_flow``
only differ in how they satisfy the marker (sync vs awaited cache); every send goes through
httpx's own driver (``httpx.Auth.sync_auth_flow`` / ``async_auth_flow`` over
:meth:`AgentGatewayAuth.auth_flow`), which reads a streamed request body before the first
send because ``requires_request_body`` is set, so the retry after a 401 can send it again.

The class is also an ``httpx2.Auth`` when ``httpx2`` is installed (``mcp`` 2.x builds its
clients with it): both libraries drive an auth through the same generator protocol.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator, Callable, Generator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import httpx

from .._errors import TokenFetchError
from ._ias import safe_url
from ._tokens import AgentGatewayTokens

logger = logging.getLogger(__name__)

if TYPE_CHECKING:
    _Httpx2Auth = object
else:
    try:
        from httpx2 import Auth as _Httpx2Auth
    except ImportError:  # httpx2 comes with mcp 2.x; without it, httpx alone
        _Httpx2Auth = object


@dataclass(frozen=True)
class _NeedToken:
    """The flow needs a token; ``stale`` (a token that just got 401) is invalidated first."""

    user_jwt: str | None
    stale: str | None = None


_Flow = Generator["httpx.Request | _NeedToken", "httpx.Response | str", None]


class AgentGatewayAuth(httpx.Auth, _Httpx2Auth):
    """Adds ``Authorization: Bearer <token>``; on 401 invalidates that token host-wide and
    retries once with a fresh one. A second 401 is returned to the caller.

    ``user_token`` (a user JWT, or a callable returning one per request) selects the
    user-scoped (exchanged) token; without it the system token is used.
    """

    requires_request_body = True  # the retry re-sends the body

    def __init__(
        self,
        tokens: AgentGatewayTokens,
        user_token: str | Callable[[], str] | None = None,
    ) -> None:
        self.tokens = tokens
        self.user_token = user_token

    def __repr__(self) -> str:
        mode = "system" if self.user_token is None else "user"
        return f"AgentGatewayAuth(scope_key={self.tokens.scope_key!r}, token={mode})"

    def _user_jwt(self) -> str | None:
        value = self.user_token() if callable(self.user_token) else self.user_token
        if value is not None and (not isinstance(value, str) or not value.strip()):
            raise TokenFetchError("AgentGatewayAuth: user_token resolved to an empty value")
        return value

    def _flow(self, request: httpx.Request) -> _Flow:
        user_jwt = self._user_jwt()
        token = yield _NeedToken(user_jwt)
        assert isinstance(token, str)
        request.headers["Authorization"] = f"Bearer {token}"
        response = yield request
        if getattr(response, "status_code", None) != 401:  # an httpx or httpx2 response
            return
        logger.debug(
            "401 from %s %s; invalidating the token and retrying once",
            request.method,
            safe_url(str(request.url)),
        )
        fresh = yield _NeedToken(user_jwt, stale=token)
        assert isinstance(fresh, str)
        request.headers["Authorization"] = f"Bearer {fresh}"
        yield request

    def _provide(self, need: _NeedToken) -> str:
        if need.stale is not None:
            self.tokens.invalidate_token(need.stale, need.user_jwt)
        return self.tokens.token(need.user_jwt)

    async def _aprovide(self, need: _NeedToken) -> str:
        if need.stale is not None:
            await self.tokens.ainvalidate_token(need.stale, need.user_jwt)
        return await self.tokens.atoken(need.user_jwt)

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        """One send of ``request`` as prepared (bearer set), run by httpx's own drivers."""
        yield request

    def sync_auth_flow(
        self, request: httpx.Request
    ) -> Generator[httpx.Request, httpx.Response, None]:
        """Drive :meth:`_flow` for a sync client, getting tokens synchronously."""
        flow = self._flow(request)
        item = next(flow)
        while True:
            if isinstance(item, _NeedToken):
                reply: httpx.Response | str = self._provide(item)
            else:
                reply = yield from _last_response(super().sync_auth_flow(item))
            try:
                item = flow.send(reply)
            except StopIteration:
                return

    async def async_auth_flow(
        self, request: httpx.Request
    ) -> AsyncGenerator[httpx.Request, httpx.Response]:
        """Drive :meth:`_flow` for an async client, awaiting tokens."""
        flow = self._flow(request)
        item = next(flow)
        while True:
            if isinstance(item, _NeedToken):
                reply: httpx.Response | str = await self._aprovide(item)
            else:
                sends = super().async_auth_flow(item)  # httpx's driver: awaits the body first
                sent = await anext(sends)
                while True:
                    reply = yield sent
                    try:
                        sent = await sends.asend(reply)
                    except StopAsyncIteration:
                        break
            try:
                item = flow.send(reply)
            except StopIteration:
                return


def _last_response(
    sends: Generator[httpx.Request, httpx.Response, None],
) -> Generator[httpx.Request, httpx.Response, httpx.Response]:
    """Relay httpx's driver ``sends`` and return the last response it received."""
    sent = next(sends)
    while True:
        response = yield sent
        try:
            sent = sends.send(response)
        except StopIteration:
            return response
