"""The benchmarks run end to end with tiny counts, so their code cannot rot unnoticed.

No assertion on speed (the machine is noisy); only on what must hold at any speed: every
section ran and rendered, the cache's stampede made exactly one token request, no
'database is locked' reached a caller, the whole agent answered every request and the drop-in
made one token request per key, and the stock SDK's dict made one per process with the store
down.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from benchmarks.run import ORDER, RESULTS, main

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
NEW_TITLES = (
    "## 10. Whole agent: gunicorn + UvicornWorkers + the real SDK",
    "## 11. Store down: token requests per 1,000 calls",
)
BEFORE_ISSUE_18 = tuple(name for name in ORDER if name not in ("agent", "storedown"))
"""The sections of the first test; the whole agent and the store down have a test of their own."""


def test_every_benchmark_runs_and_writes_results(tmp_path: Path) -> None:
    out = tmp_path / "RESULTS.md"
    args = ["--only", ",".join(BEFORE_ISSUE_18), "--plan", "tiny", "--out", str(out)]
    assert main([*args, "--workdir", str(tmp_path / "w")]) == 0
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


def _table_rows(text: str) -> list[list[str]]:
    """The cells of every markdown table row (header and separator rows included)."""
    rows = [line.strip("|").split(" | ") for line in text.splitlines() if line.startswith("| ")]
    return [[cell.strip() for cell in row] for row in rows]


@pytest.mark.timeout(300)
def test_whole_agent_and_store_down_run_and_write_results(tmp_path: Path) -> None:
    # --merge into a copy of the committed results: these sections replace their own (or are
    # added), every other section stays.
    out = tmp_path / "RESULTS.md"
    shutil.copyfile(RESULTS, out)
    args = ["agent", "storedown", "--plan", "tiny", "--merge", "--out", str(out)]
    assert main([*args, "--workdir", str(tmp_path / "w")]) == 0
    text = out.read_text(encoding="utf-8")
    assert [text.count(title) for title in (*TITLES, *NEW_TITLES)] == [1] * 11
    assert text.count("| whole agent: drop-in token requests per run") == 1  # Targets, replaced
    assert "_Measured by `python -m benchmarks agent storedown --plan tiny` (tiny plan)" in text
    # One run of each subject, 3 phases each: every request answered, none failed.
    agent_text, down_text = text.split(NEW_TITLES[0])[1].split(NEW_TITLES[1])
    agent = [row for row in _table_rows(agent_text) if row[0] in ("stock", "drop-in")]
    assert len(agent) == 6
    for row in agent:
        answered, sent = row[8].split(" / ")
        assert (answered, row[-1]) == (sent, "0"), row
    # One system token and one per user (4) for a run of the drop-in, across 2 workers and a
    # restart: the cross-process single flight of a healthy store.
    drop_in = (
        "| whole agent: drop-in token requests per run (1 system + 1 per user) | 5 | - | == 5 |"
    )
    assert drop_in in text
    # The stock SDK's dict: one request per process (2 processes x 20 calls = 50 per 1,000).
    down = [row for row in _table_rows(down_text) if row[0].startswith(("stock", "cache"))]
    assert down[0][:4] == [
        "stock SDK `_TokenCache` (a dict per process)",
        "2 / 40 calls",
        "50",
        "1, 1",
    ]
    assert [row[-1] for row in down] == ["0"] * len(down), "no call may fail, store down or not"
    if shutil.which("redis-server") or os.environ.get("AGW_REQUIRE_REDIS") == "1":
        assert len(down) == 4
