"""Benchmark 10: a whole agent. gunicorn with UvicornWorkers serves ``_agent_app`` (the real
``sap-cloud-sdk`` client, stock or the drop-in) against an mTLS identity stand-in and a local
MCP gateway; concurrent callers drive three phases: cold start, steady state, and the first
requests after a ``HUP`` restart (gunicorn replaces every worker). Stock and drop-in runs
alternate. The stand-in counts token requests; the agent reports its time-in-auth."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import statistics
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from ._harness import Ratio, Section, Table, percentile
from ._plan import Plan

TITLE = "10. Whole agent: gunicorn + UvicornWorkers + the real SDK"
SUBJECTS = ("stock", "drop-in")
PHASES = ("cold start", "steady", "after HUP restart")
CLIENT_ID = "agw-bench-agent"
JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"
REPO = Path(__file__).resolve().parent.parent


@dataclass
class PhaseResult:
    """What one phase of one run saw."""

    subject: str
    run: int
    phase: str
    system_requests: int = 0
    user_requests: int = 0
    latencies: list[float] = field(default_factory=list)
    """Seconds per request, measured by the caller."""
    auth: list[float] = field(default_factory=list)
    """Seconds per request spent in the client's get_system_auth + get_user_auth."""
    errors: list[str] = field(default_factory=list)
    workers: set[int] = field(default_factory=set)
    sent: int = 0

    @property
    def requests(self) -> int:
        return self.system_requests + self.user_requests


@dataclass(frozen=True)
class World:
    """The stand-ins and files every run shares."""

    server: Any  # tests.support.tokenserver.TokenServer, mTLS
    users: tuple[str, ...]
    """One JWT per user; request ``i`` carries user ``i % len(users)``."""
    env: dict[str, str]
    workdir: Path


def _serve_gateway(worker: Any) -> None:
    """The local MCP gateway, in a process of its own: it answers several HTTP requests per
    agent request, and in the callers' process it would slow the callers down."""
    from tests._sap_mcp import local_gateway

    with local_gateway() as gateway:
        worker.report(gateway.url)
        time.sleep(3600)  # until the parent kills it


@contextmanager
def _world(workdir: Path, plan: Plan) -> Iterator[World]:
    """The mTLS identity stand-in (answering after ``plan.agent_delay``, counting requests in
    this process), the MCP gateway (in a process of its own), and a customer binding holding
    the stand-in's URL and a client certificate it trusts."""
    from tests._deploy_procs import base_env
    from tests._sap_mcp import GLOBAL_TENANT_ID, ORD_ID
    from tests._tls import make_tls
    from tests.support.procs import Workers
    from tests.support.sap_standin import write_customer_binding
    from tests.support.tokenserver import TokenServer, mint_jwt

    workdir.mkdir(parents=True)
    tls = make_tls()
    context = tls.server_context(require_client_cert=True)
    with (
        TokenServer(ssl_context=context, delay=plan.agent_delay) as server,
        Workers("spawn", timeout=120) as gateway,  # leaving the block kills it
    ):
        gateway.start(_serve_gateway, [()])
        credentials = write_customer_binding(
            workdir / "bindings",
            gateway_url=gateway.collect()[0],
            dependencies=[(ORD_ID, GLOBAL_TENANT_ID)],
            client_id=CLIENT_ID,
            token_service_url=server.token_url,
        )
        binding = json.loads(credentials.read_text())
        binding.update(certificate=tls.client_cert_pem, privateKey=tls.client_key_pem)
        credentials.write_text(json.dumps(binding))
        env = base_env(
            SERVICE_BINDING_ROOT=str(workdir / "bindings"),
            SSL_CERT_FILE=str(tls.write_ca(workdir)),  # the SDK's mTLS context trusts our CA
            PYTHONPATH=os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p),
        )
        users = tuple(mint_jwt(f"user-{i:03d}", ttl_seconds=7200) for i in range(plan.agent_users))
        yield World(server, users, env, workdir)


async def _drive(url: str, users: Sequence[str], count: int, callers: int) -> PhaseResult:
    """``count`` requests from ``callers`` concurrent callers on new connections."""
    result = PhaseResult("", 0, "", sent=count)
    limits = httpx.Limits(max_connections=callers, max_keepalive_connections=callers)
    todo = iter(range(count))
    async with httpx.AsyncClient(timeout=120.0, limits=limits) as http:

        async def caller() -> None:
            for i in todo:
                headers = {"Authorization": f"Bearer {users[i % len(users)]}"}
                t0 = time.perf_counter()
                try:
                    response = await http.get(url, headers=headers)
                    body = response.json()
                except (httpx.HTTPError, ValueError) as exc:
                    result.errors.append(f"{type(exc).__name__}: {exc}"[:160])
                    continue
                result.latencies.append(time.perf_counter() - t0)
                if response.status_code != 200:
                    result.errors.append(f"HTTP {response.status_code}: {body}"[:160])
                    continue
                result.auth.append(body["auth_seconds"])
                result.workers.add(body["pid"])

        await asyncio.gather(*(caller() for _ in range(callers)))
    return result


def _phase(
    world: World, url: str, subject: str, run: int, phase: str, count: int, plan: Plan
) -> PhaseResult:
    """Drive one phase and count the token requests the stand-in saw meanwhile."""
    before = len(world.server.forms)
    result = asyncio.run(_drive(url, world.users, count, plan.agent_callers))
    grants = [form.get("grant_type") for form in world.server.forms[before:]]
    result.subject, result.run, result.phase = subject, run, phase
    result.user_requests = grants.count(JWT_BEARER)
    result.system_requests = len(grants) - result.user_requests
    return result


def _one_run(world: World, subject: str, run: int, plan: Plan) -> list[PhaseResult]:
    """Start gunicorn for ``subject`` on a new cache file, run the three phases, stop it."""
    from tests._deploy_procs import process_group, program, wait_for_log

    workers = plan.agent_workers
    directory = world.workdir / f"run-{run}-{subject}"
    directory.mkdir()
    env = {
        **world.env,
        "AGW_BENCH_CLIENT": subject,
        "AGW_CACHE_PATH": str(directory / "tokens.db"),
    }
    log = directory / "gunicorn.log"
    cmd = [
        *program("gunicorn", "gunicorn"),
        *("-w", str(workers), "-k", "uvicorn.workers.UvicornWorker"),
        *("-b", "127.0.0.1:0", "--backlog", "2048", "--graceful-timeout", "10"),
        *_no_control_socket(),
        "benchmarks._agent_app:app",
    ]
    with process_group(cmd, env=env, cwd=REPO, log=log) as proc:
        port = wait_for_log(log, r"Listening at: http://127\.0\.0\.1:(\d+)", proc)[0].group(1)
        started = r"Application startup complete"
        wait_for_log(log, started, proc, count=workers, timeout=120)
        url = f"http://127.0.0.1:{port}/"
        cold = _phase(world, url, subject, run, PHASES[0], plan.agent_callers, plan)
        steady = _phase(world, url, subject, run, PHASES[1], plan.agent_steady, plan)
        proc.send_signal(signal.SIGHUP)  # new workers start, then the old ones stop
        wait_for_log(log, started, proc, count=2 * workers, timeout=120)
        wait_for_log(log, r"Finished server process", proc, count=workers, timeout=120)
        restart = _phase(world, url, subject, run, PHASES[2], plan.agent_callers, plan)
    return [cold, steady, restart]


def _no_control_socket() -> list[str]:
    """gunicorn 24+ opens a control socket at one fixed path in $HOME; runs need none."""
    import gunicorn.config

    names = {setting.name for setting in gunicorn.config.KNOWN_SETTINGS}
    return ["--no-control-socket"] if "control_socket_disable" in names else []


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:,.1f}" if seconds < 10 else f"{seconds * 1000:,.0f}"


def _rows(results: Sequence[PhaseResult]) -> list[list[str]]:
    return [
        [
            r.subject,
            str(r.run + 1),
            r.phase,
            f"{r.requests} ({r.system_requests} + {r.user_requests})",
            _ms(percentile(r.latencies, 50)),
            _ms(percentile(r.latencies, 99)),
            _ms(percentile(r.auth, 50)),
            _ms(percentile(r.auth, 99)),
            f"{len(r.auth)} / {r.sent}",
            str(len(r.workers)),
            str(len(r.errors)),
        ]
        for r in results
    ]


def _ratios(results: Sequence[PhaseResult], plan: Plan) -> list[Ratio]:
    """Per run pair: cold-start time-in-auth p99 drop-in / stock (the issue's bar: <= 1),
    steady time-in-auth p50 drop-in / stock, and the drop-in's token requests per run."""

    def per_run(subject: str, phase: str, q: float) -> list[float]:
        return [percentile(r.auth, q) for r in results if r.subject == subject and r.phase == phase]

    def over(phase: str, q: float) -> tuple[float, ...]:
        pairs = zip(per_run("drop-in", phase, q), per_run("stock", phase, q), strict=True)
        return tuple(d / s for d, s in pairs)

    cold, steady = over(PHASES[0], 99), over(PHASES[1], 50)
    runs = sorted({r.run for r in results})
    totals = tuple(
        float(sum(r.requests for r in results if r.subject == "drop-in" and r.run == n))
        for n in runs
    )
    expected = 1 + plan.agent_users  # every user calls in the cold start or the steady phase
    worst = max(totals, key=lambda n: abs(n - expected))
    return [
        Ratio(
            "whole agent: cold-start time-in-auth p99, drop-in / stock",
            statistics.median(cold),
            cold,
            1.0,
        ),
        Ratio(
            "whole agent: drop-in token requests per run (1 system + 1 per user)",
            worst,
            totals,
            float(expected),
            unit="",
            exactly=True,
        ),
        Ratio(
            "whole agent: steady time-in-auth p50, drop-in / stock",
            statistics.median(steady),
            steady,
        ),
    ]


def bench_agent(workdir: Path, plan: Plan) -> Section:
    """Stock and drop-in runs alternate (``plan.agent_runs`` of each) in one world."""
    section = Section(
        key="agent",
        title=TITLE,
        method=(
            f"`gunicorn -w {plan.agent_workers} -k uvicorn.workers.UvicornWorker` serves a small "
            "ASGI agent (`benchmarks/_agent_app.py`) whose workers each build one client at "
            "startup with the stock `sap_cloud_sdk.agentgateway.create_client` or the drop-in "
            "`agw_persist_cache.integrations.sap.create_client` (a new cache file per run). A "
            "request carries one of "
            f"{plan.agent_users} user JWTs; the agent calls `list_mcp_tools()` (system token) and "
            "`call_mcp_tool(..., user_token=...)` (exchanged user token) through the real SDK "
            "against a local MCP server. The SDK's own token requests go over real mTLS to a "
            "stand-in identity service on 127.0.0.1 that answers after "
            f"{plan.agent_delay * 1000:g} ms and counts them by grant. "
            f"{plan.agent_callers} concurrent callers (httpx, new connections per phase) send: "
            f"cold start, {plan.agent_callers} requests as soon as every worker has started; "
            f"steady, {plan.agent_steady} more; then `kill -HUP` (gunicorn starts new workers "
            f"and stops the old ones) and {plan.agent_callers} requests. Request latency is "
            "measured by the caller; time-in-auth inside the agent: the client's "
            "`get_system_auth` and `get_user_auth` (where every SDK call gets its token, cached "
            "or fetched) are wrapped with a timer and summed per request. Runs alternate stock, "
            "drop-in, drop-in, stock, ..."
        ),
    )
    results: list[PhaseResult] = []
    for name in ("httpx", "mcp"):  # the gateway's and the callers' line per request
        logging.getLogger(name).setLevel(logging.WARNING)
    with _world(workdir / "agent", plan) as world:
        for run in range(plan.agent_runs):
            for subject in SUBJECTS if run % 2 == 0 else SUBJECTS[::-1]:
                print(f"[bench] agent: {subject}, run {run + 1}", file=sys.stderr, flush=True)
                results.extend(_one_run(world, subject, run, plan))
    results.sort(key=lambda r: (r.run, SUBJECTS.index(r.subject)))
    section.tables.append(
        Table(
            f"{plan.agent_workers} workers, {plan.agent_callers} concurrent callers, "
            f"{plan.agent_users} users, identity stand-in {plan.agent_delay * 1000:g} ms, "
            f"{plan.agent_runs} run(s) of each",
            [
                "subject",
                "run",
                "phase",
                "token requests (system + user)",
                "request p50 ms",
                "request p99 ms",
                "time-in-auth p50 ms",
                "time-in-auth p99 ms",
                "answered",
                "workers seen",
                "errors",
            ],
            _rows(results),
        )
    )
    section.ratios.extend(_ratios(results, plan))
    section.notes.extend(sorted({f"{r.subject}: {e}" for r in results for e in r.errors}))
    return section
