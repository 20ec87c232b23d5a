"""A clear() that stays done on Redis, and the size limits across it (issue 20, items 4, 10).

Real redis-servers: saved rows put back (header rewritten or not), the generation key rewound
or deleted, a restart from an RDB snapshot taken before the clear; and a SQLite file restored
from a backup taken before a clear. A cache object stands for a process (each has its own
memo and its own highest generation seen).
"""

from __future__ import annotations

import shutil
import sqlite3
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from _core_support import Counting, make_config, new_key, raw_rows
from support.redis_server import (  # noqa: F401  # fixtures
    RedisServer,
    own_redis_fixture,
    redis_server_fixture,
    redis_url_fixture,
)

from agw_persist_cache import CacheConfig, PersistentTokenCache
from agw_persist_cache.backends.contract import Clear

pytestmark = pytest.mark.timeout(300)

NS = "{agw-persist-cache}:"
GEN = NS + "gen"


def raw(url: str) -> redis.Redis:
    return redis.Redis.from_url(url)


def row_keys(r: redis.Redis) -> list[bytes]:
    return list(r.scan_iter(match=NS + "t:*", count=1000))


def rewritten(value: bytes, generation: int) -> bytes:
    """A saved row with the clear() generation in its header replaced (bytes 2..9)."""
    return value[:2] + struct.pack(">Q", generation) + value[10:]


@pytest.fixture
def hosts(redis_url: str) -> Iterator[tuple[CacheConfig, list[PersistentTokenCache]]]:
    """A config shared by every 'host', and the caches opened with it (closed at the end)."""
    config = make_config(url=redis_url, circuit_breaker_seconds=0)
    opened: list[PersistentTokenCache] = []
    yield config, opened
    for cache in opened:
        cache.close()


def open_host(config: CacheConfig, opened: list[PersistentTokenCache]) -> PersistentTokenCache:
    cache = PersistentTokenCache(config=config)
    opened.append(cache)
    return cache


def test_rows_put_back_after_a_clear_never_serve_again(
    redis_url: str, hosts: tuple[CacheConfig, list[PersistentTokenCache]]
) -> None:
    config, opened = hosts
    seer, clearer = open_host(config, opened), open_host(config, opened)
    seer.set_system_token("scope", "before-clear")
    assert seer.get_system_token("scope") == "before-clear"  # now in seer's memo
    r = raw(redis_url)
    ((key, value),) = [(k, r.get(k)) for k in row_keys(r)]
    assert value is not None
    clearer.clear()
    assert row_keys(r) == []  # the clear removed the row itself, not only its generation
    generation = int(r.get(GEN) or 0)
    for name, saved in (("as saved", value), ("header rewritten", rewritten(value, generation))):
        r.set(key, saved)
        fresh = open_host(config, opened)
        for cache in (seer, clearer, fresh):
            assert cache.get_system_token("scope") is None, (name, cache)
    # The rewritten header opened nowhere: its seal binds the generation it was written in.
    assert seer.stats().decrypt_failures >= 1
    r.close()


@pytest.mark.parametrize("how", ["rewind", "delete"])
def test_a_rewound_or_lost_generation_revives_no_cleared_row(
    redis_url: str, hosts: tuple[CacheConfig, list[PersistentTokenCache]], how: str
) -> None:
    config, opened = hosts
    seer, clearer = open_host(config, opened), open_host(config, opened)
    for i in range(5):
        seer.set_system_token(f"scope-{i}", f"before-clear-{i}")
        assert seer.get_system_token(f"scope-{i}") == f"before-clear-{i}"
    r = raw(redis_url)
    saved = {k: r.get(k) for k in row_keys(r)}
    clearer.clear()
    cleared_at = int(r.get(GEN) or 0)
    assert cleared_at >= 1
    assert seer.get_system_token("scope-0") is None  # the seer has seen the clear now
    if how == "rewind":
        r.set(GEN, 0)  # a failover that lost the INCR, or an operator's SET
    else:
        r.delete(GEN)  # eviction, or a failover to a replica without it
    fresh = open_host(config, opened)  # started afterwards: the rows themselves are gone
    assert all(fresh.get_system_token(f"scope-{i}") is None for i in range(5))
    # The process that saw the clear refuses the lower generation, even with the rows back.
    for k, v in saved.items():
        r.set(k, v)
    r.set(GEN, 0)
    assert all(seer.get_system_token(f"scope-{i}") is None for i in range(5))
    assert int(r.get(GEN) or 0) == cleared_at  # and put the generation back where it saw it
    later = open_host(config, opened)
    assert all(later.get_system_token(f"scope-{i}") is None for i in range(5))
    # Refusing costs one fetch per key, not one per call.
    fetch = Counting("after")
    for _ in range(3):
        assert seer.system_token("scope-0", fetch) == "after-1"
        assert later.system_token("scope-0", fetch) == "after-1"
    assert fetch.calls == 1
    r.close()


def _wait_for(condition: object, what: str, seconds: float = 30.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():  # type: ignore[operator]  # a callable
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def test_a_restart_from_a_snapshot_taken_before_the_clear(tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "snap", args=["--dbfilename", "dump.rdb"]).start()
    key = new_key()
    config = CacheConfig(url=server.url, keys=[key], circuit_breaker_seconds=0)
    seer = PersistentTokenCache(config=config)
    clearer = PersistentTokenCache(config=config)
    r: redis.Redis | None = None
    try:
        seer.set_system_token("scope", "before-clear")
        assert seer.get_system_token("scope") == "before-clear"
        assert server.admin("SAVE").startswith(b"+OK")
        snapshot = tmp_path / "before-clear.rdb"
        shutil.copy(server.dir / "dump.rdb", snapshot)
        clearer.clear()
        assert seer.get_system_token("scope") is None  # the seer has seen the clear
        server.stop()
        shutil.copy(snapshot, server.dir / "dump.rdb")
        server.start()  # the pre-clear rows and generation are back
        r = raw(server.url)
        assert r.get(GEN) in (None, b"0") and len(row_keys(r)) == 1

        # A process started after the restore, before any process that saw the clear looks:
        # what the README says it can serve. The operator repeats the clear, and it is gone.
        restored = PersistentTokenCache(config=config)
        assert restored.get_system_token("scope") == "before-clear"
        restored.close()

        # The process that saw the clear serves none of it, and fences the store back up.
        def seer_refuses() -> bool:
            return seer.get_system_token("scope") is None and (r.get(GEN) or b"0") != b"0"

        _wait_for(seer_refuses, "the process that saw the clear to fence the restored store")
        after = PersistentTokenCache(config=config)
        assert after.get_system_token("scope") is None
        after.clear()  # the operator's repeated clear (`agw-cache clear`): rows deleted too
        assert row_keys(r) == []
        after.close()
    finally:
        if r is not None:
            r.close()
        seer.close()
        clearer.close()
        server.stop()


def test_size_limits_hold_across_clears(
    redis_url: str, hosts: tuple[CacheConfig, list[PersistentTokenCache]]
) -> None:
    config, opened = hosts
    cache = PersistentTokenCache(
        config=CacheConfig(url=redis_url, keys=config.keys, max_user_token_cache_size=100)
    )
    opened.append(cache)
    r = raw(redis_url)
    peak = 0
    for round_ in range(5):
        for i in range(100):
            cache.set_user_token(f"user-{round_}-{i}", "scope", f"t-{round_}-{i}")
        peak = max(peak, len(row_keys(r)))
        cache.clear()
        cache.prune()
        assert len(row_keys(r)) <= 100
    assert peak == 100 and len(row_keys(r)) == 0
    r.close()


def test_a_clear_whose_sweep_was_cut_short_is_finished_by_a_prune(
    redis_url: str, hosts: tuple[CacheConfig, list[PersistentTokenCache]]
) -> None:
    config, opened = hosts
    cache = open_host(config, opened)
    for i in range(50):
        cache.set_system_token(f"scope-{i}", f"t-{i}")
    r = raw(redis_url)
    assert len(row_keys(r)) == 50
    cache._backend.execute(Clear())  # the process died between the clear and its sweep
    assert len(row_keys(r)) == 50
    assert all(cache.get_system_token(f"scope-{i}") is None for i in range(50))  # fenced
    cache.set_system_token("scope-0", "after")  # a digest written again keeps its new row
    cache.prune()
    assert row_keys(r) == [
        NS.encode() + b"t:" + cache._shelf.key("system", "scope-0", None).digest.hex().encode()
    ]  # type: ignore[union-attr]  # a key exists
    assert cache.get_system_token("scope-0") == "after"
    r.close()


def _copy_database(source: Path, target: Path) -> None:
    """SQLite's online backup, as an operator's backup and restore tool would use it."""
    src, dst = sqlite3.connect(source), sqlite3.connect(target)
    try:
        src.backup(dst)
    finally:
        src.close()
        dst.close()


def test_a_sqlite_file_restored_from_before_a_clear_is_fenced_again(
    db_path: Path, tmp_path: Path
) -> None:
    config = make_config()
    seer = PersistentTokenCache(db_path, config=config)
    clearer = PersistentTokenCache(db_path, config=config)
    seer.set_system_token("scope", "before-clear")
    assert seer.get_system_token("scope") == "before-clear"
    _copy_database(db_path, tmp_path / "backup.db")
    clearer.clear()
    assert seer.get_system_token("scope") is None  # the seer has seen the clear
    _copy_database(tmp_path / "backup.db", db_path)  # restored: the row and generation 0
    generation = "SELECT value FROM meta WHERE name = 'generation'"
    assert raw_rows(db_path, generation) == [(0,)] and len(raw_rows(db_path)) == 1
    assert seer.get_system_token("scope") is None
    assert raw_rows(db_path, generation) == [(1,)]  # fenced back where the seer saw it
    fresh = PersistentTokenCache(db_path, config=config)
    assert fresh.get_system_token("scope") is None
    for cache in (seer, clearer, fresh):
        cache.close()
