"""The storage contract, one suite over both backends (SQLite on a temporary file, Redis on
the test server) and both drivers (``execute`` and ``aexecute``): every operation means the
same thing whichever store is behind it."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from support.redis_server import (  # noqa: F401  # fixtures
    RedisServer,
    redis_server_fixture,
    redis_url_fixture,
)

from agw_persist_cache import CacheConfig
from agw_persist_cache._log import Warnings
from agw_persist_cache.backends._redis_lua import KEY_CHECK_SAMPLE
from agw_persist_cache.backends.contract import (
    ABSENT,
    Backend,
    Backoff,
    Clear,
    Delete,
    Fence,
    GetBackoff,
    GetFacts,
    GetKeyChecks,
    KeyChecks,
    ListRows,
    LockResult,
    Op,
    Prune,
    Read,
    Replace,
    RowsNotUnder,
    SealedRow,
    SetBackoff,
    Snapshot,
    Sweep,
    Touch,
    Write,
)
from agw_persist_cache.backends.sqlite import SqliteBackend

NOW = time.time()


@pytest.fixture(autouse=True)
def _now() -> None:
    """Times in these tests are relative to the test's start (Redis expires keys for real)."""
    global NOW
    NOW = time.time()


def row(
    tag: str,
    *,
    kind: str = "system",
    gen: int = 0,
    expires: float | None = None,
    last_used: float | None = None,
    kid: str = "kid-a",
) -> SealedRow:
    digest = tag.encode().ljust(32, b"\0")
    expires = NOW + 3600 if expires is None else expires
    last_used = NOW if last_used is None else last_used
    return SealedRow(
        digest, kind, kid, os.urandom(12), b"ct-" + os.urandom(40), expires, gen, last_used, NOW
    )


def d(tag: str) -> bytes:
    return tag.encode().ljust(32, b"\0")


class Store:
    """A backend and one of its drivers."""

    def __init__(self, backend: Backend, mode: str) -> None:
        self.backend = backend
        self.mode = mode

    async def __call__(self, op: Op[Any]) -> Any:
        if self.mode == "async":
            return await self.backend.aexecute(op)
        return self.backend.execute(op)

    async def acquire(self, digest: bytes, wait: float | None) -> tuple[LockResult, Any]:
        lock = self.backend.key_lock(digest)
        if self.mode == "async":
            return await lock.aacquire(wait), lock
        return await asyncio.to_thread(lock.acquire, wait), lock


@pytest.fixture(params=["sqlite-sync", "sqlite-async", "redis-sync", "redis-async"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    kind, mode = request.param.split("-")
    config = CacheConfig(max_system_token_cache_size=1000, max_user_token_cache_size=1000)
    backend: Backend
    if kind == "sqlite":
        sqlite = SqliteBackend(tmp_path / "c" / "tokens.db", config, Warnings())
        sqlite.prepare_dirs()  # the cache does this before it takes a lock
        backend = sqlite
    else:
        from agw_persist_cache.backends import _redis_lock
        from agw_persist_cache.backends.redis import RedisBackend

        # No polling within these tests: a waiter that gets the key soon was woken (pub/sub).
        request.getfixturevalue("monkeypatch").setattr(_redis_lock, "POLL_SECONDS", 30.0)
        url = request.getfixturevalue("redis_url")
        backend = RedisBackend(url, config, Warnings())
    yield Store(backend, mode)
    await backend.aclose()


async def test_an_empty_store_reads_nothing_at_generation_zero(store: Store) -> None:
    assert await store(Read((d("a"),))) == Snapshot(None, 0)


async def test_a_written_row_reads_back_unchanged(store: Store) -> None:
    r = row("a", kind="user")
    assert await store(Write(r)) is True
    assert await store(Read((r.digest,))) == Snapshot(r, 0)


async def test_write_refuses_when_the_generation_moved(store: Store) -> None:
    assert await store(Clear()) == 1
    assert await store(Write(row("a", gen=0))) is False
    assert await store(Read((d("a"),))) == Snapshot(None, 1)
    assert await store(Write(row("a", gen=1))) is True


async def test_a_fenced_write_keeps_a_row_written_since_the_read(store: Store) -> None:
    first = row("a")
    assert await store(Write(first, fence=ABSENT)) is True  # none was there
    assert await store(Write(row("a"), fence=ABSENT)) is False  # one is now: kept
    second = row("a")
    assert await store(Write(second, fence=first.nonce)) is True  # the one read: replaced
    assert await store(Write(row("a"), fence=first.nonce)) is False  # a newer one: kept
    assert (await store(Read((d("a"),)))).row == second
    await store(Delete((d("a"),)))
    assert await store(Write(row("a"), fence=second.nonce)) is True  # gone since: written


async def test_clear_then_sweep_leaves_no_row_and_fence_never_lowers(store: Store) -> None:
    for i in range(5):
        await store(Write(row(f"r{i}")))
    assert await store(Clear()) == 1
    steps = 1
    while await store(Sweep(limit=2)):
        steps += 1
    assert steps <= 3
    assert await store(Write(row("r0", gen=1))) is True  # written again after the clear
    assert await store(Sweep()) == 0
    assert [r.digest for r in await store(ListRows())] == [d("r0")]
    assert await store(Fence(7)) == 7
    assert await store(Fence(3)) == 7
    assert (await store(Read((d("r0"),)))).generation == 7


async def test_read_returns_the_first_digest_that_has_a_row(store: Store) -> None:
    old = row("old")
    await store(Write(old))
    assert (await store(Read((d("new"), d("old"))))).row == old
    new = row("new")
    await store(Write(new))
    assert (await store(Read((d("new"), d("old"))))).row == new


async def test_write_drops_the_digests_it_replaces(store: Store) -> None:
    await store(Write(row("old")))
    await store(Write(row("new"), replaces=(d("old"),)))
    assert (await store(Read((d("old"),)))).row is None
    assert [r.digest for r in await store(ListRows())] == [d("new")]


async def test_delete_with_a_nonce_removes_only_the_row_that_holds_it(store: Store) -> None:
    r = row("a")
    await store(Write(r))
    assert await store(Delete((r.digest,), b"x" * 12)) == 0  # replaced since: stays
    assert (await store(Read((r.digest,)))).row == r
    assert await store(Delete((r.digest,), r.nonce)) == 1
    assert (await store(Read((r.digest,)))).row is None


async def test_delete_without_a_nonce_removes_every_digest(store: Store) -> None:
    await store(Write(row("a")))
    await store(Write(row("b")))
    assert await store(Delete((d("a"), d("b"), d("c")))) == 2
    assert await store(ListRows()) == []


async def test_clear_returns_the_new_generation_and_drops_rows_and_backoff(store: Store) -> None:
    await store(Write(row("a")))
    await store(SetBackoff(d("a"), Backoff(NOW + 60, "RuntimeError", 503)))
    assert await store(Clear()) == 1
    assert await store(Read((d("a"),))) == Snapshot(None, 1)
    assert await store(GetBackoff(d("a"))) is None
    assert await store(ListRows()) == []
    facts = await store(GetFacts(NOW))
    assert (facts.entries_system, facts.entries_user, facts.key_ids_in_use) == (0, 0, ())
    assert await store(Clear()) == 2


async def test_key_checks_say_whether_rows_exist_and_which_keys_wrote_them(store: Store) -> None:
    assert await store(GetKeyChecks()) == KeyChecks(False, (), ())
    await store(Write(row("a", kid="kid-a"), key_check=b"check-a"))
    found = await store(GetKeyChecks())
    if isinstance(store.backend, SqliteBackend):  # keeps the check value of each key
        assert found == KeyChecks(True, (("kid-a", b"check-a"),), ())
    else:  # keeps none: the key ids of the newest rows of each kind decide, not a scan
        assert found == KeyChecks(True, (), ("kid-a",))
        for i in range(KEY_CHECK_SAMPLE):  # newer rows of each kind, under another key
            await store(Write(row(f"s{i}", kid="kid-b", last_used=NOW + 1 + i)))
            await store(Write(row(f"u{i}", kind="user", kid="kid-b", last_used=NOW + 1 + i)))
        assert await store(GetKeyChecks()) == KeyChecks(True, (), ("kid-b",))


async def test_prune_drops_expired_rows_then_the_lru_surplus_per_kind(store: Store) -> None:
    await store(Write(row("soon", expires=NOW + 50, last_used=NOW + 9)))
    for i in range(3):
        await store(Write(row(f"s{i}", last_used=NOW + i)))
    for i in range(2):
        await store(Write(row(f"u{i}", kind="user", last_used=NOW + i)))
    removed = await store(Prune(NOW + 100, {"system": 2, "user": 1}))
    assert removed == 3  # "soon" expired, s0 and u0 least recently used
    left = {r.digest for r in await store(ListRows())}
    assert left == {d("s1"), d("s2"), d("u1")}


async def test_touch_records_a_use_for_the_lru_order(store: Store) -> None:
    await store(Write(row("a", last_used=NOW)))
    await store(Write(row("b", last_used=NOW + 1)))
    await store(Touch(d("a"), NOW + 5))
    assert (await store(Read((d("a"),)))).row.last_used == NOW + 5
    assert [r.digest for r in await store(ListRows())] == [d("a"), d("b")]
    await store(Prune(NOW, {"system": 1, "user": 1}))
    assert [r.digest for r in await store(ListRows())] == [d("a")]
    await store(Touch(d("gone"), NOW))  # best effort: a missing row is no error


def same_mark(found: Backoff | None, mark: Backoff) -> bool:
    """Redis answers ``until`` on this host's clock from the server's (within a second)."""
    return (
        found is not None
        and found._replace(until=mark.until) == mark
        and (abs(found.until - mark.until) < 1.0)
    )


async def test_backoff_marks_are_kept_per_key(store: Store) -> None:
    mark = Backoff(time.time() + 60, "TokenFetchError", 503)
    await store(SetBackoff(d("a"), mark))
    assert same_mark(await store(GetBackoff(d("a"))), mark)
    assert await store(GetBackoff(d("b"))) is None
    other = Backoff(time.time() + 60, "OSError", None)
    await store(SetBackoff(d("b"), other))
    assert same_mark(await store(GetBackoff(d("b"))), other)


async def test_facts_count_rows_by_kind_expiry_and_key_ids(store: Store) -> None:
    await store(Write(row("a", expires=NOW + 10)))
    await store(Write(row("b", expires=NOW + 500, kid="kid-b")))
    await store(Write(row("c", kind="user", expires=NOW + 900)))
    facts = await store(GetFacts(NOW + 100))
    assert (facts.entries_system, facts.entries_user, facts.entries_expired) == (2, 1, 1)
    assert (facts.oldest_expiry, facts.newest_expiry) == (NOW + 10, NOW + 900)
    assert facts.key_ids_in_use == ("kid-a", "kid-b")
    assert facts.schema_version is not None


async def test_list_rows_gives_metadata_most_recently_used_first_per_kind(store: Store) -> None:
    await store(Write(row("u", kind="user", last_used=NOW + 3)))
    await store(Write(row("s0", last_used=NOW)))
    await store(Write(row("s1", last_used=NOW + 1)))
    rows = await store(ListRows())
    assert [(r.kind, r.digest) for r in rows] == [
        ("system", d("s1")),
        ("system", d("s0")),
        ("user", d("u")),
    ]
    assert rows[0].kid == "kid-a"
    assert rows[0].expires_at == NOW + 3600
    pages = [await store(ListRows(start, 2)) for start in (0, 2, 4)]
    assert [[r.digest for r in page] for page in pages] == [[d("s1"), d("s0")], [d("u")], []]
    assert [r.digest for r in await store(ListRows(1, 1))] == [d("s0")]


async def test_rows_not_under_looks_at_a_window_of_positions(store: Store) -> None:
    for i, kid in enumerate(("kid-a", "kid-b", "kid-b")):
        await store(Write(row(f"r{i}", kid=kid, last_used=NOW + i)))
    windows = [await store(RowsNotUnder("kid-a", 10, (), start, 2)) for start in (0, 2, 4)]
    assert [[r.digest for r in w] for w in windows] == [[d("r1")], [d("r2")], []]


async def test_rows_not_under_and_replace_reseal_a_row(store: Store) -> None:
    old = row("old", kid="kid-old")
    await store(Write(old))
    await store(Write(row("keep", kid="kid-new")))
    found = await store(RowsNotUnder("kid-new", 10))
    assert found == [old]
    assert await store(RowsNotUnder("kid-new", 10, skip=(old.digest,))) == []
    new = old._replace(digest=d("resealed"), kid="kid-new")
    assert await store(Replace(old.digest, new)) is True
    assert (await store(Read((old.digest,)))).row is None
    assert (await store(Read((new.digest,)))).row == new
    assert await store(RowsNotUnder("kid-new", 10)) == []
    taken = row("taken", kid="kid-new")
    await store(Write(taken))
    assert await store(Replace(d("resealed"), taken._replace(ct=b"other"))) is False
    assert (await store(Read((taken.digest,)))).row == taken


async def take(store: Store, digest: bytes, wait: float) -> tuple[LockResult, Any]:
    """Acquire as a flight does: after LANDED (the holder let go), try again."""
    deadline = time.monotonic() + wait
    while True:
        result, lock = await store.acquire(digest, max(0.0, deadline - time.monotonic()))
        if result is not LockResult.LANDED:
            return result, lock


async def test_key_lock_is_exclusive_per_key_and_tries_without_waiting(store: Store) -> None:
    held, first = await store.acquire(d("k"), 1.0)
    assert held is LockResult.HELD
    assert (await store.acquire(d("k"), None))[0] is LockResult.BUSY
    t0 = time.monotonic()
    assert (await take(store, d("k"), 0.3))[0] is LockResult.TIMEOUT
    assert time.monotonic() - t0 >= 0.25
    other, second = await store.acquire(d("other"), None)
    assert other is LockResult.HELD  # unrelated keys never wait
    second.release()
    first.release()  # from an event loop a release may complete a moment later
    t0 = time.monotonic()
    again, third = await take(store, d("k"), 5.0)
    assert again is LockResult.HELD
    assert time.monotonic() - t0 < 1.0  # woken by the release (no polling here)
    third.release()


async def test_a_waiter_gets_the_key_lock_soon_after_its_release(store: Store) -> None:
    _, holder = await store.acquire(d("k"), 1.0)
    threading.Timer(0.3, holder.release).start()
    t0 = time.monotonic()
    got, waiter = await take(store, d("k"), 10.0)  # a networked lock may say LANDED first
    waited = time.monotonic() - t0
    assert got is LockResult.HELD
    assert waited < 0.3 + 1.0  # woken by the release: the redis waiter polls every 30 s here
    waiter.release()


def test_redis_server_fixture_is_a_real_server(redis_server: RedisServer) -> None:
    assert redis_server.admin("PING").startswith(b"+PONG")
