"""Per-key cross-process locks: OFD byte ranges in one file (Linux) or, on the portable path
(macOS, Windows), filelock's lock on striped files. Every behaviour test runs on both."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from _core_support import make_config, warnings_of
from support.procs import Worker, Workers

from agw_persist_cache import PersistentTokenCache
from agw_persist_cache.backends._filelocks import (
    FORCE_ENV,
    KEEPS_LOCK_FILES,
    OFD_SUPPORTED,
    KeyLockFiles,
    use_ofd,
)
from agw_persist_cache.backends.contract import LockResult

A, B = b"\x01" * 32, b"\x02" * 32


@pytest.fixture(params=["ofd", "portable"])
def files(request: pytest.FixtureRequest, tmp_path: Path) -> KeyLockFiles:
    if request.param == "ofd" and not OFD_SUPPORTED:
        pytest.skip("open-file-description locks need Linux")
    directory = tmp_path / "locks"
    directory.mkdir()
    return KeyLockFiles(directory, stripes=64, ofd=request.param == "ofd")


@pytest.fixture
def workers() -> Iterator[Workers]:
    with Workers("fork", timeout=60) as started:
        yield started


def test_a_held_key_is_busy_for_everyone_else_and_free_after_release(files: KeyLockFiles) -> None:
    first, second = files.key_lock(A), files.key_lock(A)
    assert first.acquire(None) is LockResult.HELD
    assert second.acquire(None) is LockResult.BUSY  # other descriptor, same process: excluded
    assert second.acquire(0.0) is LockResult.TIMEOUT
    first.release()
    assert second.acquire(None) is LockResult.HELD
    second.release()


def test_unrelated_keys_never_wait_for_each_other(tmp_path: Path) -> None:
    if not OFD_SUPPORTED:
        pytest.skip("per-key locks need OFD locks; stripes share a lock per stripe")
    files = KeyLockFiles(tmp_path, stripes=1, ofd=True)
    holders = [files.key_lock(bytes([i]) * 32) for i in range(200)]
    assert {h.acquire(None) for h in holders} == {LockResult.HELD}
    for h in holders:
        h.release()
    assert [p.name for p in tmp_path.iterdir()] == ["keys.lock"]  # one file, not one per key


def test_portable_keys_on_different_stripes_never_wait_for_each_other(tmp_path: Path) -> None:
    files = KeyLockFiles(tmp_path, stripes=1024, ofd=False)
    keys = [i.to_bytes(4, "big") * 8 for i in range(300)]  # stripes 0..299 of 1024
    holders = [files.key_lock(key) for key in keys]
    assert {h.acquire(None) for h in holders} == {LockResult.HELD}
    for h in holders:
        h.release()
    # Lock files stay (never unlinked) and are bounded by the stripes, not by the keys.
    kept = 300 if KEEPS_LOCK_FILES else 0  # a marker-file lock (no fcntl) drops its marker
    assert len(list(tmp_path.iterdir())) == kept
    others = [files.key_lock(key + b"other") for key in keys]  # the same 300 stripes
    assert {h.acquire(None) for h in others} == {LockResult.HELD}
    assert len(list(tmp_path.iterdir())) == 300
    for h in others:
        h.release()


def test_stripes_share_a_lock_between_keys_of_one_stripe(tmp_path: Path) -> None:
    files = KeyLockFiles(tmp_path, stripes=1, ofd=False)
    held = files.key_lock(A)
    assert held.acquire(None) is LockResult.HELD
    assert files.key_lock(B).acquire(None) is LockResult.BUSY  # the documented cost of stripes
    held.release()


def test_waiters_wake_together_when_the_holder_lets_go(files: KeyLockFiles) -> None:
    holder = files.key_lock(A)
    assert holder.acquire(None) is LockResult.HELD
    results: list[LockResult] = []
    waiters = [
        threading.Thread(target=lambda: results.append(files.key_lock(A).acquire(30.0)))
        for _ in range(5)
    ]
    for t in waiters:
        t.start()
    time.sleep(0.2)
    assert results == []  # all still waiting for the holder
    holder.release()
    for t in waiters:
        t.join(30)
    # Nobody holds the lock after a wait: each reads what the holder stored, none queues.
    assert results == [LockResult.LANDED] * 5
    assert files.key_lock(A).acquire(None) is LockResult.HELD


async def test_an_async_waiter_does_not_block_the_loop(files: KeyLockFiles) -> None:
    holder = files.key_lock(A)
    assert holder.acquire(None) is LockResult.HELD
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0.01)

    tick = asyncio.create_task(ticker())
    waiter = asyncio.create_task(files.key_lock(A).aacquire(30.0))
    await asyncio.sleep(0.3)
    assert not waiter.done()
    assert ticks >= 10  # the loop kept running while the waiter waited
    holder.release()
    assert await waiter is LockResult.LANDED
    tick.cancel()


async def test_an_async_wait_times_out_and_leaves_nothing_held(files: KeyLockFiles) -> None:
    holder = files.key_lock(A)
    assert holder.acquire(None) is LockResult.HELD
    assert await files.key_lock(A).aacquire(0.2) is LockResult.TIMEOUT
    holder.release()
    # The abandoned waiter thread gets its shared lock now and drops it a moment later.
    again = files.key_lock(A)
    deadline = time.monotonic() + 10
    while again.acquire(None) is not LockResult.HELD:
        assert time.monotonic() < deadline, "a timed-out waiter kept the key locked"
        time.sleep(0.01)
    again.release()


def _hold_until_killed(directory: str, ofd: bool, worker: Worker) -> None:
    lock = KeyLockFiles(Path(directory), stripes=64, ofd=ofd).key_lock(A)
    assert lock.acquire(None) is LockResult.HELD
    worker.report("held")
    time.sleep(120)


def test_a_killed_holder_frees_the_key_at_once(files: KeyLockFiles, workers: Workers) -> None:
    (child,) = workers.start(_hold_until_killed, [(str(files.lock_dir), files.ofd)])
    assert workers.collect() == ["held"]
    assert files.key_lock(A).acquire(None) is LockResult.BUSY
    waiting: list[LockResult] = []
    lock = files.key_lock(A)
    waiter = threading.Thread(target=lambda: waiting.append(lock.acquire(60.0)))
    waiter.start()
    os.kill(child.pid or 0, signal.SIGKILL)
    child.join(30)  # reaped: a lock with no kernel state (no fcntl) checks the holder's pid
    waiter.join(60)
    # Freed by the kernel at the holder's death, not by the 60 s timeout.
    assert waiting in ([LockResult.LANDED], [LockResult.HELD])
    lock.release()
    assert files.key_lock(A).acquire(None) is LockResult.HELD


def test_a_lock_file_that_cannot_be_opened_is_an_error_not_a_timeout(files: KeyLockFiles) -> None:
    files.path(A).mkdir()  # a directory where the lock file should be
    lock = files.key_lock(A)
    assert lock.acquire(5.0) is LockResult.ERROR
    assert files.key_lock(A).acquire(None) is LockResult.ERROR
    error = getattr(lock, "error", None)
    assert error is not None and str(files.path(A)) in error and "EISDIR" in error


def test_the_environment_forces_the_portable_path(
    db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(FORCE_ENV, "portable")
    assert not use_ofd()
    cache = PersistentTokenCache(db_path, config=make_config(lock_stripes=1))
    assert cache.system_token("scope", lambda: "token") == "token"
    kept = ["000.lock", "init.lock"] if KEEPS_LOCK_FILES else []
    assert sorted(p.name for p in cache.lock_dir.iterdir()) == kept
    cache.close()
    monkeypatch.setenv(FORCE_ENV, "ofd")
    assert use_ofd() is OFD_SUPPORTED
    monkeypatch.setenv(FORCE_ENV, "flock")
    with pytest.raises(ValueError, match=FORCE_ENV):
        use_ofd()


def test_get_or_fetch_counts_a_lock_io_failure_apart_from_timeouts(
    db_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cache = PersistentTokenCache(db_path, config=make_config(lock_stripes=1))
    cache.get_system_token("warm-up")  # creates the directory and the lock directory
    (cache.lock_dir / "keys.lock").mkdir()
    (cache.lock_dir / "000.lock").mkdir()
    fetched: list[int] = []
    assert cache.system_token("scope", lambda: f"token-{fetched.append(1) or len(fetched)}")
    stats = cache.stats()
    assert (stats.lock_errors, stats.lock_timeouts, stats.fetches) == (1, 0, 1)
    (warning,) = warnings_of(caplog)
    assert "lock" in warning.getMessage() and "timeout" not in warning.getMessage()
    assert cache.system_token("scope", lambda: "never") == "token-1"  # stored all the same
    cache.close()
