"""Agent Gateway tokens through the persistent cache: one IAS fetch per key per host."""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING, Literal

from ._ias import IasTokenClient, TokenDict

if TYPE_CHECKING:
    from .._cache import PersistentTokenCache

Kind = Literal["system", "user"]


def _kind(user_jwt: str | None) -> Kind:
    return "system" if user_jwt is None else "user"


class AgentGatewayTokens:
    """System and user (exchanged) tokens for one set of customer credentials.

    Misses go through the cache's cross-process single flight, so a host fetches each
    token once; scope keys are sap-cloud-sdk's (``customer::{client_id}``), so user-token
    keys are the same (user JWT, scope) pair the SDK uses.
    """

    def __init__(self, cache: PersistentTokenCache, ias_client: IasTokenClient) -> None:
        self.cache = cache
        self.ias_client = ias_client

    @property
    def scope_key(self) -> str:
        """``customer::{client_id}``, as sap-cloud-sdk keys customer-flow tokens."""
        return self.ias_client.credentials.scope_key

    @property
    def gateway_url(self) -> str:
        """The Agent Gateway base URL of the credentials (no trailing slash)."""
        return self.ias_client.credentials.gateway_url

    def __repr__(self) -> str:
        return f"AgentGatewayTokens(scope_key={self.scope_key!r}, cache={self.cache!r})"

    # -- the fetches the cache runs on a miss (the core times them for OpenTelemetry) -------

    def _fetch_system(self) -> TokenDict:
        return self.ias_client.fetch_system_token()

    def _fetch_user(self, user_jwt: str) -> TokenDict:
        return self.ias_client.exchange_user_token(user_jwt)

    async def _afetch_system(self) -> TokenDict:
        return await self.ias_client.afetch_system_token()

    async def _afetch_user(self, user_jwt: str) -> TokenDict:
        return await self.ias_client.aexchange_user_token(user_jwt)

    # -- get-or-fetch ---------------------------------------------------------------------

    def system_token(self) -> str:
        """A valid system-scoped token (client_credentials), from the cache or IAS."""
        return self.cache.system_token(self.scope_key, self._fetch_system)

    def user_token(self, user_jwt: str) -> str:
        """A valid user-scoped token exchanged for ``user_jwt``, from the cache or IAS."""
        fetch = partial(self._fetch_user, user_jwt)
        return self.cache.user_token(user_jwt, self.scope_key, fetch)

    async def asystem_token(self) -> str:
        """Async :meth:`system_token`."""
        return await self.cache.asystem_token(self.scope_key, self._afetch_system)

    async def auser_token(self, user_jwt: str) -> str:
        """Async :meth:`user_token`."""
        afetch = partial(self._afetch_user, user_jwt)
        return await self.cache.auser_token(user_jwt, self.scope_key, afetch)

    def token(self, user_jwt: str | None = None) -> str:
        """:meth:`user_token` when ``user_jwt`` is given, else :meth:`system_token`."""
        return self.system_token() if user_jwt is None else self.user_token(user_jwt)

    async def atoken(self, user_jwt: str | None = None) -> str:
        """Async :meth:`token`."""
        if user_jwt is None:
            return await self.asystem_token()
        return await self.auser_token(user_jwt)

    # -- invalidation ---------------------------------------------------------------------

    def invalidate_token(self, token: str, user_jwt: str | None = None) -> bool:
        """Drop ``token`` for every process, unless another process already replaced it.

        Returns False when the cache holds a different (newer) token, which stays.
        """
        return self.cache.invalidate_entry(
            _kind(user_jwt), self.scope_key, user_jwt=user_jwt, token=token
        )

    async def ainvalidate_token(self, token: str, user_jwt: str | None = None) -> bool:
        """Async :meth:`invalidate_token`."""
        return await self.cache.ainvalidate_entry(
            _kind(user_jwt), self.scope_key, user_jwt=user_jwt, token=token
        )
