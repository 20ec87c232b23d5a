"""Storage: plans stepped by hand without a database, then the real file they run on."""

from __future__ import annotations

import sqlite3
from collections.abc import Generator
from pathlib import Path
from typing import Any

import pytest
from _core_support import raw_rows

from agw_persist_cache import CacheConfig, PersistentTokenCache
from agw_persist_cache._store import (
    MIGRATIONS,
    SCHEMA_VERSION,
    Counters,
    NewRow,
    Store,
    load_migrations,
    plan_clear,
    plan_facts,
    plan_generation,
    plan_prune,
    plan_write,
)

ROW = NewRow(b"d" * 32, "user", "kid1", b"n" * 12, b"ciphertext", 2000.0, 1000.0)


def first(plan: Generator[Any, Any, Any]) -> tuple[str, tuple[Any, ...]]:
    sql, params = next(plan)
    return sql, tuple(params)


def send(plan: Generator[Any, Any, Any], rows: list[Any]) -> tuple[str, tuple[Any, ...]]:
    sql, params = plan.send(rows)
    return sql, tuple(params)


def finish(plan: Generator[Any, Any, Any], rows: list[Any]) -> Any:
    with pytest.raises(StopIteration) as done:
        plan.send(rows)
    return done.value.value


# -- plans by hand ---------------------------------------------------------------------------------


def test_write_after_a_clear_reads_the_generation_and_writes_nothing() -> None:
    plan = plan_write(ROW, generation=3)
    sql, params = first(plan)
    assert sql.startswith("SELECT value FROM meta")
    assert params == ()
    assert finish(plan, [(4,)]) is False  # a clear() bumped it: no INSERT was yielded


def test_write_with_matching_generation_inserts_and_drops_old_digests() -> None:
    plan = plan_write(ROW, generation=3, delete=[b"o" * 32])
    first(plan)
    sql, params = send(plan, [(3,)])
    assert sql == "DELETE FROM tokens WHERE k = ?"
    assert params == (b"o" * 32,)
    sql, params = send(plan, [])
    assert sql.startswith("INSERT OR REPLACE INTO tokens")
    assert params == (ROW.digest, "user", "kid1", ROW.nonce, ROW.ct, 2000.0, 1000.0, 1000.0)
    assert finish(plan, []) is True


def test_a_plain_set_does_not_check_the_generation() -> None:
    plan = plan_write(ROW, generation=None)
    sql, _ = first(plan)
    assert sql.startswith("INSERT OR REPLACE INTO tokens")


def test_generation_plan_reads_one_value() -> None:
    plan = plan_generation()
    first(plan)
    assert finish(plan, [(7,)]) == 7
    plan = plan_generation()
    first(plan)
    assert finish(plan, []) is None


def test_clear_bumps_the_generation_before_truncating() -> None:
    statements = [sql for sql, _ in plan_clear()]
    assert statements[0].startswith("UPDATE meta SET value = value + 1")
    assert "DELETE FROM tokens" in statements
    assert "DELETE FROM backoff" in statements


def test_prune_deletes_expired_then_only_the_surplus_of_each_kind() -> None:
    plan = plan_prune(1000.0, {"system": 10, "user": 5})
    sql, params = first(plan)
    assert sql.startswith("DELETE FROM tokens WHERE expires_at <= ?")
    assert params == (1000.0,)
    sql, _ = send(plan, [(1,), (1,)])  # two expired rows removed
    assert sql.startswith("DELETE FROM backoff")
    sql, params = send(plan, [])
    assert "ORDER BY last_used DESC LIMIT -1 OFFSET ?" in sql
    assert params == ("system", 10)
    sql, params = send(plan, [])  # at or under the limit: nothing beyond the newest 10
    assert "ORDER BY last_used DESC LIMIT -1 OFFSET ?" in sql
    assert params == ("user", 5)
    assert finish(plan, [(1,), (1,), (1,)]) == 5


def test_prune_under_every_limit_removes_only_expired_rows() -> None:
    plan = plan_prune(1000.0, {"system": 10})
    first(plan)
    send(plan, [])
    send(plan, [])
    assert finish(plan, []) == 0


def test_facts_are_aggregated_per_kind() -> None:
    plan = plan_facts(1000.0)
    first(plan)
    send(plan, [("system", 2, 1, 900.0, 1500.0), ("user", 3, 0, 1100.0, 1200.0)])
    send(plan, [("kid-a",), ("kid-b",)])
    facts = finish(plan, [(1,)])
    assert facts == {
        "entries_system": 2,
        "entries_user": 3,
        "entries_expired": 1,
        "oldest_expiry": 900.0,
        "newest_expiry": 1500.0,
        "schema_version": 1,
        "key_ids_in_use": ("kid-a", "kid-b"),
    }


# -- migrations and the real file ----------------------------------------------------------------


def test_migrations_are_numbered_without_gaps_and_define_the_schema_version() -> None:
    assert [v for v, _, _ in MIGRATIONS] == list(range(1, len(MIGRATIONS) + 1))
    assert MIGRATIONS[-1][0] == SCHEMA_VERSION
    assert MIGRATIONS[0][1] == "0001_initial.sql"
    assert load_migrations() == MIGRATIONS
    source = Path(__file__).resolve().parent.parent / "migrations" / "0001_initial.sql"
    assert MIGRATIONS[0][2] == source.read_text(encoding="utf-8")


def _store(path: Path, **overrides: Any) -> Store:
    return Store(path, CacheConfig(**overrides), Counters())


def test_a_new_file_is_migrated_to_wal_with_the_expected_tables(db_path: Path) -> None:
    store = _store(db_path, busy_timeout_seconds=2.5)
    conn = store.conn()
    assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    assert conn.execute("PRAGMA synchronous").fetchone() == (1,)  # NORMAL
    assert conn.execute("PRAGMA busy_timeout").fetchone() == (2500,)
    assert conn.execute("PRAGMA journal_size_limit").fetchone()[0] > 0
    store.close()
    assert raw_rows(db_path, "PRAGMA user_version") == [(SCHEMA_VERSION,)]
    tables = {r[0] for r in raw_rows(db_path, "SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"tokens", "meta", "backoff"} <= tables
    indexes = {r[0] for r in raw_rows(db_path, "SELECT name FROM sqlite_master WHERE type='index'")}
    assert {"tokens_lru", "tokens_expiry"} <= indexes
    columns = [r[1] for r in raw_rows(db_path, "PRAGMA table_info(tokens)")]
    assert columns == ["k", "kind", "kid", "nonce", "ct", "expires_at", "last_used", "created_at"]


def test_opening_an_existing_file_again_does_not_reapply_migrations(db_path: Path) -> None:
    for _ in range(3):
        store = _store(db_path)
        store.conn()
        store.close()
    assert raw_rows(db_path, "SELECT name, value FROM meta") == [("generation", 0)]


def test_the_driver_commits_write_plans_and_rolls_back_failed_ones(db_path: Path) -> None:
    store = _store(db_path)
    assert store.run(plan_write(ROW, generation=0), write=True, default=None) is True
    assert len(raw_rows(db_path)) == 1

    def broken() -> Generator[Any, Any, int]:
        yield ("DELETE FROM tokens", ())
        yield ("SELECT * FROM no_such_table", ())
        return 1

    assert store.run(broken(), write=True, default=-1) == -1
    assert len(raw_rows(db_path)) == 1  # the DELETE was rolled back
    assert store.counters.storage_errors == 1
    assert store.run(plan_generation(), write=False, default=None) == 0
    store.close()


async def test_the_async_driver_runs_the_same_plans(db_path: Path) -> None:
    store = _store(db_path)
    assert await store.arun(plan_write(ROW, generation=0), write=True, default=None) is True
    await store.arun(plan_clear(), write=True, default=None)
    assert await store.arun(plan_write(ROW, generation=0), write=True, default=None) is False
    assert await store.arun(plan_generation(), write=False, default=None) == 1
    assert raw_rows(db_path) == []
    await store.aclose()


def test_a_page_cap_is_applied_when_max_db_bytes_is_set(db_path: Path) -> None:
    store = _store(db_path, max_db_bytes=1 << 20)
    assert store.conn().execute("PRAGMA max_page_count").fetchone()[0] == (1 << 20) // 4096
    store.close()


def test_a_cache_on_a_non_sqlite_file_keeps_the_bytes_aside(db_path: Path) -> None:
    db_path.parent.mkdir()
    db_path.write_bytes(b"not a database, but maybe someone's data" * 100)
    with PersistentTokenCache(db_path, config=CacheConfig(keys=[b"k" * 32])) as cache:
        cache.set_system_token("scope", "token")
    (aside,) = db_path.parent.glob("tokens.db.corrupt-*")
    assert aside.read_bytes().startswith(b"not a database")
    with sqlite3.connect(db_path) as con:
        assert con.execute("SELECT count(*) FROM tokens").fetchone() == (1,)
    con.close()
