"""Run the benchmarks and write RESULTS.md: ``python -m benchmarks [--quick]``."""

from __future__ import annotations

import argparse
import functools
import gc
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from ._fixture import Fixture, build_fixture, log
from ._harness import Section
from ._plan import PLANS, Plan
from ._report import machine_facts, merge, render
from ._subject import core_available
from .bench_agent import bench_agent
from .bench_latency import bench_async_hit, bench_hit, bench_prune, bench_set
from .bench_peers import bench_peers
from .bench_procs import bench_procs
from .bench_redis import bench_redis
from .bench_stampede import bench_distinct, bench_stampede
from .bench_storedown import bench_storedown

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
ON_FIXTURES: dict[str, Callable[[Sequence[Fixture], Plan], Section]] = {
    "hit": bench_hit,
    "async": bench_async_hit,
    "set": bench_set,
    "peers": bench_peers,
    "prune": bench_prune,  # last of these: it evicts rows
}
ON_WORKDIR: dict[str, Callable[[Path, Plan], Section]] = {
    "procs": bench_procs,
    "stampede": bench_stampede,
    "distinct": bench_distinct,
    "redis": bench_redis,
    "agent": bench_agent,
    "storedown": bench_storedown,
}
ORDER = (
    "hit",
    "async",
    "set",
    "procs",
    "stampede",
    "prune",
    "peers",
    "distinct",
    "redis",
    "agent",
    "storedown",
)


def run(
    plan: Plan, only: Sequence[str], workdir: Path
) -> tuple[list[Section], list[tuple[str, str]]]:
    """Build the fixtures once, run the chosen benchmarks, return their sections in order."""
    facts = machine_facts()
    done: dict[str, Section] = {}
    wanted = [k for k in ON_FIXTURES if k in only]
    if wanted:
        fixtures: list[Fixture] = []
        try:
            for rows in plan.sizes:
                log(f"filling {rows:,} rows in every store")
                fixtures.append(
                    build_fixture(
                        workdir,
                        rows,
                        plan.sample_keys,
                        with_cache=True,
                        with_peers="peers" in wanted,
                    )
                )
            facts += [
                (
                    f"fill {f.rows:,} rows: {store}",
                    f"{seconds:.1f} s" + (f" ({f.fill_how})" if store == "cache" else ""),
                )
                for f in fixtures
                for store, seconds in f.fill_seconds.items()
            ]
            gc.collect()
            gc.freeze()  # the fixtures live all run long: keep them out of every collection
            for key in wanted:
                done[key] = _timed(key, functools.partial(ON_FIXTURES[key], fixtures, plan))
        finally:
            gc.unfreeze()
            for fixture in fixtures:
                fixture.close()
    for key in (k for k in ON_WORKDIR if k in only):
        done[key] = _timed(key, functools.partial(ON_WORKDIR[key], workdir, plan))
    return [done[k] for k in ORDER if k in done], facts


def _timed(key: str, bench: Callable[[], Section]) -> Section:
    log(f"running {key}")
    t0 = time.perf_counter()
    section = bench()
    section.seconds = time.perf_counter() - t0
    for r in section.ratios:
        log(f"  {r.label}: {r.value_text} (target {r.target_text}: {r.verdict})")
    return section


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a fast pass (~1 min), 10k rows")
    parser.add_argument("--plan", choices=sorted(PLANS), help="full, quick or tiny (smoke test)")
    parser.add_argument(
        "sections", nargs="*", metavar="SECTION", help="run only these (same as --only)"
    )
    parser.add_argument(
        "--only", default=",".join(ORDER), help=f"comma-separated subset of {','.join(ORDER)}"
    )
    parser.add_argument(
        "--out", type=Path, help=f"markdown output (default: {RESULTS.name} for a full run)"
    )
    parser.add_argument(
        "--workdir", type=Path, help="keep the databases in a new folder under this one"
    )
    parser.add_argument(
        "--merge",
        action="store_true",
        help=f"replace only the sections run (and their targets) in {RESULTS.name} or --out",
    )
    args = parser.parse_args(argv)
    plan = PLANS[args.plan or ("quick" if args.quick else "full")]
    chosen = ",".join(args.sections) if args.sections else args.only
    only = [k.strip() for k in chosen.split(",") if k.strip()]
    unknown = sorted(set(only) - set(ORDER))
    if unknown:
        parser.error(f"unknown benchmark(s) {unknown}; choose from {','.join(ORDER)}")
    missing = core_available()
    if missing is not None:
        print(
            f"agw_persist_cache is not importable ({missing}); nothing to measure", file=sys.stderr
        )
        return 2
    everything = len(only) == len(ORDER)
    out = args.out or (RESULTS if args.merge or (plan.name == "full" and everything) else None)
    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="agw-bench-", dir=args.workdir))
    t0 = time.perf_counter()
    try:
        sections, facts = run(plan, only, workdir)
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    command = "python -m benchmarks" + ("" if everything else " " + " ".join(only))
    command += f" --plan {plan.name}" if plan.name != "full" else ""
    if args.merge and out is not None:
        text = merge(
            out.read_text(encoding="utf-8"), sections, facts, plan_name=plan.name, command=command
        )
    else:
        text = render(
            sections, facts, plan_name=plan.name, command=command, seconds=time.perf_counter() - t0
        )
    if out is None:
        print(text)
    else:
        out.write_text(text, encoding="utf-8")
        log(f"wrote {out}")
    return 0
