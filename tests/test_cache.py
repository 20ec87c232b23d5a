"""PersistentTokenCache in one process: every behaviour over the sync and the async API.

Real SQLite files in ``tmp_path``; the file is changed behind the cache's back with a
plain ``sqlite3`` connection (tamper, row swap, schema bump) as another tool would.
Multi-process behaviour (stampedes, kill -9, fork, clear across processes) lives in
``test_concurrency.py``.
"""

from __future__ import annotations

import base64
import logging
import os
import sqlite3
import time
import uuid
from pathlib import Path

import pytest
from _core_support import (
    ApiFactory,
    Counting,
    future,
    log_text,
    make_config,
    new_key,
    raw_exec,
    raw_rows,
    store_every_secret,
    warnings_of,
)
from _core_support import open_api as open_api  # fixture, re-exported by name
from support.store_down import unusable_path

import agw_persist_cache.backends.sqlite as store_module
from agw_persist_cache import (
    CachedToken,
    CacheStats,
    CacheStorageError,
    EntryInfo,
    KeyVerdict,
    PersistentTokenCache,
)
from agw_persist_cache.backends._filelocks import KEEPS_LOCK_FILES

pytestmark = pytest.mark.timeout(60)


# -- basic get / set / invalidate / clear ----------------------------------------------------


async def test_set_then_get_returns_the_token(open_api: ApiFactory) -> None:
    api = open_api()
    await api.set("scope-a", "token-a")
    assert await api.get("scope-a") == "token-a"
    assert await api.get("scope-b") is None


async def test_system_and_user_tokens_and_users_are_kept_apart(open_api: ApiFactory) -> None:
    api = open_api()
    await api.set("scope", "system-token")
    await api.set("scope", "alice-token", user="alice-jwt")
    await api.set("scope", "bob-token", user="bob-jwt")
    assert await api.get("scope") == "system-token"
    assert await api.get("scope", user="alice-jwt") == "alice-token"
    assert await api.get("scope", user="bob-jwt") == "bob-token"
    assert await api.get("scope", user="carol-jwt") is None
    assert await api.get("other-scope", user="alice-jwt") is None


async def test_token_survives_a_restart_of_the_cache(open_api: ApiFactory, db_path: Path) -> None:
    cfg = make_config()
    first = open_api(config=cfg)
    await first.set("scope", "persisted", user="jwt")
    await first.close()
    second = open_api(config=cfg)
    assert await second.get("scope", user="jwt") == "persisted"


async def test_set_replaces_the_previous_token(open_api: ApiFactory) -> None:
    api = open_api()
    await api.set("scope", "old")
    await api.set("scope", "new")
    assert await api.get("scope") == "new"
    assert len(raw_rows(api.cache.path)) == 1


async def test_invalidate_forgets_only_that_token(open_api: ApiFactory) -> None:
    api = open_api()
    await api.set("a", "token-a")
    await api.set("b", "token-b")
    await api.set("a", "user-a", user="jwt")
    await api.invalidate("a")
    assert await api.get("a") is None
    assert await api.get("b") == "token-b"
    assert await api.get("a", user="jwt") == "user-a"
    await api.invalidate("a", user="jwt")
    assert await api.get("a", user="jwt") is None
    assert len(raw_rows(api.cache.path)) == 1


async def test_invalidate_is_seen_by_another_cache_on_the_file(open_api: ApiFactory) -> None:
    writer, reader = open_api.two()
    await writer.set("scope", "token")
    assert await reader.get("scope") == "token"
    await writer.invalidate("scope")
    assert await reader.get("scope") is None


async def test_clear_removes_every_token_for_every_cache_on_the_file(open_api: ApiFactory) -> None:
    api, other = open_api.two()
    await api.set("s1", "t1")
    await api.set("s2", "t2", user="jwt")
    assert await other.get("s1") == "t1"
    generation = raw_rows(api.cache.path, "SELECT value FROM meta WHERE name = 'generation'")
    await api.clear()
    assert raw_rows(api.cache.path) == []
    assert await api.get("s1") is None
    assert await other.get("s1") is None
    assert await other.get("s2", user="jwt") is None
    after = raw_rows(api.cache.path, "SELECT value FROM meta WHERE name = 'generation'")
    assert after[0][0] == generation[0][0] + 1


async def test_cache_works_as_a_context_manager(db_path: Path) -> None:
    cfg = make_config()
    with PersistentTokenCache(db_path, config=cfg) as cache:
        cache.set_system_token("scope", "sync-token")
    async with PersistentTokenCache(db_path, config=cfg) as acache:
        assert await acache.aget_system_token("scope") == "sync-token"
        await acache.aset_system_token("scope", "async-token")
    with PersistentTokenCache(db_path, config=cfg) as cache:
        assert cache.get_system_token("scope") == "async-token"


# -- get-or-fetch ------------------------------------------------------------------------------


async def test_fetch_fetches_once_then_serves_the_cached_token(open_api: ApiFactory) -> None:
    api = open_api()
    fetch = Counting()
    assert await api.fetch("scope", fetch) == "fetched-1"
    assert await api.fetch("scope", fetch) == "fetched-1"
    assert await api.get("scope") == "fetched-1"
    assert fetch.calls == 1
    user_fetch = Counting("user")
    assert await api.fetch("scope", user_fetch, user="jwt") == "user-1"
    assert await api.fetch("scope", user_fetch, user="jwt") == "user-1"
    assert user_fetch.calls == 1
    stats = api.cache.stats()
    assert stats.fetches == 2
    assert stats.hits == 3
    assert stats.misses == 2


async def test_a_fetch_that_straddles_a_clear_returns_its_token_but_does_not_store_it(
    open_api: ApiFactory,
) -> None:
    api = open_api()

    def fetch_while_someone_clears() -> str:
        api.cache.clear()  # what another process's clear() looks like from here
        return "fetched-before-the-clear"

    assert await api.fetch("scope", fetch_while_someone_clears) == "fetched-before-the-clear"
    assert await api.get("scope") is None
    assert raw_rows(api.cache.path) == []
    assert api.cache.stats().stale_writes_skipped == 1
    assert await api.fetch("scope", Counting()) == "fetched-1"


async def test_a_row_rewritten_by_another_cache_is_read_anew(open_api: ApiFactory) -> None:
    writer, reader = open_api.two()
    for version in ("v1", "v2", "v3"):
        await writer.set("scope", version, user="jwt")
        assert await reader.get("scope", user="jwt") == version
        assert await reader.get("scope", user="jwt") == version


async def test_unicode_and_long_values_round_trip(open_api: ApiFactory) -> None:
    cfg = make_config()
    scope, user, token = "scope/ü/😀 x", "jwt-ß-😀", "tök€n-" + "z" * 20_000
    await open_api(config=cfg).set(scope, token, user=user)
    reader = open_api(config=cfg)
    assert await reader.get(scope, user=user) == token
    assert await reader.get(scope.upper(), user=user) is None


async def test_a_failing_fetch_propagates_unchanged_and_caches_nothing(
    open_api: ApiFactory,
) -> None:
    api = open_api(fetch_backoff_seconds=0)

    class IdentityServiceDown(Exception):
        pass

    def failing() -> str:
        raise IdentityServiceDown("503 from IAS")

    with pytest.raises(IdentityServiceDown, match="503 from IAS"):
        await api.fetch("scope", failing)
    assert raw_rows(api.cache.path) == []
    assert await api.fetch("scope", Counting()) == "fetched-1"


async def test_extra_round_trips_and_cached_token_repr_hides_the_token(
    open_api: ApiFactory,
) -> None:
    cfg = make_config()
    api = open_api(config=cfg)
    secret = f"TOKEN-{uuid.uuid4().hex}"
    extra = {"gateway_url": "https://gw.example/mcp", "tenant": "t1"}
    stored = await api.set_entry("scope", {"access_token": secret, "extra": extra})
    assert stored.token == secret
    assert dict(stored.extra) == extra
    # A second cache has to decrypt the row: the extra comes from disk, not from memory.
    other = open_api(config=cfg)
    entry = await other.get_entry("scope")
    assert entry is not None
    assert entry.token == secret
    assert dict(entry.extra) == extra
    assert entry.expires_at == pytest.approx(stored.expires_at)
    fetched = await other.fetch_entry(
        "fresh", Counting(extra={"gateway_url": "https://other.example"}), user="jwt"
    )
    assert dict(fetched.extra) == {"gateway_url": "https://other.example"}
    assert dict((await api.get_entry("fresh", user="jwt") or CachedToken("", 0)).extra) == {
        "gateway_url": "https://other.example"
    }
    for text in (repr(entry), str(entry), repr(stored), f"{entry}", repr([entry])):
        assert secret not in text
        assert "redacted" in text


async def test_a_token_without_extra_comes_back_with_an_empty_extra(open_api: ApiFactory) -> None:
    cfg = make_config()
    await open_api(config=cfg).set("scope", "bare")
    entry = await open_api(config=cfg).get_entry("scope")
    assert entry is not None
    assert dict(entry.extra) == {}


# -- expiry buffer -----------------------------------------------------------------------------


async def test_token_is_served_only_while_now_is_before_expiry_minus_buffer(
    open_api: ApiFactory,
) -> None:
    api = open_api(token_expiry_buffer_seconds=30)
    await api.set("inside-buffer", "soon-expiring", expires_at=future(20))
    await api.set("outside-buffer", "still-good", expires_at=future(60))
    await api.set("expired", "gone", expires_at=future(-5))
    assert await api.get("inside-buffer") is None
    assert await api.get("outside-buffer") == "still-good"
    assert await api.get("expired") is None
    fetch = Counting()
    assert await api.fetch("inside-buffer", fetch) == "fetched-1"
    assert fetch.calls == 1


async def test_a_zero_buffer_serves_until_expiry(open_api: ApiFactory) -> None:
    api = open_api(token_expiry_buffer_seconds=0)
    await api.set("scope", "short", expires_at=future(5))
    assert await api.get("scope") == "short"


async def test_expires_in_from_a_fetch_decides_when_the_token_stops_being_served(
    open_api: ApiFactory,
) -> None:
    api = open_api(token_expiry_buffer_seconds=30)
    fetch = Counting(expires_in=10)
    assert await api.fetch("scope", fetch) == "fetched-1"
    # 10 s of life is inside the 30 s buffer: never served from the cache.
    assert await api.fetch("scope", fetch) == "fetched-2"
    assert fetch.calls == 2


# -- rows that do not open ---------------------------------------------------------------------


def _flip_last_byte(blob: bytes) -> bytes:
    return blob[:-1] + bytes([blob[-1] ^ 0x01])


async def test_tampered_ciphertext_is_a_miss_deleted_counted_and_warned_once(
    open_api: ApiFactory, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = make_config()
    secret = f"TOKEN-{uuid.uuid4().hex}"
    await open_api(config=cfg).set("scope", secret, user="user-jwt")
    ((k, ct),) = raw_rows(open_api.default_path, "SELECT k, ct FROM tokens")
    raw_exec(
        open_api.default_path, "UPDATE tokens SET ct = ? WHERE k = ?", (_flip_last_byte(ct), k)
    )
    caplog.set_level(logging.WARNING)
    reader = open_api(config=cfg)
    assert await reader.get("scope", user="user-jwt") is None
    assert reader.cache.stats().decrypt_failures == 1
    assert raw_rows(reader.cache.path) == []
    assert len(warnings_of(caplog)) == 1
    assert secret not in log_text(caplog)
    assert await reader.fetch("scope", Counting(), user="user-jwt") == "fetched-1"
    assert await reader.get("scope", user="user-jwt") == "fetched-1"


async def test_tampered_nonce_is_a_miss_even_for_the_process_that_wrote_it(
    open_api: ApiFactory,
) -> None:
    api = open_api()
    await api.set("scope", "token")
    ((k, nonce),) = raw_rows(api.cache.path, "SELECT k, nonce FROM tokens")
    raw_exec(api.cache.path, "UPDATE tokens SET nonce = ? WHERE k = ?", (_flip_last_byte(nonce), k))
    assert await api.get("scope") is None
    assert api.cache.stats().decrypt_failures == 1


async def test_row_swap_does_not_hand_out_another_rows_token(open_api: ApiFactory) -> None:
    cfg = make_config()
    writer = open_api(config=cfg)
    await writer.set("scope", "alice-token", user="alice-jwt")
    (k_alice,) = (bytes(r[0]) for r in raw_rows(writer.cache.path, "SELECT k FROM tokens"))
    await writer.set("scope", "bob-token", user="bob-jwt")
    await writer.set("scope", "system-token")
    ((kid, nonce, ct),) = raw_rows(
        writer.cache.path, "SELECT kid, nonce, ct FROM tokens WHERE k = ?", (k_alice,)
    )
    # Alice's sealed token pasted onto every other row (a user row and a system row).
    raw_exec(
        writer.cache.path,
        "UPDATE tokens SET kid = ?, nonce = ?, ct = ? WHERE k != ?",
        (kid, nonce, ct, k_alice),
    )
    reader = open_api(config=cfg)
    assert await reader.get("scope", user="bob-jwt") is None
    assert await reader.get("scope") is None
    assert await reader.get("scope", user="alice-jwt") == "alice-token"
    assert reader.cache.stats().decrypt_failures == 2
    assert len(raw_rows(reader.cache.path)) == 1


async def test_wrong_key_is_a_miss_and_fetch_returns_the_fetched_token(
    open_api: ApiFactory,
) -> None:
    key_a, key_b = new_key(), new_key()
    with_a = open_api(config=make_config(keys=[key_a]))
    await with_a.set("scope", "sealed-under-a")
    with_b = open_api(config=make_config(keys=[key_b]))
    assert await with_b.get("scope") is None
    fetch = Counting()
    assert await with_b.fetch("scope", fetch) == "fetched-1"
    assert await with_b.fetch("scope", fetch) == "fetched-1"
    assert fetch.calls == 1
    # Each key sees only its own rows; neither destroyed the other's.
    assert await with_a.get("scope") == "sealed-under-a"


async def test_garbage_key_file_degrades_to_fetching_without_echoing_it(
    open_api: ApiFactory, db_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    db_path.parent.mkdir(mode=0o700)
    key_file = db_path.with_name(db_path.name + ".key")
    garbage = f"NOT-A-KEY-{uuid.uuid4().hex}"
    key_file.write_text(garbage)
    caplog.set_level(logging.WARNING)
    api = open_api(keys=None)
    assert api.cache.key_source == "file"
    assert await api.get("scope") is None
    assert await api.fetch("scope", Counting()) == "fetched-1"
    assert api.cache.stats().storage_errors >= 1
    assert len(warnings_of(caplog)) == 1
    assert garbage not in log_text(caplog)
    assert key_file.read_text() == garbage  # not silently replaced: other processes use it


# -- key rotation ------------------------------------------------------------------------------


async def test_rotated_keys_read_old_rows_and_reseal_moves_them_to_the_new_key(
    open_api: ApiFactory,
) -> None:
    old, new = new_key(), new_key()
    before = open_api(config=make_config(keys=[old]))
    await before.set("s1", "system-token")
    await before.set("s2", "user-token", user="jwt")
    old_kid = before.cache.key_ids[0]
    await before.close()

    rotated = open_api(config=make_config(keys=[new, old]))
    new_kid = rotated.cache.key_ids[0]
    assert rotated.cache.key_ids == (new_kid, old_kid)
    assert new_kid != old_kid
    assert await rotated.get("s1") == "system-token"
    assert await rotated.get("s2", user="jwt") == "user-token"
    assert {e.key_id for e in rotated.cache.list_entries()} == {old_kid}

    assert rotated.cache.reseal() == 2
    assert {e.key_id for e in rotated.cache.list_entries()} == {new_kid}
    assert rotated.cache.stats().key_ids_in_use == (new_kid,)
    assert rotated.cache.reseal() == 0

    after = open_api(config=make_config(keys=[new]))
    assert await after.get("s1") == "system-token"
    assert await after.get("s2", user="jwt") == "user-token"
    assert await open_api(config=make_config(keys=[old])).get("s1") is None


async def test_writing_under_rotated_keys_leaves_one_row_per_token(open_api: ApiFactory) -> None:
    old, new = new_key(), new_key()
    await open_api(config=make_config(keys=[old])).set("scope", "v1")
    rotated = open_api(config=make_config(keys=[new, old]))
    await rotated.set("scope", "v2")
    assert len(raw_rows(rotated.cache.path)) == 1
    assert await open_api(config=make_config(keys=[new])).get("scope") == "v2"


def test_reseal_works_in_batches_and_leaves_rows_no_key_opens(db_path: Path) -> None:
    old, new, foreign = new_key(), new_key(), new_key()
    with PersistentTokenCache(db_path, config=make_config(keys=[foreign])) as cache:
        cache.set_system_token("foreign", "foreign-token")
    with PersistentTokenCache(db_path, config=make_config(keys=[old])) as cache:
        for i in range(5):
            cache.set_system_token(f"s{i}", f"t{i}")
    with PersistentTokenCache(db_path, config=make_config(keys=[new, old])) as cache:
        assert cache.reseal(batch=2) == 5
        kids = sorted(e.key_id for e in cache.list_entries())
        assert kids.count(cache.key_ids[0]) == 5
        assert len(kids) == 6
    with PersistentTokenCache(db_path, config=make_config(keys=[new])) as cache:
        assert [cache.get_system_token(f"s{i}") for i in range(5)] == [f"t{i}" for i in range(5)]
    with PersistentTokenCache(db_path, config=make_config(keys=[foreign])) as cache:
        assert cache.get_system_token("foreign") == "foreign-token"


async def test_check_keys_says_whether_the_keys_open_the_rows(db_path: Path) -> None:
    mine, other = new_key(), new_key()
    with PersistentTokenCache(db_path, config=make_config(keys=[mine])) as cache:
        assert cache.check_keys() is None  # no rows yet
        cache.set_system_token("scope", "token")
        verdict = cache.check_keys()
        assert verdict == KeyVerdict(True, cache.key_ids)
        assert await cache.acheck_keys() == verdict
    with PersistentTokenCache(db_path, config=make_config(keys=[other])) as stranger:
        assert stranger.check_keys() == KeyVerdict(False, verdict.key_ids)
    with PersistentTokenCache(db_path, config=make_config(keys=[other, mine])) as rotating:
        assert rotating.check_keys() == KeyVerdict(True, verdict.key_ids)
    unusable = PersistentTokenCache(unusable_path(db_path.parent), config=make_config(keys=[mine]))
    with pytest.raises(CacheStorageError, match="cannot tell whether the keys open"):
        unusable.check_keys()


# -- nothing secret on disk or in logs -----------------------------------------------------------


def _encodings(marker: str) -> set[bytes]:
    """The marker as it could leak: raw, hex, and base64 at each of the three alignments."""
    raw = marker.encode()
    found = {raw, raw.hex().encode(), marker.encode("utf-16-le")}
    for shift in range(3):
        for encode in (base64.b64encode, base64.urlsafe_b64encode):
            encoded = encode(b"\0" * shift + raw)
            # Drop the characters that depend on the padding bytes and the tail.
            found.add(encoded[4 if shift else 0 : -4])
    return found


def _scan(directory: Path, markers: list[str]) -> list[tuple[str, str]]:
    leaks = []
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        data = path.read_bytes()
        for marker in markers:
            if any(enc in data for enc in _encodings(marker)):
                leaks.append((path.name, marker))
    return leaks


async def test_no_token_user_jwt_or_scope_is_on_disk_in_any_encoding(
    open_api: ApiFactory, db_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    tag = uuid.uuid4().hex
    api = open_api(keys=None)  # the generated key file sits in the same directory
    markers = await store_every_secret(api, tag)
    wal = db_path.with_name(db_path.name + "-wal")
    assert wal.exists() and wal.stat().st_size > 0
    assert _scan(db_path.parent, markers) == []
    assert _scan(db_path.parent, [f"SANITY{tag}"]) == []
    await api.prune()  # checkpoints the WAL into the main file
    assert _scan(db_path.parent, markers) == []
    await api.close()
    assert _scan(db_path.parent, markers) == []
    assert not any(m in log_text(caplog) for m in markers)


def test_the_secret_scan_finds_a_planted_marker(tmp_path: Path) -> None:
    """The scan above can fail: it finds markers written raw or base64-encoded."""
    marker = f"PLANTED{uuid.uuid4().hex}"
    (tmp_path / "raw").write_bytes(b"xx" + marker.encode() + b"yy")
    (tmp_path / "b64").write_bytes(b"z" + base64.b64encode(b"ab" + marker.encode()))
    assert sorted(_scan(tmp_path, [marker])) == [("b64", marker), ("raw", marker)]


# -- file modes ----------------------------------------------------------------------------------


async def test_files_are_private_under_umask_022(open_api: ApiFactory, db_path: Path) -> None:
    previous = os.umask(0o022)
    try:
        api = open_api(keys=None)
        await api.fetch("scope", Counting())
        await api.set("scope2", "token")
        assert api.cache.key_file is not None
        lock_dir = api.cache.lock_dir
        modes = {
            "dir": db_path.parent.stat().st_mode & 0o777,
            "db": db_path.stat().st_mode & 0o777,
            "wal": db_path.with_name(db_path.name + "-wal").stat().st_mode & 0o777,
            "shm": db_path.with_name(db_path.name + "-shm").stat().st_mode & 0o777,
            "key": api.cache.key_file.stat().st_mode & 0o777,
            "lock_dir": lock_dir.stat().st_mode & 0o777,
        }
        lock_files = sorted(lock_dir.iterdir())
    finally:
        os.umask(previous)
    assert modes == {
        "dir": 0o700,
        "db": 0o600,
        "wal": 0o600,
        "shm": 0o600,
        "key": 0o600,
        "lock_dir": 0o700,
    }
    # init.lock and the lock file of "scope" (a marker-file lock removes its marker on release)
    assert len(lock_files) >= (2 if KEEPS_LOCK_FILES else 0)
    assert {f.name: f.stat().st_mode & 0o777 for f in lock_files} == {
        f.name: 0o600 for f in lock_files
    }


# -- LRU and expiry pruning --------------------------------------------------------------------


async def test_prune_removes_exactly_the_least_recently_used_rows_over_the_limit(
    open_api: ApiFactory,
) -> None:
    api = open_api(max_user_token_cache_size=5, last_used_interval_seconds=0)
    users = [f"user-{i}" for i in range(8)]
    for user in users:
        await api.set("scope", f"token-{user}", user=user)
        time.sleep(0.002)  # distinct last_used stamps
    for user in users[:3]:  # touched: now the most recently used
        assert await api.get("scope", user=user) == f"token-{user}"
        time.sleep(0.002)
    assert await api.prune() == 3
    assert await api.prune() == 0
    survivors = {u for u in users if await api.get("scope", user=u) is not None}
    assert survivors == set(users[:3]) | set(users[6:])


async def test_prune_limits_system_and_user_rows_separately(open_api: ApiFactory) -> None:
    api = open_api(max_system_token_cache_size=2, max_user_token_cache_size=3)
    for i in range(4):
        await api.set(f"system-{i}", "t")
        await api.set("scope", "t", user=f"user-{i}")
        time.sleep(0.002)
    assert await api.prune() == 3
    stats = api.cache.stats()
    assert (stats.entries_system, stats.entries_user) == (2, 3)
    assert await api.get("system-0") is None
    assert await api.get("system-3") == "t"


async def test_prune_removes_expired_rows(open_api: ApiFactory) -> None:
    api = open_api()
    await api.set("valid", "t", expires_at=future(600))  # the first write prunes on its own
    await api.set("expired-1", "t", expires_at=future(-10))
    await api.set("expired-2", "t", user="jwt", expires_at=future(-1))
    assert api.cache.stats().entries_expired == 2
    assert await api.prune() == 2
    assert [e.kind for e in api.cache.list_entries()] == ["system"]
    assert await api.get("valid") == "t"


async def test_a_hit_does_not_write_last_used_within_the_interval(open_api: ApiFactory) -> None:
    key = new_key()
    api = open_api(config=make_config(keys=[key], last_used_interval_seconds=3600))
    await api.set("scope", "t")
    ((before,),) = raw_rows(api.cache.path, "SELECT last_used FROM tokens")
    for _ in range(5):
        assert await api.get("scope") == "t"
    assert raw_rows(api.cache.path, "SELECT last_used FROM tokens") == [(before,)]
    touching = open_api(config=make_config(keys=[key], last_used_interval_seconds=0))
    time.sleep(0.002)
    assert await touching.get("scope") == "t"
    ((after,),) = raw_rows(api.cache.path, "SELECT last_used FROM tokens")
    assert after > before


# -- never break the agent -----------------------------------------------------------------------


async def test_corrupt_file_is_moved_aside_and_the_cache_works_afterwards(
    open_api: ApiFactory, db_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with PersistentTokenCache(db_path, config=make_config()) as first:  # our file, locks
        first.set_system_token("scope", "before")
    # Damaged in place under its header: still provably ours (our application_id in it).
    db_path.write_bytes(db_path.read_bytes()[:100] + os.urandom(16384 - 100))
    caplog.set_level(logging.WARNING)
    api = open_api()
    assert await api.get("scope") is None
    assert await api.fetch("scope", Counting()) == "fetched-1"
    assert len(warnings_of(caplog)) == 1
    assert list(db_path.parent.glob("tokens.db.corrupt-*"))
    await api.set("other", "works")
    assert await api.get("other") == "works"
    assert await api.get("scope") == "fetched-1"
    assert raw_rows(db_path, "PRAGMA integrity_check") == [("ok",)]


@pytest.fixture
def impossible_path(tmp_path: Path) -> Path:
    """A database path whose parent is a regular file: nothing can ever be created there."""
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("a file where the cache directory should be")
    return blocker / "cache" / "tokens.db"


@pytest.mark.parametrize("key_source", ["config", "file"])
async def test_impossible_path_degrades_to_the_memory_tier(
    open_api: ApiFactory, impossible_path: Path, key_source: str
) -> None:
    api = open_api(impossible_path, keys=None if key_source == "file" else [new_key()])
    assert await api.get("scope") is None
    fetch = Counting()
    assert await api.fetch("scope", fetch) == "fetched-1"
    assert await api.fetch("scope", fetch) == "fetched-1"  # this process's memory tier
    assert await api.get("scope") == "fetched-1"
    await api.set("scope", "set-in-memory")
    assert await api.get("scope") == "set-in-memory"
    # Other processes cannot be told: it raises, and this process forgets all the same.
    with pytest.raises(CacheStorageError):
        await api.invalidate("scope")
    assert await api.get("scope") is None
    await api.set("scope", "again")
    with pytest.raises(CacheStorageError):
        await api.clear()
    assert await api.get("scope") is None
    assert await api.prune() == 0
    stats = api.cache.stats()
    assert stats.storage_errors > 0
    assert (stats.mode, stats.fetches) == ("degraded", 1)
    assert stats.served_from_memory >= 3
    assert stats.disabled_reason is not None
    assert str(impossible_path.parent) in stats.disabled_reason
    assert api.cache.list_entries() == []


async def test_a_directory_as_database_path_degrades_to_fetching(
    open_api: ApiFactory, db_path: Path
) -> None:
    db_path.mkdir(parents=True)
    api = open_api()
    assert await api.get("scope") is None
    assert await api.fetch("scope", Counting()) == "fetched-1"
    assert api.cache.stats().storage_errors > 0


@pytest.mark.parametrize("key_source", ["config", "file"])
async def test_impossible_path_warns_once_and_is_no_lock_timeout(
    open_api: ApiFactory,
    impossible_path: Path,
    key_source: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING)
    api = open_api(impossible_path, keys=None if key_source == "file" else [new_key()])
    assert await api.get("scope") is None
    assert await api.fetch("scope", Counting()) == "fetched-1"
    stats = api.cache.stats()
    assert stats.lock_timeouts == 0
    assert len(warnings_of(caplog)) == 1


async def test_disabled_reason_does_not_grow_with_each_call(
    open_api: ApiFactory, impossible_path: Path
) -> None:
    api = open_api(impossible_path)
    await api.get("scope")
    first = api.cache.stats().disabled_reason
    for _ in range(5):
        await api.get("scope")
    assert api.cache.stats().disabled_reason == first


async def test_a_disabled_cache_retries_once_the_path_is_usable(
    open_api: ApiFactory, impossible_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(store_module, "RETRY_UNAVAILABLE_SECONDS", 0.2)
    api = open_api(impossible_path)
    assert await api.get("scope") is None
    assert api.cache.stats().disabled_reason is not None
    impossible_path.parent.parent.unlink()  # the blocking file goes away
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline:
        await api.set("scope", "token")
        if api.cache.stats().mode == "healthy":
            break
        time.sleep(0.05)
    assert await api.get("scope") == "token"
    assert api.cache.stats().disabled_reason is None
    assert raw_rows(impossible_path, "SELECT count(*) FROM tokens") == [(1,)]  # stored


async def test_full_disk_never_raises_and_fetch_still_returns_tokens(
    open_api: ApiFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    api = open_api(max_db_bytes=65536)
    for i in range(30):
        big = f"{i:03d}-" + "x" * 8000
        assert await api.fetch(f"scope-{i}", Counting(big)) == f"{big}-1"
        await api.set(f"set-{i}", big)
    stats = api.cache.stats()
    assert stats.storage_errors > 0
    assert stats.file_bytes <= 65536
    assert 0 < stats.entries_system < 60
    assert 1 <= len(warnings_of(caplog)) <= 2
    assert "x" * 100 not in log_text(caplog)
    # Whatever made it to disk is still served; clearing makes room again.
    assert (await api.get("scope-0") or "").startswith("000-")  # fetched, then stored
    await api.clear()
    await api.set("after-clear", "fits")
    assert await api.get("after-clear") == "fits"


async def test_newer_schema_disables_the_cache_and_writes_nothing(
    open_api: ApiFactory, db_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = make_config()
    first = open_api(config=cfg)
    await first.set("scope", "old-token")
    await first.close()
    raw_exec(db_path, "PRAGMA user_version = 99")
    before = raw_rows(db_path)
    caplog.set_level(logging.WARNING)
    api = open_api(config=cfg)
    assert await api.get("scope") is None
    fetch = Counting()
    assert await api.fetch("scope", fetch) == "fetched-1"
    assert await api.fetch("new-scope", fetch) == "fetched-2"
    await api.set("other", "token")
    with pytest.raises(CacheStorageError):  # other processes cannot be told
        await api.clear()
    assert raw_rows(db_path) == before
    assert raw_rows(db_path, "PRAGMA user_version") == [(99,)]
    stats = api.cache.stats()
    assert stats.storage_errors > 0
    assert stats.disabled_reason is not None
    assert "99" in stats.disabled_reason
    (warning,) = warnings_of(caplog)
    assert "schema version 99" in warning.getMessage()


# -- stats and list_entries ----------------------------------------------------------------------


async def test_stats_and_list_entries_describe_the_file_without_secrets(
    open_api: ApiFactory,
) -> None:
    api = open_api()
    tag = uuid.uuid4().hex
    secrets = [f"TOK{tag}", f"JWT{tag}", f"SCOPE{tag}"]
    expired_at, late = future(-100), future(900)
    await api.set(f"SCOPE{tag}", f"TOK{tag}", expires_at=future(300))
    await api.set("s2", "t", expires_at=late)
    await api.set("s3", "t", expires_at=expired_at)
    for user in ("u1", "u2", f"JWT{tag}"):
        await api.set(f"SCOPE{tag}", f"TOK{tag}", user=user, expires_at=future(400))
    assert await api.get("s2") == "t"
    assert await api.get("missing") is None

    stats = api.cache.stats()
    assert isinstance(stats, CacheStats)
    assert (stats.entries_system, stats.entries_user, stats.entries_expired) == (3, 3, 1)
    assert stats.oldest_expiry == pytest.approx(expired_at)
    assert stats.newest_expiry == pytest.approx(late)
    assert stats.key_ids_in_use == api.cache.key_ids
    assert stats.schema_version == store_module.SCHEMA_VERSION
    assert stats.file_bytes > 0
    assert stats.disabled_reason is None
    assert (stats.hits, stats.misses, stats.decrypt_failures, stats.storage_errors) == (1, 1, 0, 0)

    entries = api.cache.list_entries()
    assert all(isinstance(e, EntryInfo) for e in entries)
    assert sorted(e.kind for e in entries) == ["system"] * 3 + ["user"] * 3
    assert len({e.digest_prefix for e in entries}) == 6
    for e in entries:
        assert len(e.digest_prefix) == 12
        int(e.digest_prefix, 16)
        assert e.key_id == api.cache.key_ids[0]
        assert e.created_at <= e.last_used
    texts = [repr(stats), str(stats), repr(entries), repr(api.cache), str(api.cache)]
    for text in texts:
        assert not any(s in text for s in secrets)


async def test_stats_of_an_empty_cache(open_api: ApiFactory) -> None:
    stats = open_api().cache.stats()
    assert (stats.entries_system, stats.entries_user, stats.entries_expired) == (0, 0, 0)
    assert stats.oldest_expiry is None
    assert stats.newest_expiry is None
    assert stats.key_ids_in_use == ()
    assert stats.schema_version == store_module.SCHEMA_VERSION


def test_invalid_kind_and_user_jwt_are_rejected(db_path: Path) -> None:
    cache = PersistentTokenCache(db_path, config=make_config())
    with pytest.raises(ValueError, match="kind"):
        cache.get_entry("admin", "scope")  # type: ignore[arg-type]  # deliberately invalid
    with pytest.raises(ValueError, match="user_jwt"):
        cache.get_entry("user", "scope")
    with pytest.raises(ValueError, match="user_jwt"):
        cache.get_user_token("", "scope")
    with pytest.raises(TypeError, match="scope_key"):
        cache.get_system_token(b"scope")  # type: ignore[arg-type]  # deliberately invalid
    cache.close()


def test_constructing_a_cache_touches_no_file(db_path: Path) -> None:
    PersistentTokenCache(db_path)
    assert not db_path.parent.exists()


def test_sqlite_integrity_after_a_session(db_path: Path) -> None:
    with PersistentTokenCache(db_path, config=make_config()) as cache:
        for i in range(50):
            cache.set_user_token(f"u{i}", "scope", f"t{i}")
        cache.prune()
    con = sqlite3.connect(db_path)
    try:
        assert con.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        assert con.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    finally:
        con.close()


async def test_invalidate_with_a_token_keeps_a_newer_replacement(open_api: ApiFactory) -> None:
    api = open_api()
    await api.set("scope", "rejected-token")
    cache = api.cache
    # Someone else already replaced the token that got a 401: theirs stays.
    cache.set_system_token("scope", "replacement-token")
    assert not cache.invalidate_entry("system", "scope", token="rejected-token")
    assert await api.get("scope") == "replacement-token"
    assert await cache.ainvalidate_entry("system", "scope", token="replacement-token")
    assert await api.get("scope") is None
