"""Only what is ours, on every path: every kind of path the cache did not make, through every
entry point (the library with ``AGW_CACHE_KEY`` and with a key file, sync and async;
``stats``, ``stats --json``, ``list``, ``doctor``, ``clear``, ``prune``, ``rotate-key``),
changes nothing on disk: the directory's listing and every entry's bytes, inode, mode and mtime
stay as they were. The library still hands out the token it fetched; every command exits
non-zero within 5 s.

The commands run in this process (``agw_persist_cache.cli.main``): a FIFO that something
opened would hang the test (the timeout below), not a subprocess.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import sqlite3
from collections.abc import Callable
from pathlib import Path

import pytest
from _core_support import make_config, new_key
from _paths_support import agw_cache, photograph

from agw_persist_cache import PersistentTokenCache

pytestmark = pytest.mark.timeout(60)

CLI_SECONDS = 5.0


def _text_0600(path: Path) -> None:  # issue 19 defect 1: AGW_CACHE_PATH=$PWD/.env
    path.write_text("API_TOKEN=do-not-touch\n")
    path.chmod(0o600)


def _cache_0644(path: Path) -> None:  # a real cache of ours, but others may read it
    with PersistentTokenCache(path, config=make_config()) as cache:
        cache.set_system_token("scope", "token")
    path.chmod(0o644)


def _foreign_sqlite(path: Path) -> None:
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE orders (id INTEGER PRIMARY KEY, item TEXT)")
    conn.commit()
    conn.close()
    path.chmod(0o600)


def _other_application(path: Path) -> None:
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA application_id = 42")
    conn.execute("CREATE TABLE tokens (k BLOB)")  # even with a table name of ours
    conn.commit()
    conn.close()
    path.chmod(0o600)


def _directory(path: Path) -> None:
    path.mkdir(mode=0o700)
    (path / "inside").write_text("x")


def _symlink(path: Path) -> None:  # to a cache of ours: still never followed
    real = path.parent / "real" / "tokens.db"
    with PersistentTokenCache(real, config=make_config()) as cache:
        cache.set_system_token("scope", "token")
    path.symlink_to(real)


def _fifo(path: Path) -> None:
    os.mkfifo(path, 0o600)


def _socket(path: Path) -> None:
    with socket.socket(socket.AF_UNIX) as server:  # the inode stays after the close
        server.bind(str(path))


def _empty_0644(path: Path) -> None:
    path.write_bytes(b"")
    path.chmod(0o644)


def _garbage_beside_our_locks(path: Path) -> None:  # once judged "ours, lost its header"
    path.write_bytes(os.urandom(8192))
    path.chmod(0o600)
    path.with_name(path.name + ".locks").mkdir(mode=0o700)


KINDS: dict[str, Callable[[Path], None]] = {
    "text-0600": _text_0600,
    "cache-0644": _cache_0644,
    "foreign-sqlite": _foreign_sqlite,
    "other-application": _other_application,
    "directory": _directory,
    "symlink": _symlink,
    "fifo": _fifo,
    "socket": _socket,
    "empty-0644": _empty_0644,
    "garbage-beside-our-locks": _garbage_beside_our_locks,
    "dev-null": lambda path: None,
}
ENTRY_POINTS = [
    "library-env-key",
    "library-key-file",
    "library-async-key-file",
    "stats",
    "stats-json",
    "list",
    "doctor",
    "clear",
    "prune",
    "rotate-key",
]


def _fetch_counted(calls: list[int]) -> Callable[[], dict[str, object]]:
    def fetch() -> dict[str, object]:
        calls.append(1)
        return {"access_token": "fetched", "expires_in": 3600}

    return fetch


def _library(path: Path) -> None:
    calls: list[int] = []
    with PersistentTokenCache(path) as cache:
        assert cache.system_token("scope", _fetch_counted(calls)) == "fetched"
        assert calls == [1]
        assert cache.set_system_token("other", "t") is False
        assert cache.stats().disabled_reason  # it says why it bypasses the store


def _library_async(path: Path) -> None:
    async def afetch() -> dict[str, object]:
        return {"access_token": "fetched", "expires_in": 3600}

    async def main() -> None:
        cache = PersistentTokenCache(path)
        try:
            assert await cache.asystem_token("scope", afetch) == "fetched"
            assert await cache.aset_system_token("other", "t") is False
            assert (await cache.astats()).disabled_reason
        finally:
            await cache.aclose()

    asyncio.run(main())


def _command(path: Path, entry: str) -> None:
    args = {"stats-json": ("stats", "--json")}.get(entry, (entry,))
    ran = agw_cache("--path", str(path), *args)
    assert ran.code != 0, ran.text
    assert ran.seconds < CLI_SECONDS
    assert "Traceback" not in ran.text
    if entry == "stats":
        assert "DISABLED" in ran.out
    if entry == "stats-json":
        assert json.loads(ran.out)["disabled_reason"]
    if entry == "doctor":
        assert "FAIL" in ran.out and "all checks passed" not in ran.out


@pytest.mark.parametrize("entry", ENTRY_POINTS)
@pytest.mark.parametrize("kind", list(KINDS))
def test_a_path_that_is_not_ours_changes_nothing_on_disk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str, entry: str
) -> None:
    if kind == "dev-null":
        if os.geteuid() != 0:
            pytest.skip("/dev/null as the cache path is the root-only case (CI runs as root)")
        path, root = Path("/dev/null"), tmp_path
    else:
        root = tmp_path / "home"
        root.mkdir(mode=0o700)
        path = root / "X"
        KINDS[kind](path)
    devnull_before = os.lstat("/dev/null")
    before = photograph(root)
    new = new_key()
    if not entry.endswith("key-file"):
        monkeypatch.setenv("AGW_CACHE_KEY", f"{new},{new_key()}")
    monkeypatch.setenv("AGW_CACHE_NEW_KEY", new)  # rotate-key gets past its own checks
    if entry == "library-async-key-file":
        _library_async(path)
    elif entry.startswith("library"):
        _library(path)
    else:
        _command(path, entry)
    assert photograph(root) == before
    after = os.lstat("/dev/null")
    assert (after.st_ino, after.st_mode, after.st_rdev) == (
        devnull_before.st_ino,
        devnull_before.st_mode,
        devnull_before.st_rdev,
    )
    assert not [p for p in os.listdir("/dev") if p.startswith("null") and p != "null"]


@pytest.mark.parametrize(
    "args",
    [
        ("stats",),
        ("stats", "--json"),
        ("list",),
        ("doctor",),
        ("clear",),
        ("prune",),
        ("rotate-key",),
    ],
)
def test_a_typo_path_makes_every_command_exit_non_zero_and_creates_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, args: tuple[str, ...]
) -> None:
    new = new_key()
    monkeypatch.setenv("AGW_CACHE_KEY", new)
    monkeypatch.setenv("AGW_CACHE_NEW_KEY", new)
    path = tmp_path / "typo" / "tokens.db"
    ran = agw_cache("--path", str(path), *args)
    assert ran.code != 0
    assert f"no cache at {path}" in ran.text
    assert "cleared" not in ran.text and "pruned" not in ran.text
    assert list(tmp_path.iterdir()) == []


def test_a_users_env_file_keeps_its_name_and_gets_no_neighbours(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Issue 19 defect 1, as reported: AGW_CACHE_PATH=$PWD/.env, no AGW_CACHE_KEY.
    monkeypatch.chdir(tmp_path)
    env = tmp_path / ".env"
    _text_0600(env)
    monkeypatch.setenv("AGW_CACHE_PATH", ".env")
    calls: list[int] = []
    with PersistentTokenCache() as cache:
        for _ in range(3):
            assert cache.system_token("scope", _fetch_counted(calls)) == "fetched"
        assert "not an SQLite file this cache made" in str(cache.stats().disabled_reason)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".env"]
    assert env.read_text() == "API_TOKEN=do-not-touch\n"
