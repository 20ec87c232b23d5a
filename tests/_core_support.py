"""Helpers for the single-process core tests: one adapter over the sync and async API.

Every behaviour test is written once as an ``async def`` against :class:`Api`; the
``api`` fixture (see :func:`api_fixture`) runs it over the sync methods and again over
their ``a``-prefixed twins (the stamina pattern).
"""

from __future__ import annotations

import base64
import logging
import os
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Iterable
from pathlib import Path
from typing import Any, Literal

import jwt
import pytest

from agw_persist_cache import CacheConfig, CachedToken, PersistentTokenCache, TokenData

LOGGER = "agw_persist_cache"


def kind_of(user: str | None) -> Literal["system", "user"]:
    """The entry kind a test means: system tokens have no user JWT."""
    return "system" if user is None else "user"


def new_key() -> str:
    """A fresh AES-256 master key in the urlsafe base64 form the config and env accept."""
    return base64.urlsafe_b64encode(os.urandom(32)).decode("ascii")


def make_jwt(**claims: Any) -> str:
    """An HS256 JWT with the given claims; the cache reads ``exp`` unverified."""
    return jwt.encode(claims, "test-secret-of-at-least-32-bytes-length", algorithm="HS256")


def make_config(**overrides: Any) -> CacheConfig:
    """A config with an explicit key unless the test asks for another key source."""
    overrides.setdefault("keys", [new_key()])
    return CacheConfig(**overrides)


def raw_rows(
    path: Path, sql: str = "SELECT * FROM tokens", params: Iterable[Any] = ()
) -> list[Any]:
    """Rows read with a plain sqlite3 connection, as another tool on the host would."""
    con = sqlite3.connect(path)
    try:
        return con.execute(sql, tuple(params)).fetchall()
    finally:
        con.close()


def raw_exec(path: Path, sql: str, params: Iterable[Any] = ()) -> None:
    """Change the file behind the cache's back (tamper, swap, schema bump)."""
    con = sqlite3.connect(path, isolation_level=None)
    try:
        con.execute(sql, tuple(params))
    finally:
        con.close()


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    """WARNING-or-worse records of this package."""
    return [r for r in caplog.records if r.name.startswith(LOGGER) and r.levelno >= logging.WARNING]


def log_text(caplog: pytest.LogCaptureFixture) -> str:
    """Every record of this package, fully formatted, for secret scans."""
    return "\n".join(r.getMessage() for r in caplog.records if r.name.startswith(LOGGER))


class Counting:
    """A token fetch that counts its calls and hands out ``prefix-N``."""

    def __init__(self, prefix: str = "fetched", **fields: Any) -> None:
        self.prefix = prefix
        self.fields = fields
        self.calls = 0

    def __call__(self) -> TokenData:
        self.calls += 1
        token = f"{self.prefix}-{self.calls}"
        return {"access_token": token, **self.fields} if self.fields else token


class Api:
    """The cache behind one calling convention: ``mode`` is ``"sync"`` or ``"async"``.

    ``user=None`` selects the system-token methods, a user JWT the user-token ones, so the
    named sap-cloud-sdk style methods are all exercised, not only the entry-level ones.
    """

    def __init__(self, cache: PersistentTokenCache, mode: str) -> None:
        self.cache = cache
        self.mode = mode

    @property
    def is_async(self) -> bool:
        return self.mode == "async"

    async def get(self, scope: str, user: str | None = None) -> str | None:
        c = self.cache
        if user is None:
            return await c.aget_system_token(scope) if self.is_async else c.get_system_token(scope)
        if self.is_async:
            return await c.aget_user_token(user, scope)
        return c.get_user_token(user, scope)

    async def set(
        self,
        scope: str,
        data: TokenData,
        user: str | None = None,
        *,
        expires_at: float | None = None,
    ) -> None:
        c = self.cache
        if user is None:
            if self.is_async:
                await c.aset_system_token(scope, data, expires_at=expires_at)
            else:
                c.set_system_token(scope, data, expires_at=expires_at)
        elif self.is_async:
            await c.aset_user_token(user, scope, data, expires_at=expires_at)
        else:
            c.set_user_token(user, scope, data, expires_at=expires_at)

    async def invalidate(self, scope: str, user: str | None = None) -> None:
        c = self.cache
        if user is None:
            if self.is_async:
                await c.ainvalidate_system_token(scope)
            else:
                c.invalidate_system_token(scope)
        elif self.is_async:
            await c.ainvalidate_user_token(user, scope)
        else:
            c.invalidate_user_token(user, scope)

    async def fetch(
        self, scope: str, fetch: Callable[[], TokenData], user: str | None = None
    ) -> str:
        """Get-or-fetch; ``fetch`` is a plain callable, awaited through a wrapper when async."""
        c = self.cache

        async def afetch() -> TokenData:
            return fetch()

        if user is None:
            return (
                await c.asystem_token(scope, afetch)
                if self.is_async
                else c.system_token(scope, fetch)
            )
        if self.is_async:
            return await c.auser_token(user, scope, afetch)
        return c.user_token(user, scope, fetch)

    async def get_entry(self, scope: str, user: str | None = None) -> CachedToken | None:
        kind = kind_of(user)
        if self.is_async:
            return await self.cache.aget_entry(kind, scope, user_jwt=user)
        return self.cache.get_entry(kind, scope, user_jwt=user)

    async def set_entry(self, scope: str, data: TokenData, user: str | None = None) -> CachedToken:
        kind = kind_of(user)
        if self.is_async:
            return await self.cache.aset_entry(kind, scope, data, user_jwt=user)
        return self.cache.set_entry(kind, scope, data, user_jwt=user)

    async def fetch_entry(
        self, scope: str, fetch: Callable[[], TokenData], user: str | None = None
    ) -> CachedToken:
        kind = kind_of(user)

        async def afetch() -> TokenData:
            return fetch()

        if self.is_async:
            return await self.cache.afetch_entry(kind, scope, afetch, user_jwt=user)
        return self.cache.fetch_entry(kind, scope, fetch, user_jwt=user)

    async def clear(self) -> None:
        await self.cache.aclear() if self.is_async else self.cache.clear()

    async def prune(self) -> int:
        return await self.cache.aprune() if self.is_async else self.cache.prune()

    async def close(self) -> None:
        await self.cache.aclose() if self.is_async else self.cache.close()


class ApiFactory:
    """Opens caches in one calling convention and closes every one of them at teardown."""

    def __init__(self, mode: str, default_path: Path) -> None:
        self.mode = mode
        self.default_path = default_path
        self.opened: list[Api] = []

    def __call__(
        self, path: Path | None = None, *, config: CacheConfig | None = None, **overrides: Any
    ) -> Api:
        if config is None:
            config = make_config(**overrides)
        api = Api(PersistentTokenCache(path or self.default_path, config=config), self.mode)
        self.opened.append(api)
        return api

    def two(self, **overrides: Any) -> tuple[Api, Api]:
        """Two caches on one store with one config (so one key), as two processes would be."""
        config = make_config(**overrides)
        return self(config=config), self(config=config)

    async def close_all(self) -> None:
        for api in self.opened:
            await api.close()


async def store_every_secret(api: Api, tag: str) -> list[str]:
    """Put each kind of secret through ``api`` (a token, a user JWT, a scope, a fetched token,
    extra token data) and return them, for a scan of the store that must find none."""
    token, user_jwt, scope = f"TOKENMARK{tag}", f"USERJWTMARK{tag}", f"SCOPEMARK{tag}"
    fetched, extra = f"FETCHEDMARK{tag}", f"EXTRAMARK{tag}"
    await api.set(scope, token)
    await api.set(scope, {"access_token": token, "extra": {"u": extra}}, user=user_jwt)
    await api.fetch(f"{scope}-2", lambda: fetched, user=user_jwt)
    assert await api.get(scope, user=user_jwt) == token
    return [token, user_jwt, scope, fetched, extra]


@pytest.fixture(params=["sync", "async"])
async def open_api(request: pytest.FixtureRequest, db_path: Path) -> AsyncIterator[ApiFactory]:
    """Factory of :class:`Api` objects, parametrized over the sync and the async API."""
    factory = ApiFactory(request.param, db_path)
    yield factory
    await factory.close_all()


def future(seconds: float) -> float:
    """Epoch seconds ``seconds`` from now."""
    return time.time() + seconds
