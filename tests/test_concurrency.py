"""Many processes, threads and coroutines on one cache file: real processes, counted fetches."""

from __future__ import annotations

import logging
import multiprocessing
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

SPAWN = multiprocessing.get_context("spawn")
FORK = multiprocessing.get_context("fork")


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    out = tmp_path / "out"
    out.mkdir()
    return out


@pytest.fixture
def procs() -> Iterator[list[Any]]:
    """Started processes; whatever a test leaves running is killed and reaped."""
    started: list[Any] = []
    yield started
    for p in started:
        if p.is_alive():
            p.kill()
        p.join(10)


def start(procs: list[Any], target: Callable[..., None], *args: Any, ctx: Any = SPAWN) -> Any:
    p = ctx.Process(target=target, args=args, daemon=True)
    p.start()
    procs.append(p)
    return p


def join_ok(procs: list[Any], timeout: float = 120.0) -> None:
    for p in procs:
        p.join(timeout)
        assert p.exitcode == 0, f"worker {p.pid} exited with {p.exitcode}"


def wait_for(path: Path, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path.name} never appeared"
        time.sleep(0.01)


def integrity(db: Path) -> str:
    conn = sqlite3.connect(db)
    try:
        return str(conn.execute("PRAGMA integrity_check").fetchone()[0])
    finally:
        conn.close()


def test_token_persists_across_processes_and_restarts(
    db_path: Path, run_dir: Path, procs: list[Any]
) -> None:
    start(procs, w.set_token, str(db_path), "scope", "persisted-token")
    join_ok(procs)
    start(procs, w.get_token, str(db_path), "scope", str(run_dir))
    join_ok(procs)
    assert w.read_results(run_dir) == ["persisted-token"]
    with PersistentTokenCache(db_path) as restarted:
        assert restarted.get_system_token("scope") == "persisted-token"


def test_clear_in_one_process_is_seen_by_another(db_path: Path, procs: list[Any]) -> None:
    with PersistentTokenCache(db_path) as cache:
        cache.set_system_token("scope", "about-to-go")
        assert cache.get_system_token("scope") == "about-to-go"  # now memoised here too
        start(procs, w.clear_cache, str(db_path))
        join_ok(procs)
        assert cache.get_system_token("scope") is None


def run_together(
    procs: list[Any], target: Callable[..., None], n: int, each: int, db: Path, tmp: Path
) -> tuple[list[Any], int]:
    """``n`` spawned workers of ``each`` callers released at once: (all outcomes, fetches)."""
    counter, out = tmp / "fetches", tmp / "out"
    barrier = SPAWN.Barrier(n)
    for _ in range(n):
        start(procs, target, str(db), str(counter), str(out), each, barrier)
    join_ok(procs)
    return [o for result in w.read_results(out) for o in result], w.fetches(counter)


def test_six_processes_of_sixteen_threads_fetch_once(
    db_path: Path, tmp_path: Path, run_dir: Path, procs: list[Any]
) -> None:
    tokens, fetches = run_together(procs, w.stampede_threads, 6, 16, db_path, tmp_path)
    assert len(tokens) == 96
    assert len(set(tokens)) == 1
    assert fetches == 1


def test_four_processes_of_fifty_coroutines_fetch_once(
    db_path: Path, tmp_path: Path, run_dir: Path, procs: list[Any]
) -> None:
    tokens, fetches = run_together(procs, w.stampede_coroutines, 4, 50, db_path, tmp_path)
    assert len(tokens) == 200
    assert len(set(tokens)) == 1
    assert fetches == 1


def test_failed_fetch_backs_off_every_process(
    db_path: Path, tmp_path: Path, run_dir: Path, procs: list[Any]
) -> None:
    outcomes, fetches = run_together(procs, w.backoff_coroutines, 4, 20, db_path, tmp_path)
    assert len(outcomes) == 80
    assert fetches == 1
    # The one caller that fetched sees the fetch's own error; the others fail fast.
    assert outcomes.count("RuntimeError") == 1
    assert outcomes.count("FetchBackoffError") == 79


def test_killed_lock_holder_frees_the_key(db_path: Path, tmp_path: Path, procs: list[Any]) -> None:
    started = tmp_path / "started"
    holder = start(procs, w.hold_in_fetch, str(db_path), str(started))
    wait_for(started)
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
    db_path: Path, tmp_path: Path, procs: list[Any], caplog: pytest.LogCaptureFixture
) -> None:
    started = tmp_path / "started"
    start(procs, w.hold_in_fetch, str(db_path), str(started))
    wait_for(started)
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
    db_path: Path, tmp_path: Path, run_dir: Path, procs: list[Any]
) -> None:
    started, go = tmp_path / "started", tmp_path / "go"
    start(procs, w.fetch_across_clear, str(db_path), str(started), str(go), str(run_dir))
    wait_for(started)
    with PersistentTokenCache(db_path) as cache:
        cache.clear()
        go.touch()
        join_ok(procs)
        [result] = w.read_results(run_dir)
        assert result == {"token": "fetched-before-clear", "stale": 1}
        assert cache.get_system_token("scope") is None


def test_refresh_ahead_serves_the_old_token_and_refreshes_once(
    db_path: Path, tmp_path: Path, run_dir: Path, procs: list[Any]
) -> None:
    counter = tmp_path / "fetches"
    with PersistentTokenCache(db_path) as cache:
        # 40 s lifetime, 10 s left before the buffer: inside a 50 % refresh window.
        cache.set_system_token("scope", "old-token", expires_at=time.time() + 40)
    barrier = SPAWN.Barrier(4)
    for _ in range(4):
        start(procs, w.refresh_callers, str(db_path), str(counter), str(run_dir), barrier)
    join_ok(procs)
    results = w.read_results(run_dir)
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
def test_every_start_method_shares_tokens(
    method: str, db_path: Path, run_dir: Path, procs: list[Any]
) -> None:
    ctx = multiprocessing.get_context(method)
    with PersistentTokenCache(db_path) as cache:
        cache.set_system_token("scope", f"shared-{method}")
        assert cache.get_system_token("scope") == f"shared-{method}"
        start(procs, w.get_token, str(db_path), "scope", str(run_dir), ctx=ctx)
        start(procs, w.set_token, str(db_path), "child", f"child-{method}", ctx=ctx)
        join_ok(procs)
        assert cache.get_system_token("child") == f"child-{method}"
    assert w.read_results(run_dir) == [f"shared-{method}"]


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_thirty_two_processes_open_a_new_file_at_once(db_path: Path, procs: list[Any]) -> None:
    barrier = FORK.Barrier(32)
    for i in range(32):
        start(procs, w.open_and_write, str(db_path), barrier, i, ctx=FORK)
    join_ok(procs)
    with PersistentTokenCache(db_path) as cache:
        assert [cache.get_system_token(f"scope-{i}") for i in range(32)] == [
            f"token-{i}" for i in range(32)
        ]
    assert integrity(db_path) == "ok"


def test_kill_during_write_loop_keeps_every_acknowledged_write(
    db_path: Path, tmp_path: Path, procs: list[Any]
) -> None:
    for run in range(3):
        ack = tmp_path / f"ack-{run}"
        writer = start(procs, w.write_loop, str(db_path), str(ack), f"run{run}")
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
