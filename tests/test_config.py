"""CacheConfig validation, key sources and the database path resolution."""

from __future__ import annotations

import base64
import dataclasses
import os
import uuid
from pathlib import Path
from typing import Any

import pytest
from _core_support import new_key

from agw_persist_cache import CacheConfig, CacheConfigError, CacheError, PersistentTokenCache

INVALID: list[tuple[str, Any]] = [
    ("token_expiry_buffer_seconds", -1),
    ("token_expiry_buffer_seconds", float("nan")),
    ("token_expiry_buffer_seconds", "30"),
    ("token_expiry_buffer_seconds", True),
    ("token_expiry_buffer_seconds", None),
    ("fallback_token_ttl_seconds", 0),
    ("fallback_token_ttl_seconds", -5.0),
    ("fallback_token_ttl_seconds", float("inf")),
    ("max_token_ttl_seconds", 0),
    ("max_token_ttl_seconds", float("-inf")),
    ("lock_timeout_seconds", -0.1),
    ("busy_timeout_seconds", -1),
    ("busy_timeout_seconds", float("nan")),
    ("refresh_ahead_ratio", 1),
    ("refresh_ahead_ratio", 1.5),
    ("refresh_ahead_ratio", -0.1),
    ("fetch_backoff_seconds", -1),
    ("last_used_interval_seconds", -1),
    ("prune_interval_seconds", -1),
    ("max_system_token_cache_size", 0),
    ("max_system_token_cache_size", 1.5),
    ("max_system_token_cache_size", True),
    ("max_system_token_cache_size", "10"),
    ("max_user_token_cache_size", 0),
    ("max_user_token_cache_size", -1),
    ("lock_stripes", 0),
    ("lock_stripes", None),
    ("max_db_bytes", 65535),
    ("max_db_bytes", 65536.0),
    ("max_db_bytes", True),
    ("keys", []),
    ("keys", "a-single-string-is-not-a-list"),
    ("keys", b"\x00" * 32),
    ("url", "ftp://host/x"),
    ("url", "no-scheme-at-all"),
    ("url", 6379),
    ("namespace", ""),
    ("namespace", "a{b}"),
    ("namespace", "with space"),
    ("namespace", "x" * 65),
    ("namespace", 7),
    ("socket_timeout_seconds", 0),
    ("socket_timeout_seconds", float("nan")),
    ("circuit_breaker_seconds", -1),
    ("lock_lease_seconds", 0),
    ("lock_lease_seconds", "3"),
    ("memory_tokens", 0),
    ("memory_tokens", "10"),
]


@pytest.mark.parametrize(("field", "value"), INVALID)
def test_every_invalid_value_raises_a_value_error_naming_the_field(field: str, value: Any) -> None:
    with pytest.raises(CacheConfigError) as info:
        CacheConfig(**{field: value})
    assert isinstance(info.value, ValueError)
    assert isinstance(info.value, CacheError)
    assert f"CacheConfig.{field}" in str(info.value)


def test_every_numeric_field_is_covered_by_the_invalid_table() -> None:
    fields = {f.name for f in dataclasses.fields(CacheConfig)} - {"path", "key_file"}
    assert fields == {name for name, _ in INVALID}


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"token_expiry_buffer_seconds": 0, "refresh_ahead_ratio": 0, "fetch_backoff_seconds": 0},
        {"last_used_interval_seconds": 0, "prune_interval_seconds": 0, "lock_timeout_seconds": 0},
        {"max_db_bytes": 65536, "lock_stripes": 1, "max_user_token_cache_size": 1},
        {"keys": [os.urandom(32)], "refresh_ahead_ratio": 0.99},
    ],
)
def test_valid_edge_values_are_accepted(overrides: dict[str, Any]) -> None:
    config = CacheConfig(**overrides)
    for name, value in overrides.items():
        assert getattr(config, name) == value


def test_defaults_match_sap_cloud_sdk_names_and_values() -> None:
    config = CacheConfig()
    assert config.token_expiry_buffer_seconds == 30
    assert config.fallback_token_ttl_seconds == 300
    assert config.max_token_ttl_seconds == 86_400
    assert config.max_system_token_cache_size >= 100
    assert config.max_user_token_cache_size >= config.max_system_token_cache_size


def test_config_is_frozen() -> None:
    config = CacheConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.lock_timeout_seconds = 1  # type: ignore[misc]  # proving it is read-only


# -- keys ------------------------------------------------------------------------------------


BAD_KEYS = [
    f"SECRET-NOT-A-KEY-{uuid.uuid4().hex}",
    base64.urlsafe_b64encode(b"k" * 31).decode(),  # valid base64, wrong length
    base64.urlsafe_b64encode(b"k" * 33).decode(),
]


@pytest.mark.parametrize("bad", BAD_KEYS)
def test_bad_config_key_names_its_position_and_never_echoes_it(db_path: Path, bad: str) -> None:
    with pytest.raises(CacheConfigError) as info:
        PersistentTokenCache(db_path, config=CacheConfig(keys=[new_key(), bad]))
    assert "CacheConfig.keys[1]" in str(info.value)
    assert bad not in str(info.value)
    assert bad[:16] not in repr(info.value)


@pytest.mark.parametrize("bad", BAD_KEYS)
def test_bad_env_key_names_the_variable_and_never_echoes_it(
    db_path: Path, monkeypatch: pytest.MonkeyPatch, bad: str
) -> None:
    monkeypatch.setenv("AGW_CACHE_KEY", f"{new_key()},{bad}")
    with pytest.raises(CacheConfigError) as info:
        PersistentTokenCache(db_path)
    assert "AGW_CACHE_KEY" in str(info.value)
    assert bad not in str(info.value)
    assert bad[:16] not in repr(info.value)


def test_keys_come_from_config_then_env_then_a_key_file(
    db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from_file = PersistentTokenCache(db_path)
    assert from_file.key_source == "file"
    assert from_file.key_file == db_path.with_name("tokens.db.key")

    monkeypatch.setenv("AGW_CACHE_KEY", f"{new_key()}, {new_key()}")
    from_env = PersistentTokenCache(db_path)
    assert from_env.key_source == "env"
    assert from_env.key_file is None
    assert len(from_env.key_ids) == 2

    raw = os.urandom(32)
    from_config = PersistentTokenCache(db_path, config=CacheConfig(keys=[raw]))
    assert from_config.key_source == "config"
    assert len(from_config.key_ids) == 1
    # Raw bytes and their base64 form are the same key.
    b64 = base64.urlsafe_b64encode(raw).decode().rstrip("=")
    same = PersistentTokenCache(db_path, config=CacheConfig(keys=[b64]))
    assert same.key_ids == from_config.key_ids


def test_explicit_key_file_location_is_used(tmp_path: Path, db_path: Path) -> None:
    key_file = tmp_path / "keys" / "agw.key"
    key_file.parent.mkdir()
    with PersistentTokenCache(db_path, config=CacheConfig(key_file=key_file)) as cache:
        cache.set_system_token("scope", "token")
        assert cache.key_file == key_file
    assert key_file.exists()
    assert not db_path.with_name("tokens.db.key").exists()


# -- path ----------------------------------------------------------------------------------------


def test_default_path_is_under_xdg_cache_home(tmp_path: Path) -> None:
    cache = PersistentTokenCache()
    assert cache.path == tmp_path / "xdg-cache" / "agw-persist-cache" / "tokens.db"
    assert cache.lock_dir.parent == cache.path.parent


def test_default_path_without_xdg_is_under_home_dot_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    cache = PersistentTokenCache()
    assert cache.path == tmp_path / "home" / ".cache" / "agw-persist-cache" / "tokens.db"


def test_agw_cache_path_env_is_honoured(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    env_path = tmp_path / "from-env" / "t.db"
    monkeypatch.setenv("AGW_CACHE_PATH", str(env_path))
    with PersistentTokenCache(config=CacheConfig(keys=[new_key()])) as cache:
        assert cache.path == env_path
        cache.set_system_token("scope", "token")
    assert env_path.exists()
    assert not (tmp_path / "xdg-cache").exists()


def test_argument_beats_config_path_beats_env(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AGW_CACHE_PATH", str(tmp_path / "env.db"))
    config = CacheConfig(path=tmp_path / "config.db")
    assert PersistentTokenCache(config=config).path == tmp_path / "config.db"
    assert PersistentTokenCache(tmp_path / "arg.db", config=config).path == tmp_path / "arg.db"
    assert PersistentTokenCache(str(tmp_path / "str.db")).path == tmp_path / "str.db"


def test_home_in_a_path_is_expanded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    assert PersistentTokenCache("~/t.db").path == tmp_path / "t.db"


@pytest.mark.parametrize("path", ["", "."])
def test_a_path_that_names_no_file_is_rejected(path: str) -> None:
    with pytest.raises(CacheConfigError, match="path"):
        PersistentTokenCache(path)
