"""``CacheStats`` is assembled in one place from three sources that each spell their fields
once: this process's ``Counters``, the store's ``Facts`` and this process's health."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from _tls import cache_config

from agw_persist_cache import CacheStats, PersistentTokenCache
from agw_persist_cache._health import Health
from agw_persist_cache._stats import Counters, stats_of
from agw_persist_cache.backends.contract import Facts

HEALTH_FIELDS = (
    "disabled_reason",
    "backend",
    "mode",
    "degraded_since",
    "degraded_reason",
    "memory_tokens",
)


def _names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def test_cache_stats_is_the_counters_then_the_facts_then_the_health() -> None:
    # A counter or fact added in one place and not in the public type (or the reverse) fails.
    expected = [*_names(Counters), *Facts._fields, *HEALTH_FIELDS]
    assert _names(CacheStats) == expected
    assert len(set(expected)) == len(expected)  # no field comes from two sources


def test_every_counter_and_fact_reaches_the_stats_unchanged() -> None:
    counters = Counters(**{name: i + 1 for i, name in enumerate(_names(Counters))})
    facts = Facts(11, 12, 13, 14.5, 15.5, 16, 17, 18, ("kid-a", "kid-b"))
    health = Health("somewhere", memory_size=8)
    health.failed("disk full", "write", quiet=True)
    stats = stats_of(
        counters,
        facts,
        disabled_reason=None,
        backend="redis",
        health=health,
        memory_tokens=3,
    )
    assert {n: getattr(stats, n) for n in _names(Counters)} == dataclasses.asdict(counters)
    assert tuple(getattr(stats, n) for n in Facts._fields) == facts
    assert (stats.backend, stats.mode, stats.degraded_reason) == ("redis", "degraded", "disk full")
    assert stats.degraded_since is not None and stats.memory_tokens == 3


def test_a_store_that_cannot_answer_reports_the_empty_facts(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("where the cache directory should be")
    with PersistentTokenCache(blocker / "cache" / "tokens.db", config=cache_config()) as cache:
        assert cache.system_token("scope", lambda: "from-memory") == "from-memory"
        stats = cache.stats()
    assert tuple(getattr(stats, n) for n in Facts._fields) == Facts()
    assert (stats.mode, stats.memory_tokens, stats.fetches) == ("degraded", 1, 1)
    assert stats.disabled_reason


def test_a_healthy_store_reports_its_rows(tmp_path: Path) -> None:
    with PersistentTokenCache(tmp_path / "tokens.db", config=cache_config()) as cache:
        assert cache.system_token("scope", lambda: "fetched") == "fetched"
        assert cache.get_system_token("scope") == "fetched"
        stats = cache.stats()
    assert (stats.entries_system, stats.entries_user, stats.hits, stats.fetches) == (1, 0, 1, 1)
    assert stats.schema_version is not None and stats.key_ids_in_use
    assert (stats.mode, stats.disabled_reason, stats.backend) == ("healthy", None, "sqlite")
