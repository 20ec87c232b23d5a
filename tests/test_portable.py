"""The platforms CI cannot run (Windows, macOS), proven on Linux in subprocesses.

- The package imports and caches with what Windows lacks taken away: ``fcntl``, ``fork``,
  ``os.register_at_fork``, ``os.geteuid``, ``O_CLOEXEC``, ``O_NOFOLLOW``.
- The suite's lock and cache test modules pass on the portable lock path (``filelock``):
  with ``fcntl`` (filelock on ``flock``: what macOS runs) and with ``fcntl`` unimportable
  (filelock's lock for a platform without it), in every process those tests start.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
import time
import tomllib
from pathlib import Path

import pytest

from agw_persist_cache.backends._filelocks import FORCE_ENV

ROOT = Path(__file__).resolve().parents[1]
MODULES = ("tests/test_locks.py", "tests/test_cache.py", "tests/test_concurrency.py")

# Makes fcntl unimportable in every Python process started with it on PYTHONPATH (spawned
# and forkserver children too). filelock warns at import that it falls back to its
# marker-file lock; that warning is filelock's and only happens where fcntl is missing
# on POSIX, which no real platform is (Windows uses LockFileEx and does not warn).
NO_FCNTL = """\
import sys
import warnings

sys.modules["fcntl"] = None
with warnings.catch_warnings():
    warnings.simplefilter("ignore", UserWarning)
    import filelock
"""

WINDOWS_LIKE = """\
import os, pathlib, sys, tempfile, warnings

sys.modules["fcntl"] = None
for name in ("fork", "register_at_fork", "geteuid", "O_CLOEXEC", "O_NOFOLLOW"):
    delattr(os, name)
warnings.simplefilter("error")
warnings.filterwarnings("ignore", "only soft file lock is available", UserWarning)

import agw_persist_cache
import agw_persist_cache.agentgateway
import agw_persist_cache.backends.redis
import agw_persist_cache.cli
from agw_persist_cache import PersistentTokenCache
from agw_persist_cache.backends import _filelocks

path = pathlib.Path(tempfile.mkdtemp()) / "c" / "tokens.db"
cache = PersistentTokenCache(path)
first = cache.system_token("scope", lambda: "token")
stats = cache.stats()
cache.close()
other = PersistentTokenCache(path)  # a second cache reads the token from the file
again = other.system_token("scope", lambda: "fetched again")
print(first, again, stats.fetches, stats.storage_errors, stats.disabled_reason)
print(_filelocks.use_ofd())
other.close()
print("doctor", agw_persist_cache.cli.main(["--path", str(path), "doctor"]))
"""


def _python(
    *args: str | Path, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """This interpreter run with ``args`` in the checkout; its output captured as text."""
    return subprocess.run(
        [sys.executable, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env=env,
        check=False,
    )


def test_the_package_imports_and_caches_without_what_windows_lacks() -> None:
    done = _python("-c", WINDOWS_LIKE)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[:2] == ["token token 1 0 None", "False"]
    assert lines[-1] == "doctor 0", done.stdout
    assert "this user owns every file" in done.stdout  # no uids: nothing says uid


def test_importing_the_package_needs_no_fcntl() -> None:
    code = "import sys; sys.modules['fcntl'] = None; import agw_persist_cache; print('ok')"
    done = _python("-c", code)
    assert (done.returncode, done.stdout) == (0, "ok\n"), done.stderr


def _forced_env(tmp_path: Path, *, fcntl: bool) -> dict[str, str]:
    env = {**os.environ, FORCE_ENV: "portable"}
    if not fcntl:
        site = tmp_path / "site"
        site.mkdir()
        (site / "sitecustomize.py").write_text(NO_FCNTL)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), env.get("PYTHONPATH")]))
    return env


@pytest.mark.timeout(1500)
@pytest.mark.parametrize("fcntl", [True, False], ids=["flock-as-on-macos", "without-fcntl"])
def test_lock_and_cache_modules_pass_on_the_portable_path(tmp_path: Path, fcntl: bool) -> None:
    env = _forced_env(tmp_path, fcntl=fcntl)
    probe = _python(
        "-c",
        textwrap.dedent("""\
            import importlib.util, filelock
            from agw_persist_cache.backends import _filelocks
            try:
                import fcntl
            except ImportError:
                fcntl = None
            print(fcntl is not None, _filelocks.use_ofd(), filelock.FileLock.__name__)
        """),
        env=env,
    )
    lock = "UnixFileLock" if fcntl else "SoftFileLock"
    assert probe.stdout.split() == [str(fcntl), "False", lock], probe.stderr
    started = time.monotonic()
    inner = tmp_path / "inner"  # its own: a nested run must not prune the outer run's dirs
    run = _python(
        *("-m", "pytest", "-q", "-p", "no:cacheprovider", "--basetemp", inner, *MODULES),
        env=env,
        timeout=1400,
    )
    tail = "\n".join(run.stdout.splitlines()[-40:])
    assert run.returncode == 0, tail + run.stderr[-2000:]
    summary = run.stdout.splitlines()[-1]
    passed = int(re.search(r"(\d+) passed", summary).group(1))  # type: ignore[union-attr]  # asserted by the run's success
    assert passed >= 100 and "failed" not in summary and "error" not in summary, summary
    print(
        f"portable path ({'flock' if fcntl else 'no fcntl'}): {summary} "
        f"[{time.monotonic() - started:.1f} s]"
    )


def test_the_metadata_names_the_platforms_these_tests_cover() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    platforms = {c for c in project["classifiers"] if c.startswith("Operating System ::")}
    assert platforms == {
        "Operating System :: MacOS",
        "Operating System :: Microsoft :: Windows",
        "Operating System :: POSIX",
        "Operating System :: POSIX :: Linux",
    }
