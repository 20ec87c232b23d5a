"""Many processes, threads and coroutines on one cache file: real processes, counted fetches."""

from __future__ import annotations

import logging
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import _workers as w
import pytest

from agw_persist_cache import CacheConfig, PersistentTokenCache
from tests.support.procs import Method, Workers, run_together


@pytest.fixture
def workers() -> Iterator[Workers]:
    """Spawned workers; whatever a test leaves running is killed and reaped."""
    with Workers("spawn", timeout=120.0) as started:
        yield started


def integrity(db: Path) -> str:
    conn = sqlite3.connect(db)
    try:
        return str(conn.execute("PRAGMA integrity_check").fetchone()[0])
    finally:
        conn.close()


def test_token_persists_across_processes_and_restarts(db_path: Path, workers: Workers) -> None:
    workers.start(w.set_token, [(str(db_path), "scope", "persisted-token")])
    workers.join()
    assert run_together(w.get_token, [(str(db_path), "scope")]) == ["persisted-token"]
    with PersistentTokenCache(db_path) as restarted:
        assert restarted.get_system_token("scope") == "persisted-token"


def test_clear_in_one_process_is_seen_by_another(db_path: Path, workers: Workers) -> None:
    with PersistentTokenCache(db_path) as cache:
        cache.set_system_token("scope", "about-to-go")
        assert cache.get_system_token("scope") == "about-to-go"  # now memoised here too
        workers.start(w.clear_cache, [(str(db_path),)])
        workers.join()
        assert cache.get_system_token("scope") is None


def stampede(target: Callable[..., None], n: int, each: int, db: Path, tmp: Path) -> Any:
    """``n`` workers of ``each`` callers released at once: (all outcomes, fetches)."""
    counter = tmp / "fetches"
    results = run_together(target, [(str(db), str(counter), each)] * n)
    return [o for result in results for o in result], w.fetches(counter)


def test_six_processes_of_sixteen_threads_fetch_once(db_path: Path, tmp_path: Path) -> None:
    tokens, fetches = stampede(w.stampede_threads, 6, 16, db_path, tmp_path)
    assert len(tokens) == 96
    assert len(set(tokens)) == 1
    assert fetches == 1


def test_four_processes_of_fifty_coroutines_fetch_once(db_path: Path, tmp_path: Path) -> None:
    tokens, fetches = stampede(w.stampede_coroutines, 4, 50, db_path, tmp_path)
    assert len(tokens) == 200
    assert len(set(tokens)) == 1
    assert fetches == 1


def test_failed_fetch_backs_off_every_process(db_path: Path, tmp_path: Path) -> None:
    outcomes, fetches = stampede(w.backoff_coroutines, 4, 20, db_path, tmp_path)
    assert len(outcomes) == 80
    assert fetches == 1
    # The one caller that fetched sees the fetch's own error; the others fail fast.
    assert outcomes.count("RuntimeError") == 1
    assert outcomes.count("FetchBackoffError") == 79


def test_killed_lock_holder_frees_the_key(db_path: Path, tmp_path: Path, workers: Workers) -> None:
    [holder] = workers.start(w.hold_in_fetch, [(str(db_path),)])
    assert workers.collect() == ["fetching"]
    assert holder.pid is not None
    os.kill(holder.pid, signal.SIGKILL)
    holder.join(10)
    counter = tmp_path / "fetches"
    # If the dead holder's lock were not freed this would wait the full 20 s and count a timeout.
    with PersistentTokenCache(db_path, config=CacheConfig(lock_timeout_seconds=20)) as cache:
        token = cache.system_token("scope", w.make_fetch(counter, delay=0))
        assert token.startswith("tok-")
        assert cache.stats().lock_timeouts == 0
    assert w.fetches(counter) == 1


def test_lock_timeout_fetches_anyway_and_warns(
    db_path: Path, tmp_path: Path, workers: Workers, caplog: pytest.LogCaptureFixture
) -> None:
    workers.start(w.hold_in_fetch, [(str(db_path),)])
    assert workers.collect() == ["fetching"]
    counter = tmp_path / "fetches"
    with (
        caplog.at_level(logging.WARNING, logger="agw_persist_cache"),
        PersistentTokenCache(db_path, config=CacheConfig(lock_timeout_seconds=0.3)) as cache,
    ):
        token = cache.system_token("scope", w.make_fetch(counter, delay=0))
        assert token.startswith("tok-")
        assert cache.stats().lock_timeouts == 1
    assert w.fetches(counter) == 1
    assert any("fetching anyway" in r.getMessage() for r in caplog.records)


def test_fetch_that_began_before_clear_does_not_write_back(
    db_path: Path, tmp_path: Path, workers: Workers
) -> None:
    go = tmp_path / "go"
    workers.start(w.fetch_across_clear, [(str(db_path), str(go))])
    assert workers.collect() == ["fetching"]
    with PersistentTokenCache(db_path) as cache:
        cache.clear()
        go.touch()
        [result] = workers.collect()
        workers.join()
        assert result == {"token": "fetched-before-clear", "stale": 1}
        assert cache.get_system_token("scope") is None


def test_refresh_ahead_serves_the_old_token_and_refreshes_once(
    db_path: Path, tmp_path: Path
) -> None:
    counter = tmp_path / "fetches"
    with PersistentTokenCache(db_path) as cache:
        # 40 s lifetime, 10 s left before the buffer: inside a 50 % refresh window.
        cache.set_system_token("scope", "old-token", expires_at=time.time() + 40)
    results = run_together(w.refresh_callers, [(str(db_path), str(counter))] * 4)
    # Every caller returned at once with the valid old token (the refresh takes 1 s)...
    assert all(t == "old-token" for r in results for t in r["tokens"][:1])
    # ...and exactly one process on the host fetched the replacement.
    assert w.fetches(counter) == 1
    assert sum(r["refreshes"] for r in results) == 1
    with PersistentTokenCache(db_path) as cache:
        fresh = cache.get_system_token("scope")
    assert fresh is not None and fresh.startswith("tok-")


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_fork_after_use_works_in_child_and_parent(db_path: Path) -> None:
    with PersistentTokenCache(db_path) as cache:
        cache.set_system_token("parent", "from-parent")
        assert cache.get_system_token("parent") == "from-parent"
        pid = os.fork()
        if pid == 0:  # child: the inherited connection must be dropped, not reused
            code = 1
            try:
                ok = cache.get_system_token("parent") == "from-parent"
                cache.set_system_token("child", "from-child")
                code = 0 if ok and cache.get_system_token("child") == "from-child" else 2
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert cache.get_system_token("child") == "from-child"
        cache.set_system_token("parent-again", "still-works")
        assert cache.get_system_token("parent-again") == "still-works"
    assert integrity(db_path) == "ok"


@pytest.mark.parametrize("method", ["spawn", "fork", "forkserver"])
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_every_start_method_shares_tokens(method: Method, db_path: Path) -> None:
    with PersistentTokenCache(db_path) as cache, Workers(method) as workers:
        cache.set_system_token("scope", f"shared-{method}")
        assert cache.get_system_token("scope") == f"shared-{method}"
        reader = workers.start(w.get_token, [(str(db_path), "scope")])
        workers.start(w.set_token, [(str(db_path), "child", f"child-{method}")])
        assert workers.collect(reader) == [f"shared-{method}"]
        workers.join()
        assert cache.get_system_token("child") == f"child-{method}"


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_thirty_two_processes_open_a_new_file_at_once(db_path: Path) -> None:
    with Workers("fork") as workers:
        workers.start(w.open_and_write, [(str(db_path),)] * 32)
        workers.join()
    with PersistentTokenCache(db_path) as cache:
        assert [cache.get_system_token(f"scope-{i}") for i in range(32)] == [
            f"token-{i}" for i in range(32)
        ]
    assert integrity(db_path) == "ok"


def test_kill_during_write_loop_keeps_every_acknowledged_write(
    db_path: Path, tmp_path: Path, workers: Workers
) -> None:
    for run in range(3):
        ack = tmp_path / f"ack-{run}"
        [writer] = workers.start(w.write_loop, [(str(db_path), str(ack), f"run{run}")])
        assert writer.pid is not None
        deadline = time.monotonic() + 60
        while w.fetches(ack) < 50 + 40 * run:
            assert time.monotonic() < deadline and writer.is_alive()
            time.sleep(0.005)
        os.kill(writer.pid, signal.SIGKILL)
        writer.join(10)
        assert integrity(db_path) == "ok"
        acknowledged = [int(x) for x in ack.read_text().split()]
        with PersistentTokenCache(db_path) as cache:
            for i in acknowledged:
                assert cache.get_system_token(f"k{i}") == f"run{run}-{i}"


def test_unclosed_async_cache_does_not_hold_the_interpreter_at_exit(db_path: Path) -> None:
    script = (
        "import asyncio, sys\n"
        "from agw_persist_cache import PersistentTokenCache\n"
        "cache = PersistentTokenCache(sys.argv[1])\n"
        "async def main():\n"
        "    await cache.aset_system_token('scope', 'token')\n"
        "    assert await cache.aget_system_token('scope') == 'token'\n"
        "asyncio.run(main())\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(db_path)], timeout=60, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
