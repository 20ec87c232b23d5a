"""Never break the agent: bounded descriptors and threads, fork while threads run, hits that
never wait for a writer, writes that tell the truth, corruption that converges, clock-proof
and replay-proof rows. Real files, real processes."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from _core_support import Counting, future, make_config, new_key, raw_exec, raw_rows
from support.procs import Worker, Workers

from agw_persist_cache import (
    CacheStorageError,
    FetchBackoffError,
    PersistentTokenCache,
)
from agw_persist_cache.backends import _sqlite_pool as pool
from agw_persist_cache.backends._sqlite_pool import POOL_IDLE, QUICK_IDLE, READERS
from agw_persist_cache.backends.sqlite import IDENTITY_CHECK_SECONDS

SCALE = float(os.environ.get("AGW_TEST_SCALE", "1"))
"""``AGW_TEST_SCALE=5`` runs the counts the issue measures (10,000 threads, 1,000 loops)."""


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def cache_fds(db_path: Path, *, only_the_database: bool = False) -> int:
    """Open descriptors on the cache's files (the database, -wal, -shm, key locks), or on the
    database file alone: one per connection open, or closed while others stayed open
    (SQLite keeps those for its next open)."""
    ours = str(db_path.resolve())
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(FileNotFoundError):  # the listing's own descriptor
            name = os.readlink(f"/proc/self/fd/{fd}")
            count += name == ours if only_the_database else name.startswith(ours)
    return count


def live_threads() -> int:
    return threading.active_count()


@pytest.fixture
def workers() -> Iterator[Workers]:
    with Workers("fork", timeout=60) as started:
        yield started


# -- bounded resources ----------------------------------------------------------------------------


def test_short_lived_threads_leave_no_descriptor_or_thread_behind(db_path: Path) -> None:
    cache = PersistentTokenCache(db_path, config=make_config())
    cache.set_system_token("scope", "token")

    def one_get(start: threading.Barrier) -> None:
        start.wait()  # the 8 overlap, so the pool runs past its idle bound and closes extras
        for _ in range(5):
            assert cache.get_system_token("scope") == "token"

    def batch(n: int) -> None:
        start = threading.Barrier(n)
        threads = [threading.Thread(target=one_get, args=(start,)) for _ in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    batch(8)
    others, threads = open_fds() - cache_fds(db_path), live_threads()
    for _ in range(int(250 * SCALE)):
        batch(8)  # 2,000 threads (10,000 with AGW_TEST_SCALE=5)
    # How far the pool grew in the warm-up depends on how its threads overlapped, so the
    # descriptors on the cache's own files are held to the pool's bound (each idle
    # connection: the file and its -wal; one -shm per process; and SQLite keeps the file's
    # descriptor of a connection closed while others are open, at most one per thread that
    # was inside at once), and everything else to +4.
    assert open_fds() - cache_fds(db_path) <= others + 4
    assert 0 < cache_fds(db_path) <= 2 * (POOL_IDLE + QUICK_IDLE) + 1 + 8
    assert live_threads() <= threads + 4
    cache.close()
    assert cache_fds(db_path) == 0


def test_hits_of_many_threads_share_a_few_connections(
    db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pool, "READER_WAIT_SECONDS", 30.0)  # no waiting hit gives up
    cache = PersistentTokenCache(db_path, config=make_config())
    cache.set_system_token("scope", "token")
    start = threading.Barrier(8)

    def gets() -> None:
        start.wait()
        for _ in range(200):
            assert cache.get_system_token("scope") == "token"

    threads = [threading.Thread(target=gets) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # the set's connection, READERS that hits opened, the best-effort one (unlimited: ~9)
    assert cache_fds(db_path, only_the_database=True) <= 1 + READERS + QUICK_IDLE
    cache.close()


@pytest.mark.timeout(120)
def test_a_hit_opens_one_more_connection_rather_than_wait_long(
    db_path: Path, workers: Workers, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Every connection hits may open is out already: a hit waits a moment, then opens one.
    monkeypatch.setattr(pool, "READERS", 0)
    cache = PersistentTokenCache(db_path, config=make_config(busy_timeout_seconds=60))
    cache.set_system_token("scope", "token")
    assert cache.get_system_token("scope") == "token"
    opened = cache_fds(db_path, only_the_database=True)
    writer = _writer(workers, db_path, freeze=False)  # another process holds the write lock
    stored: list[bool] = []
    sets = [
        threading.Thread(target=lambda i=i: stored.append(cache.set_system_token(f"s{i}", "t")))
        for i in range(POOL_IDLE + 2)
    ]
    for t in sets:
        t.start()
    # Each set holds a connection while it waits: those that found none idle opened one.
    # Once no more open for a while, every idle connection is out.
    deadline, seen, steady = time.monotonic() + 30, 0, time.monotonic()
    while (now := cache_fds(db_path, only_the_database=True)) < opened + 2 or (
        time.monotonic() - steady < 1.0
    ):
        assert time.monotonic() < deadline, "the sets never took every pooled connection"
        if now != seen:
            seen, steady = now, time.monotonic()
        time.sleep(0.01)
    started = time.monotonic()
    assert cache.get_system_token("scope") == "token"
    assert time.monotonic() - started < 20  # not the writers' 60 s
    assert stored == []  # the sets were still waiting for the lock all along
    writer.kill()
    writer.join(10)
    for t in sets:
        t.join(60)
    assert stored == [True] * (POOL_IDLE + 2)
    cache.close()
    assert cache_fds(db_path) == 0


def test_asyncio_run_per_task_leaves_no_thread_or_descriptor_behind(db_path: Path) -> None:
    cache = PersistentTokenCache(db_path, config=make_config())

    async def task(i: int) -> None:
        assert await cache.aset_system_token(f"s{i % 7}", f"t{i}") is True
        assert await cache.aget_system_token(f"s{i % 7}") == f"t{i}"
        assert cache.get_system_token(f"s{i % 7}") == f"t{i}"

    asyncio.run(task(0))
    asyncio.run(task(1))
    fds, threads = open_fds(), live_threads()
    for i in range(int(200 * SCALE)):  # 1,000 with AGW_TEST_SCALE=5
        asyncio.run(task(i))
    assert open_fds() <= fds + 4
    assert live_threads() <= threads + 4
    cache.close()
    assert live_threads() < threads  # close() releases the last loop's connection too


# -- fork while other threads use the cache -------------------------------------------------------


def test_fifty_forks_while_four_threads_hammer_the_cache_all_read_and_write(db_path: Path) -> None:
    cache = PersistentTokenCache(
        db_path, config=make_config(last_used_interval_seconds=0, prune_interval_seconds=0)
    )
    stop = threading.Event()

    def hammer(seed: int) -> None:
        rng = random.Random(seed)
        while not stop.is_set():
            key = f"k{rng.randrange(200)}"
            action = rng.randrange(3)
            if action == 0:
                cache.set_system_token(key, f"v{rng.random()}")
            elif action == 1:
                cache.get_system_token(key)
            else:
                cache.system_token(key, lambda: f"f{rng.random()}")

    workers = [threading.Thread(target=hammer, args=(i,), daemon=True) for i in range(4)]
    for t in workers:
        t.start()
    outcomes: list[int | str] = []
    try:
        for i in range(50):
            time.sleep(0.01)
            pid = os.fork()
            if pid == 0:  # the child: read and write at once, in under a second
                status = 1
                try:
                    started = time.monotonic()
                    ok = cache.set_system_token(f"child-{i}", f"token-{i}")
                    got = cache.get_system_token(f"child-{i}")
                    fetched = cache.system_token(f"fresh-{i}", lambda: "fresh")
                    fast = time.monotonic() - started < 10  # a hang is what is being caught
                    status = (
                        0 if (ok and got == f"token-{i}" and fetched == "fresh" and fast) else 1
                    )
                finally:
                    os._exit(status)
            outcomes.append(_reap(pid, timeout=20))
    finally:
        stop.set()
        for t in workers:
            t.join(30)
    assert outcomes == [0] * 50
    assert [cache.get_system_token(f"child-{i}") for i in range(50)] == [
        f"token-{i}" for i in range(50)
    ]
    cache.close()


def _reap(pid: int, timeout: float) -> int | str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.005)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    return "hung"


# -- a writer elsewhere: hits never wait, writes tell the truth -----------------------------------


def _hold_write_lock(path: str, freeze: bool, worker: Worker) -> None:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("BEGIN IMMEDIATE")
    conn.execute("UPDATE meta SET value = value WHERE name = 'generation'")
    worker.report("holding the write lock")
    worker.outbox.close()
    worker.outbox.join_thread()  # the report is on its way before this process is stopped
    if freeze:
        os.kill(os.getpid(), signal.SIGSTOP)
    time.sleep(120)


def _writer(workers: Workers, db_path: Path, *, freeze: bool) -> Any:
    (child,) = workers.start(_hold_write_lock, [(str(db_path), freeze)])
    assert workers.collect() == ["holding the write lock"]
    return child


@pytest.mark.timeout(60)
async def test_a_hit_does_not_wait_for_a_stopped_writer(db_path: Path, workers: Workers) -> None:
    # A busy timeout of 45 s: a hit that waited for the writer would run into the test timeout.
    cache = PersistentTokenCache(
        db_path, config=make_config(busy_timeout_seconds=45, last_used_interval_seconds=0)
    )
    cache.set_system_token("scope", "token")
    _writer(workers, db_path, freeze=True)
    started = time.perf_counter()
    for _ in range(20):  # every hit is due for an LRU touch, which must be skipped
        assert cache.get_system_token("scope") == "token"
        assert await cache.aget_system_token("scope") == "token"
        assert cache.system_token("scope", Counting()) == "token"
    per_hit_ms = (time.perf_counter() - started) / 60 * 1000
    print(f"hit with a stopped writer: {per_hit_ms:.3f} ms")
    assert cache.stats().storage_errors == 0
    await cache.aclose()


async def test_writes_take_effect_or_say_so_while_another_process_writes(
    db_path: Path, workers: Workers, caplog: pytest.LogCaptureFixture
) -> None:
    cache = PersistentTokenCache(db_path, config=make_config(busy_timeout_seconds=0.3))
    cache.set_system_token("scope", "revoked")
    writer = _writer(workers, db_path, freeze=False)
    with pytest.raises(CacheStorageError, match="clear did not take effect"):
        cache.clear()
    with pytest.raises(CacheStorageError, match="clear did not take effect"):
        await cache.aclear()
    with pytest.raises(CacheStorageError, match="invalidate did not take effect"):
        cache.invalidate_system_token("scope")
    with pytest.raises(CacheStorageError):
        await cache.ainvalidate_system_token("scope")
    assert cache.get_system_token("scope") == "revoked"  # nothing pretended otherwise
    assert cache.set_system_token("other", "t") is False
    assert await cache.aset_system_token("other", "t") is False
    fetch = Counting()
    assert cache.system_token("missing", fetch) == "fetched-1"  # the caller gets its token
    stats = cache.stats()
    assert stats.sets_not_stored == 2
    assert stats.storage_errors >= 5
    assert "database is locked" not in "".join(str(r.exc_info) for r in caplog.records)
    writer.kill()
    writer.join(10)
    cache.clear()
    assert cache.get_system_token("scope") is None
    await cache.aclose()


def test_a_full_disk_set_returns_false_and_counts_it(db_path: Path) -> None:
    cache = PersistentTokenCache(db_path, config=make_config(max_db_bytes=64 * 1024))
    big = {"access_token": "x" * 4000, "expires_in": 3600}
    answers = [cache.set_system_token(f"scope-{i}", big) for i in range(200)]
    assert answers[0] is True
    assert False in answers
    assert cache.stats().sets_not_stored == answers.count(False)
    fetch = Counting(expires_in=3600)
    assert cache.system_token("one-more", fetch) == "fetched-1"  # get-or-fetch still answers
    cache.close()


def _write_under_a_file_size_limit(path: str, key: str, limit: int, worker: Worker) -> None:
    """Sets, a get-or-fetch and a clear() in a process whose files may not grow past ``limit``
    bytes (RLIMIT_FSIZE; SIGXFSZ ignored, so a write past it fails with EFBIG)."""
    import resource

    from _core_support import make_config as config_with

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    cache = PersistentTokenCache(path, config=config_with(keys=[key]))
    big = {"access_token": "x" * 4000, "expires_in": 3600}
    answers = [cache.set_system_token(f"scope-{i}", big) for i in range(100)]
    fetched = cache.system_token("one-more", Counting(expires_in=3600))
    try:
        cache.clear()
        cleared = "cleared"
    except CacheStorageError as exc:
        cleared = type(exc).__name__
    worker.report((answers, cache.stats().sets_not_stored, fetched, cleared))


def test_sets_past_a_file_size_limit_return_false_and_the_rest_still_answers(
    db_path: Path, workers: Workers
) -> None:
    key = new_key()
    with PersistentTokenCache(db_path, config=make_config(keys=[key])) as cache:
        cache.set_system_token("before", "kept")  # the file and its WAL exist
    limit = max(db_path.stat().st_size, 64 * 1024) + 64 * 1024
    workers.start(_write_under_a_file_size_limit, [(str(db_path), key, limit)])
    [(answers, not_stored, fetched, cleared)] = workers.collect()
    workers.join()
    assert answers[0] is True and False in answers
    assert not_stored == answers.count(False)
    assert fetched == "fetched-1"  # get-or-fetch answers whether or not it could store
    assert cleared == "CacheStorageError"  # a clear() that did not happen says so
    with PersistentTokenCache(db_path, config=make_config(keys=[key])) as cache:
        stored = [cache.get_system_token(f"scope-{i}") is not None for i in range(100)]
        assert stored == answers  # True means stored, False means not: never the other way
        assert cache.get_system_token("before") == "kept"  # and the failed clear() lost nothing


# -- corruption converges -------------------------------------------------------------------------


def _serve(path: str, key: str, out: str, stop: Any, worker: Worker) -> None:
    """A long-lived worker: reads 'probe' every 20 ms and reports what it sees."""
    from _core_support import make_config as config_with

    cache = PersistentTokenCache(path, config=config_with(keys=[key]))
    seen = ""
    while not stop.is_set():
        now = str(cache.get_system_token("probe"))
        if now != seen:
            seen = now
            with open(out, "a", encoding="utf-8") as fh:
                fh.write(now + "\n")
        time.sleep(0.02)
    cache.close()


def _seen(out: Path) -> list[str]:
    return out.read_text(encoding="utf-8").split() if out.exists() else []


def _wait_seen(out: Path, value: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while _seen(out)[-1:] != [value]:
        assert time.monotonic() < deadline, f"the worker saw {_seen(out)}, not {value!r}"
        time.sleep(0.02)


def _corrupt_tokens_root_page(db_path: Path) -> None:
    raw_exec(db_path, "PRAGMA wal_checkpoint(TRUNCATE)")
    ((root,),) = raw_rows(db_path, "SELECT rootpage FROM sqlite_master WHERE name = 'tokens'")
    ((page_size,),) = raw_rows(db_path, "PRAGMA page_size")
    with open(db_path, "r+b") as fh:
        fh.seek((root - 1) * page_size)
        fh.write(random.Random(7).randbytes(page_size))


def test_after_a_quarantine_every_process_serves_from_the_new_file(
    db_path: Path, tmp_path: Path, workers: Workers
) -> None:
    key = new_key()
    cache = PersistentTokenCache(db_path, config=make_config(keys=[key]))
    cache.set_system_token("probe", "before")
    out, stop = tmp_path / "seen.txt", workers.ctx.Event()
    (worker,) = workers.start(_serve, [(str(db_path), key, str(out), stop)])
    _wait_seen(out, "before", 30)
    _corrupt_tokens_root_page(db_path)
    fds = open_fds()
    fetch = Counting()
    for _ in range(20):  # the first write finds the corruption and moves the file aside
        cache.system_token("other", fetch)
    assert fetch.calls <= 2  # the fetch whose write failed, then one into the new file
    calls = fetch.calls
    for _ in range(20):
        assert cache.system_token("other", fetch) == f"fetched-{calls}"
    assert fetch.calls == calls  # the new file serves
    assert open_fds() <= fds + 4  # no descriptor left behind per call
    moved = db_path.parent.glob("tokens.db.corrupt-*")
    stamps = {p.name.removesuffix("-wal").removesuffix("-shm") for p in moved}
    assert len(stamps) == 1  # moved aside once (with its -wal and -shm when they existed)
    cache.set_system_token("probe", "after")
    _wait_seen(out, "after", 5 + IDENTITY_CHECK_SECONDS)  # the worker moved to the new file
    cache.clear()
    _wait_seen(out, "None", 5)  # and a clear() reaches it
    stop.set()
    worker.join(10)
    assert worker.exitcode == 0
    cache.close()


# -- clocks and planted rows ----------------------------------------------------------------------


def test_a_row_saved_before_a_clear_never_opens_after_it(db_path: Path) -> None:
    cache = PersistentTokenCache(db_path, config=make_config())
    cache.set_system_token("scope", "revoked-token", expires_at=future(3600))
    (saved,) = raw_rows(db_path)
    cache.clear()
    columns = ", ".join(["?"] * len(saved))
    raw_exec(db_path, f"INSERT INTO tokens VALUES ({columns})", saved)  # replayed by someone
    assert cache.get_system_token("scope") is None
    fresh = PersistentTokenCache(db_path, config=cache.config)  # nor in another process
    assert fresh.get_system_token("scope") is None
    assert raw_rows(db_path) == []  # and it is dropped
    cache.close()
    fresh.close()


def test_a_planted_back_off_never_blocks_longer_than_the_setting(db_path: Path) -> None:
    cache = PersistentTokenCache(db_path, config=make_config(fetch_backoff_seconds=5))
    cache.get_system_token("warm-up")
    ((digest,),) = [(d,) for d in [cache._shelf.key("system", "scope", None).digest]]  # type: ignore[union-attr]
    raw_exec(
        db_path,
        "INSERT INTO backoff (k, until, cause, status) VALUES (?, ?, 'Planted', NULL)",
        (digest, time.time() + 10 * 365 * 86400),
    )
    with pytest.raises(FetchBackoffError) as info:
        cache.system_token("scope", Counting())
    assert 0 < info.value.retry_after <= 5


def test_a_lifetime_read_from_the_store_is_capped_at_the_ttl_limit(db_path: Path) -> None:
    key = new_key()
    ahead = PersistentTokenCache(
        db_path, config=make_config(keys=[key], max_token_ttl_seconds=10 * 86400)
    )
    ahead.set_system_token("scope", "token", expires_at=future(2 * 86400))  # a clock a day ahead
    cache = PersistentTokenCache(
        db_path, config=make_config(keys=[key], max_token_ttl_seconds=3600)
    )
    entry = cache.get_entry("system", "scope")
    assert entry is not None
    assert entry.expires_at <= time.time() + 3600
    ahead.close()
    cache.close()


def test_a_back_off_is_capped_when_the_clock_steps_back(db_path: Path) -> None:
    cache = PersistentTokenCache(db_path, config=make_config(fetch_backoff_seconds=5))

    def failing() -> str:
        raise RuntimeError("identity service down")

    with pytest.raises(RuntimeError):
        cache.system_token("scope", failing)
    # The clock steps back one hour: the stored end now lies 3,605 s ahead.
    raw_exec(db_path, "UPDATE backoff SET until = until + 3600")
    with pytest.raises(FetchBackoffError) as info:
        cache.system_token("scope", failing)
    assert info.value.retry_after <= 5
    cache.close()


# -- honest keys ----------------------------------------------------------------------------------


def test_a_wrong_key_is_named_and_counted_not_silent(
    db_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    right, wrong = new_key(), new_key()
    writer = PersistentTokenCache(db_path, config=make_config(keys=[right]))
    for i in range(3):
        writer.set_system_token(f"scope-{i}", f"token-{i}")
    other = PersistentTokenCache(db_path, config=make_config(keys=[wrong]))
    assert other.system_token("scope-0", Counting()) == "fetched-1"  # a miss, fetched
    assert other.get_system_token("scope-1") is None
    assert other.stats().key_mismatch == 1  # once per process
    (warning,) = [r.getMessage() for r in caplog.records if "does not open" in r.getMessage()]
    assert "3 rows" in warning and writer.key_ids[0] in warning and other.key_ids[0] in warning
    assert right not in warning and wrong not in warning
    rotated = PersistentTokenCache(db_path, config=make_config(keys=[wrong, right]))
    assert rotated.get_system_token("nothing") is None
    assert rotated.stats().key_mismatch == 0  # new,old: the old key still opens them
    for cache in (writer, other, rotated):
        cache.close()
