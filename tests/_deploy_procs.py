"""Helpers for tests that run real programs: the CLI, gunicorn, a celery worker.

Servers run in their own process group so that stopping them reaps every worker they
forked, whatever happens in the test.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples"
BIN = Path(sys.executable).parent


def program(name: str, module: str) -> list[str]:
    """The venv's console script ``name``, else ``python -m module``."""
    script = shutil.which(name, path=str(BIN))
    return [script] if script else [sys.executable, "-m", module]


def cli_command() -> list[str]:
    """How to run ``agw-cache``: the installed console script when present."""
    return program("agw-cache", "agw_persist_cache")


def run(
    cmd: Sequence[str], *, env: Mapping[str, str], cwd: Path | None = None, timeout: float = 60.0
) -> subprocess.CompletedProcess[str]:
    """Run a program to completion and capture its text output (no check: tests assert)."""
    return subprocess.run(
        list(cmd),
        env=dict(env),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def run_cli(
    *args: str, env: Mapping[str, str], timeout: float = 60.0
) -> subprocess.CompletedProcess[str]:
    """Run ``agw-cache ARGS`` in a subprocess and capture its output."""
    return run([*cli_command(), *args], env=env, timeout=timeout)


def base_env(**extra: str) -> dict[str, str]:
    """The current environment minus any cache settings of the developer, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGW_")}
    env.update(extra)
    return env


def stop_group(proc: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    """SIGTERM the leader (a graceful stop), then SIGKILL whatever is left of its group."""
    proc.terminate()
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=timeout)
    with contextlib.suppress(ProcessLookupError):  # stragglers, or a leader that hung
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


@contextmanager
def process_group(
    cmd: Sequence[str], *, env: Mapping[str, str], cwd: Path, log: Path
) -> Iterator[subprocess.Popen[bytes]]:
    """Start ``cmd`` as the leader of a new process group; stop the whole group on exit."""
    with log.open("wb") as sink:
        proc = subprocess.Popen(
            list(cmd),
            env=dict(env),
            cwd=cwd,
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        yield proc
    finally:
        stop_group(proc)


def wait_for_log(
    log: Path,
    pattern: str,
    proc: subprocess.Popen[bytes],
    *,
    count: int = 1,
    timeout: float = 60.0,
) -> list[re.Match[str]]:
    """Wait until ``pattern`` matched ``count`` times in ``log``; fail fast if ``proc`` died."""
    deadline = time.monotonic() + timeout
    while True:
        text = log.read_text(errors="replace")
        found = list(re.finditer(pattern, text))
        if len(found) >= count:
            return found
        if proc.poll() is not None:
            raise AssertionError(f"{proc.args!r} exited with {proc.returncode}:\n{text}")
        if time.monotonic() > deadline:
            raise AssertionError(f"{pattern!r} not seen {count}x in {timeout}s:\n{text}")
        time.sleep(0.1)
