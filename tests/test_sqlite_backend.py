"""Storage: plans stepped by hand without a database, then the real file they run on."""

from __future__ import annotations

import sqlite3
from collections.abc import Generator
from pathlib import Path
from typing import Any

import pytest
from _core_support import raw_exec, raw_rows
from _tls import TEST_CACHE_KEY

from agw_persist_cache import CacheConfig, PersistentTokenCache
from agw_persist_cache.backends.contract import (
    Clear,
    GetFacts,
    GetKeyChecks,
    KeyChecks,
    Prune,
    Read,
    SealedRow,
    Snapshot,
    StorageError,
    Write,
)
from agw_persist_cache.backends.sqlite import (
    APPLICATION_ID,
    MIGRATIONS,
    SCHEMA_VERSION,
    Rows,
    SqliteBackend,
    load_migrations,
    plan_clear,
    plan_facts,
    plan_key_checks,
    plan_prune,
    plan_write,
    read,
    rows_of,
    run,
    transaction,
)

ROW = SealedRow(b"d" * 32, "user", "kid1", b"n" * 12, b"ciphertext", 2000.0, 3, 1000.0, 1000.0)


def first(plan: Generator[Any, Any, Any]) -> tuple[str, tuple[Any, ...]]:
    sql, params = next(plan)
    return sql, tuple(params)


def changed(n: int) -> Rows:
    """What the driver hands a plan after a statement that changed ``n`` rows."""
    return rows_of([], n)


def send(plan: Generator[Any, Any, Any], rows: list[Any]) -> tuple[str, tuple[Any, ...]]:
    sql, params = plan.send(rows if isinstance(rows, Rows) else rows_of(rows))
    return sql, tuple(params)


def finish(plan: Generator[Any, Any, Any], rows: list[Any]) -> Any:
    with pytest.raises(StopIteration) as done:
        plan.send(rows if isinstance(rows, Rows) else rows_of(rows))
    return done.value.value


# -- plans by hand ---------------------------------------------------------------------------------


def test_a_write_is_one_statement_guarded_by_the_generation() -> None:
    plan = plan_write(Write(ROW))
    sql, params = first(plan)
    assert sql.startswith("INSERT OR REPLACE INTO tokens")
    assert "WHERE (SELECT value FROM meta WHERE rowid = 1 AND name = 'generation') = ?" in sql
    assert params == (*ROW, 3)
    assert finish(plan, changed(0)) is False  # a clear() moved the generation: nothing inserted
    plan = plan_write(Write(ROW))
    first(plan)
    assert finish(plan, changed(1)) is True
    assert next(iter(transaction(Write(ROW))))[0].startswith("INSERT")  # no BEGIN


def test_write_after_a_clear_with_rows_to_replace_writes_nothing() -> None:
    plan = plan_write(Write(ROW, replaces=(b"o" * 32,)))
    sql, params = first(plan)
    assert sql.startswith("SELECT value FROM meta")
    assert params == ()
    assert finish(plan, [(4,)]) is False  # a clear() bumped it: no INSERT was yielded


def test_write_with_matching_generation_inserts_and_drops_old_digests() -> None:
    plan = plan_write(Write(ROW, replaces=(b"o" * 32,)))
    first(plan)
    sql, params = send(plan, [(3,)])
    assert sql == "DELETE FROM tokens WHERE k = ?"
    assert params == (b"o" * 32,)
    sql, params = send(plan, [])
    assert sql.startswith("INSERT OR REPLACE INTO tokens")
    assert params == tuple(ROW)
    assert finish(plan, []) is True


def test_read_returns_the_first_digest_that_has_a_row_and_the_generation(
    db_path: Path,
) -> None:
    store = _store(db_path)
    row = ROW._replace(digest=b"b" * 32, generation=0)
    assert store.execute(Write(row)) is True
    conn = store._borrow()
    assert read(conn, (b"a" * 32, b"b" * 32)) == Snapshot(row, 0)
    assert read(conn, (b"a" * 32,)) == Snapshot(None, 0)
    conn.close()
    store.close()


def test_clear_bumps_the_generation_before_truncating() -> None:
    plan = plan_clear(Clear())
    sql, _ = first(plan)
    assert sql.startswith("UPDATE meta SET value = value + 1")
    assert send(plan, [(8,)])[0] == "DELETE FROM tokens"
    assert send(plan, [])[0] == "DELETE FROM backoff"
    assert finish(plan, []) == 8


def test_a_write_op_runs_in_one_immediate_transaction() -> None:
    plan = transaction(Clear())
    assert first(plan)[0] == "BEGIN IMMEDIATE"
    assert send(plan, [])[0].startswith("UPDATE meta")
    assert send(plan, [(1,)])[0] == "DELETE FROM tokens"
    assert send(plan, [])[0] == "DELETE FROM backoff"
    assert send(plan, [])[0] == "COMMIT"
    assert finish(plan, []) == 1


def test_prune_deletes_expired_then_only_the_surplus_of_each_kind() -> None:
    plan = plan_prune(Prune(1000.0, {"system": 10, "user": 5}))
    sql, params = first(plan)
    assert sql.startswith("DELETE FROM tokens WHERE expires_at <= ?")
    assert params == (1000.0,)
    sql, _ = send(plan, changed(2))  # two expired rows removed
    assert sql.startswith("DELETE FROM backoff")
    sql, params = send(plan, [])
    assert "ORDER BY last_used DESC LIMIT -1 OFFSET ?" in sql
    assert params == ("system", 10)
    sql, params = send(plan, [])  # at or under the limit: nothing beyond the newest 10
    assert "ORDER BY last_used DESC LIMIT -1 OFFSET ?" in sql
    assert params == ("user", 5)
    assert finish(plan, changed(3)) == 5


def test_prune_under_every_limit_removes_only_expired_rows() -> None:
    plan = plan_prune(Prune(1000.0, {"system": 10}))
    first(plan)
    send(plan, [])
    send(plan, [])
    assert finish(plan, []) == 0


def test_facts_are_aggregated_per_kind() -> None:
    plan = plan_facts(GetFacts(1000.0))
    first(plan)
    send(plan, [("system", 2, 1, 900.0, 1500.0), ("user", 3, 0, 1100.0, 1200.0)])
    send(plan, [("kid-a",), ("kid-b",)])
    facts = finish(plan, [(2,)])
    assert facts._asdict() == {
        "entries_system": 2,
        "entries_user": 3,
        "entries_expired": 1,
        "oldest_expiry": 900.0,
        "newest_expiry": 1500.0,
        "schema_version": 2,
        "key_ids_in_use": ("kid-a", "kid-b"),
        "file_bytes": 0,
        "wal_bytes": 0,
    }


def test_key_checks_are_two_point_reads_unless_the_file_kept_none() -> None:
    plan = plan_key_checks(GetKeyChecks())
    assert first(plan)[0].startswith("SELECT kid, check_value FROM key_checks")
    assert send(plan, [("kid-a", b"check-a")])[0] == "SELECT EXISTS (SELECT 1 FROM tokens)"
    assert finish(plan, [(1,)]) == KeyChecks(True, (("kid-a", b"check-a"),), ())  # no scan
    plan = plan_key_checks(GetKeyChecks())  # rows from before check values were kept
    first(plan)
    send(plan, [])
    assert send(plan, [(1,)])[0].startswith("SELECT DISTINCT kid FROM tokens")
    assert finish(plan, [("kid-b",)]) == KeyChecks(True, (), ("kid-b",))
    plan = plan_key_checks(GetKeyChecks())  # an empty store
    first(plan)
    send(plan, [])
    assert finish(plan, [(0,)]) == KeyChecks(False, (), ())


# -- migrations and the real file ----------------------------------------------------------------


def test_migrations_are_numbered_without_gaps_and_define_the_schema_version() -> None:
    assert [v for v, _, _ in MIGRATIONS] == list(range(1, len(MIGRATIONS) + 1))
    assert MIGRATIONS[-1][0] == SCHEMA_VERSION
    assert MIGRATIONS[0][1] == "0001_initial.sql"
    assert load_migrations() == MIGRATIONS
    source = Path(__file__).resolve().parent.parent / "migrations" / "0001_initial.sql"
    assert MIGRATIONS[0][2] == source.read_text(encoding="utf-8")


def test_a_repeated_read_is_answered_from_memory_only_while_nothing_was_written(
    db_path: Path,
) -> None:
    store = _store(db_path)
    row = ROW._replace(generation=0)
    assert store.execute(Write(row)) is True
    conn = store._borrow()
    statements: list[str] = []
    conn.set_trace_callback(statements.append)
    key = (row.digest,)
    assert read(conn, key) == read(conn, key) == Snapshot(row, 0)  # read, then checked and read
    statements.clear()
    assert read(conn, key) == Snapshot(row, 0)
    assert statements == ["PRAGMA data_version"]  # unchanged: no row was read
    # Another connection (as another process would) rewrites the row: seen at once.
    raw_exec(db_path, "UPDATE tokens SET nonce = ?", (b"m" * 12,))
    assert read(conn, key) == Snapshot(row._replace(nonce=b"m" * 12), 0)
    # This very connection writes (data_version does not move for its own commits): seen.
    conn.execute("UPDATE tokens SET last_used = 5")
    assert read(conn, key) == Snapshot(row._replace(nonce=b"m" * 12, last_used=5.0), 0)
    # A clear() elsewhere: the generation moved and the row is gone.
    raw_exec(db_path, "UPDATE meta SET value = value + 1")
    raw_exec(db_path, "DELETE FROM tokens")
    assert read(conn, key) == Snapshot(None, 1)
    # A row put back behind the cache's back (a replay) is read, not remembered away.
    raw_exec(db_path, "INSERT INTO tokens VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", [
        row.digest, row.kind, row.kid, row.nonce, row.ct, row.expires_at,
        row.last_used, row.created_at, row.generation,
    ])  # fmt: skip
    assert read(conn, key) == Snapshot(row, 1)
    conn.close()
    store.close()


def test_a_file_without_its_generation_refuses_reads_and_clears(db_path: Path) -> None:
    store = _store(db_path)
    assert store.execute(Write(ROW._replace(generation=0))) is True
    raw_exec(db_path, "DELETE FROM meta")
    with pytest.raises(StorageError):
        store.execute(Clear())  # no fence for a fetch in flight: nothing is cleared
    with pytest.raises(StorageError):
        store.execute(Read((b"z" * 32,)))
    assert len(raw_rows(db_path)) == 1
    store.close()


def _store(path: Path, **overrides: Any) -> SqliteBackend:
    return SqliteBackend(path, CacheConfig(**overrides))


def test_a_new_file_is_migrated_to_wal_with_the_expected_tables(db_path: Path) -> None:
    store = _store(db_path, busy_timeout_seconds=2.5)
    conn = store._borrow()
    assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    assert conn.execute("PRAGMA synchronous").fetchone() == (1,)  # NORMAL
    assert conn.execute("PRAGMA busy_timeout").fetchone() == (2500,)
    assert conn.execute("PRAGMA journal_size_limit").fetchone()[0] > 0
    conn.close()
    store.close()
    assert raw_rows(db_path, "PRAGMA user_version") == [(SCHEMA_VERSION,)]
    assert raw_rows(db_path, "PRAGMA application_id") == [(APPLICATION_ID,)]
    tables = {r[0] for r in raw_rows(db_path, "SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"tokens", "meta", "backoff"} <= tables
    indexes = {r[0] for r in raw_rows(db_path, "SELECT name FROM sqlite_master WHERE type='index'")}
    assert {"tokens_lru", "tokens_expiry"} <= indexes
    columns = [r[1] for r in raw_rows(db_path, "PRAGMA table_info(tokens)")]
    assert columns == [
        "k", "kind", "kid", "nonce", "ct", "expires_at", "last_used", "created_at", "gen"
    ]  # fmt: skip


def test_opening_an_existing_file_again_does_not_reapply_migrations(db_path: Path) -> None:
    for _ in range(3):
        store = _store(db_path)
        store.execute(Read((b"x" * 32,)))
        store.close()
    assert raw_rows(db_path, "SELECT name, value FROM meta") == [("generation", 0)]


def test_a_version_1_file_is_migrated_and_its_old_rows_dropped(db_path: Path) -> None:
    db_path.parent.mkdir()
    con = sqlite3.connect(db_path, isolation_level=None)
    con.executescript(MIGRATIONS[0][2] + "\nPRAGMA user_version = 1;")
    con.execute(
        "INSERT INTO tokens VALUES (?, 'system', 'kid', ?, ?, 2e9, 1, 1)", (b"k", b"n", b"c")
    )
    con.close()
    db_path.chmod(0o600)
    store = _store(db_path)
    assert store.execute(Read((b"k",))) == Snapshot(None, 0)
    store.close()
    assert raw_rows(db_path, "PRAGMA user_version") == [(SCHEMA_VERSION,)]


def test_the_driver_commits_write_plans_and_rolls_back_failed_ones(db_path: Path) -> None:
    store = _store(db_path)
    row = ROW._replace(generation=0)
    assert store.execute(Write(row)) is True
    assert len(raw_rows(db_path)) == 1

    def broken() -> Generator[Any, Any, int]:
        yield ("BEGIN IMMEDIATE", ())
        yield ("DELETE FROM tokens", ())
        yield ("SELECT * FROM no_such_table", ())
        return 1

    conn = store._borrow()
    with pytest.raises(sqlite3.OperationalError):
        run(conn, broken())
    assert not conn.in_transaction
    assert len(raw_rows(db_path)) == 1  # the DELETE was rolled back
    conn.close()
    store.close()


def test_a_failed_operation_raises_a_storage_error_naming_no_row(db_path: Path) -> None:
    store = _store(db_path)
    store.execute(Read((b"x" * 32,)))
    raw_exec(db_path, "DROP TABLE backoff")
    with pytest.raises(StorageError) as info:
        store.execute(Clear())
    assert "backoff" in str(info.value)
    assert raw_rows(db_path, "SELECT value FROM meta") == [(0,)]  # the whole clear rolled back
    store.close()


@pytest.mark.parametrize("bug", [TypeError, ValueError])
async def test_a_bug_inside_the_backend_propagates_and_is_not_storage_trouble(
    db_path: Path, monkeypatch: pytest.MonkeyPatch, bug: type[Exception]
) -> None:
    cache = PersistentTokenCache(db_path, config=CacheConfig(keys=[TEST_CACHE_KEY]))
    cache.set_system_token("warm", {"access_token": "t", "expires_in": 3600})

    def broken(op: object) -> object:
        raise bug("a bug of ours")

    monkeypatch.setattr("agw_persist_cache.backends.sqlite.transaction", broken)
    with pytest.raises(bug, match="a bug of ours"):
        cache.set_system_token("scope", {"access_token": "t2", "expires_in": 3600})
    with pytest.raises(bug, match="a bug of ours"):
        await cache.aset_system_token("scope", {"access_token": "t2", "expires_in": 3600})
    monkeypatch.undo()
    stats = cache.stats()
    assert (stats.storage_errors, stats.mode, stats.disabled_reason) == (0, "healthy", None)
    assert cache.set_system_token("scope", {"access_token": "t3", "expires_in": 3600})
    cache.close()


async def test_the_async_driver_runs_the_same_plans(db_path: Path) -> None:
    store = _store(db_path)
    row = ROW._replace(generation=0)
    assert await store.aexecute(Write(row)) is True
    assert await store.aexecute(Clear()) == 1
    assert await store.aexecute(Write(row)) is False  # sealed in generation 0, now 1
    assert await store.aexecute(Read((row.digest,))) == Snapshot(None, 1)
    assert raw_rows(db_path) == []
    await store.aclose()


def test_a_page_cap_is_applied_when_max_db_bytes_is_set(db_path: Path) -> None:
    store = _store(db_path, max_db_bytes=1 << 20)
    conn = store._borrow()
    assert conn.execute("PRAGMA max_page_count").fetchone()[0] == (1 << 20) // 4096
    conn.close()
    store.close()


@pytest.mark.parametrize("mode", [0o600, 0o644])
def test_a_file_that_is_not_ours_is_left_alone_and_the_cache_fetches(
    db_path: Path, mode: int, caplog: pytest.LogCaptureFixture
) -> None:
    db_path.parent.mkdir()
    data = b"not a database, but maybe someone's data\n" * 100
    db_path.write_bytes(data)
    db_path.chmod(mode)
    with PersistentTokenCache(db_path, config=CacheConfig(keys=[b"k" * 32])) as cache:
        assert cache.set_system_token("scope", "token") is False
        assert cache.system_token("other", lambda: "fetched") == "fetched"
        assert cache.stats().disabled_reason is not None
    assert db_path.read_bytes() == data  # not moved, not rewritten
    assert {p.name for p in db_path.parent.iterdir()} <= {"tokens.db", "tokens.db.locks"}
    (warning,) = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert str(db_path) in warning and "someone" not in warning


def test_another_applications_sqlite_file_is_never_migrated(db_path: Path) -> None:
    db_path.parent.mkdir()
    other = sqlite3.connect(db_path)
    other.execute("CREATE TABLE orders (id INTEGER PRIMARY KEY, item TEXT)")
    other.commit()
    other.close()
    db_path.chmod(0o600)
    before = db_path.read_bytes()
    with PersistentTokenCache(db_path, config=CacheConfig(keys=[b"k" * 32])) as cache:
        assert cache.get_system_token("scope") is None
        assert "tables of its own" in str(cache.stats().disabled_reason)
    assert db_path.read_bytes() == before
    assert raw_rows(db_path, "PRAGMA journal_mode") == [("delete",)]  # not switched to WAL


def test_an_empty_file_of_ours_is_adopted(db_path: Path) -> None:
    db_path.parent.mkdir()
    db_path.touch(mode=0o600)
    with PersistentTokenCache(db_path, config=CacheConfig(keys=[b"k" * 32])) as cache:
        assert cache.set_system_token("scope", "token") is True
    assert raw_rows(db_path, "PRAGMA application_id") == [(APPLICATION_ID,)]


def test_a_read_only_look_at_a_missing_path_creates_nothing(tmp_path: Path) -> None:
    path = tmp_path / "typo" / "tokens.db"
    with PersistentTokenCache(path, read_only=True) as cache:
        stats = cache.stats()
        assert cache.list_entries() == []
    assert stats.disabled_reason == f"no cache at {path}"
    assert not (tmp_path / "typo").exists()  # no directory, database, key or lock file


async def test_a_read_only_look_reads_rows_and_writes_nothing(db_path: Path) -> None:
    with PersistentTokenCache(db_path) as worker:  # a key file, as workers use
        worker.set_system_token("scope", "token")
    raw_exec(db_path, "PRAGMA wal_checkpoint(TRUNCATE)")
    before = {p.name: p.stat().st_mtime_ns for p in db_path.parent.iterdir()}
    with PersistentTokenCache(db_path, read_only=True) as look:
        assert look.stats().entries_system == 1
        assert [e.kind for e in await look.alist_entries()] == ["system"]
        assert look.get_system_token("scope") == "token"
        assert look.set_system_token("other", "t") is False
    after = {p.name: p.stat().st_mtime_ns for p in db_path.parent.iterdir()}
    assert after == before
