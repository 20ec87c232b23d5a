"""One retry policy for identity-service requests.

A transient failure (a connect or read timeout, a reset connection, HTTP 502/503/504) gets a
second attempt after a short jittered exponential back-off, inside the one fetch, so that the
cache records its host-wide back-off only when both attempts failed. 4xx answers and every
other error are never retried. The loop is ``stamina``'s (sync and async alike).
"""

from __future__ import annotations

from functools import partial

import httpx
import stamina

ATTEMPTS = 2
"""Attempts per fetch, the first included."""
WAIT_INITIAL = 0.1
WAIT_MAX = 1.0
WAIT_JITTER = 0.1
TRANSIENT_STATUSES = frozenset({502, 503, 504})
_TRANSIENT_TRANSPORT = (httpx.TimeoutException, httpx.NetworkError, httpx.RemoteProtocolError)


def transient_transport_error(exc: BaseException | None) -> bool:
    """True when ``exc`` or one of its causes is a timeout, a network error or a reset."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, _TRANSIENT_TRANSPORT):
            return True
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return False


retry_policy = partial(
    stamina.retry_context,
    attempts=ATTEMPTS,
    timeout=None,
    wait_initial=WAIT_INITIAL,
    wait_max=WAIT_MAX,
    wait_jitter=WAIT_JITTER,
)
"""``for attempt in retry_policy(on=predicate): with attempt: ...`` (``async for`` works too)."""
