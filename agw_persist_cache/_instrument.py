"""``instrument(cache)``: the public way to have a cache's metrics reported (see ``_otel``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from . import _otel

if TYPE_CHECKING:
    from ._cache import PersistentTokenCache


def instrument(cache: PersistentTokenCache) -> None:
    """Report ``cache``'s metrics (``agw_cache.*``) through OpenTelemetry's global meter
    provider, meter ``agw_persist_cache``.

    Every cache registers itself when built; call this for one built while metrics were
    switched off (``AGW_CACHE_OTEL=0``). A cache is counted once however often it is
    registered; without ``opentelemetry-api``, or switched off, this does nothing.
    """
    _otel.register(cache)
