"""README.md's code blocks, read from README.md and run, so that they cannot drift.

Every fenced block is either run by a test here (named in ``RUN``) or listed in ``NOT_RUN``
with the reason it cannot run on this machine; a new block fails
:func:`test_every_block_is_run_or_excluded_with_a_reason` until it is one or the other.
A block is known by its section, language and first line.
"""

from __future__ import annotations

import inspect
import json
import os
import re
import shlex
import subprocess
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from _core_support import new_key
from _deploy_procs import BIN, REPO, base_env, run, run_cli
from _tls import make_tls, mtls_token_server

from agw_persist_cache import CacheConfig, PersistentTokenCache
from tests.support.tokenserver import TokenServer

README = REPO / "README.md"
FENCE = re.compile(r"^```(\w*)\n(.*?)^```\n", re.M | re.S)


@dataclass(frozen=True)
class Block:
    section: str
    lang: str
    text: str

    @property
    def key(self) -> str:
        return f"{self.section} | {self.lang or 'text'} | {self.text.splitlines()[0].strip()}"


def blocks() -> list[Block]:
    text = README.read_text(encoding="utf-8")
    headings = [(m.start(), m.group(1)) for m in re.finditer(r"^#{2,3} (.+)$", text, re.M)]
    found = []
    for match in FENCE.finditer(text):
        section = [title for start, title in headings if start < match.start()][-1]
        found.append(Block(section, match.group(1), match.group(2)))
    return found


def block(key: str) -> str:
    (text,) = [b.text for b in blocks() if b.key == key]
    return text


TRY_IT = "Try it: two commands | bash | # 1. The demo: 4 worker processes x 8 concurrent callers, started twice, against a local"  # noqa: E501  (a README line)
DEMO_SAMPLE = "Try it: two commands | text | cache        phase     procs   calls   token requests   hit ratio   p50 ms   p99 ms"  # noqa: E501  (a README line)
DROP_IN = "Using sap-cloud-sdk? Change one import | diff | - from sap_cloud_sdk.agentgateway import create_client"  # noqa: E501  (a README line)
TEN_LINES = "Ten lines | python | import ssl"
LAYOUT = "How it works | text | agw_persist_cache/"
MCP = "Use with httpx / the MCP client | python | import httpx"
ROTATION = 'Rotating the key | bash | python -c "import base64,os;print(base64.urlsafe_b64encode(os.urandom(32)).decode())" > new.key'  # noqa: E501  (a README line)

RUN = {
    TRY_IT: "test_try_it_runs_the_demo_and_names_the_test_command_ci_runs",
    DEMO_SAMPLE: "test_try_it_runs_the_demo_and_names_the_test_command_ci_runs",
    DROP_IN: "test_the_drop_in_import_takes_the_sdks_arguments",
    TEN_LINES: "test_ten_lines_fetch_once_over_mtls_and_a_restart_reads_the_cache",
    LAYOUT: "test_how_it_works_names_files_that_exist",
    MCP: "test_the_mcp_client_example_calls_a_tool",
    ROTATION: "test_the_key_rotation_steps_reseal_every_row",
}
NOT_RUN = {
    "Using sap-cloud-sdk? Change one import | bash | pip install 'agw-persist-cache[sap]'": (
        "installs from the package index; the tests run on the checkout's editable install"
    ),
    "Many hosts | bash | pip install 'agw-persist-cache[redis]'     # redis-py >= 5.3.1 (sync and redis.asyncio)": (  # noqa: E501  (a README line)
        "installs from the package index and names a placeholder Redis host; the Redis tests "
        "run the same URL forms against their own redis-server"
    ),
    "Many hosts | yaml | # Kyma: the Deployment's container, both values from Secrets": (
        "a Kubernetes manifest fragment: needs a cluster"
    ),
    "Many hosts | bash | # Cloud Foundry": "needs the cf CLI and a Cloud Foundry landscape",
    "Operations | python | cache = PersistentTokenCache()                 # module level, in app.py": (  # noqa: E501  (a README line)
        "a fragment of examples/gunicorn/app.py, which tests/test_deployments.py runs"
    ),
    "Operations | bash | gunicorn --preload -w 4 -b 0.0.0.0:8000 app:app": (
        "the command tests/test_deployments.py runs on examples/gunicorn (on a free port)"
    ),
    "OpenTelemetry | bash | pip install 'agw-persist-cache[otel]'   # opentelemetry-api only; sap-cloud-sdk already has it": (  # noqa: E501  (a README line)
        "installs from the package index; tests/test_otel.py covers the metrics"
    ),
}


def test_every_block_is_run_or_excluded_with_a_reason() -> None:
    keys = [b.key for b in blocks()]
    assert len(keys) == len(set(keys)), "two README blocks start alike: tell them apart"
    assert not set(RUN) & set(NOT_RUN)
    new = sorted(set(keys) - set(RUN) - set(NOT_RUN))
    assert new == [], "new README blocks: run each here (RUN) or say why not (NOT_RUN)"
    assert sorted(set(RUN) | set(NOT_RUN)) == sorted(keys), "entries for blocks that are gone"
    assert all(name in globals() for name in RUN.values())
    assert all(reason.strip() for reason in NOT_RUN.values())


def _commands(text: str) -> list[str]:
    """The shell commands of a block: its lines without comments, split at ``&&``."""
    lines = [line for line in text.splitlines() if line.strip() and not line.startswith("#")]
    return [part.strip() for line in lines for part in line.split("&&")]


def _sample_rows(text: str) -> list[list[str]]:
    """(cache, phase, procs, calls, token requests) of each row of a demo table."""
    rows = re.findall(r"^\s*((?:persistent|in-memory)\s+\S+\s+\d+\s+\d+\s+\d+)\s", text, re.M)
    return [row.split() for row in rows]


@pytest.mark.timeout(240)
def test_try_it_runs_the_demo_and_names_the_test_command_ci_runs() -> None:
    commands = _commands(block(TRY_IT))
    demo = [c for c in commands if c.startswith(".venv/bin/agw-cache")]
    tests = [c for c in commands if c.startswith(".venv/bin/pytest")]
    assert demo == [".venv/bin/agw-cache demo"]
    assert tests == [".venv/bin/pytest"]  # the command .ci/run calls (with AGW_REQUIRE_REDIS=1)
    result = run_cli(*shlex.split(demo[0])[1:], env=base_env(), timeout=200)
    assert result.returncode == 0, result.stdout + result.stderr
    sample = block(DEMO_SAMPLE)
    assert _sample_rows(result.stdout) == _sample_rows(sample)
    assert sample.splitlines()[-1] in result.stdout  # "token requests: persistent cache 1, ..."


def test_the_drop_in_import_takes_the_sdks_arguments() -> None:
    lines = block(DROP_IN).splitlines()
    old = "\n".join(line[1:].strip() for line in lines if line.startswith("-"))
    new = "\n".join(line[1:].strip() for line in lines if line.startswith("+"))
    stock: dict[str, Any] = {}
    ours: dict[str, Any] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # traceloop, at the SDK's import
        pytest.importorskip("sap_cloud_sdk", reason="the [sap] extra is not installed")
        exec(old, stock)
        exec(new, ours)
    stock_params = inspect.signature(stock["create_client"]).parameters
    our_params = inspect.signature(ours["create_client"]).parameters
    assert list(stock_params) == [p for p in our_params if p != "cache"]


def _write_ten_lines(tmp_path: Path, tls: Any, token_url: str) -> Path:
    cert, key = tmp_path / "client.pem", tmp_path / "client.key"
    cert.write_text(tls.client_cert_pem)
    key.write_text(tls.client_key_pem)
    prelude = (
        f"TOKEN_URL = {token_url!r}\nCLIENT_ID = 'readme-agent'\n"
        f"CERT_FILE = {str(cert)!r}\nKEY_FILE = {str(key)!r}\n"
    )
    script = tmp_path / "ten_lines.py"
    script.write_text(prelude + block(TEN_LINES) + "\nprint(token)\n")
    return script


def test_ten_lines_fetch_once_over_mtls_and_a_restart_reads_the_cache(tmp_path: Path) -> None:
    tls = make_tls()
    with mtls_token_server(tls) as server:
        script = _write_ten_lines(tmp_path, tls, server.token_url)
        env = base_env(
            SSL_CERT_FILE=str(tls.write_ca(tmp_path)),  # the stand-in's CA, for the default context
            AGW_CACHE_PATH=str(tmp_path / "cache" / "tokens.db"),
        )
        first = run([sys.executable, str(script)], env=env)
        again = run([sys.executable, str(script)], env=env)  # a restart, at once
        assert first.returncode == 0, first.stderr
        assert again.returncode == 0, again.stderr
        assert server.requests == 1
        assert server.client_subjects == ["agw-test-client"]  # mTLS with the README's context
        assert first.stdout == again.stdout == server.issued_tokens[0] + "\n"
        assert server.forms[0]["client_id"] == "readme-agent"


def test_how_it_works_names_files_that_exist() -> None:
    names = re.findall(r"^  ([\w/]+(?:\.py|/))", block(LAYOUT), re.M)
    assert len(names) >= 8
    package = REPO / "agw_persist_cache"
    assert [name for name in names if not (package / name).exists()] == []


async def test_the_mcp_client_example_calls_a_tool(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("mcp")
    from _sap_mcp import GLOBAL_TENANT_ID, ORD_ID, local_gateway

    with local_gateway() as gateway, TokenServer() as server:
        monkeypatch.setenv("INTEGRATION_CLIENT_ID", "readme-agent")
        monkeypatch.setenv("INTEGRATION_AUTH_URL", server.token_url)
        monkeypatch.setenv("INTEGRATION_GATEWAY_URL", gateway.url)
        deps = [{"ordId": ORD_ID, "globalTenantId": GLOBAL_TENANT_ID}]
        monkeypatch.setenv("INTEGRATION_DEPENDENCIES", json.dumps(deps))
        namespace: dict[str, Any] = {}
        exec(block(MCP), namespace)
        try:
            assert await namespace["call_tool"]("echo", {"text": "from the README"}) == (
                "from the README"
            )
            assert await namespace["call_tool"]("echo", {"text": "again"}) == "again"
        finally:
            await namespace["tokens"].ias_client.aclose()
            await namespace["tokens"].cache.aclose()
        assert server.requests == 1
        assert set(gateway.gate.seen) == {server.issued_tokens[0]}


def test_the_key_rotation_steps_reseal_every_row(tmp_path: Path) -> None:
    db = tmp_path / "cache" / "tokens.db"
    old = new_key()
    with PersistentTokenCache(db, config=CacheConfig(keys=[old])) as cache:
        for n in range(3):
            assert cache.set_system_token(f"scope-{n}", f"token-{n}")
    script = block(ROTATION).replace("<old key>", old)
    env = base_env(AGW_CACHE_PATH=str(db))
    env["PATH"] = os.pathsep.join([str(BIN), env["PATH"]])  # python and agw-cache of this venv
    result = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert old not in result.stdout + result.stderr
    new = (tmp_path / "new.key").read_text().strip()
    assert (tmp_path / "new.key").stat().st_mode & 0o777 == 0o600
    with PersistentTokenCache(db, config=CacheConfig(keys=[new])) as cache:  # step 3
        assert [cache.get_system_token(f"scope-{n}") for n in range(3)] == [
            "token-0",
            "token-1",
            "token-2",
        ]


def test_the_test_run_lists_each_skip_reason_with_a_count(tmp_path: Path) -> None:
    # What a fresh machine without redis-server sees above the summary line.
    (tmp_path / "test_skips.py").write_text(
        "import pytest\n"
        "@pytest.mark.parametrize('n', range(3))\n"
        "def test_needs_a_server(n):\n"
        "    pytest.skip('redis-server is not installed')\n"
        "def test_runs():\n"
        "    pass\n"
    )
    plugin = ["-p", "tests.support.skip_summary", "-p", "no:cacheprovider"]
    alone = ["-c", os.devnull, "--rootdir", str(tmp_path)]  # not this project's ini
    result = run(
        [sys.executable, "-m", "pytest", *plugin, *alone, str(tmp_path / "test_skips.py")],
        env=base_env(PYTHONPATH=str(REPO)),
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    section = next(i for i, line in enumerate(lines) if "skipped, by reason" in line)
    assert lines[section + 1].split() == ["3", "redis-server", "is", "not", "installed"]
    assert "1 passed, 3 skipped" in lines[-1]
