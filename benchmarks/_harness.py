"""Timing and statistics shared by every benchmark: per-call timers, interleaved rounds, ratios.

Numbers from a noisy 2-core machine only mean something as ratios inside one run, so every
subject runs next to its baseline: rounds alternate the subjects (the order rotates each
round), and a ratio is the median of the per-round ratios of the per-round medians.
"""

from __future__ import annotations

import asyncio
import gc
import statistics
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

Runner = Callable[[int], list[int]]
"""Runs ``n`` timed operations and returns ``n`` durations in nanoseconds."""


@contextmanager
def quiet_gc() -> Iterator[None]:
    """Collect the young generations, then keep the garbage collector out of the timed section.

    (A full collection here would cost more than the calls it protects once the fixtures hold
    100,000 rows; ``run`` freezes the fixtures out of the collector's sight instead.)
    """
    was_enabled = gc.isenabled()
    gc.collect(1)
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def time_calls(
    fn: Callable[[Any], object],
    args: Sequence[Any],
    n: int,
    *,
    before: Callable[[Any], object] | None = None,
) -> list[int]:
    """Time ``n`` calls of ``fn``, cycling through ``args``; one duration (ns) per call.

    ``before(arg)``, when given, runs untimed ahead of each call (e.g. another writer's set).
    """
    clock = time.perf_counter_ns
    out = [0] * n
    m = len(args)
    with quiet_gc():
        for i in range(n):
            arg = args[i % m]
            if before is not None:
                before(arg)
            t0 = clock()
            fn(arg)
            out[i] = clock() - t0
    return out


async def atime_calls(
    afn: Callable[[Any], Awaitable[object]], args: Sequence[Any], n: int
) -> list[int]:
    """The awaited twin of :func:`time_calls`: each duration spans one ``await afn(arg)``."""
    clock = time.perf_counter_ns
    out = [0] * n
    m = len(args)
    with quiet_gc():
        for i in range(n):
            arg = args[i % m]
            t0 = clock()
            await afn(arg)
            out[i] = clock() - t0
    return out


def calls(
    fn: Callable[[Any], object],
    args: Sequence[Any],
    *,
    before: Callable[[Any], object] | None = None,
) -> Runner:
    """A runner timing ``fn`` over ``args`` (see :func:`time_calls`)."""

    def runner(n: int) -> list[int]:
        return time_calls(fn, args, n, before=before)

    return runner


def awaited_calls(
    loop: asyncio.AbstractEventLoop, afn: Callable[[Any], Awaitable[object]], args: Sequence[Any]
) -> Runner:
    """A runner timing ``await afn(arg)`` on ``loop`` (see :func:`atime_calls`)."""

    def runner(n: int) -> list[int]:
        return loop.run_until_complete(atime_calls(afn, args, n))

    return runner


def timer_overhead_ns() -> int:
    """Median cost of one ``perf_counter_ns`` pair: included in every per-call sample."""
    clock = time.perf_counter_ns
    samples = []
    for _ in range(20_000):
        t0 = clock()
        samples.append(clock() - t0)
    return int(statistics.median(samples))


def percentile(samples: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in 0..100) of unsorted samples."""
    if not samples:
        return float("nan")
    ordered = sorted(samples)
    rank = max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))
    return float(ordered[rank])


@dataclass
class Series:
    """One subject's measurements across the rounds of a comparison."""

    name: str
    samples: list[float] = field(default_factory=list)
    """Every sample of every round (ns for latencies), pooled for p50/p99."""
    per_round: list[float] = field(default_factory=list)
    """The statistic each round's ratio is taken over (p50 for latencies, a rate for rates)."""

    @property
    def p50(self) -> float:
        return percentile(self.samples, 50)

    @property
    def p99(self) -> float:
        return percentile(self.samples, 99)


def interleave(
    runners: Mapping[str, Runner],
    *,
    rounds: int,
    iterations: int,
    warmup: int,
    between: Callable[[], None] | None = None,
) -> dict[str, Series]:
    """Run every runner once per round, rotating their order, after one warm-up pass each."""
    names = list(runners)
    for name in names:
        runners[name](warmup)
    series = {name: Series(name) for name in names}
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            if between is not None:
                between()
            samples = runners[name](iterations)
            series[name].samples.extend(samples)
            series[name].per_round.append(statistics.median(samples))
    return series


@dataclass(frozen=True)
class Ratio:
    """A subject over a baseline (median of per-round ratios), optionally against a target."""

    label: str
    value: float
    rounds: tuple[float, ...]
    target: float | None = None
    at_least: bool = False
    """True when the target is a floor (throughput), False when it is a ceiling (latency)."""
    unit: str = "x"
    """``x`` for ratios; empty for counts (token requests, errors)."""
    exactly: bool = False
    """The target is an exact count (e.g. one token request), not a bound."""

    @property
    def value_text(self) -> str:
        return f"{self.value:.2f}x" if self.unit == "x" else f"{self.value:g}"

    @property
    def spread_text(self) -> str:
        """Lowest and highest per-round value: how much the noisy machine moved it."""
        if len(self.rounds) < 2:
            return "-"
        fmt = "{:.2f}" if self.unit == "x" else "{:g}"
        return f"{fmt.format(min(self.rounds))} - {fmt.format(max(self.rounds))}"

    @property
    def verdict(self) -> str:
        if self.target is None:
            return "-"
        if self.exactly:
            met = self.value == self.target
        else:
            met = self.value >= self.target if self.at_least else self.value <= self.target
        return "met" if met else "MISSED"

    @property
    def target_text(self) -> str:
        if self.target is None:
            return "-"
        relation = "==" if self.exactly else ">=" if self.at_least else "<="
        return f"{relation} {self.target:g}{self.unit}"


def ratio(
    label: str,
    subject: Series,
    baseline: Series,
    *,
    target: float | None = None,
    at_least: bool = False,
) -> Ratio:
    """The median over rounds of ``subject / baseline`` for their per-round statistics."""
    per_round = tuple(s / b for s, b in zip(subject.per_round, baseline.per_round, strict=True))
    return Ratio(label, statistics.median(per_round), per_round, target, at_least)


@dataclass
class Table:
    """A markdown table with a caption."""

    caption: str
    columns: list[str]
    rows: list[list[str]] = field(default_factory=list)


@dataclass
class Section:
    """One benchmark's outcome: tables for RESULTS.md, its ratios, and notes."""

    key: str
    title: str
    method: str
    tables: list[Table] = field(default_factory=list)
    ratios: list[Ratio] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0


def us(ns: float) -> str:
    """Nanoseconds as microseconds with sensible precision."""
    value = ns / 1000
    if value < 10:
        return f"{value:.2f}"
    if value < 1000:
        return f"{value:.1f}"
    return f"{value:,.0f}"


def latency_rows(series: Mapping[str, Series], baselines: Mapping[str, str]) -> list[list[str]]:
    """Rows ``subject | p50 | p99 | calls | x baseline``; ``baselines`` maps subject to baseline."""
    rows = []
    for s in series.values():
        base = baselines.get(s.name)
        rel = "-" if base is None else f"{ratio('', s, series[base]).value:.2f} ({base})"
        rows.append([s.name, us(s.p50), us(s.p99), f"{len(s.samples):,}", rel])
    return rows


LATENCY_COLUMNS = ["subject", "p50 µs", "p99 µs", "calls timed", "x baseline (median of rounds)"]
