"""``agw-cache demo`` end to end: worker processes, a local token endpoint, counted requests."""

from __future__ import annotations

import json
import sys

import pytest
from _deploy_procs import base_env, run, run_cli

pytestmark = pytest.mark.timeout(120)


def test_demo_json_reports_one_token_request_for_every_process_start() -> None:
    result = run_cli(
        "demo",
        "--json",
        "--workers",
        "4",
        "--requests",
        "4",
        "--rounds",
        "3",
        env=base_env(),
        timeout=90,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    doc = json.loads(result.stdout)
    assert doc["errors"] == 0
    assert doc["token_requests"] == {"persistent": 1, "in_memory": 8}
    phases = {(p["cache"], p["phase"]): p for p in doc["phases"]}
    assert phases["persistent", "restart"]["token_requests"] == 0
    assert phases["persistent", "restart"]["hit_ratio"] == 1.0
    assert phases["in-memory", "restart"]["token_requests"] == 4
    assert all(p["requests"] == 4 * 4 * 3 for p in doc["phases"])
    assert "persistent cache," in result.stderr  # the progress display


def test_demo_prints_a_plain_table_without_rich() -> None:
    code = (
        "import sys; sys.modules['rich'] = None\n"  # as if the demo extra were not installed
        "from agw_persist_cache.cli import main\n"
        "sys.exit(main(['demo', '--workers', '2', '--requests', '2', '--rounds', '1',"
        " '--delay-ms', '20']))"
    )
    result = run([sys.executable, "-c", code], env=base_env(), timeout=90)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split()[:2] == ["cache", "phase"]
    assert [line.split()[:2] for line in lines[1:5]] == [
        ["persistent", "start"],
        ["persistent", "restart"],
        ["in-memory", "start"],
        ["in-memory", "restart"],
    ]
    assert "token requests: persistent cache 1, per-process in-memory cache 4." in result.stdout
