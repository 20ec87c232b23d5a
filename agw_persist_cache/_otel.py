"""OpenTelemetry metrics for the token cache (extra ``[otel]``: ``opentelemetry-api`` only).

Enabled by itself when ``opentelemetry-api`` is importable (``AGW_CACHE_OTEL=0`` turns it off);
the instruments come from the global meter provider, so the application's OpenTelemetry SDK
setup (or sap-cloud-sdk's) decides where they go, and without one the API's no-op provider
drops them. Without the package every function here is a no-op.

Nothing is added to a cache hit: the event counters are *observable* instruments whose
callbacks read each live cache's per-process counters when the reader collects, and the
gauge of rows reads ``stats()`` then. Only a fetch (a miss, 100 ms or more) and a lock wait
record at event time, through :func:`fetch_timer` / :func:`record_fetch` and
:func:`record_lock_wait`.

Attributes are ``backend`` and ``kind`` (and ``outcome`` on fetches), never a token, scope,
user or digest.
"""

from __future__ import annotations

import os
import threading
import time
import weakref
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

from ._version import __version__

if TYPE_CHECKING:
    from opentelemetry.metrics import (
        CallbackOptions,
        Counter,
        Histogram,
        MeterProvider,
        Observation,
    )

ENV_SWITCH = "AGW_CACHE_OTEL"
"""``0``/``false``/``off`` disables the automatic set-up."""
METER_NAME = "agw_persist_cache"

FETCHES = "agw_cache.fetches"
FETCH_DURATION = "agw_cache.fetch.duration"
LOCK_WAIT = "agw_cache.lock.wait"
ROWS = "agw_cache.rows"
EVENT_COUNTERS: dict[str, tuple[str, str]] = {
    # metric name: (field of the cache's per-process counters, description)
    "agw_cache.hits": ("hits", "Token reads served from the cache"),
    "agw_cache.misses": ("misses", "Token reads that found no usable token"),
    "agw_cache.lock_timeouts": ("lock_timeouts", "Lock waits that timed out (fetched anyway)"),
    "agw_cache.decrypt_failures": ("decrypt_failures", "Rows no configured key could open"),
    "agw_cache.storage_errors": ("storage_errors", "Storage operations that failed"),
    "agw_cache.backoff_rejections": (
        "backoff_rejections",
        "Calls failed fast by the back-off after a failed fetch",
    ),
    "agw_cache.refreshes": ("refreshes", "Tokens replaced ahead of expiry in the background"),
    "agw_cache.served_from_memory": (
        "served_from_memory",
        "Tokens served from the process's memory tier while the store could not answer",
    ),
}
DEGRADED = "agw_cache.degraded"
OUTCOMES = ("ok", "error")


def backend_of(cache: object) -> str:
    """The storage backend's name for the ``backend`` attribute (``sqlite`` by default)."""
    name = getattr(cache, "backend_name", "sqlite")
    return name if isinstance(name, str) else "sqlite"


@dataclass
class _Registered:
    ref: weakref.ReferenceType[Any]
    counters: object  # the cache's per-process counters, kept after the cache is gone
    backend: str


@dataclass
class _Instruments:
    fetches: Counter
    fetch_duration: Histogram
    lock_wait: Histogram
    provider: object  # keeps observable instruments' provider alive


_lock = threading.Lock()
_setup_lock = threading.Lock()  # one set-up at a time: instruments are created once per provider
_registry: list[_Registered] = []
_retired: dict[tuple[str, str], int] = {}
"""(backend, field): counts of caches that are gone, so that the counters never go down."""
_instruments: _Instruments | None = None
_switched_off = False


def _api_available() -> bool:
    try:
        import opentelemetry.metrics  # noqa: F401  (probe only)
    except ImportError:
        return False
    return True


def _wanted() -> bool:
    return os.environ.get(ENV_SWITCH, "1").strip().lower() not in ("0", "false", "no", "off")


def enable(meter_provider: MeterProvider | None = None) -> bool:
    """Create the instruments on ``meter_provider`` (default: the global one).

    Called by itself on the first registered cache; call it to use a provider of your own.
    Returns False when ``opentelemetry-api`` is not installed.
    """
    if not _api_available():
        return False
    from opentelemetry import metrics

    with _setup_lock:
        provider = meter_provider or metrics.get_meter_provider()
        if _instruments is None or _instruments.provider is not provider:
            _set_up(provider)
    return True


def _set_up(provider: MeterProvider) -> None:
    global _instruments, _switched_off
    meter = provider.get_meter(METER_NAME, __version__)
    for name, (field, description) in EVENT_COUNTERS.items():
        meter.create_observable_counter(
            name,
            callbacks=[partial(_observe_counter, field)],
            unit="{event}",
            description=description,
        )
    meter.create_observable_gauge(
        ROWS, callbacks=[_observe_rows], unit="{row}", description="Cached tokens by kind"
    )
    meter.create_observable_gauge(
        DEGRADED,
        callbacks=[_observe_degraded],
        unit="{cache}",
        description="Caches of this process whose store cannot be used (memory tier only)",
    )
    with _lock:
        _switched_off = False
        _instruments = _Instruments(
            fetches=meter.create_counter(
                FETCHES, unit="{fetch}", description="Token fetches from the identity service"
            ),
            fetch_duration=meter.create_histogram(
                FETCH_DURATION, unit="s", description="Duration of token fetches"
            ),
            lock_wait=meter.create_histogram(
                LOCK_WAIT, unit="s", description="Time spent waiting for a key's lock"
            ),
            provider=provider,
        )


def disable() -> None:
    """Stop recording (the instruments already handed to a provider then observe nothing)."""
    global _instruments, _switched_off
    with _lock:
        _instruments = None
        _switched_off = True
        _registry.clear()
        _retired.clear()


def reset() -> None:
    """Forget every instrument and cache and go back to the automatic set-up (for tests)."""
    global _switched_off
    disable()
    with _lock:
        _switched_off = False


def register(cache: object) -> None:
    """Let the observable instruments read ``cache`` (weakly: it is not kept alive).

    The one place a cache is registered: by itself when built, or by ``instrument()``.
    Adapters register nothing: the instruments come from the API's global provider, a
    proxy until the application installs its own, so a provider set up after the cache was
    built receives them (and the counts from before) with nothing registered again."""
    if _switched_off or (_instruments is None and not (_wanted() and _api_available())):
        return
    if _instruments is None:
        enable()  # the global provider; a second caller finds it set up
    counters = getattr(cache, "_counters", None)
    if counters is None:
        return
    with _lock:
        if any(entry.ref() is cache for entry in _registry):
            return
        _retire_dead()
        _registry.append(_Registered(weakref.ref(cache), counters, backend_of(cache)))


def _retire_dead() -> None:
    """Fold the counts of caches that are gone into ``_retired``; called with the lock held."""
    for entry in [e for e in _registry if e.ref() is None]:
        for field, _ in EVENT_COUNTERS.values():
            key = (entry.backend, field)
            _retired[key] = _retired.get(key, 0) + int(getattr(entry.counters, field))
        _registry.remove(entry)


def record_fetch(seconds: float, *, kind: str, backend: str, outcome: str) -> None:
    """One fetch from the identity service ended with ``outcome`` (``ok`` or ``error``)."""
    instruments = _instruments
    if instruments is None:
        return
    attributes = {"kind": kind, "backend": backend, "outcome": outcome}
    instruments.fetches.add(1, attributes)
    instruments.fetch_duration.record(seconds, attributes)


def record_lock_wait(seconds: float, *, kind: str, backend: str) -> None:
    """Time a caller waited for a key's lock (in-process and cross-process together)."""
    instruments = _instruments
    if instruments is None:
        return
    instruments.lock_wait.record(seconds, {"kind": kind, "backend": backend})


@contextmanager
def fetch_timer(kind: str, backend: str) -> Iterator[None]:
    """Time the fetch in the block and record it with its outcome (an exception: ``error``)."""
    started = time.perf_counter()
    outcome = "error"
    try:
        yield
        outcome = "ok"
    finally:
        record_fetch(time.perf_counter() - started, kind=kind, backend=backend, outcome=outcome)


# -- callbacks, run by the reader at collection time -------------------------------------------


def _observe_counter(field: str, options: CallbackOptions) -> Iterable[Observation]:
    from opentelemetry.metrics import Observation

    with _lock:
        registered = list(_registry)
        totals = {backend: n for (backend, f), n in _retired.items() if f == field}
    for entry in registered:
        totals[entry.backend] = totals.get(entry.backend, 0) + int(getattr(entry.counters, field))
    return [Observation(total, {"backend": backend}) for backend, total in totals.items()]


def _observe_degraded(options: CallbackOptions) -> Iterable[Observation]:
    from opentelemetry.metrics import Observation

    with _lock:
        live = [(entry.ref(), entry.backend) for entry in _registry]
    degraded: dict[str, int] = {}
    for cache, backend in live:
        health = getattr(cache, "_health", None)
        if health is None:
            continue
        degraded[backend] = degraded.get(backend, 0) + (health.mode == "degraded")
    return [Observation(n, {"backend": backend}) for backend, n in degraded.items()]


def _observe_rows(options: CallbackOptions) -> Iterable[Observation]:
    from opentelemetry.metrics import Observation

    with _lock:
        live = [(entry.ref(), entry.backend) for entry in _registry]
    rows: dict[tuple[str, str], int] = {}
    seen: set[tuple[str, str]] = set()
    for cache, backend in live:
        if cache is None or (backend, str(cache.path)) in seen:
            continue  # gone, or a second handle on a store already counted
        seen.add((backend, str(cache.path)))
        try:
            stats = cache.stats()
        except Exception:  # a broken store must not break the reader
            continue
        for kind in ("system", "user"):
            key = (backend, kind)
            rows[key] = rows.get(key, 0) + int(getattr(stats, f"entries_{kind}", 0))
    return [Observation(n, {"backend": b, "kind": k}) for (b, k), n in rows.items()]
