"""Expiry resolution: expires_at > expires_in > access_token exp > id_token exp > fallback."""

from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from _core_support import ApiFactory, make_config, make_jwt
from _core_support import open_api as open_api  # fixture, re-exported by name

from agw_persist_cache import CacheConfig, CacheUsageError
from agw_persist_cache._expiry import jwt_exp, normalize, parse_expires_at

NOW = datetime(2030, 1, 1, tzinfo=UTC).timestamp() - 3600.0  # one hour before 2030
AT_2030 = datetime(2030, 1, 1, tzinfo=UTC).timestamp()
CONFIG = CacheConfig(fallback_token_ttl_seconds=300, max_token_ttl_seconds=86_400)


def resolve(data: Any, *, expires_at: float | None = None, config: CacheConfig = CONFIG) -> float:
    return normalize(data, now=NOW, expires_at=expires_at, config=config).expires_at


@pytest.mark.parametrize(
    "value",
    [
        AT_2030,
        int(AT_2030),
        str(int(AT_2030)),
        f" {AT_2030} ",
        "2030-01-01T00:00:00Z",
        "2030-01-01T00:00:00+00:00",
        "2030-01-01T02:00:00+02:00",
        "2029-12-31T19:00:00-05:00",
        "2030-01-01T00:00:00",  # naive means UTC
        "2030-01-01 00:00:00",
        "2030-01-01T00:00:00.000Z",
    ],
)
def test_expires_at_accepts_epoch_numeric_strings_and_iso_8601(value: object) -> None:
    assert resolve({"access_token": "t", "expires_at": value}) == AT_2030


UNUSABLE = ["tomorrow", "abc", "", True, False, [1], {}, float("nan"), float("inf"), "inf", "NaN"]


@pytest.mark.parametrize("value", UNUSABLE)
def test_unusable_expires_at_is_refused_naming_the_field(value: object) -> None:
    assert parse_expires_at(value) is None
    with pytest.raises(CacheUsageError, match="'expires_at'"):
        resolve({"access_token": "t", "expires_at": value, "expires_in": 60})


@pytest.mark.parametrize("value", UNUSABLE)
def test_unusable_expires_in_is_refused_naming_the_field(value: object) -> None:
    with pytest.raises(CacheUsageError, match="'expires_in'") as info:
        resolve({"access_token": make_jwt(exp=NOW + 1000), "expires_in": value})
    assert isinstance(info.value, ValueError) and isinstance(info.value, TypeError)


def test_a_secret_in_an_unusable_expiry_is_not_echoed() -> None:
    for field in ("expires_at", "expires_in"):
        with pytest.raises(CacheUsageError, match=field) as info:
            resolve({"access_token": "t", field: SECRET})
        assert SECRET not in str(info.value) and SECRET not in repr(info.value)


@pytest.mark.parametrize("field", ["expires_at", "expires_in"])
def test_absent_or_none_expiry_falls_through_to_the_next_source(field: str) -> None:
    assert resolve({"access_token": "t", field: None}) == NOW + 300
    assert resolve({"access_token": make_jwt(exp=NOW + 1000), field: None}) == NOW + 1000


def test_numeric_string_expires_in_is_accepted_as_the_sdk_does() -> None:
    assert resolve({"access_token": "t", "expires_in": "3600"}) == NOW + 3600
    assert resolve({"access_token": "t", "expires_in": " 90.5 "}) == NOW + 90.5


def test_expires_at_beats_expires_in_and_jwt_claims() -> None:
    data = {
        "access_token": make_jwt(exp=NOW + 1000),
        "id_token": make_jwt(exp=NOW + 2000),
        "expires_in": 500,
        "expires_at": NOW + 700,
    }
    assert resolve(data) == NOW + 700


def test_expires_in_beats_jwt_claims() -> None:
    data = {
        "access_token": make_jwt(exp=NOW + 1000),
        "id_token": make_jwt(exp=NOW + 2000),
        "expires_in": "500",
    }
    assert resolve(data) == NOW + 500


def test_access_token_exp_beats_id_token_exp() -> None:
    data = {"access_token": make_jwt(exp=NOW + 1000), "id_token": make_jwt(exp=NOW + 2000)}
    assert resolve(data) == NOW + 1000
    assert resolve(make_jwt(exp=NOW + 1000)) == NOW + 1000  # a bare JWT string too


def test_id_token_exp_is_used_when_the_access_token_has_none() -> None:
    assert resolve({"access_token": "opaque", "id_token": make_jwt(exp=NOW + 2000)}) == NOW + 2000
    no_exp = make_jwt(sub="someone")
    assert resolve({"access_token": no_exp, "id_token": make_jwt(exp=NOW + 2000)}) == NOW + 2000


def test_fallback_ttl_when_nothing_says_when() -> None:
    config = CacheConfig(fallback_token_ttl_seconds=123)
    assert resolve("opaque-token", config=config) == NOW + 123
    assert resolve({"access_token": "a.b.c", "id_token": "not-a-jwt"}, config=config) == NOW + 123


def test_jwt_exp_is_read_unverified_and_tolerates_garbage() -> None:
    assert jwt_exp(make_jwt(exp=12345)) == 12345
    assert jwt_exp("a.b.c") is None
    assert jwt_exp("no-dots") is None
    assert jwt_exp(None) is None
    assert jwt_exp(make_jwt(exp="soon")) is None


@pytest.mark.parametrize(
    "data",
    [
        {"access_token": "t", "expires_at": NOW + 10 * 86_400},
        {"access_token": "t", "expires_in": 10 * 86_400},
        {"access_token": make_jwt(exp=NOW + 10 * 86_400)},
        {"access_token": "t", "id_token": make_jwt(exp=NOW + 10 * 86_400)},
    ],
)
def test_absurd_lifetimes_are_capped_at_max_token_ttl(data: dict[str, Any]) -> None:
    assert resolve(data) == NOW + 86_400
    assert resolve(data, config=CacheConfig(max_token_ttl_seconds=60)) == NOW + 60


def test_the_cap_applies_to_the_fallback_too() -> None:
    config = CacheConfig(fallback_token_ttl_seconds=600, max_token_ttl_seconds=60)
    assert resolve("t", config=config) == NOW + 60


def test_expires_at_argument_overrides_the_response() -> None:
    data = {"access_token": make_jwt(exp=NOW + 1000), "expires_in": 500, "expires_at": NOW + 700}
    assert resolve(data, expires_at=NOW + 42) == NOW + 42
    assert resolve(data, expires_at=NOW + 10 * 86_400) == NOW + 86_400


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), "soon", True])
def test_unusable_expires_at_argument_is_rejected(bad: Any) -> None:
    with pytest.raises(CacheUsageError, match="expires_at"):
        resolve("t", expires_at=bad)


SECRET = f"SECRET-TOKEN-{uuid.uuid4().hex}"


@pytest.mark.parametrize(
    ("data", "error", "field"),
    [
        ({"token_type": "bearer", "id_token": SECRET}, ValueError, "access_token"),
        ({"access_token": 12345}, ValueError, "access_token"),
        ({"access_token": "   "}, ValueError, "access_token"),
        ({"access_token": None, "refresh_token": SECRET}, ValueError, "access_token"),
        ({"access_token": SECRET, "extra": {"url": 1}}, TypeError, "extra"),
        ({"access_token": SECRET, "extra": {1: "x"}}, TypeError, "extra"),
        ({"access_token": SECRET, "extra": [("url", "x")]}, TypeError, "extra"),
        ({"access_token": SECRET, "extra": SECRET}, TypeError, "extra"),
        (12345, TypeError, "token_data"),
        (SECRET.encode(), TypeError, "token_data"),
    ],
)
def test_bad_token_data_names_the_field_and_never_echoes_the_token(
    data: Any, error: type[Exception], field: str
) -> None:
    with pytest.raises(error) as info:
        resolve(data)
    assert isinstance(info.value, CacheUsageError)
    assert field in str(info.value)
    assert SECRET not in str(info.value)
    assert SECRET not in repr(info.value)


def test_extra_is_copied_not_aliased() -> None:
    extra = {"gateway_url": "https://gw"}
    normalized = normalize(
        {"access_token": "t", "extra": extra}, now=NOW, expires_at=None, config=CONFIG
    )
    extra["gateway_url"] = "changed"
    assert dict(normalized.extra) == {"gateway_url": "https://gw"}


# -- through the cache API (both sync and async) -------------------------------------------------


async def test_cache_resolves_expiry_the_same_way(open_api: ApiFactory, db_path: Path) -> None:
    api = open_api(config=make_config(fallback_token_ttl_seconds=600))
    before = time.time()
    assert (await api.set_entry("fallback", "opaque")).expires_at == pytest.approx(
        before + 600, abs=5
    )
    exp = before + 900
    assert (await api.set_entry("jwt", make_jwt(exp=exp))).expires_at == exp
    fetched = await api.fetch_entry("in", lambda: {"access_token": "t", "expires_in": 1200})
    assert fetched.expires_at == pytest.approx(before + 1200, abs=5)
    stored = await api.get_entry("in")
    assert stored is not None
    assert stored.expires_at == fetched.expires_at


async def test_set_with_expires_at_overrides_the_response(open_api: ApiFactory) -> None:
    api = open_api()
    at = time.time() + 500
    await api.set("scope", {"access_token": "t", "expires_in": 5}, expires_at=at)
    entry = await api.get_entry("scope")
    assert entry is not None
    assert entry.expires_at == at


async def test_bad_token_data_is_rejected_by_both_apis_and_frees_the_key(
    open_api: ApiFactory,
) -> None:
    api = open_api()
    with pytest.raises(ValueError, match="access_token"):
        await api.set("scope", {"token": SECRET})
    with pytest.raises(ValueError, match="access_token") as info:
        await api.fetch("scope", lambda: {"access_token": None, "id_token": SECRET})
    assert SECRET not in str(info.value)
    # Nothing was stored, and the key's locks were released: the next fetch just works.
    assert await api.get("scope") is None
    assert await api.fetch("scope", lambda: "good-token") == "good-token"


async def test_a_fetch_answering_an_unusable_expires_in_is_refused_by_both_apis(
    open_api: ApiFactory,
) -> None:
    api = open_api()
    for bad in ("abc", float("nan"), True):
        with pytest.raises(CacheUsageError, match="expires_in"):
            await api.fetch("scope", lambda bad=bad: {"access_token": SECRET, "expires_in": bad})
    assert await api.get("scope") is None
    assert await api.fetch("scope", lambda: {"access_token": "ok", "expires_in": "60"}) == "ok"
