"""A WSGI app whose every request needs an IAS token; all gunicorn workers share one.

Run (see README.md here)::

    AGW_EXAMPLE_TOKEN_URL=http://127.0.0.1:8765/oauth2/token \\
        gunicorn --preload -w 4 -b 127.0.0.1:8000 app:app
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable
from typing import Any

import httpx

from agw_persist_cache import PersistentTokenCache

TOKEN_URL = os.environ.get("AGW_EXAMPLE_TOKEN_URL", "http://127.0.0.1:8765/oauth2/token")
SCOPE = "example-agent-gateway"

# Created once in the gunicorn master (--preload); the cache reconnects in each forked worker.
# Path and key come from AGW_CACHE_PATH / AGW_CACHE_KEY, else ~/.cache/agw-persist-cache/.
cache = PersistentTokenCache()


def fetch_token() -> dict[str, Any]:
    """The real fetch: client_credentials against the identity service (here: a local one)."""
    response = httpx.post(TOKEN_URL, data={"grant_type": "client_credentials"}, timeout=30.0)
    response.raise_for_status()
    body = response.json()
    return {"access_token": body["access_token"], "expires_in": body["expires_in"]}


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    """Get the shared token (fetched by one worker on the host), then "call the gateway"."""
    token = cache.system_token(SCOPE, fetch_token)
    # A real app sends `Authorization: Bearer <token>` to the Agent Gateway here. We answer
    # with a fingerprint only: a token never leaves the process in a response or a log.
    fingerprint = hashlib.sha256(token.encode()).hexdigest()[:12]
    body = json.dumps({"pid": os.getpid(), "token_sha256": fingerprint}).encode()
    headers = [("Content-Type", "application/json"), ("Content-Length", str(len(body)))]
    start_response("200 OK", headers)
    return [body]
