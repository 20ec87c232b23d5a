"""The peers, doing the same hit and set: diskcache (SQLite, not encrypted) and msal-extensions
(``PersistedTokenCache`` over ``FilePersistence`` with its file lock, not encrypted on Linux)."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import diskcache  # type: ignore[import-untyped]  # reason: diskcache ships no type information
import msal  # type: ignore[import-untyped]  # reason: msal ships no type information
from msal_extensions import (  # type: ignore[import-untyped]  # reason: no type information
    FilePersistence,
    PersistedTokenCache,
)

CLIENT_ID = "bench-client"
ENVIRONMENT = "tenant.accounts.ondemand.com"
REALM = "oauth2"
TOKEN_ENDPOINT = f"https://{ENVIRONMENT}/{REALM}/token"
ACCESS_TOKEN = msal.TokenCache.CredentialType.ACCESS_TOKEN
QUERY = {"client_id": CLIENT_ID, "environment": ENVIRONMENT, "realm": REALM}


class DiskcachePeer:
    """``diskcache.Cache``: get by key, set with an expiry; values stored as plain text."""

    name = "diskcache"

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._cache = diskcache.Cache(str(directory))

    def close(self) -> None:
        self._cache.close()

    def get(self, scope: str) -> str | None:
        value: str | None = self._cache.get(scope)
        return value

    def set(self, scope: str, token: str, expires_at: float) -> None:
        self._cache.set(scope, token, expire=expires_at - time.time())

    def populate(self, scopes: Sequence[str], tokens: Sequence[str], expires_at: float) -> None:
        with self._cache.transact():
            for scope, token in zip(scopes, tokens, strict=True):
                self.set(scope, token, expires_at)


def _event(scope: str, token: str, expires_at: float) -> dict[str, Any]:
    """The client-credentials token event MSAL's application hands its cache."""
    return {
        "client_id": CLIENT_ID,
        "scope": [scope],
        "token_endpoint": TOKEN_ENDPOINT,
        "response": {
            "access_token": token,
            "expires_in": int(expires_at - time.time()),
            "token_type": "Bearer",
        },
        "data": {},
    }


class MsalPeer:
    """msal-extensions: the hit is ``acquire_token_for_client``'s cache probe (O(1) key, early
    break), which first reloads the whole file when another process wrote it; a set
    (``add``) takes the file lock, reloads, and rewrites the whole file."""

    name = "msal-extensions"

    def __init__(self, path: Path) -> None:
        self.path = path
        self._cache = PersistedTokenCache(FilePersistence(str(path)))

    def close(self) -> None:
        """Nothing to release: msal-extensions holds no open handle between calls."""

    def get(self, scope: str) -> str | None:
        query = {**QUERY, "home_account_id": None}
        for entry in self._cache.search(ACCESS_TOKEN, target=[scope], query=query):
            if int(entry["expires_on"]) > time.time():
                token: str = entry["secret"]
                return token
        return None

    def set(self, scope: str, token: str, expires_at: float) -> None:
        self._cache.add(_event(scope, token, expires_at))

    def populate(self, scopes: Sequence[str], tokens: Sequence[str], expires_at: float) -> None:
        """Write the file MSAL would have written after ``len(scopes)`` adds, in one go (one
        real ``add`` gives the entry format; adding 100,000 through the lock takes hours)."""
        template_cache = msal.SerializableTokenCache()
        template_cache.add(_event(scopes[0], tokens[0], expires_at))
        state = json.loads(template_cache.serialize())
        ((_, template),) = state["AccessToken"].items()
        entries = {}
        for scope, token in zip(scopes, tokens, strict=True):
            key = f"-{ENVIRONMENT}-accesstoken-{CLIENT_ID}-{REALM}-{scope}".lower()
            entries[key] = {**template, "target": scope, "secret": token}
        state["AccessToken"] = entries
        self.path.write_text(json.dumps(state, indent=4))
        self._cache = PersistedTokenCache(FilePersistence(str(self.path)))
