"""How much to measure: the full run, ``--quick``, and the tiny smoke-test pass."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Plan:
    """Sizes, rounds and iteration counts for one run of the benchmarks."""

    name: str
    sizes: tuple[int, ...] = (100, 100_000)
    rounds: int = 7
    """Interleaved rounds of every latency comparison."""
    hit_iterations: int = 3_000
    """Timed hits per subject per round."""
    set_iterations: int = 400
    """Timed sets per subject per round."""
    peer_iterations: int = 100
    """Timed sets and hits-after-write per subject per round in the peers benchmark."""
    sample_keys: int = 1_000
    """Distinct rows the timed hits and sets cycle through (random rows of the table)."""
    slow_iterations: int = 2
    """Timed calls for operations that take seconds (msal-extensions at 100k rows)."""
    slow_rows: int = 10_000
    """From this size on, msal-extensions sets and hits-after-write run ``slow_iterations``
    times outside the rounds (each reads or rewrites the whole JSON file)."""
    prune_iterations: int = 10
    procs: int = 4
    proc_seconds: float = 5.0
    proc_rounds: int = 2
    writer_rate: float = 100.0
    proc_rows: int = 100
    stampede_procs: int = 8
    stampede_coroutines: int = 50
    stampede_delay: float = 0.2
    stampede_rounds: int = 3
    distinct_procs: int = 4
    distinct_users: int = 100
    agent_workers: int = 4
    """Whole agent: gunicorn UvicornWorkers."""
    agent_callers: int = 64
    """Whole agent: concurrent callers; also the requests of the cold and restart phases."""
    agent_users: int = 50
    agent_steady: int = 256
    """Whole agent: requests of the steady phase."""
    agent_runs: int = 2
    """Whole agent: runs of each subject (stock and drop-in alternate)."""
    agent_delay: float = 0.15
    """Whole agent: how long the mTLS identity stand-in takes to answer."""
    down_procs: int = 4
    down_calls: int = 1_000
    """Store down: get-or-fetch calls across all processes (one key)."""
    down_delay: float = 0.05
    """Store down: how long the token endpoint takes to answer."""

    @property
    def warmup(self) -> int:
        return min(self.sample_keys, 1_000)


FULL = Plan("full")
QUICK = Plan(
    "quick",
    sizes=(100, 10_000),
    rounds=3,
    hit_iterations=1_000,
    set_iterations=150,
    peer_iterations=30,
    sample_keys=500,
    slow_iterations=1,
    prune_iterations=3,
    proc_seconds=1.5,
    proc_rounds=1,
    stampede_rounds=1,
    agent_runs=1,
    agent_steady=128,
    down_calls=400,
)
TINY = Plan(
    "tiny",
    sizes=(100, 500),
    slow_rows=500,
    rounds=2,
    hit_iterations=100,
    set_iterations=20,
    peer_iterations=10,
    sample_keys=50,
    slow_iterations=1,
    prune_iterations=2,
    procs=1,
    proc_seconds=0.3,
    proc_rounds=1,
    writer_rate=50.0,
    proc_rows=20,
    stampede_procs=2,
    stampede_coroutines=5,
    stampede_delay=0.05,
    stampede_rounds=1,
    distinct_procs=2,
    distinct_users=10,
    agent_workers=2,
    agent_callers=8,
    agent_users=4,
    agent_steady=16,
    agent_runs=1,
    agent_delay=0.05,
    down_procs=2,
    down_calls=40,
    down_delay=0.01,
)
PLANS = {plan.name: plan for plan in (FULL, QUICK, TINY)}
