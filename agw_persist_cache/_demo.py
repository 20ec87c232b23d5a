"""``agw-cache demo``: N worker processes share one token, measured against a local endpoint.

Needs no configuration: it starts a token endpoint on 127.0.0.1 with a realistic delay,
runs worker processes (fresh, as after a deploy) whose concurrent callers each make a few
calls that need a token, then starts them again ("restart"). The same workload then runs
with a per-process in-memory cache (the sap-cloud-sdk default) for comparison.

One word for one thing: a *caller* is a thread in a worker, a *call* is one
``system_token`` call of a caller, a *token request* is one request the endpoint received.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import queue
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from multiprocessing.context import ForkServerContext
from multiprocessing.synchronize import Event
from pathlib import Path
from typing import Any, Protocol, TextIO

from . import CacheConfig, CacheError, PersistentTokenCache, _fork
from ._cli_common import EXIT_OK, EXIT_PROBLEMS, UsageError, table_lines
from ._demo_endpoint import DemoTokenEndpoint

SCOPE = "demo-agent-gateway"
PHASES = (
    ("persistent", "start"),
    ("persistent", "restart"),
    ("in-memory", "start"),
    ("in-memory", "restart"),
)
PHASE_TIMEOUT_SECONDS = 60.0  # only a hung worker hits this; a slow machine must not

TokenData = Mapping[str, Any]


class DemoError(Exception):
    """The demo could not complete (a worker hung or died)."""


class _MemoryCache:
    """The per-process baseline: a dict with in-process single flight, lost on restart."""

    def __init__(self) -> None:
        self._tokens: dict[str, tuple[str, float]] = {}
        self._lock = threading.Lock()

    def system_token(self, scope_key: str, fetch: Callable[[], TokenData]) -> str:
        with self._lock:
            hit = self._tokens.get(scope_key)
            if hit is not None and hit[1] > time.time():
                return hit[0]
            data = fetch()
            token = str(data["access_token"])
            self._tokens[scope_key] = (token, time.time() + float(data["expires_in"]) - 30)
            return token

    def close(self) -> None:
        self._tokens.clear()


def _percentile(sorted_values: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile of already sorted values (0 for none)."""
    if not sorted_values:
        return 0.0
    rank = max(1, -(-len(sorted_values) * pct // 100))
    return sorted_values[int(rank) - 1]


# Why a call can fail, by exception class: what to do about it.
HINTS = {
    "FetchBackoffError": "another caller's fetch had just failed, and this key was backed off "
    "for fetch_backoff_seconds: the first failure listed is the cause",
    "HTTPStatusError": "the token endpoint answered with an error status (a real identity "
    "service: check the credentials and the token URL)",
    "ConnectTimeout": "the local token endpoint did not accept the connection in time: the "
    "machine is overloaded; try fewer --workers or --callers",
    "ReadTimeout": "the local token endpoint did not answer in time: the machine is "
    "overloaded; try fewer --workers or --callers",
    "ConnectError": "could not connect to the local token endpoint (connection refused or "
    "reset): try fewer --workers or --callers",
}
GENERIC_HINT = "unexpected here; run with fewer --workers to see whether load causes it"


def _failure_lines(results: Sequence[PhaseResult]) -> list[str]:
    """Per phase and exception class: how many calls failed with it, and what to do."""
    lines = []
    for result in results:
        for name, count in sorted(result.failures.items(), key=lambda item: (-item[1], item[0])):
            noun = "call" if count == 1 else "calls"
            lines.append(
                f"  {result.cache} {result.phase}: {count} {noun} failed with {name}: "
                f"{HINTS.get(name, GENERIC_HINT)}"
            )
    return lines


def _worker(
    kind: str,
    path: str,
    key: bytes,
    token_url: str,
    callers: int,
    rounds: int,
    go: Event,
    results: multiprocessing.Queue[tuple[Any, ...]],
) -> None:
    """One worker process: ``callers`` concurrent threads, ``rounds`` calls each."""
    import httpx  # here, not at the top: every other agw-cache command starts without it

    client = httpx.Client(timeout=30.0)
    fetches = [0]
    failures: dict[str, int] = {}
    lock = threading.Lock()
    latencies: list[float] = []

    def fetch() -> TokenData:
        with lock:
            fetches[0] += 1
        response = client.post(token_url, data={"grant_type": "client_credentials"})
        response.raise_for_status()
        body = response.json()
        return {"access_token": body["access_token"], "expires_in": body["expires_in"]}

    cache: PersistentTokenCache | _MemoryCache
    if kind == "persistent":
        cache = PersistentTokenCache(path, config=CacheConfig(keys=[key]))
        cache.stats()  # open the file at boot, as an app that builds its cache at import does
    else:
        cache = _MemoryCache()

    def caller() -> None:
        for _ in range(rounds):
            start = time.perf_counter()
            try:
                cache.system_token(SCOPE, fetch)
            except (httpx.HTTPError, CacheError, OSError) as exc:  # reported; the demo goes on
                with lock:
                    name = type(exc).__name__
                    failures[name] = failures.get(name, 0) + 1
            with lock:
                latencies.append((time.perf_counter() - start) * 1000.0)
        results.put(("tick", os.getpid()))

    results.put(("ready", os.getpid()))
    if go.wait(PHASE_TIMEOUT_SECONDS):
        pool = [_fork.start_thread("agw-cache-demo-caller", caller) for _ in range(callers)]
        for thread in pool:
            thread.join()
    results.put(("done", os.getpid(), latencies, fetches[0], failures))
    cache.close()
    client.close()


@dataclass
class PhaseResult:
    """What one phase measured; ``latencies_ms`` stays out of the JSON."""

    cache: str
    phase: str
    processes: int
    calls: int
    token_requests: int
    fetches: int
    failed_calls: int
    failures: dict[str, int]
    seconds: float
    latencies_ms: list[float] = field(repr=False)

    @property
    def hit_ratio(self) -> float:
        return 1.0 - self.fetches / self.calls if self.calls else 0.0

    def to_json(self) -> dict[str, Any]:
        doc = asdict(self)
        del doc["latencies_ms"]
        ordered = sorted(self.latencies_ms)
        doc.update(
            hit_ratio=round(self.hit_ratio, 4),
            p50_ms=round(_percentile(ordered, 50), 2),
            p99_ms=round(_percentile(ordered, 99), 2),
        )
        return doc


class Progress(Protocol):
    """Where the demo reports progress while it runs (rich or plain text, on stderr)."""

    def start(self, label: str, total: int) -> None: ...
    def advance(self) -> None: ...
    def finish(self, summary: str) -> None: ...


class PlainProgress:
    """One line per phase on stderr, for terminals without rich and for logs."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream

    def start(self, label: str, total: int) -> None:
        self._stream.write(f"{label} ...")
        self._stream.flush()

    def advance(self) -> None:
        return None

    def finish(self, summary: str) -> None:
        self._stream.write(f" {summary}\n")
        self._stream.flush()


class RichProgress:
    """A live progress bar per phase (rich, the ``demo`` extra)."""

    def __init__(self) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

        self._progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[summary]}"),
            console=Console(stderr=True),
        )
        self._task: Any = None

    def __enter__(self) -> RichProgress:
        self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.stop()

    def start(self, label: str, total: int) -> None:
        self._task = self._progress.add_task(label, total=total, summary="")

    def advance(self) -> None:
        self._progress.advance(self._task)

    def finish(self, summary: str) -> None:
        self._progress.update(self._task, summary=summary)


def _collect(
    results: multiprocessing.Queue[tuple[Any, ...]],
    kind: str,
    want: int,
    deadline: float,
    progress: Progress,
) -> list[tuple[Any, ...]]:
    """Read messages of ``kind`` until ``want`` arrived; ticks advance the progress display."""
    got: list[tuple[Any, ...]] = []
    while len(got) < want:
        try:
            message = results.get(timeout=max(0.1, deadline - time.monotonic()))
        except queue.Empty:
            raise DemoError(f"workers did not report {kind!r} in time") from None
        if message[0] == "tick":
            progress.advance()
        elif message[0] == kind:
            got.append(message)
    return got


def _run_phase(
    ctx: ForkServerContext,
    server: DemoTokenEndpoint,
    kind: str,
    phase: str,
    settings: DemoSettings,
    cache_path: Path,
    key: bytes,
    progress: Progress,
) -> PhaseResult:
    """Start the workers, release them together, gather their numbers, reap them."""
    deadline = time.monotonic() + PHASE_TIMEOUT_SECONDS
    results: multiprocessing.Queue[tuple[Any, ...]] = ctx.Queue()
    go = ctx.Event()
    args = (kind, str(cache_path), key, server.token_url, settings.callers, settings.rounds, go)
    procs = [
        ctx.Process(target=_worker, args=(*args, results), daemon=True)
        for _ in range(settings.workers)
    ]
    label = f"{kind + ' cache,':<18} {phase:<8}"
    progress.start(label, settings.workers * settings.callers)
    try:
        for proc in procs:
            proc.start()
        _collect(results, "ready", settings.workers, deadline, progress)
        before = server.token_requests
        started = time.perf_counter()
        go.set()
        done = _collect(results, "done", settings.workers, deadline, progress)
        seconds = time.perf_counter() - started
        token_requests = server.token_requests - before
    finally:
        go.set()
        for proc in procs:
            proc.join(timeout=5)
            if proc.is_alive():
                proc.terminate()
                proc.join()
        results.close()
        results.join_thread()
    failures: dict[str, int] = {}
    for message in done:
        for name, count in message[4].items():
            failures[name] = failures.get(name, 0) + count
    result = PhaseResult(
        cache=kind,
        phase=phase,
        processes=settings.workers,
        calls=settings.workers * settings.callers * settings.rounds,
        token_requests=token_requests,
        fetches=sum(message[3] for message in done),
        failed_calls=sum(failures.values()),
        failures=failures,
        seconds=round(seconds, 3),
        latencies_ms=[latency for message in done for latency in message[2]],
    )
    noun = "request" if token_requests == 1 else "requests"
    progress.finish(f"{token_requests} token {noun}, {seconds:.1f} s")
    return result


@dataclass(frozen=True)
class DemoSettings:
    """The workload: processes x concurrent callers x sequential calls, endpoint delay."""

    workers: int = 4
    callers: int = 8
    rounds: int = 5
    delay_ms: float = 150.0

    def validate(self) -> None:
        limits = {"--workers": self.workers, "--callers": self.callers, "--rounds": self.rounds}
        for flag, value in limits.items():
            if not 1 <= value <= 64:
                raise UsageError(f"{flag} must be between 1 and 64, got {value}")
        if not 0 <= self.delay_ms <= 5000:
            raise UsageError(f"--delay-ms must be between 0 and 5000, got {self.delay_ms}")


def run_demo(settings: DemoSettings, progress: Progress) -> list[PhaseResult]:
    """Run all phases against a fresh temporary cache and a local token endpoint."""
    # Fresh processes, as after a deploy, forked from a server that imported this package
    # once: much cheaper than spawn's import per worker, and no threads are forked.
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload([__name__])
    key = os.urandom(32)
    with (
        DemoTokenEndpoint(delay=settings.delay_ms / 1000.0) as server,
        tempfile.TemporaryDirectory(prefix="agw-cache-demo-") as tmp,
    ):
        cache_path = Path(tmp) / "tokens.db"
        with PersistentTokenCache(cache_path, config=CacheConfig(keys=[key])) as cache:
            cache.stats()  # create the schema once, before the workers race to open it
        return [
            _run_phase(ctx, server, kind, phase, settings, cache_path, key, progress)
            for kind, phase in PHASES
        ]


COLUMNS = ("cache", "phase", "procs", "calls", "token requests", "hit ratio", "p50 ms", "p99 ms")


def _rows(results: Sequence[PhaseResult]) -> list[tuple[str, ...]]:
    rows: list[tuple[str, ...]] = []
    for result in results:
        doc = result.to_json()
        rows.append(
            (
                result.cache,
                result.phase,
                str(result.processes),
                str(result.calls),
                str(result.token_requests),
                f"{doc['hit_ratio']:.1%}",
                f"{doc['p50_ms']:.2f}",
                f"{doc['p99_ms']:.2f}",
            )
        )
    return rows


def _render_table(results: Sequence[PhaseResult], out: TextIO) -> None:
    """The results table: rich when installed, aligned plain text otherwise."""
    rows = _rows(results)
    try:
        from rich.box import SIMPLE_HEAD
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        out.writelines(line + "\n" for line in table_lines(COLUMNS, rows))
        return
    table = Table(title="agw-persist-cache demo", box=SIMPLE_HEAD)
    for index, column in enumerate(COLUMNS):
        header = column.replace(" ", "\n", 1) if len(column) > 6 else column
        table.add_column(header, justify="left" if index < 2 else "right", no_wrap=True)
    for row in rows:
        table.add_row(*row)
    Console(file=out, width=None if out.isatty() else 100).print(table)


def _totals(results: Sequence[PhaseResult]) -> dict[str, int]:
    totals: dict[str, int] = {}
    for result in results:
        name = result.cache.replace("-", "_")
        totals[name] = totals.get(name, 0) + result.token_requests
    return totals


def _make_progress(json_output: bool) -> tuple[Progress, Any]:
    """Rich on a terminal when installed, else plain lines; both write to stderr."""
    import sys

    if sys.stderr.isatty() and not json_output:
        try:
            rich_progress = RichProgress()
        except ImportError:
            pass
        else:
            return rich_progress, rich_progress
    return PlainProgress(sys.stderr), None


def run_demo_command(args: argparse.Namespace, out: TextIO) -> int:
    """``agw-cache demo``: run, then print the table (or JSON) and a one-line verdict."""
    settings = DemoSettings(
        workers=args.workers, callers=args.callers, rounds=args.rounds, delay_ms=args.delay_ms
    )
    settings.validate()
    progress, live = _make_progress(args.json)
    started = time.perf_counter()
    try:
        if live is not None:
            with live:
                results = run_demo(settings, progress)
        else:
            results = run_demo(settings, progress)
    except DemoError as exc:
        out.write(f"demo failed: {exc}\n")
        return EXIT_PROBLEMS
    totals = _totals(results)
    failed = sum(result.failed_calls for result in results)
    seen = sorted({name for result in results for name in result.failures})
    if args.json:
        doc = {
            "settings": asdict(settings),
            "phases": [result.to_json() for result in results],
            "token_requests": totals,
            "failed_calls": failed,
            "hints": {name: HINTS.get(name, GENERIC_HINT) for name in seen},
            "seconds": round(time.perf_counter() - started, 2),
        }
        json.dump(doc, out, indent=2)
        out.write("\n")
    else:
        _render_table(results, out)
        starts = 2 * settings.workers
        out.write(
            f"{starts} process starts ({settings.workers} workers, started twice), "
            f"{settings.workers * settings.callers} concurrent callers per phase, "
            f"token endpoint delay {settings.delay_ms:.0f} ms.\n"
            f"token requests: persistent cache {totals.get('persistent', 0)}, "
            f"per-process in-memory cache {totals.get('in_memory', 0)}.\n"
        )
        if failed:
            noun = "call" if failed == 1 else "calls"
            out.write(f"{failed} {noun} failed (token requests above still counted):\n")
            out.writelines(line + "\n" for line in _failure_lines(results))
    return EXIT_PROBLEMS if failed else EXIT_OK
