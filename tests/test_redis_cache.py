"""The cache on Redis, in one process: choosing the backend, what lands in Redis, expiry and
LRU by the engine, tampering, namespaces, ACL users, TLS, unix sockets, the circuit breaker,
event loops and fork. Every behaviour test runs over the sync and the async API."""

from __future__ import annotations

import asyncio
import base64
import logging
import multiprocessing
import sys
import time
import uuid
import warnings
from pathlib import Path
from typing import Any

import pytest
import redis
from _core_support import (
    ApiFactory,
    Counting,
    log_text,
    make_config,
    new_key,
    store_every_secret,
)
from _core_support import open_api as open_api  # fixture, re-exported by name
from support.redis_server import (  # noqa: F401  # fixtures
    RedisServer,
    acl_server,
    count_commands,
    free_port,
    own_redis_fixture,
    redis_server_fixture,
    redis_url_fixture,
    tls_server,
)

from agw_persist_cache import CacheConfig, CacheConfigError, CacheStorageError, PersistentTokenCache
from agw_persist_cache.backends._redis_ops import Layout, pack_row, unpack_row
from agw_persist_cache.backends.contract import Backoff, SealedRow, SetBackoff
from agw_persist_cache.backends.redis import redact


def raw(url: str) -> redis.Redis:
    """A plain client, as an operator's redis-cli would be."""
    return redis.Redis.from_url(url)


def dump(url: str) -> dict[bytes, Any]:
    """Every key of the database and everything it holds."""
    r = raw(url)
    try:
        out: dict[bytes, Any] = {}
        for key in r.scan_iter(count=1000):
            kind = r.type(key)
            if kind == b"string":
                out[key] = r.get(key)
            elif kind == b"zset":
                out[key] = r.zrange(key, 0, -1, withscores=True)
            else:
                out[key] = kind
        return out
    finally:
        r.close()


def _encodings(marker: str) -> set[bytes]:
    raw_bytes = marker.encode()
    found = {raw_bytes, raw_bytes.hex().encode()}
    for shift in range(3):
        for encode in (base64.b64encode, base64.urlsafe_b64encode):
            found.add(encode(b"\0" * shift + raw_bytes)[4 if shift else 0 : -4])
    return found


def leaks(url: str, markers: list[str]) -> list[str]:
    blob = repr(dump(url)).encode()
    return [m for m in markers if any(e in blob for e in _encodings(m))]


# -- choosing the backend ---------------------------------------------------------------------


def test_a_redis_url_selects_the_redis_backend_from_each_source(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = new_key()
    for cache in (
        PersistentTokenCache(url=redis_url, config=CacheConfig(keys=[key])),
        PersistentTokenCache(config=CacheConfig(url=redis_url, keys=[key])),
    ):
        assert cache.stats().backend == "redis"
        cache.close()
    monkeypatch.setenv("AGW_CACHE_URL", redis_url)
    monkeypatch.setenv("AGW_CACHE_KEY", key)
    with PersistentTokenCache() as cache:
        cache.set_system_token("s", "t")
        assert cache.stats().backend == "redis"
    assert any(k.startswith(b"{agw-persist-cache}:t:") for k in dump(redis_url))


def test_valkey_scheme_is_the_same_protocol(redis_url: str) -> None:
    url = redis_url.replace("redis://", "valkey://")
    with PersistentTokenCache(url=url, config=make_config()) as cache:
        cache.set_system_token("s", "t")
        assert cache.get_system_token("s") == "t"


def test_a_redis_url_without_an_explicit_key_is_refused(redis_url: str) -> None:
    with pytest.raises(CacheConfigError, match="AGW_CACHE_KEY"):
        PersistentTokenCache(url=redis_url)


def test_a_missing_redis_package_names_the_extra_to_install(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delitem(sys.modules, "agw_persist_cache.backends.redis")
    monkeypatch.setitem(sys.modules, "redis", None)
    with pytest.raises(CacheConfigError, match=r"pip install 'agw-persist-cache\[redis\]'"):
        PersistentTokenCache(url=redis_url, config=make_config())


def test_a_malformed_url_is_a_config_error_that_does_not_echo_it() -> None:
    with pytest.raises(CacheConfigError) as info:
        PersistentTokenCache(url="redis://u:hunter2secret@host:notaport/0", config=make_config())
    assert "hunter2secret" not in str(info.value)


def test_redact_hides_passwords_in_userinfo_and_query() -> None:
    assert redact("redis://alice:s3cret@h:6379/0") == "redis://alice:***@h:6379/0"
    assert redact("rediss://:s3cret@h/0") == "rediss://:***@h/0"
    assert redact("redis://h/0?password=s3cret&db=1") == "redis://h/0?password=***&db=1"
    assert redact("unix:///tmp/r.sock?db=0") == "unix:///tmp/r.sock?db=0"


# -- the row layout (no server) ------------------------------------------------------------------


def test_rows_round_trip_and_anything_else_decodes_as_no_row() -> None:
    row = SealedRow(b"d" * 32, "user", "kid1", b"n" * 12, b"ct" * 600, 2e9, 7, 1e9, 1e9)
    packed = pack_row(row)
    assert unpack_row(row.digest, packed) == row
    for garbage in (b"", b"x", packed[:30], packed[:50], b"\x02" + packed[1:], 42, None):
        assert unpack_row(row.digest, garbage) is None
    assert unpack_row(row.digest, packed[:1] + b"z" + packed[2:]) is None  # unknown kind


def test_every_key_of_a_namespace_shares_one_cluster_hash_tag() -> None:
    layout = Layout("team-a")
    names = [layout.gen, layout.row(b"x"), *layout.lru.values(), layout.exp]
    names += [layout.backoff(b"x"), layout.lock(b"x"), layout.channel]
    assert all(n.startswith("{team-a}:") for n in names)


# -- behaviour over both APIs ------------------------------------------------------------------


async def test_two_hosts_share_set_invalidate_and_clear(
    open_api: ApiFactory, redis_url: str
) -> None:
    a, b = open_api.two(url=redis_url)
    await a.set("scope", "sys-token")
    await a.set("scope", "user-token", user="alice")
    assert await b.get("scope") == "sys-token"
    assert await b.get("scope", user="alice") == "user-token"
    await b.invalidate("scope", user="alice")
    assert await a.get("scope", user="alice") is None
    assert await a.get("scope") == "sys-token"
    await b.clear()
    assert await a.get("scope") is None
    assert dump(redis_url).keys() <= {b"{agw-persist-cache}:gen", *_row_keys(redis_url)}


def test_a_wrong_key_is_named_and_counted_on_redis_too(
    redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    right, wrong = new_key(), new_key()
    writer = PersistentTokenCache(config=make_config(url=redis_url, keys=[right]))
    for i in range(3):
        writer.set_system_token(f"scope-{i}", f"token-{i}")
    other = PersistentTokenCache(config=make_config(url=redis_url, keys=[wrong]))
    assert other.get_system_token("scope-0") is None
    assert other.get_system_token("scope-1") is None
    assert other.stats().key_mismatch == 1  # once per process
    (warning,) = [r.getMessage() for r in caplog.records if "does not open" in r.getMessage()]
    assert "3 rows" in warning and writer.key_ids[0] in warning and other.key_ids[0] in warning
    rotated = PersistentTokenCache(config=make_config(url=redis_url, keys=[wrong, right]))
    assert rotated.get_system_token("nothing") is None
    assert rotated.stats().key_mismatch == 0  # new,old: the old key still opens them
    for cache in (writer, other, rotated):
        cache.close()


def _row_keys(url: str) -> set[bytes]:
    return {k for k in dump(url) if k.startswith(b"{agw-persist-cache}:t:")}


async def test_fetch_fetches_once_and_a_fetch_straddling_a_clear_is_not_stored(
    open_api: ApiFactory, redis_url: str
) -> None:
    a, b = open_api.two(url=redis_url)
    fetch = Counting()
    assert await a.fetch("scope", fetch) == "fetched-1"
    assert await b.fetch("scope", fetch) == "fetched-1"
    assert fetch.calls == 1

    def clearing_fetch() -> str:
        b.cache.clear()  # another host clears while this fetch runs
        return "before-clear"

    assert await a.fetch("other", clearing_fetch) == "before-clear"
    assert await b.get("other") is None
    assert a.cache.stats().stale_writes_skipped == 1


async def test_invalidate_with_the_rejected_token_keeps_a_newer_replacement(
    open_api: ApiFactory, redis_url: str
) -> None:
    a, b = open_api.two(url=redis_url)
    await a.set("scope", "old")
    await b.set("scope", "new")  # another host already replaced the rejected token
    assert a.cache.invalidate_entry("system", "scope", token="old") is False
    assert await b.get("scope") == "new"
    assert a.cache.invalidate_entry("system", "scope", token="new") is True
    assert await b.get("scope") is None


async def test_nothing_in_redis_holds_a_token_user_jwt_scope_or_key(
    open_api: ApiFactory, redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    tag, key = uuid.uuid4().hex, new_key()
    api = open_api(config=CacheConfig(url=redis_url, keys=[key]))
    markers = await store_every_secret(api, tag)
    mark = Backoff(time.time() + 60, "RuntimeError", 503)
    api.cache._backend.execute(SetBackoff(b"k" * 32, mark))
    markers += [key, key.rstrip("="), base64.urlsafe_b64decode(key).hex()]
    assert len(dump(redis_url)) >= 6
    assert leaks(redis_url, markers) == []
    assert leaks(redis_url, [f"SANITY{tag}"]) == []
    assert not any(m in log_text(caplog) for m in markers)


def test_the_redis_secret_scan_finds_a_planted_marker(redis_url: str) -> None:
    marker = f"PLANTED{uuid.uuid4().hex}"
    r = raw(redis_url)
    r.set("{agw-persist-cache}:t:ab", b"xx" + base64.b64encode(b"a" + marker.encode()))
    r.close()
    assert leaks(redis_url, [marker]) == [marker]


async def test_rows_expire_in_the_engine_at_the_token_expiry(
    open_api: ApiFactory, redis_url: str
) -> None:
    api = open_api(config=make_config(url=redis_url))
    expires_at = time.time() + 120
    await api.set("scope", {"access_token": "t", "expires_at": expires_at})
    ((row_key,),) = [tuple(_row_keys(redis_url))]
    r = raw(redis_url)
    assert abs(r.pexpiretime(row_key) / 1000 - expires_at) < 0.01
    r.pexpire(row_key, 1)  # the engine drops it: a miss, nothing else
    r.close()
    time.sleep(0.01)
    assert await api.get("scope") is None


async def test_lru_bound_per_kind_is_kept_by_every_write(
    open_api: ApiFactory, redis_url: str
) -> None:
    api = open_api(
        config=make_config(
            url=redis_url,
            max_user_token_cache_size=3,
            max_system_token_cache_size=2,
            prune_interval_seconds=10**6,
        )
    )
    for i in range(6):
        await api.set(f"s{i}", f"user-{i}", user="alice")
        await api.set(f"s{i}", f"sys-{i}")
    assert len(_row_keys(redis_url)) == 5
    assert [await api.get(f"s{i}", user="alice") for i in range(6)] == [None] * 3 + [
        "user-3",
        "user-4",
        "user-5",
    ]
    assert [await api.get(f"s{i}") for i in (3, 4, 5)] == [None, "sys-4", "sys-5"]


async def test_namespaces_keep_applications_apart(open_api: ApiFactory, redis_url: str) -> None:
    key = new_key()
    a = open_api(config=CacheConfig(url=redis_url, keys=[key], namespace="app-a"))
    b = open_api(config=CacheConfig(url=redis_url, keys=[key], namespace="app-b"))
    await a.set("scope", "a-token")
    assert await b.get("scope") is None
    await b.clear()
    assert await a.get("scope") == "a-token"
    assert all(k.startswith((b"{app-a}:", b"{app-b}:")) for k in dump(redis_url))


async def test_a_tampered_or_swapped_value_is_a_miss_never_a_wrong_token(
    open_api: ApiFactory, redis_url: str
) -> None:
    api = open_api(config=make_config(url=redis_url))
    await api.set("scope", "alice-token", user="alice")
    (alice_key,) = _row_keys(redis_url)
    await api.set("scope", "bob-token", user="bob")
    (bob_key,) = _row_keys(redis_url) - {alice_key}
    r = raw(redis_url)
    alice = r.get(alice_key)
    assert alice is not None
    r.set(bob_key, alice)  # Alice's sealed row under Bob's digest
    reader = open_api(config=api.cache.config)
    assert await reader.get("scope", user="bob") is None
    flipped = alice[:-1] + bytes([alice[-1] ^ 1])
    r.set(alice_key, flipped)
    assert await reader.get("scope", user="alice") is None
    r.set(alice_key, b"not a row at all")
    assert await reader.get("scope", user="alice") is None
    r.close()
    assert reader.cache.stats().decrypt_failures == 2
    assert await reader.fetch("scope", lambda: "refetched", user="alice") == "refetched"


async def test_garbage_in_the_generation_key_degrades_to_fetching(
    open_api: ApiFactory, redis_url: str
) -> None:
    api = open_api(config=make_config(url=redis_url))
    r = raw(redis_url)
    r.set("{agw-persist-cache}:gen", b"\xffnot-a-number")
    r.close()
    assert await api.get("scope") is None
    assert await api.fetch("scope", lambda: "direct") == "direct"
    stats = api.cache.stats()
    assert stats.storage_errors >= 1
    assert stats.disabled_reason is not None and "Garbage" in stats.disabled_reason


async def test_unix_socket_url(
    open_api: ApiFactory, redis_server: RedisServer, redis_url: str
) -> None:
    api = open_api(config=make_config(url=redis_server.unix_url))
    await api.set("scope", "t")
    assert await api.get("scope") == "t"
    assert api.cache.stats().storage_errors == 0


# -- auth, TLS, breaker --------------------------------------------------------------------------


async def test_acl_user_and_password_work_and_never_show(
    open_api: ApiFactory, tmp_path: Path, caplog: pytest.LogCaptureFixture, capsys: Any
) -> None:
    password = f"pw{uuid.uuid4().hex}"
    server = acl_server(tmp_path / "acl", "agent", password).start()
    try:
        good = open_api(config=make_config(url=server.url))
        await good.set("scope", "t")
        assert await good.get("scope") == "t"
        wrong = server.url.replace(password, "wrong-password")
        anon = server.url.replace(f"agent:{password}@", "")
        for url in (wrong, anon):
            bad = open_api(config=make_config(url=url, circuit_breaker_seconds=60))
            assert await bad.fetch("scope", lambda: "direct") == "direct"
            stats = bad.cache.stats()
            assert stats.storage_errors >= 1 and stats.disabled_reason is not None
        shown = [repr(good.cache), str(good.cache.stats()), good.cache._backend.location]
        shown += [repr(good.cache.config), log_text(caplog), capsys.readouterr().err]
        assert "agent:***@" in good.cache._backend.location
        assert not any(password in s for s in shown)
    finally:
        server.stop()


async def test_tls_rediss_url_with_a_test_ca(open_api: ApiFactory, tmp_path: Path) -> None:
    server = tls_server(tmp_path / "tls").start()
    try:
        api = open_api(config=make_config(url=server.url))
        await api.set("scope", "t")
        assert await api.get("scope") == "t"
        assert api.cache.stats().storage_errors == 0
        no_tls = server.url.replace("rediss://", "redis://").partition("?")[0]
        plain = open_api(config=make_config(url=no_tls))
        assert await plain.fetch("scope", lambda: "direct") == "direct"  # TLS port, no TLS
    finally:
        server.stop()


async def test_unreachable_redis_fetches_directly_then_skips_redis_then_resumes(
    open_api: ApiFactory,
    own_redis: RedisServer,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    api = open_api(config=make_config(url=own_redis.url, circuit_breaker_seconds=0.5))
    await api.set("scope", "cached")
    own_redis.kill()
    t0 = time.monotonic()
    assert await api.fetch("scope", lambda: "direct-1") == "cached"  # this process's memory
    assert time.monotonic() - t0 < 0.5 + 0.2
    assert api.cache._backend.unavailable is not None
    sent = count_commands(monkeypatch)
    for i in range(20):  # the breaker is open: no command reaches the network
        assert await api.fetch("fresh", lambda i=i: f"direct-{i}") == "direct-0"  # fetched once
    assert sent() == 0
    assert len([r for r in caplog.records if r.levelno >= logging.WARNING]) <= 2
    with pytest.raises(CacheStorageError):  # a clear that did not happen says so
        await api.clear()
    own_redis.start()
    await asyncio.sleep(0.6)
    assert await api.fetch("scope", lambda: "after") == "after"  # probe succeeded, stored
    assert await api.get("scope") == "after"
    assert api.cache._backend.unavailable is None


# -- resources -----------------------------------------------------------------------------


def _clients(server: RedisServer) -> int:
    return server.admin("CLIENT", "LIST").count(b"id=") - 1  # minus the admin connection


def test_asyncio_run_per_task_keeps_connections_bounded(own_redis: RedisServer) -> None:
    cache = PersistentTokenCache(url=own_redis.url, config=make_config())

    async def one(i: int) -> str:
        return await cache.asystem_token("scope", lambda: asyncio.sleep(0, f"t{i}"))

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tokens = [asyncio.run(one(i)) for i in range(30)]
        assert tokens == ["t0"] * 30
        assert _clients(own_redis) <= 3
        cache.close()
        import gc

        gc.collect()
    time.sleep(0.1)
    assert _clients(own_redis) == 0


def _use_after_fork(url: str, key: str, out: Any) -> None:
    cache = PersistentTokenCache(url=url, config=CacheConfig(keys=[key]))
    out.put(cache.get_system_token("scope"))


def test_a_forked_child_uses_its_own_connections(redis_url: str) -> None:
    key = new_key()
    cache = PersistentTokenCache(url=redis_url, config=CacheConfig(keys=[key]))
    cache.set_system_token("scope", "before-fork")
    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()

    def child() -> None:
        out.put(cache.get_system_token("scope"))
        cache.set_system_token("scope", "from-child")

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # fork with threads (pytest's)
        proc = ctx.Process(target=child)
        proc.start()
    proc.join(30)
    assert proc.exitcode == 0
    assert out.get(timeout=5) == "before-fork"
    assert cache.get_system_token("scope") == "from-child"
    cache.close()


async def test_waiters_read_the_landed_token_instead_of_taking_the_lock_in_turn(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two caches ("hosts") of ten tasks each miss at once: one fetch, and the shared lock
    is tried once per cache, not once per task (followers read the token when it lands)."""
    from agw_persist_cache.backends import _redis_lock
    from agw_persist_cache.backends import redis as driver

    tries: list[str] = []
    asend = driver._asend

    async def counting(pool: Any, call: Any, *rest: Any) -> Any:
        if call.command[0] == "SET":
            tries.append(call.command[1])
        return await asend(pool, call, *rest)

    monkeypatch.setattr(driver, "_asend", counting)
    monkeypatch.setattr(_redis_lock, "POLL_SECONDS", 30.0)  # only a wake-up ends a wait here
    config = make_config(url=redis_url)
    hosts = [PersistentTokenCache(config=config) for _ in range(2)]
    fetch = Counting()

    async def afetch() -> Any:
        await asyncio.sleep(0.2)
        return fetch()

    tokens = await asyncio.gather(
        *(cache.asystem_token("scope", afetch) for cache in hosts for _ in range(10))
    )
    assert set(tokens) == {"fetched-1"}
    assert fetch.calls == 1
    # A handful, not one per task: the holder's try; the other cache's waiter tries around
    # listening and again after each wake-up (its subscription taking effect is one).
    # Tasks taking the lock in turn made 16.
    assert len(tries) <= 8
    for cache in hosts:
        await cache.aclose()


def test_the_sap_drop_in_takes_the_url_from_the_environment(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("sap_cloud_sdk")
    from agw_persist_cache.integrations import _defaults, sap

    monkeypatch.setenv("AGW_CACHE_URL", redis_url)
    monkeypatch.setenv("AGW_CACHE_KEY", new_key())
    monkeypatch.setattr(_defaults, "_defaults", {})
    cache = sap.default_cache()
    try:
        assert cache.stats().backend == "redis"
        assert sap.default_cache() is cache
    finally:
        cache.close()


async def test_a_failed_fetch_backs_off_every_host(open_api: ApiFactory, redis_url: str) -> None:
    from agw_persist_cache import FetchBackoffError

    config = make_config(url=redis_url, fetch_backoff_seconds=30)
    a, b = open_api(config=config), open_api(config=config)

    def failing() -> str:
        raise RuntimeError("identity service down")

    with pytest.raises(RuntimeError):
        await a.fetch("scope", failing)
    fetch = Counting()
    with pytest.raises(FetchBackoffError):
        await b.fetch("scope", fetch)  # another host fails fast: no request of its own
    assert fetch.calls == 0
    await b.clear()  # a clear drops back-off marks for every host too
    assert await b.fetch("scope", fetch) == "fetched-1"


async def test_a_cluster_node_that_does_not_own_the_cache_slot_redirects_it(
    open_api: ApiFactory, tmp_path: Path
) -> None:
    from support.redis_server import cluster_pair

    a, b = cluster_pair(tmp_path / "cluster")
    try:
        reply = a.admin("CLUSTER", "KEYSLOT", "{agw-persist-cache}")
        owner, other = (a, b) if int(reply[1:].split(b"\r")[0]) <= 8191 else (b, a)
        config = make_config(url=other.url)
        writer, reader = open_api(config=config), open_api(config=config)
        await writer.set("scope", "t")
        assert await reader.get("scope") == "t"
        fetch = Counting()
        assert await reader.fetch("other", fetch) == "fetched-1"
        assert await writer.fetch("other", fetch) == "fetched-1"
        await writer.clear()
        assert await reader.get("scope") is None
        assert reader.cache.stats().storage_errors == 0
        assert int(owner.admin("DBSIZE")[1:].split(b"\r")[0]) > 0
        assert other.admin("DBSIZE").startswith(b":0")
    finally:
        a.stop()
        b.stop()
