"""What the cache reports: per-process counters, ``CacheStats`` and ``EntryInfo``.

``CacheStats`` is the public mirror of three sources, each spelling its fields once:
:class:`Counters` (this process's events), the store's
:class:`~.backends.contract.Facts`, and this process's health; :func:`stats_of` is the one
place that puts them together (``tests/test_stats.py`` pins that the fields match).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import NamedTuple

from ._health import Health
from .backends.contract import Facts


@dataclass
class Counters:
    """Per-process event counters (see :class:`CacheStats`)."""

    hits: int = 0
    misses: int = 0
    fetches: int = 0
    stale_writes_skipped: int = 0
    lock_timeouts: int = 0
    lock_errors: int = 0
    decrypt_failures: int = 0
    key_mismatch: int = 0
    storage_errors: int = 0
    sets_not_stored: int = 0
    refreshes: int = 0
    backoff_rejections: int = 0
    served_from_memory: int = 0


class KeyVerdict(NamedTuple):
    """Whether the configured keys open the stored rows, and the key ids that wrote them."""

    opens: bool
    key_ids: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class EntryInfo:
    """Metadata of one row: never the token, the scope or the user."""

    kind: str
    digest_prefix: str
    expires_at: float
    last_used: float
    created_at: float
    key_id: str


@dataclass(frozen=True, slots=True)
class CacheStats:
    """This process's counters, and facts about the store shared by all (assembled by
    :func:`stats_of`: counters, then facts, then this process's health)."""

    hits: int
    misses: int
    fetches: int
    stale_writes_skipped: int
    lock_timeouts: int
    lock_errors: int
    decrypt_failures: int
    key_mismatch: int
    storage_errors: int
    sets_not_stored: int
    refreshes: int
    backoff_rejections: int
    served_from_memory: int
    """Tokens served from this process's memory tier because the store could not answer."""
    entries_system: int
    entries_user: int
    entries_expired: int
    oldest_expiry: float | None
    newest_expiry: float | None
    file_bytes: int
    wal_bytes: int
    schema_version: int | None
    key_ids_in_use: tuple[str, ...]
    disabled_reason: str | None
    backend: str = "sqlite"
    mode: str = "healthy"
    """``healthy``, or ``degraded``: the store cannot be used and the memory tier is the cache."""
    degraded_since: float | None = None
    """When the current outage began (epoch seconds), while degraded."""
    degraded_reason: str | None = None
    """What failed first in the current outage, while degraded."""
    memory_tokens: int = 0
    """Tokens this process holds in its memory tier (at most ``CacheConfig.memory_tokens``)."""


def stats_of(
    counters: Counters,
    facts: Facts | None,
    *,
    disabled_reason: str | None,
    backend: str,
    health: Health,
    memory_tokens: int,
) -> CacheStats:
    """The one place a ``CacheStats`` is assembled; ``facts`` None: the store did not answer
    (its facts are then the empty ``Facts()``)."""
    down = health.down
    return CacheStats(
        **dataclasses.asdict(counters),
        **(facts or Facts())._asdict(),
        disabled_reason=disabled_reason,
        backend=backend,
        mode=health.mode,
        degraded_since=None if down is None else down.since,
        degraded_reason=None if down is None else down.reason,
        memory_tokens=memory_tokens,
    )
