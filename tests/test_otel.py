"""OpenTelemetry metrics, read with the OpenTelemetry SDK's in-memory metric reader: the cache's
counters, fetches by outcome, fetch and lock-wait histograms, rows by kind, attributes that
never carry a secret, and nothing at all without the ``[otel]`` extra."""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from _core_support import new_key
from _otel_reader import points, reader, value
from _scripted_ias import ScriptedIas
from _tls import USER_JWT, cache_config
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from agw_persist_cache import FetchBackoffError, PersistentTokenCache, TokenFetchError, _otel
from agw_persist_cache.agentgateway import AgentGatewayTokens, CustomerCredentials, IasTokenClient

SDK = {"backend": "sqlite"}
__all__ = ["reader"]  # a fixture, imported for pytest to find


@pytest.fixture
def ias() -> Iterator[ScriptedIas]:
    with ScriptedIas([200]) as server:
        yield server


@pytest.fixture
async def tokens(tmp_path: Path, ias: ScriptedIas) -> AsyncIterator[AgentGatewayTokens]:
    creds = CustomerCredentials(ias.url, "agent-client", "https://gateway.example")
    async with (
        PersistentTokenCache(tmp_path / "tokens.db", config=cache_config()) as cache,
        IasTokenClient(creds, timeout=5.0) as client,
    ):
        yield AgentGatewayTokens(cache, client)


async def test_hits_misses_fetches_and_rows_are_observed(
    reader: InMemoryMetricReader, tokens: AgentGatewayTokens
) -> None:
    tokens.system_token()
    await tokens.asystem_token()
    tokens.user_token(USER_JWT)
    tokens.user_token(USER_JWT)
    found = points(reader)
    assert value(found, "agw_cache.misses", **SDK) == 2
    assert value(found, "agw_cache.hits", **SDK) == 2
    for kind in ("system", "user"):
        labels = {"kind": kind, "backend": "sqlite"}
        assert value(found, "agw_cache.fetches", outcome="ok", **labels) == 1
        assert value(found, "agw_cache.fetch.duration", outcome="ok", **labels) == 1
        assert value(found, "agw_cache.rows", **labels) == 1
    for name in _otel.EVENT_COUNTERS:
        assert name in found  # every counter is reported, zeros included


async def test_a_failed_fetch_and_the_backoff_after_it_are_counted(
    reader: InMemoryMetricReader, tokens: AgentGatewayTokens, ias: ScriptedIas
) -> None:
    ias.script[:] = [400]
    with pytest.raises(TokenFetchError):
        tokens.system_token()
    with pytest.raises(FetchBackoffError):
        await tokens.asystem_token()
    found = points(reader)
    labels = {"kind": "system", "backend": "sqlite"}
    assert value(found, "agw_cache.fetches", outcome="error", **labels) == 1
    assert value(found, "agw_cache.fetches", outcome="ok", **labels) == 0
    assert value(found, "agw_cache.backoff_rejections", **SDK) == 1


async def test_attributes_are_kind_backend_and_outcome_only(
    reader: InMemoryMetricReader, tokens: AgentGatewayTokens
) -> None:
    token = tokens.user_token(USER_JWT)
    _otel.record_lock_wait(0.25, kind="user", backend="sqlite")
    found = points(reader)
    # The miss's own wait for the key's locks, recorded by the core, and the one above.
    assert value(found, "agw_cache.lock.wait", kind="user", backend="sqlite") == 2
    for name, observed in found.items():
        for attributes, _ in observed:
            assert set(attributes) <= {"kind", "backend", "outcome"}, name
            text = repr(attributes)
            for secret in (token, USER_JWT, tokens.scope_key):
                assert secret not in text


def test_counts_of_a_collected_cache_are_kept(reader: InMemoryMetricReader, tmp_path: Path) -> None:
    cache = PersistentTokenCache(tmp_path / "a.db", config=cache_config())
    _otel.register(cache)
    cache.set_system_token("scope", "token-a")
    assert cache.get_system_token("scope") == "token-a"
    assert value(points(reader), "agw_cache.hits", **SDK) == 1
    cache.close()
    del cache
    gc.collect()
    other = PersistentTokenCache(tmp_path / "b.db", config=cache_config())
    _otel.register(other)  # folds the collected cache's counts into the totals
    assert value(points(reader), "agw_cache.hits", **SDK) == 1  # a counter never goes down
    other.close()


def test_the_degraded_mode_and_tokens_served_from_memory_are_observed(
    reader: InMemoryMetricReader, tmp_path: Path
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("where the cache directory should be")
    cache = PersistentTokenCache(blocker / "cache" / "tokens.db", config=cache_config())
    healthy = PersistentTokenCache(tmp_path / "ok" / "tokens.db", config=cache_config())
    _otel.register(cache)
    _otel.register(healthy)
    healthy.set_system_token("scope", "fine")
    for _ in range(3):
        assert cache.system_token("scope", lambda: "from-memory") == "from-memory"
    found = points(reader)
    assert value(found, "agw_cache.served_from_memory", **SDK) == 2
    assert value(found, "agw_cache.degraded", **SDK) == 1  # one of the two caches
    cache.close()
    healthy.close()


_LATE_SET_UP = """
import json, sys
from opentelemetry import metrics
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from _otel_reader import points, value
from agw_persist_cache import CacheConfig, PersistentTokenCache
from agw_persist_cache.agentgateway import AgentGatewayTokens, CustomerCredentials, IasTokenClient
path, ias_url, key = sys.argv[1:]
cache = PersistentTokenCache(path, config=CacheConfig(keys=[key]))
creds = CustomerCredentials(ias_url, "agent-client", "https://gateway.example")
tokens = AgentGatewayTokens(cache, IasTokenClient(creds, timeout=5.0))
tokens.system_token()  # a miss and a fetch before any OpenTelemetry set-up
reader = InMemoryMetricReader()
metrics.set_meter_provider(MeterProvider(metric_readers=[reader]))  # the application's, late
tokens.system_token()
tokens.system_token()
cache.invalidate_system_token(tokens.scope_key)
tokens.system_token()  # a miss and a fetch after it
found = points(reader)
labels = {"kind": "system", "backend": "sqlite"}
print(json.dumps({
    "hits": value(found, "agw_cache.hits", backend="sqlite"),
    "misses": value(found, "agw_cache.misses", backend="sqlite"),
    "fetches": value(found, "agw_cache.fetches", outcome="ok", **labels),
    "rows": value(found, "agw_cache.rows", **labels),
}))
"""


def test_opentelemetry_set_up_after_the_cache_was_made_sees_its_metrics(
    tmp_path: Path, ias: ScriptedIas
) -> None:
    """The application installs its meter provider after the cache and its adapter exist
    (a process of its own: the global provider is set once per process); nothing registers
    the cache again, and its counts from before the set-up are kept."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent)}
    env.pop(_otel.ENV_SWITCH, None)
    args = [str(tmp_path / "t.db"), ias.url, new_key()]
    done = subprocess.run(
        [sys.executable, "-c", _LATE_SET_UP, *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout)
    # Counters read the cache's own counts: the miss before the set-up is in them. The fetch
    # before it went to no provider; the one after reaches the application's reader.
    assert seen == {"hits": 2, "misses": 2, "fetches": 1, "rows": 1}
    assert ias.hits == 2


_WITHOUT_OTEL = """
import sys
sys.modules["opentelemetry"] = None  # as if the [otel] extra were not installed
from agw_persist_cache import PersistentTokenCache, _otel
cache = PersistentTokenCache(sys.argv[1])
_otel.register(cache)
with _otel.fetch_timer("system", "sqlite"):
    pass
_otel.record_lock_wait(1.0, kind="system", backend="sqlite")
assert not _otel.enable()
assert _otel._instruments is None and _otel._registry == []
assert not [m for m in sys.modules if m.startswith("opentelemetry.")]
print("ok")
"""


@pytest.mark.parametrize("how", ["package missing", "AGW_CACHE_OTEL=0"])
def test_without_the_extra_or_switched_off_nothing_is_set_up(tmp_path: Path, how: str) -> None:
    env = dict(os.environ)
    script = _WITHOUT_OTEL
    if how == "AGW_CACHE_OTEL=0":
        env[_otel.ENV_SWITCH] = "0"
        script = script.replace('sys.modules["opentelemetry"] = None', "pass").replace(
            "assert not _otel.enable()\n", ""
        )
        script = script.replace(
            'assert not [m for m in sys.modules if m.startswith("opentelemetry.")]\n', ""
        )
    done = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "t.db")],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"
