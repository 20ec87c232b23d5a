"""Benchmark 4: N processes reading for a few seconds (aggregate gets/s), the cache against the
raw floor; then the same with one more process writing at a fixed rate. Every error and every
miss that reaches a caller is counted."""

from __future__ import annotations

import logging
import random
import statistics
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.support.procs import Worker, run_together

from ._floor import RawStore, bench_key, digest_of, make_token, scope_of
from ._harness import Ratio, Section, Table
from ._plan import Plan
from ._subject import open_cache, populate_cache

SUBJECTS = ("floor", "cache")
LOCKED = "database is locked"


@dataclass
class Outcome:
    """What one process saw."""

    role: str
    calls: int
    seconds: float
    misses: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    warnings: dict[str, int] = field(default_factory=dict)
    storage_errors: int = 0


class _WarningCounter(logging.Handler):
    """Counts the cache's warnings (it degrades instead of raising) by their first words."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.seen: Counter[str] = Counter()

    def emit(self, record: logging.LogRecord) -> None:
        self.seen[record.getMessage()[:120]] += 1


def _worker(
    subject: str,
    role: str,
    path: Path,
    key: bytes,
    rows: int,
    seconds: float,
    rate: float,
    worker: Worker,
) -> None:
    """One process: read random rows (or write at ``rate``/s) until ``seconds`` have passed."""
    handler = _WarningCounter()
    logging.getLogger("agw_persist_cache").addHandler(handler)
    cache = open_cache(path, key) if subject == "cache" else None
    floor = RawStore(path, key) if subject == "floor" else None
    scopes = [scope_of(i) for i in range(rows)]
    args: list[Any] = scopes if cache is not None else [digest_of(s) for s in scopes]
    get = cache.get_system_token if cache is not None else floor.get  # type: ignore[union-attr]
    tokens = [make_token() for _ in range(64)]
    expires_at = time.time() + 3600
    rng = random.Random()
    order = [rng.randrange(rows) for _ in range(4096)]
    errors: Counter[str] = Counter()
    calls = misses = 0
    get(args[0])  # opens the connection before the clock starts
    worker.wait()
    start = time.perf_counter()
    deadline = start + seconds
    if role == "reader":
        while time.perf_counter() < deadline:
            for i in order[:256]:
                try:
                    if get(args[i]) is None:
                        misses += 1
                except Exception as exc:  # reason: every error that reaches a caller is counted
                    errors[f"{type(exc).__name__}: {exc}"[:120]] += 1
            calls += 256
            order.append(order.pop(0))
    else:
        tick = start
        while time.perf_counter() < deadline:
            i = order[calls % len(order)]
            try:
                if cache is not None:
                    cache.set_system_token(scopes[i], tokens[calls % 64], expires_at=expires_at)
                else:
                    floor.set(args[i], tokens[calls % 64], expires_at)  # type: ignore[union-attr]
            except Exception as exc:  # reason: every error that reaches a caller is counted
                errors[f"{type(exc).__name__}: {exc}"[:120]] += 1
            calls += 1
            tick += 1 / rate
            time.sleep(max(0.0, tick - time.perf_counter()))
    elapsed = time.perf_counter() - start
    storage_errors = cache.stats().storage_errors if cache is not None else 0
    worker.report(
        Outcome(role, calls, elapsed, misses, dict(errors), dict(handler.seen), storage_errors)
    )
    if cache is not None:
        cache.close()
    if floor is not None:
        floor.close()


def _run_phase(subject: str, path: Path, key: bytes, plan: Plan, *, writer: bool) -> list[Outcome]:
    """The readers (and the writer) of one subject, started together."""
    roles = ["reader"] * plan.procs + (["writer"] if writer else [])
    args = [
        (subject, role, path, key, plan.proc_rows, plan.proc_seconds, plan.writer_rate)
        for role in roles
    ]
    outcomes: list[Outcome] = run_together(_worker, args, timeout=plan.proc_seconds + 120)
    return outcomes


def bench_procs(workdir: Path, plan: Plan) -> Section:
    """Aggregate reads/s of the cache over the floor, without and with a writer, interleaved."""
    directory = workdir / "procs"
    directory.mkdir()
    key = bench_key()
    scopes = [scope_of(i) for i in range(plan.proc_rows)]
    tokens = [make_token() for _ in scopes]
    expires_at = time.time() + 3600
    paths = {"floor": directory / "floor.db", "cache": directory / "cache.db"}
    floor = RawStore(paths["floor"], key)
    floor.populate(scopes, tokens, expires_at)
    floor.close()
    with open_cache(paths["cache"], key) as cache:
        populate_cache(cache, scopes, tokens, expires_at)
    rates: dict[tuple[str, bool], list[float]] = {}
    seen: dict[tuple[str, bool], list[Outcome]] = {}
    for r in range(plan.proc_rounds):
        for writer in (False, True):
            order = SUBJECTS if r % 2 == 0 else SUBJECTS[::-1]
            for subject in order:
                outcomes = _run_phase(subject, paths[subject], key, plan, writer=writer)
                readers = [o for o in outcomes if o.role == "reader"]
                rates.setdefault((subject, writer), []).append(
                    sum(o.calls / o.seconds for o in readers)
                )
                seen.setdefault((subject, writer), []).extend(outcomes)
    table = Table(
        f"{plan.procs} reader processes, {plan.proc_seconds:g} s per phase, "
        f"{plan.proc_rounds} round(s), {plan.proc_rows} rows",
        [
            "subject",
            "writer",
            "aggregate gets/s (median)",
            "per round",
            "writes done",
            "misses",
            "errors to callers",
            f"'{LOCKED}' to callers",
            "cache warnings",
        ],
    )
    section = Section(
        key="procs",
        title=f"4. Processes reading ({plan.procs}), then with one writer at "
        f"{plan.writer_rate:g} sets/s",
        method=(
            f"{plan.procs} spawned processes each open the store, meet at a barrier, then read "
            f"random rows for {plan.proc_seconds:g} s; the aggregate is the sum of each "
            "process's gets/s. With a writer: one more process overwrites random rows at the "
            "given rate. Floor and cache phases alternate. Every exception, every miss (None) "
            "and every warning the cache logs is counted."
        ),
        tables=[table],
    )
    locked_total = 0
    for writer in (False, True):
        for subject in SUBJECTS:
            outcomes = seen[(subject, writer)]
            errors: Counter[str] = Counter()
            warnings: Counter[str] = Counter()
            for o in outcomes:
                errors.update(o.errors)
                warnings.update(o.warnings)
            locked = sum(n for msg, n in errors.items() if LOCKED in msg)
            locked_total += locked
            per_round = rates[(subject, writer)]
            writes = sum(o.calls for o in outcomes if o.role == "writer")
            table.rows.append(
                [
                    subject,
                    "yes" if writer else "no",
                    f"{statistics.median(per_round):,.0f}",
                    ", ".join(f"{x:,.0f}" for x in per_round),
                    f"{writes:,}" if writer else "-",
                    str(sum(o.misses for o in outcomes)),
                    str(sum(errors.values())),
                    str(locked),
                    str(sum(warnings.values())),
                ]
            )
            for msg, n in sorted({**errors, **warnings}.items()):
                section.notes.append(f"{subject}{' + writer' if writer else ''}: {n} x {msg}")
        label = "with a writer" if writer else "readers only"
        ratios = tuple(
            c / f for c, f in zip(rates[("cache", writer)], rates[("floor", writer)], strict=True)
        )
        section.ratios.append(
            Ratio(
                f"{plan.procs}-process gets/s, {label}: cache / floor",
                statistics.median(ratios),
                ratios,
                0.85,
                at_least=True,
            )
        )
    section.ratios.append(
        Ratio(f"'{LOCKED}' reaching a caller (count)", float(locked_total), (), 0.0, unit="")
    )
    return section
