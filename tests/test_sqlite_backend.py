"""The SQLite backend as its callers and other processes see it: what each operation leaves
in the file (read back over a connection of its own, as another process would), what it
refuses, and how it behaves while another connection holds the write lock."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from _core_support import raw_exec, raw_rows
from _tls import TEST_CACHE_KEY

from agw_persist_cache import CacheConfig, PersistentTokenCache, _fork
from agw_persist_cache._files import side_files_of
from agw_persist_cache.backends._sqlite_schema import MIGRATIONS, load_migrations
from agw_persist_cache.backends.contract import (
    ABSENT,
    Backoff,
    Clear,
    GetBackoff,
    GetFacts,
    GetKeyChecks,
    KeyChecks,
    Prune,
    Read,
    SealedRow,
    SetBackoff,
    Snapshot,
    StorageError,
    Touch,
    Write,
)
from agw_persist_cache.backends.sqlite import APPLICATION_ID, SCHEMA_VERSION, SqliteBackend

ROW = SealedRow(b"d" * 32, "user", "kid1", b"n" * 12, b"ciphertext", 2e9, 0, 1000.0, 1000.0)
TOKENS = "SELECT k, kind, kid, nonce, ct, expires_at, gen, last_used, created_at FROM tokens"


def _store(path: Path, **overrides: Any) -> SqliteBackend:
    return SqliteBackend(path, CacheConfig(**overrides))


def stored(path: Path) -> list[SealedRow]:
    """The rows in the file, read over a connection of its own."""
    return sorted(SealedRow(bytes(k), *rest) for k, *rest in raw_rows(path, TOKENS))


def row(name: bytes, **changes: Any) -> SealedRow:
    return ROW._replace(digest=name * 32, **changes)


def write_lock_is_free(path: Path) -> bool:
    """Whether another connection could take the write lock at once."""
    con = sqlite3.connect(path, isolation_level=None, timeout=0)
    try:
        con.execute("BEGIN IMMEDIATE")
        con.execute("ROLLBACK")
        return True
    except sqlite3.OperationalError:
        return False
    finally:
        con.close()


# -- writes: what they leave in the file, what they refuse ----------------------------------------


def test_a_write_another_connection_sees_when_it_returns(db_path: Path) -> None:
    store = _store(db_path)
    assert store.execute(Write(ROW)) is True
    assert stored(db_path) == [ROW]
    newer = ROW._replace(nonce=b"m" * 12, ct=b"newer")
    assert store.execute(Write(newer, replaces=(b"o" * 32,))) is True  # its own transaction
    assert stored(db_path) == [newer]
    store.close()


def test_a_write_sealed_before_a_clear_from_another_connection_is_refused(db_path: Path) -> None:
    store, other = _store(db_path), _store(db_path)
    old = row(b"o")
    assert store.execute(Write(old)) is True
    assert other.execute(Clear()) == 1  # another process clears: generation 0 -> 1
    assert stored(db_path) == []
    assert store.execute(Write(ROW)) is False  # sealed in generation 0: one statement
    kept = old._replace(generation=1)
    assert store.execute(Write(kept)) is True
    # Sealed in generation 0 with a row to replace (a transaction): refused whole.
    assert store.execute(Write(ROW, replaces=(old.digest,), key_check=b"c")) is False
    assert stored(db_path) == [kept]
    assert raw_rows(db_path, "SELECT * FROM key_checks") == []
    assert store.execute(Write(ROW._replace(generation=1), replaces=(old.digest,))) is True
    assert stored(db_path) == [ROW._replace(generation=1)]  # the row it replaces is gone
    store.close()
    other.close()


def test_a_fetchs_write_is_refused_when_another_row_took_the_place_it_read(db_path: Path) -> None:
    store = _store(db_path)
    assert store.execute(Write(ROW, fence=ABSENT)) is True  # it read no row: none there yet
    theirs = ROW._replace(nonce=b"t" * 12, ct=b"theirs")
    mine = ROW._replace(nonce=b"m" * 12, ct=b"mine")
    assert store.execute(Write(mine, fence=ABSENT)) is False  # a row was written meanwhile
    assert store.execute(Write(theirs, fence=ROW.nonce)) is True  # replaces the row it read
    assert store.execute(Write(mine, fence=ROW.nonce, replaces=(b"o" * 32,))) is False
    assert stored(db_path) == [theirs]
    store.close()


def test_clear_empties_tokens_and_back_offs_and_moves_the_generation(db_path: Path) -> None:
    store = _store(db_path)
    store.execute(Write(ROW))
    store.execute(SetBackoff(ROW.digest, Backoff(2e9, "ias", 503)))
    assert store.execute(GetBackoff(ROW.digest)) == Backoff(2e9, "ias", 503)
    assert store.execute(Clear()) == 1
    assert store.execute(Clear()) == 2
    assert stored(db_path) == []
    assert raw_rows(db_path, "SELECT * FROM backoff") == []
    assert raw_rows(db_path, "SELECT name, value FROM meta") == [("generation", 2)]
    assert store.execute(GetBackoff(ROW.digest)) is None
    store.close()


def test_prune_removes_expired_rows_then_the_least_recently_used_beyond_each_limit(
    db_path: Path,
) -> None:
    store = _store(db_path)
    systems = [row(bytes([65 + i]), kind="system", last_used=100.0 + i) for i in range(5)]
    expired = row(b"x", kind="system", expires_at=500.0, last_used=999.0)  # the most recent
    users = [row(bytes([97 + i]), kind="user", last_used=100.0 + i) for i in range(3)]
    for each in [*systems, expired, *users]:
        assert store.execute(Write(each)) is True
    assert store.execute(Prune(1000.0, {"system": 2, "user": 1}, compact=True)) == 1 + 3 + 2
    assert stored(db_path) == sorted([*systems[-2:], users[-1]])
    assert store.execute(Prune(1000.0, {"system": 2, "user": 1}, compact=True)) == 0
    store.close()


def test_a_touch_records_the_use_that_prune_goes_by(db_path: Path) -> None:
    store = _store(db_path)
    old, new = row(b"a", last_used=100.0), row(b"b", last_used=200.0)
    store.execute(Write(old))
    store.execute(Write(new))
    assert store.execute(Touch(old.digest, 300.0)) is None
    assert store.execute(Prune(250.0, {"user": 1}, compact=True)) == 1
    assert stored(db_path) == [old._replace(last_used=300.0)]
    store.close()


# -- reads: one path, whichever entry --------------------------------------------------------------


async def test_every_entry_reads_the_first_digest_that_has_a_row(db_path: Path) -> None:
    store = _store(db_path)
    found = row(b"b")
    assert store.read_inline(Read((found.digest,))) is None  # nothing open: not on a loop
    assert await store.aexecute(Write(found)) is True
    both = Read((b"a" * 32, found.digest))  # rotation: the new key's digest first
    assert store.execute(both) == Snapshot(found, 0)
    assert await store.aexecute(both) == Snapshot(found, 0)
    assert store.read_inline(both) == Snapshot(found, 0)  # a connection is open now
    assert store.execute(Read((b"a" * 32,))) == Snapshot(None, 0)
    await store.aclose()


def test_a_repeated_read_sees_every_change_made_since(db_path: Path) -> None:
    store = _store(db_path)
    assert store.execute(Write(ROW)) is True
    key = Read((ROW.digest,))
    assert store.execute(key) == store.execute(key) == Snapshot(ROW, 0)
    # Another connection (as another process would) rewrites the row: seen at once.
    raw_exec(db_path, "UPDATE tokens SET nonce = ?", (b"m" * 12,))
    moved = ROW._replace(nonce=b"m" * 12)
    assert store.execute(key) == store.execute(key) == Snapshot(moved, 0)
    # This store writes on the connection its reads use (its own commits move no
    # data_version): seen too.
    assert store.execute(Write(moved._replace(ct=b"own"))) is True
    assert store.execute(key) == Snapshot(moved._replace(ct=b"own"), 0)
    # A clear() elsewhere: the generation moved and the row is gone.
    raw_exec(db_path, "UPDATE meta SET value = value + 1")
    raw_exec(db_path, "DELETE FROM tokens")
    assert store.execute(key) == Snapshot(None, 1)
    # A row put back behind the cache's back (a replay) is read, not remembered away.
    raw_exec(db_path, "INSERT INTO tokens VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", [
        ROW.digest, ROW.kind, ROW.kid, ROW.nonce, ROW.ct, ROW.expires_at,
        ROW.last_used, ROW.created_at, 1,
    ])  # fmt: skip
    assert store.execute(key) == Snapshot(ROW._replace(generation=1), 1)
    store.close()


def test_a_file_without_its_generation_refuses_reads_and_clears(db_path: Path) -> None:
    store = _store(db_path)
    assert store.execute(Write(ROW)) is True
    raw_exec(db_path, "DELETE FROM meta")
    with pytest.raises(StorageError):
        store.execute(Clear())  # no fence for a fetch in flight: nothing is cleared
    with pytest.raises(StorageError):
        store.execute(Read((b"z" * 32,)))
    assert len(raw_rows(db_path)) == 1
    store.close()


# -- stats and key checks --------------------------------------------------------------------------


def test_facts_count_rows_by_kind_and_read_the_sizes_from_the_files(db_path: Path) -> None:
    store = _store(db_path)
    store.execute(Write(row(b"a", kind="system", kid="kid-b", expires_at=900.0)))
    store.execute(Write(row(b"b", kind="system", kid="kid-a", expires_at=1500.0)))
    store.execute(Write(row(b"c", kind="user", kid="kid-a", expires_at=1100.0)))
    facts = store.execute(GetFacts(1000.0))
    assert facts._asdict() | {"file_bytes": 0, "wal_bytes": 0} == {
        "entries_system": 2,
        "entries_user": 1,
        "entries_expired": 1,
        "oldest_expiry": 900.0,
        "newest_expiry": 1500.0,
        "schema_version": SCHEMA_VERSION,
        "key_ids_in_use": ("kid-a", "kid-b"),
        "file_bytes": 0,
        "wal_bytes": 0,
    }
    assert facts.file_bytes == db_path.stat().st_size > 0
    assert facts.wal_bytes == side_files_of(db_path)[0].stat().st_size
    store.close()


def test_key_checks_name_the_keys_that_wrote_or_else_the_rows_key_ids(db_path: Path) -> None:
    store = _store(db_path)
    assert store.execute(GetKeyChecks()) == KeyChecks(False, (), ())  # an empty store
    assert store.execute(Write(ROW, key_check=b"check-1")) is True
    assert store.execute(GetKeyChecks()) == KeyChecks(True, (("kid1", b"check-1"),), ())
    raw_exec(db_path, "DELETE FROM key_checks")  # rows from before check values were kept
    assert store.execute(GetKeyChecks()) == KeyChecks(True, (), ("kid1",))
    store.close()


# -- another writer holds the lock; failures roll back ---------------------------------------------


def test_writes_wait_for_another_writer_and_best_effort_ones_skip(db_path: Path) -> None:
    store = _store(db_path, busy_timeout_seconds=30)
    store.execute(Write(ROW))
    holder = sqlite3.connect(db_path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # another process's write in progress
    started = time.monotonic()
    assert store.execute(Touch(ROW.digest, 5000.0)) is None  # skipped, not queued
    assert store.execute(Prune(1000.0, {"user": 0})) is None  # the prune after a write too
    assert time.monotonic() - started < 10  # far below the 30 s busy timeout
    done: list[int] = []
    clear = threading.Thread(target=lambda: done.append(store.execute(Clear())))
    clear.start()
    clear.join(1.0)
    assert clear.is_alive() and done == []  # it waits for the lock: no partial clear
    holder.execute("COMMIT")
    clear.join(30)
    assert done == [1]
    assert stored(db_path) == []
    holder.close()
    store.close()


def test_writes_past_the_busy_timeout_raise_and_change_nothing(db_path: Path) -> None:
    store = _store(db_path, busy_timeout_seconds=0.3)
    store.execute(Write(ROW))
    holder = sqlite3.connect(db_path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    with pytest.raises(StorageError, match="locked"):
        store.execute(Clear())
    with pytest.raises(StorageError, match="locked"):
        store.execute(Write(row(b"e")))
    holder.execute("ROLLBACK")
    holder.close()
    assert stored(db_path) == [ROW]
    assert raw_rows(db_path, "SELECT value FROM meta") == [(0,)]
    store.close()


@pytest.mark.parametrize("mode", ["sync", "async"])
async def test_a_failed_operation_rolls_back_whole_and_frees_the_write_lock(
    db_path: Path, mode: str
) -> None:
    store = _store(db_path)
    store.execute(Write(ROW))
    raw_exec(db_path, "DROP TABLE backoff")  # a clear() fails at its third statement
    with pytest.raises(StorageError) as info:
        if mode == "sync":
            store.execute(Clear())
        else:
            await store.aexecute(Clear())
    assert "backoff" in str(info.value) and ROW.ct.decode() not in str(info.value)
    assert raw_rows(db_path, "SELECT value FROM meta") == [(0,)]  # the whole clear rolled back
    assert stored(db_path) == [ROW]
    assert write_lock_is_free(db_path)  # the failed transaction did not keep the lock
    await store.aclose()


@pytest.mark.parametrize("bug", [TypeError, ValueError])
async def test_a_bug_inside_the_backend_propagates_and_is_not_storage_trouble(
    db_path: Path, monkeypatch: pytest.MonkeyPatch, bug: type[Exception]
) -> None:
    cache = PersistentTokenCache(db_path, config=CacheConfig(keys=[TEST_CACHE_KEY]))
    cache.set_system_token("warm", {"access_token": "t", "expires_in": 3600})

    def broken(op: object) -> object:
        raise bug("a bug of ours")

    monkeypatch.setattr("agw_persist_cache.backends._sqlite_sql.transaction", broken)
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
    assert await store.aexecute(Write(ROW)) is True
    assert await store.aexecute(Clear()) == 1
    assert await store.aexecute(Write(ROW)) is False  # sealed in generation 0, now 1
    assert await store.aexecute(Read((ROW.digest,))) == Snapshot(None, 1)
    assert raw_rows(db_path) == []
    await store.aclose()


def test_a_file_size_limit_stops_writes_and_the_file_stays_under_it(db_path: Path) -> None:
    limit = 64 * 1024
    store = _store(db_path, max_db_bytes=limit)
    answers: list[bool | str] = []
    for i in range(100):
        try:
            answers.append(store.execute(Write(row(i.to_bytes(1, "big"), ct=b"x" * 4000))))
        except StorageError as exc:
            answers.append(str(exc))
    assert answers[0] is True
    assert any("full" in str(answer) for answer in answers)  # SQLITE_FULL at the page cap
    store.close()
    raw_exec(db_path, "PRAGMA wal_checkpoint(TRUNCATE)")
    assert db_path.stat().st_size <= limit


async def test_every_thread_the_backend_starts_is_one_the_fork_policy_names(
    db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    started: list[str] = []
    real = _fork.start_thread

    def spy(name: str, target: Any, *args: Any) -> threading.Thread:
        started.append(name)
        return real(name, target, *args)

    monkeypatch.setattr(_fork, "start_thread", spy)
    store = _store(db_path)
    before = {t.ident for t in threading.enumerate()}

    async def task() -> None:
        assert await store.aexecute(Write(ROW)) is True

    await asyncio.to_thread(asyncio.run, task())
    await asyncio.to_thread(asyncio.run, task())  # the first loop closed: its connection stops
    await store.aclose()
    assert started and set(started) == {"agw-cache-aiosqlite-stop"}
    assert set(started) <= set(_fork.THREADS)
    time.sleep(0.5)
    left = [t for t in threading.enumerate() if t.ident not in before]
    assert [t.name for t in left if t.name.startswith("agw-cache")] == []


# -- the file: schema, migrations, ownership ----------------------------------------------------


def test_migrations_are_numbered_without_gaps_and_define_the_schema_version() -> None:
    assert [v for v, _, _ in MIGRATIONS] == list(range(1, len(MIGRATIONS) + 1))
    assert MIGRATIONS[-1][0] == SCHEMA_VERSION
    assert MIGRATIONS[0][1] == "0001_initial.sql"
    assert load_migrations() == MIGRATIONS
    source = Path(__file__).resolve().parent.parent / "migrations" / "0001_initial.sql"
    assert MIGRATIONS[0][2] == source.read_text(encoding="utf-8")


def test_a_new_file_is_migrated_to_wal_with_the_expected_tables(db_path: Path) -> None:
    store = _store(db_path)
    assert store.execute(Read((b"x" * 32,))) == Snapshot(None, 0)
    store.close()
    assert raw_rows(db_path, "PRAGMA journal_mode") == [("wal",)]
    assert raw_rows(db_path, "PRAGMA user_version") == [(SCHEMA_VERSION,)]
    assert raw_rows(db_path, "PRAGMA application_id") == [(APPLICATION_ID,)]
    tables = {r[0] for r in raw_rows(db_path, "SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"tokens", "meta", "backoff", "key_checks"} <= tables
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
