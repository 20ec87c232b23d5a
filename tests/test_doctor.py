"""Read-only diagnostics: ``stats``, ``list`` and ``doctor`` create nothing, and ``doctor``
reports every broken set-up as a FAIL line (as another user too), never a traceback."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from _core_support import new_key
from _deploy_procs import base_env, run_cli

from agw_persist_cache import CacheConfig, PersistentTokenCache
from tests.support.other_user import (
    public_tmp_path_fixture,  # noqa: F401  (a fixture: pytest finds it by its name)
    run_python_as_nobody,
)


def _tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.mark.parametrize("command", ["stats", "list", "doctor"])
def test_diagnostics_on_a_missing_path_say_so_and_create_nothing(
    tmp_path: Path, command: str
) -> None:
    path = tmp_path / "typo" / "tokens.db"
    result = run_cli("--path", str(path), command, env=base_env())
    assert result.returncode == 1
    assert f"no cache at {path}" in result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    assert _tree(tmp_path) == []


def test_diagnostics_change_nothing_in_an_existing_cache(tmp_path: Path) -> None:
    key = new_key()
    path = tmp_path / "c" / "tokens.db"
    with PersistentTokenCache(path, config=CacheConfig(keys=[key])) as cache:
        cache.set_system_token("scope", "token")
    before = {p: p.stat().st_mtime_ns for p in path.parent.iterdir()}
    env = base_env(AGW_CACHE_KEY=key)
    for command in ("stats", "list", "doctor"):
        result = run_cli("--path", str(path), command, env=env)
        assert result.returncode == 0, result.stdout + result.stderr
    assert {p: p.stat().st_mtime_ns for p in path.parent.iterdir()} == before


@pytest.mark.parametrize("how", ["--url", "AGW_CACHE_URL"])
def test_doctor_checks_the_file_a_sqlite_url_names(tmp_path: Path, how: str) -> None:
    """The file checked is the file the cache opens, however the URL is given."""
    key = new_key()
    path = tmp_path / "c" / "tokens.db"
    with PersistentTokenCache(path, config=CacheConfig(keys=[key])) as cache:
        cache.set_system_token("scope", "token")
    url = f"sqlite://{path}"
    if how == "--url":
        result = run_cli("doctor", "--url", url, env=base_env(AGW_CACHE_KEY=key))
    else:
        result = run_cli("doctor", env=base_env(AGW_CACHE_KEY=key, AGW_CACHE_URL=url))
    assert result.returncode == 0, result.stdout + result.stderr
    source = how if how == "--url" else f"${how}"
    assert f"{path} (from {source})" in result.stdout
    assert "open the 1 rows" in result.stdout


def _doctor(path: Path, **env: str) -> tuple[int, str]:
    result = run_cli("--path", str(path), "doctor", env=base_env(**env))
    assert "Traceback" not in result.stderr, result.stderr
    return result.returncode, result.stdout


def test_doctor_fails_on_a_wrong_key_naming_key_ids_only(tmp_path: Path) -> None:
    right, wrong = new_key(), new_key()
    path = tmp_path / "c" / "tokens.db"
    with PersistentTokenCache(path, config=CacheConfig(keys=[right])) as cache:
        cache.set_system_token("scope", "token")
    code, out = _doctor(path, AGW_CACHE_KEY=wrong)
    assert code == 1
    (line,) = [x for x in out.splitlines() if x.startswith("FAIL  key")]
    assert "does not open this cache" in line and "1 rows" in line
    assert right not in out and wrong not in out


@pytest.mark.parametrize(
    ("content", "why"),
    [(b"x\n", "not an SQLite file"), (None, "tables of its own")],
)
def test_doctor_fails_on_a_file_that_is_not_a_cache_and_leaves_it(
    tmp_path: Path, content: bytes | None, why: str
) -> None:
    path = tmp_path / "app.conf"
    if content is None:
        with sqlite3.connect(path) as conn:
            conn.execute("CREATE TABLE settings (k TEXT, v TEXT)")
        conn.close()
    else:
        path.write_bytes(content)
    path.chmod(0o600)
    data = path.read_bytes()
    code, out = _doctor(path)
    assert code == 1
    assert any(line.startswith("FAIL") and why in line for line in out.splitlines())
    assert path.read_bytes() == data
    assert _tree(tmp_path) == ["app.conf"]


def test_doctor_warns_about_a_directory_others_may_write(tmp_path: Path) -> None:
    shared = tmp_path / "emptydir"
    shared.mkdir()
    key = new_key()
    with PersistentTokenCache(shared / "tokens.db", config=CacheConfig(keys=[key])) as cache:
        cache.set_system_token("scope", "token")
    shared.chmod(0o777)
    code, out = _doctor(shared / "tokens.db", AGW_CACHE_KEY=key)
    assert code == 0, out
    assert any(line.startswith("warn  directory") for line in out.splitlines())


def _as_nobody(*args: str) -> tuple[int, str, str]:
    """``agw-cache ARGS`` as ``nobody``, on a readable copy of the package (any checkout)."""
    result = run_python_as_nobody(["-m", "agw_persist_cache", *args])
    return result.returncode, result.stdout, result.stderr


def _root_cache(cache_dir: Path, *, mode: int, reachable: Path) -> Path:
    """A cache with one row in ``cache_dir`` (``mode``), made by this (root) user; every
    directory from ``reachable`` up may be entered by others."""
    cache_dir.mkdir()
    with PersistentTokenCache(cache_dir / "tokens.db", config=CacheConfig(keys=[new_key()])) as c:
        c.set_system_token("scope", "token")
    cache_dir.chmod(mode)
    _open_to_all(reachable)
    return cache_dir / "tokens.db"


def _open_to_all(path: Path) -> None:
    for p in (path, *path.parents):
        if p in (Path("/"), Path("/tmp")):
            break
        p.chmod(p.stat().st_mode | 0o011)


def test_doctor_as_another_user_reports_a_root_owned_cache_without_crashing(
    public_tmp_path: Path,
) -> None:
    # The caller can write the directory, not read the 0600 database.
    db = _root_cache(public_tmp_path / "shared", mode=0o777, reachable=public_tmp_path)
    code, out, err = _as_nobody("--path", str(db), "doctor")
    assert code == 1
    assert "Traceback" not in err
    assert any(
        line.startswith("FAIL  owner") and "owned by uid 0" in line for line in out.split("\n")
    )


def test_doctor_as_another_user_reports_a_private_directory_without_crashing(
    public_tmp_path: Path,
) -> None:
    db = _root_cache(public_tmp_path / "private", mode=0o700, reachable=public_tmp_path)
    code, out, err = _as_nobody("--path", str(db), "doctor")
    assert code == 1
    assert "Traceback" not in err
    assert out.splitlines()[-1].startswith("doctor: ")
    assert any(line.startswith("FAIL") for line in out.splitlines())


def test_doctor_shows_the_mode(tmp_path: Path) -> None:
    key = new_key()
    path = tmp_path / "c" / "tokens.db"
    with PersistentTokenCache(path, config=CacheConfig(keys=[key])) as cache:
        cache.set_system_token("scope", "token")
    code, out = _doctor(path, AGW_CACHE_KEY=key)
    assert code == 0, out
    (line,) = [ln for ln in out.splitlines() if ln.split()[1:2] == ["mode"]]
    assert line.startswith("ok") and "healthy" in line
