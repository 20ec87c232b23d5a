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
        "--callers",
        "4",
        "--rounds",
        "3",
        env=base_env(),
        timeout=90,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    doc = json.loads(result.stdout)
    assert doc["failed_calls"] == 0
    assert doc["token_requests"] == {"persistent": 1, "in_memory": 8}
    phases = {(p["cache"], p["phase"]): p for p in doc["phases"]}
    assert phases["persistent", "restart"]["token_requests"] == 0
    assert phases["persistent", "restart"]["hit_ratio"] == 1.0
    assert phases["in-memory", "restart"]["token_requests"] == 4
    assert all(p["calls"] == 4 * 4 * 3 for p in doc["phases"])
    assert doc["settings"] == {"workers": 4, "callers": 4, "rounds": 3, "delay_ms": 150.0}
    assert "persistent cache," in result.stderr  # the progress display


def test_demo_prints_a_plain_table_without_rich() -> None:
    code = (
        "import sys; sys.modules['rich'] = None\n"  # as if the demo extra were not installed
        "from agw_persist_cache.cli import main\n"
        "sys.exit(main(['demo', '--workers', '2', '--callers', '2', '--rounds', '1',"
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


def test_a_failed_call_is_explained_by_its_exception_class_and_a_hint() -> None:
    code = (
        "import sys\n"
        "from agw_persist_cache import _demo_endpoint\n"
        "def refuse(self):\n"  # the endpoint fails every token request with a 503
        "    self.rfile.read(int(self.headers.get('Content-Length') or 0))\n"
        "    self.send_response(503)\n"
        "    self.send_header('Content-Length', '0')\n"
        "    self.end_headers()\n"
        "_demo_endpoint._Handler.do_POST = refuse\n"
        "from agw_persist_cache.cli import main\n"
        "sys.exit(main(['demo', '--workers', '2', '--callers', '3', '--rounds', '1',"
        " '--delay-ms', '0']))"
    )
    result = run([sys.executable, "-c", code], env=base_env(), timeout=90)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    failures = [line.strip() for line in result.stdout.splitlines() if "failed with" in line]
    # Every in-memory call fetches and gets the 503; the persistent cache's callers waiting
    # behind the one failed fetch are backed off, and the hint says where the cause is.
    assert any(
        line.startswith("in-memory start: 6 calls failed with HTTPStatusError: the token endpoint")
        for line in failures
    ), failures
    assert any(
        line.startswith("persistent start:")
        and "FetchBackoffError" in line
        and "first failure" in line
        for line in failures
    ), failures
    assert any(
        "calls failed (token requests above still counted)" in line
        for line in result.stdout.splitlines()
    )


def test_the_old_requests_option_still_sets_the_callers() -> None:
    from agw_persist_cache.cli import build_parser

    args = build_parser().parse_args(["demo", "--requests", "3"])
    assert args.callers == 3
    assert build_parser().parse_args(["demo"]).callers == 8


def test_the_demo_endpoint_answers_as_many_callers_as_connect_at_once() -> None:
    # --workers 64 opens 64 connections at once (128 here). With socketserver's default
    # backlog of 5 the kernel reset some of them: "12 requests failed" with no reason.
    import threading

    import httpx

    from agw_persist_cache._demo_endpoint import DemoTokenEndpoint

    failures: list[str] = []
    with DemoTokenEndpoint(delay=0.15) as endpoint:
        start = threading.Barrier(128)

        def one() -> None:
            start.wait()
            try:
                with httpx.Client(timeout=60) as client:
                    client.post(endpoint.token_url, data={"grant_type": "x"}).raise_for_status()
            except httpx.HTTPError as exc:
                failures.append(type(exc).__name__)

        callers = [threading.Thread(target=one) for _ in range(128)]
        for thread in callers:
            thread.start()
        for thread in callers:
            thread.join()
        assert failures == []
        assert endpoint.token_requests == 128
