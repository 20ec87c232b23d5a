"""``AgentGatewayClient`` with its tokens in the host-wide persistent cache.

The seam: every public method of the SDK client gets its token from ``get_system_auth`` or
``get_user_auth``, and both consult ``self._token_cache`` before fetching. This subclass
overrides those two methods (with the SDK's own telemetry decorator, so hits are counted as
the SDK counts every call) to put ``PersistentTokenCache.afetch_entry`` (cross-process single
flight, persistence, refresh ahead) in front of the SDK's acquisition: for customer flows the
SDK's token functions (``get_system_token_mtls`` / ``exchange_user_token``) with the
credentials already loaded to name the key, for LoB the SDK's own method body. Every SDK name
is looked up in the SDK client's module at call time, so patches users put there apply.
``self._token_cache`` is replaced by :class:`_SharedTokenCache`, a ``_TokenCache``
whose reads miss while the SDK fetches on our behalf and whose writes hand the SDK's expiry
back to us, so the one place that writes the shared file is ``afetch_entry`` (which honours a
``clear()`` racing the fetch). ``call_mcp_tool`` additionally retries once after a 401."""

from __future__ import annotations

import asyncio
import contextvars
import logging
import re
import threading
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Literal

from agw_persist_cache import FetchBackoffError, PersistentTokenCache
from agw_persist_cache.agentgateway._retry import (
    TRANSIENT_STATUSES,
    retry_policy,
    transient_transport_error,
)

from ._defaults import default_cache
from ._sap_compat import (
    AgentGatewayClient,
    AgentGatewaySDKError,
    AuthResult,
    ClientConfig,
    CustomerCredentials,
    MCPTool,
    Module,
    Operation,
    _cache_scope_key,
    _system_scope_key,
    _TokenCache,
    _user_scope_key,
    record_metrics,
    sdk_client_module,
)
from ._sap_time import monotonic_to_epoch, stored_expiry
from ._sap_unauthorized import rejected_by_server

log = logging.getLogger("agw_persist_cache")

Kind = Literal["system", "user"]
_SCOPE_PREFIX = "sap-cloud-sdk/agentgateway:"
_GATEWAY_URL = "gateway_url"
_MAX_PENDING = 1024
_FAILURE = {"system": "System auth acquisition failed", "user": "User auth exchange failed"}

# The SDK's methods without their telemetry decorator (``functools.wraps`` keeps them as
# ``__wrapped__``): this class's overrides carry the same decorator, so every call, hit or
# miss, records the SDK's metrics exactly once.
_sdk_get_system_auth: Callable[[AgentGatewayClient], Awaitable[AuthResult]] = (
    AgentGatewayClient.get_system_auth.__wrapped__
)
_sdk_get_user_auth: Callable[[AgentGatewayClient, str], Awaitable[AuthResult]] = (
    AgentGatewayClient.get_user_auth.__wrapped__
)
_sdk_call_mcp_tool: Callable[..., Awaitable[str]] = AgentGatewayClient.call_mcp_tool.__wrapped__


# The SDK reports IAS errors as AgentGatewaySDKError("Token request failed with status N: ...").
_SDK_STATUS = re.compile(r"\bstatus (\d{3})\b")


class _TransientSdkError(Exception):
    """Stands in for a transient SDK error while it is retried, so that the retry log names
    the kind of failure, never the SDK's message (which may quote the IAS response body)."""

    def __init__(self, original: AgentGatewaySDKError, why: str) -> None:
        super().__init__(why)
        self.original = original


def _why_transient(exc: AgentGatewaySDKError) -> str | None:
    """``"transport"`` or ``"HTTP 503"`` when ``exc`` is worth a second attempt, else None."""
    if transient_transport_error(exc):
        return "transport"
    match = _SDK_STATUS.search(str(exc))
    if match and int(match.group(1)) in TRANSIENT_STATUSES:
        return f"HTTP {match.group(1)}"
    return None


async def _with_retries(acquire: Callable[[], Awaitable[AuthResult]]) -> AuthResult:
    """The SDK's acquisition, a transient failure retried (see ``agentgateway._retry``)."""
    try:
        async for attempt in retry_policy(on=_TransientSdkError):
            with attempt:
                try:
                    return await acquire()
                except AgentGatewaySDKError as exc:
                    why = _why_transient(exc)
                    if why is None:
                        raise
                    raise _TransientSdkError(exc, why) from None
    except _TransientSdkError as exhausted:
        original = exhausted.original
        raise original from original.__cause__  # the SDK's error as it was, cause included
    raise AssertionError("unreachable: the last failed attempt re-raises")  # pragma: no cover


def shared_scope_key(sdk_scope_key: str) -> str:
    """The persistent cache's scope key for one of the SDK's own scope keys."""
    return _SCOPE_PREFIX + sdk_scope_key


class _SharedTokenCache(_TokenCache):
    """The SDK's ``_TokenCache`` interface over a :class:`PersistentTokenCache`.

    While :meth:`fetching` marks a key, reads of it miss (so the SDK really fetches, also
    for a refresh ahead) and writes record the SDK's deadline, as epoch, for the caller to
    store. Invalidation and ``clear()`` act on the shared file, for every process.
    """

    def __init__(self, config: ClientConfig, cache: PersistentTokenCache) -> None:
        super().__init__(config)
        self.cache = cache
        self._lock = threading.Lock()
        self._fetching: Counter[tuple[Kind, str, str | None]] = Counter()
        self._deadlines: dict[str, float] = {}

    @contextmanager
    def fetching(self, kind: Kind, scope_key: str, user_jwt: str | None) -> Iterator[None]:
        """Within the block the SDK's reads of this key miss; its writes are recorded."""
        mark = (kind, scope_key, user_jwt)
        with self._lock:
            self._fetching[mark] += 1
        try:
            yield
        finally:
            with self._lock:
                self._fetching[mark] -= 1
                if self._fetching[mark] <= 0:
                    del self._fetching[mark]

    def usable_until(self, token: str) -> float | None:
        """The epoch deadline the SDK computed for ``token`` (once), if it stored one."""
        with self._lock:
            return self._deadlines.pop(token, None)

    def _read(self, kind: Kind, scope_key: str, user_jwt: str | None) -> str | None:
        with self._lock:
            if (kind, scope_key, user_jwt) in self._fetching:
                return None
        entry = self.cache.get_entry(kind, shared_scope_key(scope_key), user_jwt=user_jwt)
        return entry.token if entry else None

    def _record(self, token: str, expires_at: float) -> None:
        with self._lock:
            if len(self._deadlines) >= _MAX_PENDING:  # only cancelled fetches leave entries
                self._deadlines.clear()
            self._deadlines[token] = monotonic_to_epoch(expires_at)

    def get_system_token(self, scope_key: str) -> str | None:
        return self._read("system", scope_key, None)

    def set_system_token(self, token: str, expires_at: float, scope_key: str) -> None:
        self._record(token, expires_at)

    def invalidate_system_token(self, scope_key: str) -> None:
        self.cache.invalidate_entry("system", shared_scope_key(scope_key))

    def get_user_token(self, user_jwt: str, scope_key: str) -> str | None:
        return self._read("user", scope_key, user_jwt)

    def set_user_token(self, user_jwt: str, token: str, expires_at: float, scope_key: str) -> None:
        self._record(token, expires_at)

    def invalidate_user_token(self, user_jwt: str, scope_key: str) -> None:
        self.cache.invalidate_entry("user", shared_scope_key(scope_key), user_jwt=user_jwt)

    def clear(self) -> None:
        self.cache.clear()


@dataclass(frozen=True, slots=True)
class _Flow:
    """Where a token comes from: the SDK's scope key, the gateway URL if known up front, and
    the customer credentials when the flow is a customer one (binding file or transparent)."""

    scope_key: str
    gateway_url: str | None
    credentials: CustomerCredentials | None = field(default=None, repr=False)


@dataclass(frozen=True, slots=True)
class _Served:
    """The token this task's last auth call handed out (to invalidate it after a 401)."""

    kind: Kind
    scope_key: str
    user_jwt: str | None = field(repr=False)
    token: str = field(repr=False)


_served: contextvars.ContextVar[_Served | None] = contextvars.ContextVar(
    "agw_persist_cache_sap_served", default=None
)


class PersistentAgentGatewayClient(AgentGatewayClient):
    """An ``AgentGatewayClient`` whose tokens live in a :class:`PersistentTokenCache`.

    Every process on the host that uses the same cache file shares the tokens; a cold start of
    many processes and coroutines makes one token request per (flow, credentials or tenant,
    user). Takes every argument of the SDK's ``AgentGatewayClient`` (forwarded unchanged), plus
    ``cache`` (default: :func:`agw_persist_cache.integrations.sap.default_cache`).
    """

    _token_cache: _SharedTokenCache

    def __init__(
        self,
        tenant_subdomain: str | Callable[[], str] | None = None,
        config: ClientConfig | None = None,
        _telemetry_source: Module | None = None,
        *,
        cache: PersistentTokenCache | None = None,
    ) -> None:
        super().__init__(
            tenant_subdomain=tenant_subdomain, config=config, _telemetry_source=_telemetry_source
        )
        self._token_cache = _SharedTokenCache(
            self._config, cache if cache is not None else default_cache()
        )

    @property
    def token_cache(self) -> PersistentTokenCache:
        """The persistent cache this client reads and fills."""
        return self._token_cache.cache

    def clear_token_cache(self) -> None:
        """Drop every cached token on the host: the next call in any process fetches anew."""
        self._token_cache.clear()

    @record_metrics(Module.AGENTGATEWAY, Operation.AGENTGATEWAY_GET_SYSTEM_AUTH)
    async def get_system_auth(self) -> AuthResult:
        """As the SDK's, served from the shared cache; one fetch per key across processes."""
        return await self._auth("system", None, lambda: _sdk_get_system_auth(self))

    @record_metrics(Module.AGENTGATEWAY, Operation.AGENTGATEWAY_GET_USER_AUTH)
    async def get_user_auth(self, user_token: str | Callable[[], str] | None) -> AuthResult:
        """As the SDK's, served from the shared cache; one exchange per user across processes."""
        user_jwt = self._resolve_value(user_token, "user_token is required for token exchange.")
        return await self._auth("user", user_jwt, lambda: _sdk_get_user_auth(self, user_jwt))

    @record_metrics(Module.AGENTGATEWAY, Operation.AGENTGATEWAY_CALL_MCP_TOOL)
    async def call_mcp_tool(
        self,
        tool: MCPTool,
        user_token: str | Callable[[], str] | None = None,
        **kwargs: Any,
    ) -> str:
        """As the SDK's; if the MCP server answers 401, forget that token everywhere, retry once."""
        _served.set(None)
        try:
            return await _sdk_call_mcp_tool(self, tool, user_token, **kwargs)
        except AgentGatewaySDKError as exc:
            served = _served.get()
            if served is None or not await rejected_by_server(
                exc, getattr(tool, "url", None), served.token, self._config.timeout
            ):
                raise
            log.info("MCP server rejected the cached token (401); fetching a new one, once")
            await self._forget(served)
        return await _sdk_call_mcp_tool(self, tool, user_token, **kwargs)

    def _flow(self, kind: Kind) -> _Flow:
        """Mirror the SDK's dispatch (binding file, transparent env, LoB) to name the key.

        The detection functions are looked up where the SDK's client looks them up (its
        ``agw_client`` module), at call time, so patches and wrappers on those names apply here.
        """
        sdk = sdk_client_module
        path = sdk.detect_customer_agent_credentials()
        if path or sdk.detect_transparent_credentials():
            creds = (
                sdk.load_customer_credentials(path)
                if path
                else sdk.load_customer_credentials_from_env()
            )
            return _Flow(_cache_scope_key(creds), creds.gateway_url, creds)
        tenant = self._resolve_tenant_subdomain()
        lob_key = _system_scope_key(tenant) if kind == "system" else _user_scope_key(tenant)
        return _Flow(lob_key, None)

    async def _auth(
        self, kind: Kind, user_jwt: str | None, sdk_auth: Callable[[], Awaitable[AuthResult]]
    ) -> AuthResult:
        try:
            flow = self._flow(kind)
        except Exception:  # the SDK raises its own, familiar error for this
            return await sdk_auth()
        shared = self._token_cache
        if flow.credentials is not None:
            sdk_auth = partial(self._customer_auth, kind, flow.credentials, user_jwt)

        async def fetch() -> dict[str, Any]:
            with shared.fetching(kind, flow.scope_key, user_jwt):
                auth = await _with_retries(sdk_auth)
            data: dict[str, Any] = {
                "access_token": auth.access_token,
                "extra": {_GATEWAY_URL: auth.gateway_url},
            }
            usable_until = shared.usable_until(auth.access_token)
            if usable_until is not None:
                data["expires_at"] = stored_expiry(shared.cache, usable_until)
            return data

        scope = shared_scope_key(flow.scope_key)
        try:
            entry = await shared.cache.afetch_entry(kind, scope, fetch, user_jwt=user_jwt)
            gateway_url = flow.gateway_url or entry.extra.get(_GATEWAY_URL)
            if gateway_url is None:  # a row written without its URL: fetch both again
                await shared.cache.ainvalidate_entry(kind, scope, user_jwt=user_jwt)
                entry = await shared.cache.afetch_entry(kind, scope, fetch, user_jwt=user_jwt)
                gateway_url = entry.extra.get(_GATEWAY_URL, "")
        except FetchBackoffError as exc:
            raise AgentGatewaySDKError(f"{_FAILURE[kind]}: {exc}") from exc
        _served.set(_Served(kind, scope, user_jwt, entry.token))
        return AuthResult(access_token=entry.token, gateway_url=gateway_url)

    async def _customer_auth(
        self, kind: Kind, credentials: CustomerCredentials, user_jwt: str | None
    ) -> AuthResult:
        """The SDK's customer-flow acquisition with the credentials ``_flow`` already loaded
        (the SDK's body would load them a second time), through the SDK's own token functions
        and its error wrapping."""
        sdk = sdk_client_module
        loop = asyncio.get_running_loop()
        timeout = self._config.timeout
        try:
            if user_jwt is None:
                get = partial(sdk.get_system_token_mtls, credentials, timeout, self._token_cache)
            else:
                get = partial(
                    sdk.exchange_user_token, credentials, user_jwt, timeout, self._token_cache
                )
            token = await loop.run_in_executor(None, get)
        except AgentGatewaySDKError:
            raise
        except Exception as exc:
            raise AgentGatewaySDKError(f"{_FAILURE[kind]}: {exc}") from exc
        return AuthResult(access_token=token, gateway_url=credentials.gateway_url)

    async def _forget(self, served: _Served) -> None:
        """Invalidate ``served`` unless another process already replaced it."""
        await self._token_cache.cache.ainvalidate_entry(
            served.kind, served.scope_key, user_jwt=served.user_jwt, token=served.token
        )
