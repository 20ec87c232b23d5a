"""The API boundary: bad arguments raise CacheUsageError before anything is locked or fetched;
the async API keeps file work off the event loop's thread; the async twins of the rest."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from pathlib import Path
from typing import Any

import pytest
from _core_support import Counting, make_config, new_key

import agw_persist_cache._crypto as crypto_module
import agw_persist_cache.backends.sqlite as sqlite_module
from agw_persist_cache import CacheConfig, CacheError, CacheUsageError, PersistentTokenCache

SECRET = "eyJhbGciOiJub25lIn0.c2VjcmV0LXVzZXI.sig"


@pytest.mark.parametrize(
    ("kind", "scope", "user", "named"),
    [
        ("system", 42, None, "scope_key"),
        ("system", "s", SECRET, "user_jwt"),
        ("user", "s", None, "user_jwt"),
        ("user", "s", "", "user_jwt"),
        ("user", "s", " \t\n ", "user_jwt"),
        ("user", "s", b"jwt", "user_jwt"),
        ("admin", "s", None, "kind"),
        ("system", "x" * 9000, None, "scope_key"),
        ("user", "s", "j" * 70_000, "user_jwt"),
    ],
)
def test_bad_arguments_raise_the_usage_error_before_any_lock_or_fetch(
    db_path: Path, kind: Any, scope: Any, user: Any, named: str
) -> None:
    cache = PersistentTokenCache(db_path, config=make_config())
    fetch = Counting()
    with pytest.raises(CacheUsageError) as info:
        cache.fetch_entry(kind, scope, fetch, user_jwt=user)
    assert isinstance(info.value, CacheError | ValueError | TypeError)
    assert named in str(info.value)
    assert SECRET not in str(info.value) and "xxxx" not in str(info.value)
    assert fetch.calls == 0
    assert not cache.lock_dir.exists()  # nothing was opened, created or locked
    with pytest.raises(CacheUsageError):
        cache.get_entry(kind, scope, user_jwt=user)
    cache.close()


async def test_any_string_is_a_key_even_nul_and_lone_surrogates(db_path: Path) -> None:
    cache = PersistentTokenCache(db_path, config=make_config())
    odd = ["a\x00b", "\ud800", "é\udfff", "tab\there"]
    for i, text in enumerate(odd):
        cache.set_user_token(text, text, f"token-{i}")
    assert [cache.get_user_token(t, t) for t in odd] == [f"token-{i}" for i in range(len(odd))]
    assert await cache.asystem_token("\ud800", lambda: _token("surrogate")) == "surrogate"
    assert cache.get_system_token("\ud800") == "surrogate"
    await cache.aclose()


async def _token(value: str) -> str:
    return value


async def test_async_twins_of_stats_list_and_reseal(db_path: Path) -> None:
    old, new = new_key(), new_key()
    cache = PersistentTokenCache(db_path, config=make_config(keys=[old]))
    await cache.aset_system_token("a", "token-a")
    await cache.aset_user_token("jwt", "b", "token-b")
    stats = await cache.astats()
    assert (stats.entries_system, stats.entries_user) == (1, 1)
    assert stats == cache.stats()
    entries = await cache.alist_entries()
    assert sorted(e.kind for e in entries) == ["system", "user"]
    assert entries == cache.list_entries()
    await cache.aclose()
    rotated = PersistentTokenCache(db_path, config=make_config(keys=[new, old]))
    assert await rotated.areseal() == 2
    assert {e.key_id for e in await rotated.alist_entries()} == {rotated.key_ids[0]}
    only_new = PersistentTokenCache(db_path, config=make_config(keys=[new]))
    assert only_new.get_user_token("jwt", "b") == "token-b"
    await rotated.aclose()
    only_new.close()


async def test_the_async_api_opens_migrates_and_makes_the_key_file_off_the_loop(
    db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    loop_thread = threading.get_ident()
    on_loop: list[str] = []
    connect, make_key = sqlite3.connect, crypto_module.load_or_create_key_file

    def spy_connect(*args: Any, **kwargs: Any) -> sqlite3.Connection:
        if threading.get_ident() == loop_thread:
            on_loop.append("sqlite3.connect")
        return connect(*args, **kwargs)

    def spy_key(path: Path) -> bytes:
        if threading.get_ident() == loop_thread:
            on_loop.append("key file")
        return make_key(path)

    monkeypatch.setattr(sqlite_module.sqlite3, "connect", spy_connect)
    monkeypatch.setattr("agw_persist_cache._shelf.load_or_create_key_file", spy_key)
    cache = PersistentTokenCache(db_path, config=CacheConfig())  # a key file, made on first use
    assert await cache.aget_system_token("first-hit-of-a-new-file") is None
    assert await cache.aset_system_token("s", "token") is True
    assert await cache.asystem_token("s", lambda: _token("never")) == "token"
    assert db_path.exists() and cache.key_file is not None and cache.key_file.exists()
    assert on_loop == []
    await cache.aclose()


async def test_a_hit_on_the_loop_takes_no_thread_hop(db_path: Path) -> None:
    cache = PersistentTokenCache(db_path, config=make_config())
    await cache.aset_system_token("s", "token")
    assert await cache.aget_system_token("s") == "token"  # warm: a pooled connection exists
    hops: list[Any] = []
    loop = asyncio.get_running_loop()
    original = loop.run_in_executor

    def counting(*args: Any) -> Any:
        hops.append(args)
        return original(*args)

    loop.run_in_executor = counting  # type: ignore[method-assign]  # a spy, restored below
    try:
        for _ in range(20):
            assert await cache.aget_system_token("s") == "token"
    finally:
        loop.run_in_executor = original  # type: ignore[method-assign]
    assert hops == []
    await cache.aclose()


async def test_a_token_shorter_lived_than_the_buffer_is_served_once_not_stored(
    db_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cache = PersistentTokenCache(db_path, config=make_config(token_expiry_buffer_seconds=60))
    short = Counting(expires_in=30)  # valid for 30 s, but hits need 60 s of life left
    assert cache.system_token("scope", short) == "fetched-1"  # the caller that fetched it
    assert cache.get_system_token("scope") is None  # never stored: it could not be served
    assert await cache.asystem_token("scope", lambda: _token("fetched-2")) == "fetched-2"
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "token_expiry_buffer_seconds" in warnings[0]
    await cache.aclose()
