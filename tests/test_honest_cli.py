"""The CLI and the library tell the truth (issue 19, defects 4-9): a damaged file of ours is
reported by diagnostics and quarantined once by a worker; clear/prune never claim a change
they did not make; relative paths work; status and ``disabled_reason`` say why in every
output format; rotation records the new key and refuses the wrong order; doctor names the
owner and never calls a foreign database "schema version 0".

Commands run in this process (``agw_persist_cache.cli.main``) with the test's environment.
"""

from __future__ import annotations

import json
import os
import sqlite3
from pathlib import Path

import pytest
from _core_support import new_key, raw_exec, raw_rows
from _paths_support import Ran, agw_cache, damage_pages, photograph

from agw_persist_cache import CacheConfig, PersistentTokenCache

pytestmark = pytest.mark.timeout(60)


def _seed(path: Path, key: str | None, rows: int = 3) -> None:
    """A cache with ``rows`` system tokens, sealed under ``key`` (None: a key file)."""
    config = CacheConfig(keys=[key]) if key else None
    with PersistentTokenCache(path, config=config) as cache:
        cache.stats()  # the file (and key file) exist even without rows
        for i in range(rows):
            assert cache.set_system_token(f"scope-{i}", f"token-{i}") is True


def _seed_under_env_key(path: Path, monkeypatch: pytest.MonkeyPatch, rows: int = 3) -> str:
    """A cache of ``rows`` tokens sealed under a new key, which ``AGW_CACHE_KEY`` names."""
    key = new_key()
    monkeypatch.setenv("AGW_CACHE_KEY", key)
    _seed(path, key, rows)
    return key


def _diagnose(path: Path) -> tuple[Ran, Ran, Ran, Ran]:
    """The read-only commands on ``path``: stats, stats --json, list, doctor."""
    commands = (("stats",), ("stats", "--json"), ("list",), ("doctor",))
    stats, as_json, listed, doctor = (agw_cache("--path", str(path), *c) for c in commands)
    return stats, as_json, listed, doctor


def _fetch() -> dict[str, object]:
    return {"access_token": "fetched", "expires_in": 3600}


# -- 4: a damaged file of ours ------------------------------------------------------------------


def test_diagnostics_report_a_damaged_file_and_leave_it_where_it_is(
    db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _seed_under_env_key(db_path, monkeypatch, rows=50)
    damage_pages(db_path)
    before = photograph(db_path.parent)
    stats, as_json, listed, doctor = _diagnose(db_path)
    for ran in (stats, as_json, listed, doctor):
        assert ran.code == 1, ran.text
        assert "moved it aside" not in ran.text and "started an empty one" not in ran.text
    assert "status              DISABLED" in stats.out and "is damaged" in stats.out
    assert "is damaged" in json.loads(as_json.out)["disabled_reason"]
    assert "is damaged" in listed.err and "0 rows" not in listed.out
    assert any(
        line.startswith("FAIL  file") and "is damaged" in line for line in doctor.out.splitlines()
    )
    assert photograph(db_path.parent) == before


def test_a_worker_quarantines_a_damaged_file_of_ours_once(
    db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _seed_under_env_key(db_path, monkeypatch, rows=50)
    damage_pages(db_path)
    for _ in range(2):  # two workers, one after the other
        with PersistentTokenCache(db_path) as worker:
            assert worker.system_token("scope-new", _fetch) == "fetched"
            assert worker.get_system_token("scope-new") == "fetched"
    moved = db_path.parent.glob("tokens.db.corrupt-*")
    stamps = {p.name.removesuffix("-wal").removesuffix("-shm") for p in moved}
    assert len(stamps) == 1  # moved aside once, by the first worker
    assert raw_rows(db_path, "PRAGMA integrity_check") == [("ok",)]


# -- 5: clear and prune never claim what they did not do ---------------------------------------


@pytest.mark.parametrize("command", ["clear", "prune", "rotate-key"])
def test_changing_commands_refuse_a_newer_schema_without_claiming_success(
    db_path: Path, monkeypatch: pytest.MonkeyPatch, command: str
) -> None:
    key = _seed_under_env_key(db_path, monkeypatch)
    monkeypatch.setenv("AGW_CACHE_NEW_KEY", key)
    raw_exec(db_path, "PRAGMA user_version = 999")
    ran = agw_cache("--path", str(db_path), command)
    assert ran.code == 1, ran.text
    assert "upgrade" in ran.err
    assert "cleared" not in ran.out and "pruned" not in ran.out and "re-sealed" not in ran.out
    assert len(raw_rows(db_path)) == 3


def test_clear_on_a_cache_of_ours_says_what_it_did(
    db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _seed_under_env_key(db_path, monkeypatch)
    ran = agw_cache("--path", str(db_path), "clear")
    assert ran.code == 0, ran.text
    assert f"cleared 3 rows from {db_path}" in ran.out
    assert raw_rows(db_path) == []


# -- 6: relative paths --------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["--path", "AGW_CACHE_PATH"])
def test_relative_paths_work_for_every_diagnostic(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    monkeypatch.chdir(tmp_path)
    _seed_under_env_key(Path("tokens.db"), monkeypatch)
    where: tuple[str, ...] = ("--path", "tokens.db")
    if how == "AGW_CACHE_PATH":
        monkeypatch.setenv("AGW_CACHE_PATH", "tokens.db")
        where = ()
    for args in (("stats",), ("stats", "--json"), ("list",), ("doctor",), ("prune",)):
        ran = agw_cache(*where, *args)
        assert ran.code == 0, (args, ran.text)
        assert "ValueError" not in ran.text
    assert "3 rows" in agw_cache(*where, "list").out
    assert str(tmp_path / "tokens.db") in agw_cache(*where, "stats").out


# -- 7: status says why, in every format ---------------------------------------------------------


def _break_key_file(key_file: Path, how: str) -> None:
    if how == "mode-0644":
        key_file.chmod(0o644)
    elif how == "other-owner":
        if os.geteuid() != 0:
            pytest.skip("giving a file to another user needs root (CI runs as root)")
        os.chown(key_file, 65534, 65534)
    elif how == "empty":
        key_file.write_bytes(b"")
    elif how == "garbage":
        key_file.write_text("not a key at all\n")
    else:  # dangling symlink
        key_file.unlink()
        key_file.symlink_to(key_file.with_name("gone.key"))


@pytest.mark.parametrize("how", ["mode-0644", "other-owner", "empty", "garbage", "dangling-link"])
@pytest.mark.parametrize("rows", [0, 3])
def test_an_unusable_key_file_disables_the_cache_and_every_output_says_so(
    db_path: Path, how: str, rows: int
) -> None:
    _seed(db_path, None, rows=rows)
    key_file = db_path.with_name("tokens.db.key")
    _break_key_file(key_file, how)
    stats, as_json, listed, doctor = _diagnose(db_path)
    for ran in (stats, as_json, listed, doctor):
        assert ran.code == 1, ran.text
    assert "status              DISABLED" in stats.out and str(key_file) in stats.out
    doc = json.loads(as_json.out)
    assert doc["status"] == "disabled" and str(key_file) in doc["disabled_reason"]
    assert any(line.startswith("FAIL  key") for line in doctor.out.splitlines())
    assert "all checks passed" not in doctor.out
    with PersistentTokenCache(db_path) as worker:  # the library says so too
        assert worker.system_token("scope", _fetch) == "fetched"
        assert str(key_file) in str(worker.stats().disabled_reason)


def test_a_cache_file_others_may_read_is_disabled_in_stats(db_path: Path) -> None:
    _seed(db_path, None)
    db_path.chmod(0o644)
    stats = agw_cache("--path", str(db_path), "stats")
    assert stats.code == 1
    assert "status              DISABLED" in stats.out and "0644" in stats.out


# -- 8: rotation ----------------------------------------------------------------------------------


def test_after_rotation_the_new_key_alone_passes_and_the_old_one_alone_fails(
    db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    old, new = new_key(), new_key()
    _seed(db_path, old)
    monkeypatch.setenv("AGW_CACHE_KEY", f"{new},{old}")  # step 1 done
    monkeypatch.setenv("AGW_CACHE_NEW_KEY", new)
    rotated = agw_cache("--path", str(db_path), "rotate-key")
    assert rotated.code == 0, rotated.text
    assert "re-sealed 3 rows" in rotated.out and "[done here]" in rotated.out
    monkeypatch.setenv("AGW_CACHE_KEY", new)  # step 3
    doctor = agw_cache("--path", str(db_path), "doctor")
    assert doctor.code == 0, doctor.out
    with PersistentTokenCache(db_path) as worker:
        assert worker.get_system_token("scope-0") == "token-0"
        assert worker.get_system_token("never-stored") is None  # a miss compares keys
        assert worker.stats().key_mismatch == 0
    monkeypatch.setenv("AGW_CACHE_KEY", old)
    stale = agw_cache("--path", str(db_path), "doctor")
    assert stale.code == 1
    assert any(line.startswith("FAIL  key") for line in stale.out.splitlines())
    with PersistentTokenCache(db_path) as worker:
        assert worker.get_system_token("never-stored") is None
        assert worker.stats().key_mismatch == 1


def test_rotate_key_before_step_1_refuses_and_changes_nothing(
    db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    old, new = new_key(), new_key()
    _seed(db_path, old)
    kids = raw_rows(db_path, "SELECT kid FROM tokens")
    monkeypatch.setenv("AGW_CACHE_KEY", old)  # the workers do not know <new> yet
    monkeypatch.setenv("AGW_CACHE_NEW_KEY", new)
    refused = agw_cache("--path", str(db_path), "rotate-key")
    assert refused.code != 0
    assert "step 1 is not done" in refused.err and "--force" in refused.err
    assert new not in refused.text and old not in refused.text
    assert raw_rows(db_path, "SELECT kid FROM tokens") == kids
    forced = agw_cache("--path", str(db_path), "rotate-key", "--force")
    assert forced.code == 0, forced.text
    assert "re-sealed 3 rows" in forced.out and "NOT done here" in forced.out


def test_rotate_key_warns_about_a_key_file_others_can_read(
    db_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    old, new = new_key(), new_key()
    _seed(db_path, old)
    monkeypatch.setenv("AGW_CACHE_KEY", f"{new},{old}")
    key_file = tmp_path / "new.key"
    key_file.write_text(new + "\n")
    for mode, warned in ((0o644, True), (0o600, False)):
        key_file.chmod(mode)
        ran = agw_cache("--path", str(db_path), "rotate-key", "--key-file", str(key_file))
        assert ran.code == 0, ran.text
        assert ("others on this host can read the new key" in ran.err) is warned
        assert new not in ran.text


# -- 9: doctor's words ----------------------------------------------------------------------------


def test_doctor_names_a_wrong_owner_and_stops_there(db_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("giving a file to another user needs root (CI runs as root)")
    _seed(db_path, None)
    os.chown(db_path, 65534, 65534)
    doctor = agw_cache("--path", str(db_path), "doctor")
    assert doctor.code == 1
    lines = doctor.out.splitlines()
    assert any(line.startswith("FAIL  owner") and "uid 65534" in line for line in lines)
    assert not any(line.startswith("FAIL  modes") for line in lines)
    assert "no usable key" not in doctor.out and "AGW_CACHE_KEY" not in doctor.out


def test_doctor_calls_a_foreign_database_not_ours_never_schema_version_0(tmp_path: Path) -> None:
    path = tmp_path / "app.db"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE settings (k TEXT, v TEXT)")
    conn.commit()
    conn.close()
    path.chmod(0o600)
    doctor = agw_cache("--path", str(path), "doctor")
    assert doctor.code == 1
    assert "schema version 0" not in doctor.out and "migrates" not in doctor.out
    assert any(
        line.startswith("FAIL  file") and "tables of its own" in line
        for line in doctor.out.splitlines()
    )
