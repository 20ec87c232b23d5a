"""Did the MCP server reject our token with HTTP 401?

mcp 1.x surfaces the status as an ``httpx.HTTPStatusError`` in the exception chain; mcp 2.x
folds every HTTP error into a generic JSON-RPC ``INTERNAL_ERROR`` and the status is lost. When
the chain does not say, one ``ping`` to the tool's URL with the same token answers it; it is
sent only after a failed call, so the happy path pays nothing.
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx

_UNAUTHORIZED = 401
_PING = {"jsonrpc": "2.0", "id": "agw-persist-cache-auth-check", "method": "ping"}


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc``, its causes and contexts, and the members of any exception group, once each."""
    seen: set[int] = set()
    todo = [exc]
    while todo:
        current = todo.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        if isinstance(current, BaseExceptionGroup):
            todo.extend(current.exceptions)
        todo.extend(e for e in (current.__cause__, current.__context__) if e is not None)


def http_status(exc: BaseException) -> int | None:
    """The HTTP status carried by an ``httpx.HTTPStatusError`` in ``exc``'s chain, if any."""
    for inner in _chain(exc):
        if isinstance(inner, httpx.HTTPStatusError):
            return inner.response.status_code
    return None


async def rejected_by_server(
    exc: BaseException, url: str | None, token: str, timeout: float
) -> bool:
    """True when the failure behind ``exc`` was the server refusing ``token`` with 401."""
    status = http_status(exc)
    if status is not None:
        return status == _UNAUTHORIZED
    if not url:
        return False
    headers = {
        "Authorization": f"Bearer {token}",
        "Accept": "application/json, text/event-stream",
    }
    try:
        async with httpx.AsyncClient(timeout=timeout) as client:
            response = await client.post(url, json=_PING, headers=headers)
    except httpx.HTTPError:
        return False
    return response.status_code == _UNAUTHORIZED
