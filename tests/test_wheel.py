"""The built wheel carries the migrations and py.typed, and works installed outside the checkout."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import sysconfig
import textwrap
import zipfile
from pathlib import Path

import pytest

from agw_persist_cache.backends.sqlite import SCHEMA_VERSION as _SCHEMA_VERSION

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.timeout(240)

SCRIPT = textwrap.dedent(
    """
    import json, sys
    import agw_persist_cache as pkg
    from agw_persist_cache import CacheConfig, PersistentTokenCache
    from agw_persist_cache.backends import _sqlite_schema as _schema
    from agw_persist_cache import cli  # with doctor and demo: nothing from tests/ needed

    path = sys.argv[1]
    with PersistentTokenCache(path, config=CacheConfig(keys=[b"k" * 32])) as cache:
        cache.set_system_token("scope", "installed-token")
        fetched = cache.system_token("other", lambda: "fetched-token")
    with PersistentTokenCache(path, config=CacheConfig(keys=[b"k" * 32])) as cache:
        print(json.dumps({
            "file": pkg.__file__,
            "migrations": str(_schema.migrations_dir()),
            "token": cache.get_system_token("scope"),
            "fetched": fetched,
            "schema": cache.stats().schema_version,
            "checkout_on_path": any("/work/main" == p.rstrip("/") for p in sys.path),
        }))
    """
)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    # Without hatchling in the venv pip builds in an isolated env (needs the package index).
    isolation = ["--no-build-isolation"] if importlib.util.find_spec("hatchling") else []
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", *isolation, "-q", "-w", str(out),
         str(ROOT)],
        check=True,
        timeout=180,
    )  # fmt: skip
    (built,) = out.glob("agw_persist_cache-*.whl")
    return built


def test_wheel_contains_the_migrations_and_py_typed(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "agw_persist_cache/_migrations/0001_initial.sql" in names
    assert "agw_persist_cache/py.typed" in names
    assert "agw_persist_cache/__init__.py" in names
    assert not any(n.startswith("tests/") for n in names)


def test_wheel_ships_no_test_scaffolding(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    stems = {Path(n).stem for n in names if n.endswith(".py")}
    assert not stems & {"_tokenserver", "tokenserver", "_sap_standin", "sap_standin"}
    assert not any("/support/" in n or n.startswith("benchmarks/") for n in names)


def test_installed_wheel_caches_tokens_outside_the_checkout(wheel: Path, tmp_path: Path) -> None:
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target),
         str(wheel)],
        check=True,
        timeout=120,
    )  # fmt: skip
    work = tmp_path / "elsewhere"
    work.mkdir()
    deps = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env["PYTHONPATH"] = os.pathsep.join([str(target), *sorted(deps)])
    # -S: no site hooks, so the editable install's path entry to the checkout is not added.
    result = subprocess.run(
        [sys.executable, "-S", "-c", SCRIPT, str(work / "tokens.db")],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    facts = json.loads(result.stdout)
    assert Path(facts["file"]).is_relative_to(target)
    assert Path(facts["migrations"]).is_relative_to(target)
    assert facts["token"] == "installed-token"
    assert facts["fetched"] == "fetched-token"
    assert facts["schema"] == _SCHEMA_VERSION
    assert not facts["checkout_on_path"]
