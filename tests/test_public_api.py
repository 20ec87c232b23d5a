"""The public surface: what ``agw_persist_cache`` exports, and that each export says what it is."""

from __future__ import annotations

import inspect
import types
from pathlib import Path

import pytest
from _core_support import new_key
from _otel_reader import points, value
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

import agw_persist_cache
from agw_persist_cache import (
    CacheConfig,
    CacheConfigError,
    CachedToken,
    CacheError,
    CacheStats,
    EntryInfo,
    FetchBackoffError,
    PersistentTokenCache,
    TokenFetchError,
    _otel,
    instrument,
)

# The names the issue promises users: importing them above is half the test.
CONTRACT = {
    cls.__name__
    for cls in (CacheConfig, CacheConfigError, CacheError, CachedToken, CacheStats, EntryInfo)
} | {cls.__name__ for cls in (FetchBackoffError, PersistentTokenCache, TokenFetchError)}
CONTRACT |= {instrument.__name__}  # what the README tells users to call for metrics


def test_all_is_sorted_and_unique() -> None:
    names = agw_persist_cache.__all__
    assert names == sorted(names)
    assert len(set(names)) == len(names)


def test_all_is_complete_and_holds_only_real_names() -> None:
    public = {
        name
        for name, value in vars(agw_persist_cache).items()
        if not name.startswith("_") and not isinstance(value, types.ModuleType)
    }
    assert public <= set(agw_persist_cache.__all__)
    assert all(hasattr(agw_persist_cache, name) for name in agw_persist_cache.__all__)


def test_the_documented_contract_is_exported() -> None:
    assert set(agw_persist_cache.__all__) >= CONTRACT


def test_every_exported_class_and_function_has_a_docstring() -> None:
    missing = [
        name
        for name in agw_persist_cache.__all__
        if (inspect.isclass(obj := getattr(agw_persist_cache, name)) or inspect.isfunction(obj))
        and not (inspect.getdoc(obj) or "").strip()
    ]
    assert missing == []
    assert (agw_persist_cache.__doc__ or "").strip()


def test_exported_classes_live_in_private_modules_but_present_as_the_package() -> None:
    for name in CONTRACT:
        module = getattr(agw_persist_cache, name).__module__
        assert module.startswith("agw_persist_cache._"), (name, module)


def test_error_hierarchy() -> None:
    assert issubclass(CacheConfigError, CacheError)
    assert issubclass(CacheConfigError, ValueError)
    assert issubclass(TokenFetchError, CacheError)
    assert issubclass(FetchBackoffError, TokenFetchError)
    assert TokenFetchError("no", status=401).status == 401
    backoff = FetchBackoffError(retry_after=2.5, cause_type="ConnectError", status=None)
    assert backoff.retry_after == 2.5
    assert "ConnectError" in str(backoff)


def test_sync_methods_have_async_twins() -> None:
    sync = [
        "get_system_token",
        "set_system_token",
        "invalidate_system_token",
        "get_user_token",
        "set_user_token",
        "invalidate_user_token",
        "system_token",
        "user_token",
        "get_entry",
        "set_entry",
        "invalidate_entry",
        "fetch_entry",
        "clear",
        "prune",
        "close",
    ]
    for name in sync:
        twin = getattr(PersistentTokenCache, "a" + name)
        assert inspect.iscoroutinefunction(twin), name
        plain = list(inspect.signature(getattr(PersistentTokenCache, name)).parameters)
        twin_params = ["fetch" if p == "afetch" else p for p in inspect.signature(twin).parameters]
        assert twin_params == plain, name
    assert inspect.iscoroutinefunction(PersistentTokenCache.__aenter__)


def test_the_package_is_typed() -> None:
    assert (Path(agw_persist_cache.__file__).parent / "py.typed").is_file()


def test_instrument_reports_a_cache_built_while_metrics_were_off(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _otel.reset()
    monkeypatch.setenv(_otel.ENV_SWITCH, "0")
    cache = PersistentTokenCache(tmp_path / "tokens.db", config=CacheConfig(keys=[new_key()]))
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    try:
        assert cache.set_system_token("scope", "token")
        assert cache.get_system_token("scope") == "token"
        assert _otel.enable(provider)
        assert value(points(reader), "agw_cache.hits", backend="sqlite") == 0
        instrument(cache)
        instrument(cache)  # counted once
        assert value(points(reader), "agw_cache.hits", backend="sqlite") == 1
    finally:
        _otel.reset()
        provider.shutdown()
        cache.close()
