"""Bounded in time, whatever a clock says (issue 20, item 5): a back-off mark blocks a key for
``fetch_backoff_seconds`` at most after it was written, on Redis (the server's clock) and on
SQLite; a row never outlives the lifetime it was written with; a planted mark's text never
reaches an exception or a log line raw."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
from _core_support import Counting, log_text, make_config
from support.redis_server import (  # noqa: F401  # fixtures
    RedisServer,
    redis_server_fixture,
    redis_url_fixture,
)

from agw_persist_cache import FetchBackoffError, PersistentTokenCache, TokenFetchError
from agw_persist_cache._expiry import TokenData
from agw_persist_cache.backends._redis_ops import Layout

pytestmark = pytest.mark.timeout(120)

CAP = 1.0  # fetch_backoff_seconds in these tests
HOUR = 3600.0
TEN_YEARS = 10 * 365 * 86400.0
_real_time = time.time


def failing() -> TokenData:
    raise TokenFetchError("identity service down", status=503)


@pytest.fixture
def skewed(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[float], None]]:
    """Set this process's wall clock ``ahead`` seconds ahead of the real one (0: right)."""

    def set_ahead(ahead: float) -> None:
        monkeypatch.setattr(time, "time", lambda: _real_time() + ahead)

    yield set_ahead
    monkeypatch.setattr(time, "time", _real_time)


def _store(request: pytest.FixtureRequest, db_path: Path) -> dict[str, object]:
    if request.param == "redis":
        return {"url": request.getfixturevalue("redis_url")}
    return {"path": db_path}


@pytest.fixture(params=["sqlite", "redis"])
def where(request: pytest.FixtureRequest, db_path: Path) -> dict[str, object]:
    """The store of a test: the SQLite file or the Redis server."""
    return _store(request, db_path)


def two_hosts(where: dict[str, object], **settings: object) -> list[PersistentTokenCache]:
    """Two caches on one store with one key: two hosts (Redis) or two processes (SQLite)."""
    config = make_config(url=where.get("url"), fetch_backoff_seconds=CAP, **settings)
    path = where.get("path")
    return [PersistentTokenCache(path, config=config) for _ in range(2)]  # type: ignore[arg-type]  # a Path or None


def test_a_mark_written_an_hour_ahead_blocks_a_key_for_the_cap_at_most(
    where: dict[str, object], skewed: Callable[[float], None]
) -> None:
    fast, right = two_hosts(where)
    try:
        skewed(HOUR)
        with pytest.raises(TokenFetchError):
            fast.system_token("scope", failing)
        skewed(0)
        fetch = Counting("ok")
        deadline = time.monotonic() + CAP + 0.5
        while True:  # blocked for the cap at most (Redis: the server's clock), then fetched
            try:
                assert right.system_token("scope", fetch) == "ok-1"
                break
            except FetchBackoffError as exc:
                assert 0 < exc.retry_after <= CAP
                assert time.monotonic() < deadline, "a mark outlived fetch_backoff_seconds"
                time.sleep(0.1)
        assert fetch.calls == 1
    finally:
        fast.close()
        right.close()


def test_a_row_written_a_day_ahead_is_not_served_past_its_lifetime(
    where: dict[str, object], skewed: Callable[[float], None]
) -> None:
    writer, reader = two_hosts(where, fallback_token_ttl_seconds=300.0)
    try:
        skewed(86400.0)
        writer.set_system_token("scope", "from-tomorrow")  # lives 5 minutes by its clock
        skewed(0)
        if "url" in where:  # Redis expires it after its lifetime by the server's clock
            r = redis.Redis.from_url(str(where["url"]))
            digest = reader._shelf.key("system", "scope", None).digest  # type: ignore[union-attr]  # a key exists
            assert 0 < r.pttl(Layout("agw-persist-cache").row(digest)) <= 300_000
            r.close()
        else:  # one host's clock: a row from its future cannot say how long it has left
            assert reader.get_system_token("scope") is None
            assert writer.get_system_token("scope") is None
    finally:
        writer.close()
        reader.close()


def test_a_planted_mark_blocks_for_the_cap_at_most_and_its_text_is_never_echoed(
    redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    cache, other = two_hosts({"url": redis_url})
    r = redis.Redis.from_url(redis_url)
    try:
        digest = cache._shelf.key("system", "scope", None).digest  # type: ignore[union-attr]  # a key exists
        mark = Layout("agw-persist-cache").backoff(digest)
        seconds, micros = r.time()
        now_ms = seconds * 1000 + micros // 1000
        cause = "Evil\r\nINJECTED level=CRITICAL"
        # Written now by the server's clock, for ten years, with no expiry on the key.
        r.set(mark, f"0|{now_ms}|{int(TEN_YEARS * 1000)}|503|{cause}")
        with pytest.raises(FetchBackoffError) as info:
            cache.system_token("scope", Counting())
        assert info.value.cause_type == "error" and "INJECTED" not in str(info.value)
        assert info.value.retry_after <= CAP
        time.sleep(CAP + 0.2)
        fetch = Counting("ok")
        assert cache.system_token("scope", fetch) == "ok-1"  # the mark is still in Redis
        assert r.exists(mark)
        cache.invalidate_system_token("scope")
        r.set(mark, f"0|{now_ms + int(TEN_YEARS * 1000)}|1000|503|Planted")
        assert other.system_token("scope", fetch) == "ok-2"  # written in the future: ignored
        r.set(mark, f"0|{int((time.time() + TEN_YEARS) * 1000)}|503|Old")  # the old format
        other.invalidate_system_token("scope")
        assert other.system_token("scope", fetch) == "ok-3"
        assert "INJECTED" not in log_text(caplog)
    finally:
        r.close()
        cache.close()
        other.close()
