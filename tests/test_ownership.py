"""Only what is ours: files another user made, links, and files that are not a cache of ours.

The two-user test runs the victim as ``nobody`` (with ``setpriv``; CI runs as root), on a
readable copy of the package (``tests/support/other_user.py``: it works from a private
checkout); where privileges cannot be dropped it is skipped with the reason.
"""

from __future__ import annotations

import json
import os
import stat
import textwrap
from pathlib import Path

import pytest
from _core_support import new_key, raw_rows

from agw_persist_cache import PersistentTokenCache
from agw_persist_cache._crypto import encode_key
from agw_persist_cache._files import make_private_dirs, others_may_write
from tests.support.other_user import (
    cannot_drop_privileges,
    public_tmp_path_fixture,  # noqa: F401  (a fixture: pytest finds it by its name)
    run_python_as_nobody,
)

VICTIM = textwrap.dedent(
    """
    import json, sys
    from agw_persist_cache import PersistentTokenCache
    cache = PersistentTokenCache(sys.argv[1])
    stored = cache.set_system_token("victim-scope", "VICTIM-SECRET-TOKEN")
    fetched = cache.system_token("other", lambda: "fetched-directly")
    print(json.dumps({"stored": stored, "fetched": fetched,
                      "disabled": cache.stats().disabled_reason}))
    """
)


@pytest.fixture
def shared_dir(public_tmp_path: Path) -> Path:
    """A directory every user can enter, like /var/tmp."""
    return public_tmp_path


def test_another_users_directory_database_and_key_file_are_refused(shared_dir: Path) -> None:
    if reason := cannot_drop_privileges():
        pytest.skip(reason)
    planted = shared_dir / "cache"
    planted.mkdir(mode=0o777)
    planted.chmod(0o777)
    db = planted / "tokens.db"
    known_key = new_key()
    with PersistentTokenCache(db) as attacker:  # a real cache file, with the attacker's key
        attacker.set_system_token("bait", "attacker-token")
    db.chmod(0o666)
    (planted / "tokens.db.key").write_text(known_key + "\n")
    (planted / "tokens.db.key").chmod(0o644)
    before = sorted(p.name for p in planted.iterdir())
    result = run_python_as_nobody(["-c", VICTIM, str(db)])
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout)
    assert seen["stored"] is False
    assert seen["fetched"] == "fetched-directly"
    assert "owned by uid 0" in seen["disabled"]
    assert "VICTIM-SECRET-TOKEN" not in result.stderr
    assert str(db) in result.stderr  # one warning naming the path
    assert len(raw_rows(db)) == 1  # only the attacker's bait: nothing of the victim's
    assert sorted(p.name for p in planted.iterdir()) == before  # the victim made nothing


def test_a_key_file_that_is_a_link_is_refused(db_path: Path, tmp_path: Path) -> None:
    known = tmp_path / "known.key"
    known.write_text(new_key())
    known.chmod(0o600)
    db_path.parent.mkdir(mode=0o700)
    (db_path.parent / "tokens.db.key").symlink_to(known)
    with PersistentTokenCache(db_path) as cache:
        assert cache.set_system_token("scope", "token") is False
        assert cache.key_ids == ()
    assert not db_path.exists() or raw_rows(db_path) == []


def test_a_database_link_is_refused_and_its_target_untouched(db_path: Path, tmp_path: Path) -> None:
    target = tmp_path / "someone-elses.db"
    target.write_bytes(b"")
    target.chmod(0o600)
    db_path.parent.mkdir(mode=0o700)
    db_path.symlink_to(target)
    with PersistentTokenCache(db_path, config=_keys()) as cache:
        assert cache.set_system_token("scope", "token") is False
        assert "symbolic link" in str(cache.stats().disabled_reason)
    assert target.read_bytes() == b""


def test_a_dangling_link_does_not_get_its_target_created(db_path: Path, tmp_path: Path) -> None:
    target = tmp_path / "elsewhere" / "created.db"
    target.parent.mkdir()
    db_path.parent.mkdir(mode=0o700)
    db_path.symlink_to(target)
    with PersistentTokenCache(db_path, config=_keys()) as cache:
        assert cache.set_system_token("scope", "token") is False
    assert not target.exists()


def test_a_group_readable_key_file_is_refused(db_path: Path) -> None:
    db_path.parent.mkdir(mode=0o700)
    key_file = db_path.parent / "tokens.db.key"
    key_file.write_text(encode_key(os.urandom(32)) + "\n")
    key_file.chmod(0o640)
    with PersistentTokenCache(db_path) as cache:
        assert cache.set_system_token("scope", "token") is False


def test_directories_the_cache_creates_are_0700_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        make_private_dirs(tmp_path / "a" / "b" / "c")
        with PersistentTokenCache(tmp_path / "x" / "tokens.db", config=_keys()) as cache:
            assert cache.set_system_token("scope", "token") is True
    finally:
        os.umask(old)
    for d in (tmp_path / "a", tmp_path / "a" / "b", tmp_path / "a" / "b" / "c", tmp_path / "x"):
        assert stat.S_IMODE(d.stat().st_mode) == 0o700, d
    assert stat.S_IMODE((tmp_path / "x" / "tokens.db.locks").stat().st_mode) == 0o700
    for f in (tmp_path / "x").glob("tokens.db*"):
        if f.is_file():
            assert stat.S_IMODE(f.stat().st_mode) == 0o600, f


def test_a_world_writable_directory_without_sticky_bit_is_noticed(tmp_path: Path) -> None:
    shared = tmp_path / "emptydir"
    shared.mkdir()
    shared.chmod(0o777)
    assert others_may_write(shared)
    shared.chmod(0o1777)
    assert not others_may_write(shared)


def _keys():  # type: ignore[no-untyped-def]
    from _core_support import make_config

    return make_config()
