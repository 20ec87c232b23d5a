"""Turning the SDK's notion of "usable until" into the cache's epoch expiry.

sap-cloud-sdk hands out deadlines that already include its own safety margin (agentgateway:
``time.monotonic()`` deadlines minus ``token_expiry_buffer_seconds``; ADMS: a TTL minus 60 s).
The cache subtracts its own buffer when it reads, so the stored expiry adds that buffer back:
a token is served from the shared file exactly as long as the SDK itself would serve it.
"""

from __future__ import annotations

import time

from agw_persist_cache import PersistentTokenCache


def monotonic_to_epoch(deadline: float) -> float:
    """The wall-clock moment of a ``time.monotonic()`` deadline: comparable in every process."""
    return time.time() + (deadline - time.monotonic())


def stored_expiry(cache: PersistentTokenCache, usable_until: float) -> float:
    """The epoch expiry to store so that ``cache`` serves the token until ``usable_until``."""
    return usable_until + cache.config.token_expiry_buffer_seconds
