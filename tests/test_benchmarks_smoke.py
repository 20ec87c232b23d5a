"""The benchmarks run end to end with tiny counts, so their code cannot rot unnoticed.

No assertion on speed (the machine is noisy); only on what must hold at any speed: every
section ran and rendered, the cache's stampede made exactly one token request, and no
'database is locked' reached a caller.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from benchmarks.run import main

pytestmark = pytest.mark.timeout(180)

TITLES = (
    "## 1. Sync hit",
    "## 2. Async hit",
    "## 3. Set",
    "## 4. Processes reading",
    "## 5. Cold stampede",
    "## 6. Prune",
    "## 7. Peers",
    "## 8. Distinct cold users",
    "## 9. Many hosts: the Redis backend",
)


def test_every_benchmark_runs_and_writes_results(tmp_path: Path) -> None:
    out = tmp_path / "RESULTS.md"
    assert main(["--plan", "tiny", "--out", str(out), "--workdir", str(tmp_path / "w")]) == 0
    text = out.read_text(encoding="utf-8")
    assert text.startswith("# agw-persist-cache benchmarks")
    assert [t for t in TITLES if t not in text] == []
    assert "| SQLite (sqlite3 module) |" in text
    assert "| stampede: token requests per round (cache, worst round) | 1 | - | == 1 |" in text
    assert "| 'database is locked' reaching a caller (count) | 0 | - | <= 0 |" in text
    assert "| distinct users: token requests per round (worst round) | 10 | - | == 10 |" in text
    if shutil.which("redis-server") or os.environ.get("AGW_REQUIRE_REDIS") == "1":
        assert "| redis stampede: token requests (2 hosts x 1 procs x 5 coroutines) | 1 |" in text
        assert "| redis soak: wrong tokens served | 0 | - | == 0 | met |" in text
