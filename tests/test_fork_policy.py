"""The one fork and thread policy (``agw_persist_cache/_fork.py``; issue 21).

Read from the sources: no module but ``_fork`` starts a thread or registers a fork hook, and
every thread name it knows is in README's resource model. Then real forks (``os.fork()`` and
multiprocessing's "fork"): the child's Redis backend and IAS client build their own pools
and work while the parent's keep theirs (the same Redis connection, the same TLS
connection), and threads the child starts (lock waiters, the wake-up subscription) work.
"""

from __future__ import annotations

import ast
import contextlib
import json
import multiprocessing
import os
import re
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from _tls import (
    USER_JWT,
    TlsMaterial,
    cache_config,
    eventually,
    make_tls,
    mtls_credentials,
    mtls_token_server,
)
from support.redis_server import (  # noqa: F401  # fixtures
    RedisServer,
    own_redis_fixture,
    redis_server_fixture,
    redis_url_fixture,
)

import agw_persist_cache
from agw_persist_cache import CacheConfig, PersistentTokenCache, _fork
from agw_persist_cache._log import Warnings
from agw_persist_cache.agentgateway import AgentGatewayTokens, IasTokenClient
from agw_persist_cache.backends import _redis_lock
from agw_persist_cache.backends._filelocks import OFD_SUPPORTED, KeyLockFiles
from agw_persist_cache.backends.contract import LockResult

pytestmark = [pytest.mark.timeout(300), pytest.mark.filterwarnings("ignore::DeprecationWarning")]

PACKAGE = Path(agw_persist_cache.__file__).parent
README = PACKAGE.parent / "README.md"
KEY = b"\x07" * 32

# -- read from the sources ---------------------------------------------------------------


def _own_policy_calls(path: Path) -> list[str]:
    """``threading.Thread(...)`` / ``Thread(...)`` / ``os.register_at_fork(...)`` calls, and
    classes made from ``threading.Thread``, in ``path``, as ``line: source``."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    thread_names = {"Thread"} & {
        alias.asname or alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module == "threading"
        for alias in node.names
    }
    found = []
    for node in ast.walk(tree):
        targets: list[ast.expr] = []
        if isinstance(node, ast.Call):
            targets = [node.func]
        elif isinstance(node, ast.ClassDef):
            targets = list(node.bases)
        for target in targets:
            dotted = ast.unparse(target)
            if dotted in ("threading.Thread", "os.register_at_fork") or dotted in thread_names:
                found.append(f"{node.lineno}: {dotted}")
    return found


def test_no_module_but_fork_starts_threads_or_registers_fork_hooks() -> None:
    offenders = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        name = path.relative_to(PACKAGE).as_posix()
        calls = _own_policy_calls(path)
        if name != "_fork.py" and calls:
            offenders[name] = calls
    assert offenders == {}
    assert _own_policy_calls(PACKAGE / "_fork.py")  # the check sees a call where there is one


def test_every_thread_started_through_fork_has_a_known_name() -> None:
    started: set[str] = set()
    literals: set[str] = set()
    for path in PACKAGE.rglob("*.py"):
        if path.name == "_fork.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                literals.add(node.value)
            if isinstance(node, ast.Call) and ast.unparse(node.func).endswith("start_thread"):
                first = node.args[0]
                assert isinstance(first, ast.Constant), f"{path}: {ast.unparse(node)}"
                started.add(first.value)
    assert started <= set(_fork.THREADS)
    assert {"agw-cache-lock-wait", "agw-cache-redis-lease"} <= started
    assert set(_fork.THREADS) <= literals  # no name listed for a thread nobody starts
    with pytest.raises(ValueError, match="unknown thread kind"):
        _fork.start_thread("agw-cache-unlisted", lambda: None)


def _resource_model() -> str:
    text = README.read_text(encoding="utf-8")
    match = re.search(r"^## Resource model\n(.*?)^## ", text, re.M | re.S)
    assert match is not None, "README has no '## Resource model' section"
    return match.group(1)


def test_readme_resource_model_lists_every_thread_and_the_fork_of_each_resource() -> None:
    section = _resource_model()
    listed = set(re.findall(r"^\| `(agw-cache-[a-z-]+)` \|", section, re.M))
    assert listed == set(_fork.THREADS)
    for resource in ("SQLite connections", "key lock descriptors", "Redis pools", "IAS client"):
        assert resource in section


# -- real forks --------------------------------------------------------------------------


class Forked:
    """A child made by ``os.fork()`` or multiprocessing's "fork" that runs ``work()`` and
    reports its JSON-able result (or the traceback of what it raised) over a pipe."""

    def __init__(self, how: str, work: Callable[[], dict[str, Any]]) -> None:
        ctx = multiprocessing.get_context("fork")
        self._receive, send = ctx.Pipe(duplex=False)
        self._proc: Any = None
        self._pid = 0
        if how == "os.fork":
            self._pid = os.fork()
            if self._pid == 0:
                _report(work, send)
        else:
            self._proc = ctx.Process(target=_report, args=(work, send))
            self._proc.start()
        send.close()

    def result(self, timeout: float = 120.0) -> dict[str, Any]:
        try:
            assert self._receive.poll(timeout), "the child reported nothing"
            report: dict[str, Any] = json.loads(self._receive.recv())
        finally:
            code = self._reap()
        assert "error" not in report, report.get("error")
        assert code == 0
        return report

    def _reap(self) -> int | None:
        if self._proc is not None:
            self._proc.join(60)
            if self._proc.is_alive():
                self._proc.kill()
                self._proc.join()
            code: int | None = self._proc.exitcode
            return code
        _, status = os.waitpid(self._pid, 0)
        return os.waitstatus_to_exitcode(status)


def _report(work: Callable[[], dict[str, Any]], send: Any) -> None:
    code = 1
    try:
        try:
            report = work()
        except BaseException:
            report = {"error": traceback.format_exc()}
        send.send(json.dumps(report))
        code = 0
    finally:
        os._exit(code)


def _client_ids(server: RedisServer) -> set[str]:
    """The ids of the connections the server has, not counting the one asking."""
    listing = server.admin("CLIENT", "LIST").decode(errors="replace")
    return {
        line.split()[0]
        for line in listing.splitlines()
        if line.startswith("id=") and "cmd=client|list" not in line
    }


def _agw_threads() -> list[str]:
    return sorted(t.name for t in threading.enumerate() if t.name.startswith("agw-cache-"))


@pytest.fixture(scope="module")
def tls() -> TlsMaterial:
    return make_tls()


HOW = ["os.fork", "multiprocessing"]


@pytest.mark.parametrize("how", HOW)
def test_a_forked_child_builds_its_own_redis_and_ias_pools_and_the_parents_keep_theirs(
    how: str, own_redis: RedisServer, tls: TlsMaterial, tmp_path: Path
) -> None:
    with mtls_token_server(tls) as server:
        credentials = mtls_credentials(tls, server.token_url)
        ias = IasTokenClient(credentials, ca_file=tls.write_ca(tmp_path))
        cache = PersistentTokenCache(url=own_redis.url, config=cache_config())
        tokens = AgentGatewayTokens(cache, ias)
        system = tokens.system_token()  # a miss: IAS request 1, the parent's connection
        parents = _client_ids(own_redis)
        assert parents and server.connections == 1

        def child() -> dict[str, Any]:
            seen = {
                "system": tokens.system_token(),
                "user": tokens.user_token(USER_JWT),  # a miss: the child's own IAS connection
                "ids": sorted(_client_ids(own_redis)),  # while the child's pool is open
                "threads": _agw_threads(),  # its own deadline watchdog among them
            }
            cache.close()  # closes the child's pools only
            ias.close()
            return seen

        seen = Forked(how, child).result()
        assert seen["system"] == system
        assert "agw-cache-redis-deadlines" in seen["threads"]
        childs = set(seen["ids"]) - parents
        assert childs and parents <= set(seen["ids"])  # the child opened its own
        assert eventually(lambda: _client_ids(own_redis) == parents)  # the child's are gone
        assert (server.requests, server.connections) == (2, 2)

        # The parent's pools still work, on the very same connections.
        assert tokens.user_token(USER_JWT) == seen["user"]  # stored by the child: no request
        assert ias.fetch_system_token()["access_token"] != system  # the parent's TLS session
        assert (server.requests, server.connections) == (3, 2)
        assert _client_ids(own_redis) == parents
        cache.close()
        ias.close()
    assert eventually(lambda: _client_ids(own_redis) == set())


def _key_lock_descriptors(path: Path) -> int:
    """Descriptors of this process open on ``path`` (from /proc/self/fd)."""
    target, count = os.path.realpath(path), 0
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # the descriptor listdir used, gone already
            count += os.readlink(f"/proc/self/fd/{fd}") == target
    return count


def _wait_in_a_thread(lock: Any, thread: str, waiting: Any) -> str:
    """``lock.acquire(60)`` in a thread of the child; ``waiting`` is set once the package's
    ``thread`` runs; returns the outcome's name."""
    outcome: list[LockResult] = []
    caller = threading.Thread(target=lambda: outcome.append(lock.acquire(60.0)))
    caller.start()
    deadline = time.monotonic() + 60
    while thread not in _agw_threads() and time.monotonic() < deadline:
        time.sleep(0.01)
    waiting.set()
    caller.join(90)
    lock.release()
    return outcome[0].name if outcome else "still waiting"


@pytest.mark.skipif(not OFD_SUPPORTED, reason="open-file-description locks need Linux")
@pytest.mark.parametrize("how", HOW)
def test_a_forked_childs_key_lock_waiter_lands_when_the_parent_lets_go(
    how: str, tmp_path: Path
) -> None:
    files = KeyLockFiles(tmp_path, stripes=1, ofd=True)
    held = files.key_lock(KEY)
    assert held.acquire(None) is LockResult.HELD
    waiting = multiprocessing.get_context("fork").Event()

    def child() -> dict[str, Any]:
        inherited = _key_lock_descriptors(files.path(KEY))  # closed by the fork hook
        busy = files.key_lock(KEY).acquire(None).name  # still the parent's
        landed = _wait_in_a_thread(files.key_lock(KEY), "agw-cache-lock-wait", waiting)
        return {"inherited": inherited, "busy": busy, "landed": landed}

    forked = Forked(how, child)
    assert _key_lock_descriptors(files.path(KEY)) == 1  # the parent's, held
    assert waiting.wait(90)
    time.sleep(0.2)  # the waiter is in the kernel by now (it lands either way)
    held.release()
    seen = forked.result()
    assert seen == {"inherited": 0, "busy": "BUSY", "landed": "LANDED"}
    assert files.key_lock(KEY).acquire(None) is LockResult.HELD  # nothing left locked


@pytest.mark.parametrize("how", HOW)
def test_a_forked_childs_redis_waiter_is_woken_by_its_own_subscription(
    how: str, own_redis: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    from agw_persist_cache.backends.redis import RedisBackend

    monkeypatch.setattr(_redis_lock, "POLL_SECONDS", 30.0)  # only a wake-up ends a wait
    config = CacheConfig(lock_lease_seconds=1.0)
    backend = RedisBackend(own_redis.url, config, Warnings())
    held = backend.key_lock(KEY)
    assert held.acquire(None) is LockResult.HELD
    assert "agw-cache-redis-lease" in _agw_threads()
    waiting = multiprocessing.get_context("fork").Event()

    def child() -> dict[str, Any]:
        threads = _agw_threads()  # none came along
        time.sleep(1.5)  # past the lease: only the parent's keeper keeps it
        busy = backend.key_lock(KEY).acquire(None).name
        # Woken when the child's subscription takes effect (everyone looks again then)...
        subscribed = backend.key_lock(KEY).acquire(60.0).name
        # ...which lingers: this wait ends only with the parent's release.
        landed = _wait_in_a_thread(backend.key_lock(KEY), "agw-cache-redis-wakeups", waiting)
        mine = backend.key_lock(KEY)
        held = mine.acquire(None).name
        holding = _agw_threads()  # the child's own lease keeper
        time.sleep(1.5)  # past the lease: the child's keeper renews it
        kept = backend.key_lock(KEY).acquire(None).name
        mine.release()
        return {
            "threads": threads,
            "results": [busy, subscribed, landed, held, kept],
            "holding": holding,
        }

    forked = Forked(how, child)
    assert waiting.wait(90)
    time.sleep(1.5)  # the child's waiter is waiting by now (a release before would be HELD)
    held.release()
    seen = forked.result()
    assert seen["threads"] == []
    assert seen["results"] == ["BUSY", "LANDED", "LANDED", "HELD", "BUSY"]
    assert "agw-cache-redis-lease" in seen["holding"]
    assert set(seen["holding"]) <= set(_fork.THREADS)
    assert backend.key_lock(KEY).acquire(None) is LockResult.HELD  # the parent's pools work
    backend.close()
