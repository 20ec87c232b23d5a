"""``agw-cache --url ...`` and ``agw-cache doctor --url ...`` against a real redis-server: the
same commands as for the file, the URL's password never printed."""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import pytest
from _core_support import new_key
from _deploy_procs import base_env, run_cli
from support.redis_server import (  # noqa: F401  # fixtures
    RedisServer,
    acl_server,
    redis_server_fixture,
    redis_url_fixture,
)

from agw_persist_cache import CacheConfig, PersistentTokenCache
from agw_persist_cache.cli import main

pytestmark = pytest.mark.timeout(120)


def seed(url: str, key: str) -> list[str]:
    secrets = [f"TOKEN{uuid.uuid4().hex}", f"SCOPE{uuid.uuid4().hex}", f"JWT{uuid.uuid4().hex}"]
    with PersistentTokenCache(url=url, config=CacheConfig(keys=[key])) as cache:
        cache.set_system_token(secrets[1], secrets[0])
        cache.set_user_token(secrets[2], secrets[1], secrets[0])
    return secrets


def test_stats_list_clear_with_a_url(redis_url: str) -> None:
    key = new_key()
    secrets = seed(redis_url, key)
    env = base_env(AGW_CACHE_KEY=key)
    stats = run_cli("--url", redis_url, "stats", "--json", env=env)
    assert stats.returncode == 0, stats.stderr
    doc = json.loads(stats.stdout)
    assert (doc["backend"], doc["entries_system"], doc["entries_user"]) == ("redis", 1, 1)
    assert doc["path"] == redis_url  # no password in this URL: shown as given
    listed = run_cli("list", "--url", redis_url, env=env)
    assert listed.stdout.rstrip().endswith("2 rows")
    cleared = run_cli("clear", env=base_env(AGW_CACHE_KEY=key, AGW_CACHE_URL=redis_url))
    assert cleared.returncode == 0 and "cleared 2 rows" in cleared.stdout
    for result in (stats, listed, cleared):
        assert not any(s in result.stdout + result.stderr for s in [*secrets, key])
    with PersistentTokenCache(url=redis_url, config=CacheConfig(keys=[key])) as cache:
        assert cache.stats().entries_system == 0


def test_path_and_url_together_are_a_usage_error(redis_url: str, tmp_path: Path) -> None:
    result = run_cli("--url", redis_url, "--path", str(tmp_path / "t.db"), "stats", env=base_env())
    assert result.returncode == 2
    assert "not both" in result.stderr


def test_doctor_checks_a_healthy_redis_and_the_key_opens_its_rows(redis_url: str) -> None:
    key = new_key()
    seed(redis_url, key)
    result = run_cli("doctor", "--url", redis_url, env=base_env(AGW_CACHE_KEY=key))
    assert result.returncode == 0, result.stdout + result.stderr
    names = [line.split()[1] for line in result.stdout.splitlines()[:-1]]
    assert names == [
        "url",
        "latency",
        "version",
        "role",
        "eviction",
        "persistence",
        "clear",
        "key",
        "rows",
    ]
    assert "open the 2 rows" in result.stdout
    assert "persistence none" in " ".join(result.stdout.split())


def test_doctor_fails_on_a_foreign_key_and_on_no_key(redis_url: str) -> None:
    seed(redis_url, new_key())
    other = run_cli("doctor", "--url", redis_url, env=base_env(AGW_CACHE_KEY=new_key()))
    assert other.returncode == 1
    assert "does not open this cache: 2 rows" in other.stdout
    none = run_cli("doctor", "--url", redis_url, env=base_env())
    assert none.returncode == 1
    assert "FAIL  key" in none.stdout


def test_doctor_reports_auth_problems_without_printing_the_password(tmp_path: Path) -> None:
    password = f"pw{uuid.uuid4().hex}"
    server = acl_server(tmp_path / "acl", "agent", password).start()
    try:
        env = base_env(AGW_CACHE_KEY=new_key())
        good = run_cli("doctor", "--url", server.url, env=env)
        assert good.returncode == 0, good.stdout
        assert "agent:***@" in good.stdout
        wrong = run_cli("doctor", "--url", server.url.replace(password, "nope"), env=env)
        assert wrong.returncode == 1
        assert "FAIL  auth" in wrong.stdout
        for result in (good, wrong):
            assert password not in result.stdout + result.stderr
    finally:
        server.stop()


def test_doctor_warns_about_an_eviction_policy_that_can_drop_locks(
    redis_server: RedisServer, redis_url: str
) -> None:
    redis_server.admin("CONFIG", "SET", "maxmemory", "100mb")
    redis_server.admin("CONFIG", "SET", "maxmemory-policy", "allkeys-lru")
    try:
        result = run_cli("doctor", "--url", redis_url, env=base_env(AGW_CACHE_KEY=new_key()))
    finally:
        redis_server.admin("CONFIG", "SET", "maxmemory-policy", "noeviction")
        redis_server.admin("CONFIG", "SET", "maxmemory", "0")
    assert "warn  eviction    maxmemory-policy allkeys-lru can evict lock keys" in result.stdout
    assert result.returncode == 0  # a warning, not a failure


def test_doctor_names_an_unreachable_server() -> None:
    from support.redis_server import free_port

    url = f"redis://127.0.0.1:{free_port()}/0"
    result = run_cli("doctor", "--url", url, env=base_env(AGW_CACHE_KEY=new_key()))
    assert result.returncode == 1
    assert "FAIL  reach" in result.stdout


def test_clear_reaches_the_namespace_the_application_uses(redis_url: str) -> None:
    key = new_key()
    apps = {ns: CacheConfig(keys=[key], namespace=ns) for ns in ("my-agent", "other-agent")}
    for ns, config in apps.items():
        with PersistentTokenCache(url=redis_url, config=config) as cache:
            cache.set_system_token("scope", f"token-of-{ns}")
    env = base_env(AGW_CACHE_KEY=key)
    default = run_cli("--url", redis_url, "clear", env=env)  # the default namespace: empty
    assert default.returncode == 0 and "cleared 0 rows" in default.stdout
    assert "'agw-persist-cache'" in default.stdout
    by_option = run_cli("clear", "--url", redis_url, "--namespace", "my-agent", env=env)
    assert by_option.returncode == 0, by_option.stderr
    assert "cleared 1 rows" in by_option.stdout and "'my-agent'" in by_option.stdout
    by_env = run_cli(
        "--url", redis_url, "stats", "--json", env={**env, "AGW_CACHE_NAMESPACE": "other-agent"}
    )
    assert json.loads(by_env.stdout)["entries_system"] == 1
    for ns, config in apps.items():
        with PersistentTokenCache(url=redis_url, config=config) as cache:
            expected = None if ns == "my-agent" else f"token-of-{ns}"
            assert cache.get_system_token("scope") == expected
    bad = run_cli("--url", redis_url, "--namespace", "a b", "stats", env=env)
    assert bad.returncode == 2 and "AGW_CACHE_NAMESPACE" in bad.stderr


def test_doctor_names_a_clear_left_unfinished_and_prune_finishes_it(redis_url: str) -> None:
    from agw_persist_cache.backends.contract import Clear

    key = new_key()
    config = CacheConfig(keys=[key], namespace="my-agent")
    with PersistentTokenCache(url=redis_url, config=config) as cache:
        for i in range(3):
            cache.set_system_token(f"scope-{i}", "token")
        cache._backend.execute(Clear())  # the clearing process died before its sweep
    env = base_env(AGW_CACHE_KEY=key, AGW_CACHE_NAMESPACE="my-agent")
    before = run_cli("doctor", "--url", redis_url, env=env)
    assert "generation 1; a clear() left 3 old rows" in before.stdout, before.stdout
    assert run_cli("--url", redis_url, "prune", env=env).returncode == 0
    after = run_cli("doctor", "--url", redis_url, env=env)
    assert "generation 1; no rows left by a clear()" in after.stdout, after.stdout


def test_url_and_namespace_options_are_arguments_not_the_environment(
    redis_url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``--url``/``--namespace`` win over an environment naming another store, and the
    command leaves the environment it ran in as it found it (run in-process)."""
    key = new_key()
    with PersistentTokenCache(
        url=redis_url, config=CacheConfig(keys=[key], namespace="cli-ns")
    ) as cache:
        for i in range(2):
            cache.set_system_token(f"scope-{i}", "token")
    elsewhere = tmp_path / "elsewhere.db"
    with PersistentTokenCache(elsewhere, config=CacheConfig(keys=[key])) as cache:
        for i in range(5):
            cache.set_system_token(f"scope-{i}", "token")
    monkeypatch.setenv("AGW_CACHE_KEY", key)
    monkeypatch.setenv("AGW_CACHE_URL", f"sqlite://{elsewhere}")
    monkeypatch.setenv("AGW_CACHE_NAMESPACE", "env-ns")
    before = dict(os.environ)
    assert main(["--url", redis_url, "--namespace", "cli-ns", "stats", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert (doc["backend"], doc["entries_system"], doc["path"]) == ("redis", 2, redis_url)
    assert main(["doctor", "--url", redis_url, "--namespace", "cli-ns"]) == 0
    out = capsys.readouterr().out
    assert "open the 2 rows" in out and "2 in namespace cli-ns" in out, out
    assert main(["clear", "--url", redis_url, "--namespace", "cli-ns"]) == 0
    assert "cleared 2 rows" in capsys.readouterr().out
    assert dict(os.environ) == before
    assert main(["stats", "--json"]) == 0  # the environment's store: untouched by the clear
    doc = json.loads(capsys.readouterr().out)
    assert (doc["backend"], doc["entries_system"], doc["path"]) == ("sqlite", 5, str(elsewhere))


@pytest.mark.parametrize(
    ("info", "level"),
    [
        ({"redis_version": "4.0.14"}, "FAIL"),  # no ZPOPMIN, scripts replicated verbatim
        ({"redis_version": "5.0.14"}, "ok"),  # what the backend's commands need
        ({"redis_version": "6.0.20"}, "ok"),  # no SET PXAT: not needed either
        ({"redis_version": "7.2.4", "valkey_version": "7.2.5"}, "ok"),
    ],
)
def test_doctor_asks_for_the_version_the_commands_need(info: dict[str, str], level: str) -> None:
    from agw_persist_cache._doctor_redis import _server_checks

    class Server:  # what INFO and PING answer; the rest of the checks are not reached here
        def ping(self) -> bool:
            return True

        def info(self) -> dict[str, str]:
            return info

    checks = _server_checks(Server())
    next(checks)  # latency
    found = next(checks)
    assert (found.name, found.level) == ("version", level), found
    assert level == "ok" or "5.0 or newer" in found.detail
