"""The call path of a get-or-fetch runs downhill: every call from one module of the package to
another goes to a module below it (by the imports), the key is derived once per call, and a
miss reads the store once before it takes the cross-process lock.

Traced for real (``sys.setprofile``) on a real SQLite file, sync and async. The one call that
goes up is the runner (``_steps``) resuming the flow it was handed: that is what a sans-I/O
flow is (httpx's ``auth_flow`` drivers do the same).
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType
from typing import Any

import pytest
from support.imports import graph

from agw_persist_cache import CacheConfig, PersistentTokenCache
from agw_persist_cache.backends.contract import Read

KEY = bytes(range(32))
RUNNER = "agw_persist_cache._steps"
BACKENDS = "agw_persist_cache.backends."
CONTRACT = "agw_persist_cache.backends.contract"


def _ranks() -> dict[str, int]:
    """Each module's floor: one above the highest package module it imports."""
    imports = graph()
    ranks: dict[str, int] = {}

    def rank(name: str) -> int:
        if name not in ranks:
            ranks[name] = 1 + max((rank(other) for other in imports[name]), default=0)
        return ranks[name]

    for name in imports:
        rank(name)
    return ranks


class Trace:
    """Calls between two modules of the package: (caller, callee, function)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, str]] = []

    def __call__(self, frame: FrameType, event: str, arg: Any) -> None:
        if event != "call" or frame.f_back is None:
            return
        callee = frame.f_globals.get("__name__", "")
        caller = frame.f_back.f_globals.get("__name__", "")
        ours = callee.startswith("agw_persist_cache") and caller.startswith("agw_persist_cache")
        if ours and callee != caller:
            self.calls.append((caller, callee, frame.f_code.co_name))


@pytest.fixture
def traced() -> Iterator[Callable[[Callable[[], Any]], Trace]]:
    def run(call: Callable[[], Any]) -> Trace:
        trace = Trace()
        sys.setprofile(trace)
        try:
            call()
        finally:
            sys.setprofile(None)
        return trace

    yield run


def _cache(tmp_path: Path) -> PersistentTokenCache:
    cache = PersistentTokenCache(tmp_path / "c.db", config=CacheConfig(keys=[KEY]))
    cache.stats()  # the file exists: what is traced is the call, not the first open
    return cache


def _fetch() -> dict[str, Any]:
    return {"access_token": "t", "expires_in": 3600}


async def _afetch() -> dict[str, Any]:
    return _fetch()


def _miss_and_hit(cache: PersistentTokenCache, mode: str) -> Callable[[], Any]:
    def sync() -> None:
        cache.system_token("scope", _fetch)
        cache.system_token("scope", _fetch)

    def run_async() -> None:
        async def both() -> None:
            await cache.asystem_token("scope", _afetch)
            await cache.asystem_token("scope", _afetch)

        asyncio.run(both())

    return sync if mode == "sync" else run_async


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_every_call_between_modules_goes_down(
    tmp_path: Path, traced: Callable[[Callable[[], Any]], Trace], mode: str
) -> None:
    ranks = _ranks()
    cache = _cache(tmp_path)
    trace = traced(_miss_and_hit(cache, mode))
    cache.close()
    modules = {callee for _caller, callee, _name in trace.calls}
    assert {"agw_persist_cache._flight", "agw_persist_cache._shelf"} <= modules

    def floor(caller: str, callee: str) -> int:
        # The cache knows a backend only through the contract: a call into one from outside
        # the backends goes down to the storage layer, whichever implementation answers.
        if callee.startswith(BACKENDS) and not caller.startswith(BACKENDS):
            return ranks[CONTRACT]
        return ranks[callee]

    uphill = [
        (caller, callee, name)
        for caller, callee, name in trace.calls
        if caller != RUNNER and floor(caller, callee) >= ranks[caller]
    ]
    assert uphill == []
    entered_from_cache = {
        callee for caller, callee, _name in trace.calls if caller == "agw_persist_cache._cache"
    }
    assert entered_from_cache == {"agw_persist_cache._flight"}


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_call_derives_its_key_once_and_a_miss_reads_once_before_the_lock(
    tmp_path: Path, mode: str
) -> None:
    cache = _cache(tmp_path)
    backend, shelf = cache._backend, cache._shelf
    events: list[str] = []
    inside: list[str] = []  # a spied call made by another (aexecute -> execute) counts once

    def spy(name: str, real: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            if not inside and (name != "read" or isinstance(args[0], Read)):
                events.append(name)
            inside.append(name)
            try:
                return real(*args, **kwargs)
            finally:
                inside.pop()

        async def acall(*args: Any, **kwargs: Any) -> Any:
            if not inside and isinstance(args[0], Read):
                events.append(name)
            inside.append(name)
            try:
                return await real(*args, **kwargs)
            finally:
                inside.pop()

        return acall if asyncio.iscoroutinefunction(real) else call

    shelf.key = spy("key", shelf.key)  # type: ignore[method-assign]  # counting calls
    backend.key_lock = spy("key_lock", backend.key_lock)  # type: ignore[method-assign]
    for name in ("execute", "aexecute", "read_inline"):
        setattr(backend, name, spy("read", getattr(backend, name)))
    _miss_and_hit(cache, mode)()
    cache.close()
    first_call = events[: events.index("key", 1)]
    assert first_call.count("key") == 1
    assert first_call.index("key_lock") > 0
    assert first_call[: first_call.index("key_lock")] == ["key", "read"]
    assert first_call[first_call.index("key_lock") :].count("read") == 1  # under the lock
    second_call = events[events.index("key", 1) :]
    assert second_call == ["key", "read"]  # a hit: one key, one read
