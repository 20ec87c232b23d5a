"""``agw-cache`` through the real console script, in a subprocess, against a real cache file.

Every command's stdout and stderr is checked for the secrets stored in the cache (tokens,
the user JWT, scope strings, the key): none may ever appear.
"""

from __future__ import annotations

import json
import secrets
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from _core_support import new_key
from _deploy_procs import base_env, cli_command, run, run_cli

from agw_persist_cache import CacheConfig, PersistentTokenCache
from agw_persist_cache._doctor import filesystem_of, is_network_filesystem

pytestmark = pytest.mark.timeout(120)


@dataclass
class Seeded:
    """A cache file with three rows (system valid, system expired, user) and its secrets."""

    path: Path
    env: dict[str, str]
    scopes: list[str]
    tokens: list[str]
    user_jwt: str
    secrets: list[str] = field(default_factory=list)

    def cli(
        self, *args: str, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run ``agw-cache`` and assert no secret leaked into its output."""
        result = run_cli(*args, env=env or self.env)
        for secret in self.secrets:
            assert secret not in result.stdout, f"secret leaked to stdout of {args}"
            assert secret not in result.stderr, f"secret leaked to stderr of {args}"
        return result

    def open(self, *keys: str) -> PersistentTokenCache:
        config = CacheConfig(keys=list(keys)) if keys else None
        return PersistentTokenCache(self.path, config=config)


@pytest.fixture
def seeded(tmp_path: Path) -> Iterator[Seeded]:
    home = tmp_path / "cache"
    home.mkdir(mode=0o700)
    path = home / "tokens.db"
    token_system, token_expired, token_user = (f"tok-{secrets.token_hex(16)}" for _ in range(3))
    user_jwt = f"eyJhbGciOiJub25lIn0.{secrets.token_urlsafe(24)}.sig"
    scopes = [f"scope-{secrets.token_hex(6)}" for _ in range(3)]
    with PersistentTokenCache(path) as cache:
        cache.set_system_token(scopes[0], {"access_token": token_system, "expires_in": 3600})
        cache.set_system_token(scopes[1], token_expired, expires_at=time.time() - 120)
        cache.set_user_token(user_jwt, scopes[2], {"access_token": token_user, "expires_in": 600})
        key_file = cache.key_file
    assert key_file is not None and key_file.exists()
    tokens = [token_system, token_expired, token_user]
    seed = Seeded(path, base_env(AGW_CACHE_PATH=str(path)), scopes, tokens, user_jwt)
    seed.secrets = [*tokens, user_jwt, *scopes, key_file.read_text().strip()]
    yield seed


def test_stats_json_counts_rows_by_kind_and_expiry(seeded: Seeded) -> None:
    result = seeded.cli("stats", "--json")
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["by_kind"] == {
        "system": {"valid": 1, "expired": 1},
        "user": {"valid": 1, "expired": 0},
    }
    assert doc["path"] == str(seeded.path)
    assert doc["entries_system"] == 2 and doc["entries_user"] == 1
    assert doc["file_bytes"] > 0
    assert doc["schema_version"] >= 1
    assert len(doc["key_ids_in_use"]) == 1
    assert doc["key_ids_in_use"] == doc["key_ids_configured"]


def test_stats_text_names_every_fact_and_path_flag_works_after_the_command(
    seeded: Seeded,
) -> None:
    result = seeded.cli("stats", "--path", str(seeded.path), env=base_env())
    assert result.returncode == 0, result.stderr
    for label in ("rows", "oldest expiry", "newest expiry", "file size", "schema version"):
        assert label in result.stdout
    assert "system 2 (1 valid, 1 expired)" in result.stdout


def test_list_prints_one_metadata_line_per_row(seeded: Seeded) -> None:
    listed = seeded.cli("list", "--json")
    assert listed.returncode == 0, listed.stderr
    rows = json.loads(listed.stdout)
    assert sorted(r["kind"] for r in rows) == ["system", "system", "user"]
    assert all(len(r["digest_prefix"]) == 12 for r in rows)
    text = seeded.cli("--path", str(seeded.path), "list", env=base_env())
    assert text.returncode == 0, text.stderr
    lines = text.stdout.splitlines()
    assert lines[0].split()[:3] == ["KIND", "DIGEST", "EXPIRES"]
    assert lines[-1] == "3 rows"
    for row in rows:
        assert any(row["digest_prefix"] in line and row["key_id"] in line for line in lines)
    assert "expired" in text.stdout


def test_prune_prints_the_expired_row_it_removed(seeded: Seeded) -> None:
    rows = json.loads(seeded.cli("list", "--json").stdout)
    expired = [r["digest_prefix"] for r in rows if r["expires_at"] < time.time()]
    assert len(expired) == 1
    result = seeded.cli("prune")
    assert result.returncode == 0, result.stderr
    assert expired[0] in result.stdout
    assert "pruned 1 rows, 2 left" in result.stdout
    assert len(json.loads(seeded.cli("list", "--json").stdout)) == 2


def test_clear_empties_the_cache_for_every_process(seeded: Seeded) -> None:
    result = seeded.cli("clear")
    assert result.returncode == 0, result.stderr
    assert "cleared 3 rows" in result.stdout
    doc = json.loads(seeded.cli("stats", "--json").stdout)
    assert doc["entries_system"] == doc["entries_user"] == 0
    with seeded.open() as cache:
        assert cache.get_system_token(seeded.scopes[0]) is None


def test_rotate_key_from_a_file_reseals_every_row_under_the_new_key(
    seeded: Seeded, tmp_path: Path
) -> None:
    old, new = seeded.secrets[-1], new_key()
    seeded.secrets.append(new)
    key_file = tmp_path / "new.key"
    key_file.write_text(new + "\n")
    key_file.chmod(0o600)
    step_1 = {**seeded.env, "AGW_CACHE_KEY": f"{new},{old}"}
    result = seeded.cli("rotate-key", "--key-file", str(key_file), env=step_1)
    assert result.returncode == 0, result.stderr
    assert "re-sealed 3 rows" in result.stdout
    assert "AGW_CACHE_KEY=<new>,<old>" in result.stdout
    with seeded.open(new) as cache:  # the new key alone opens every row now
        assert cache.get_system_token(seeded.scopes[0]) == seeded.tokens[0]
        got = cache.get_user_token(seeded.user_jwt, seeded.scopes[2])
        assert got == seeded.tokens[2]
        assert cache.stats().key_ids_in_use == (cache.key_ids[0],)


def test_rotate_key_from_env_keeps_old_env_keys_readable(seeded: Seeded) -> None:
    old_file_key = seeded.secrets[-1]
    old, new = new_key(), new_key()
    seeded.secrets += [old, new]
    env = {**seeded.env, "AGW_CACHE_KEY": f"{old},{old_file_key}", "AGW_CACHE_NEW_KEY": new}
    result = seeded.cli("rotate-key", "--force", env=env)
    assert result.returncode == 0, result.stderr
    assert "re-sealed 3 rows" in result.stdout
    again = seeded.cli("rotate-key", env={**env, "AGW_CACHE_KEY": f"{new},{old}"})
    assert again.returncode == 0, again.stderr
    assert "re-sealed 0 rows" in again.stdout
    with seeded.open(new) as cache:
        assert cache.get_system_token(seeded.scopes[0]) == seeded.tokens[0]


def test_rotate_key_usage_errors_exit_2_without_echoing_the_key(seeded: Seeded) -> None:
    missing = seeded.cli("rotate-key")
    assert missing.returncode == 2
    assert "--key-file" in missing.stderr
    bad = "not-a-key-" + secrets.token_hex(4)
    seeded.secrets.append(bad)
    wrong = seeded.cli("rotate-key", env={**seeded.env, "AGW_CACHE_NEW_KEY": bad})
    assert wrong.returncode == 2
    assert "32-byte key" in wrong.stderr


def test_doctor_passes_on_a_healthy_cache(seeded: Seeded) -> None:
    result = seeded.cli("doctor")
    assert result.returncode == 0, result.stdout + result.stderr
    names = [line.split()[1] for line in result.stdout.splitlines()[:-1]]
    for name in ("path", "filesystem", "journal", "modes", "owner", "key", "schema", "locks"):
        assert name in names
    assert all(line.split()[0] in ("ok", "warn") for line in result.stdout.splitlines()[:-1])


def test_doctor_fails_on_a_file_readable_by_others(seeded: Seeded) -> None:
    seeded.path.chmod(0o644)
    result = seeded.cli("doctor")
    assert result.returncode == 1
    assert any(
        line.startswith("FAIL  modes") and "chmod 600" in line
        for line in result.stdout.splitlines()
    )


def test_doctor_refuses_a_network_filesystem_before_opening(tmp_path: Path) -> None:
    cache_dir = tmp_path / "shared"
    cache_dir.mkdir(mode=0o700)
    mounts = tmp_path / "mounts"
    mounts.write_text(f"/dev/vda / ext4 rw 0 0\nfiler:/export {cache_dir} nfs4 rw 0 0\n")
    path = cache_dir / "tokens.db"
    result = run_cli("--path", str(path), "doctor", "--mounts-file", str(mounts), env=base_env())
    assert result.returncode == 1
    assert "FAIL  filesystem" in result.stdout
    assert "network filesystem" in result.stdout and "AGW_CACHE_PATH" in result.stdout
    assert not path.exists(), "doctor must not create a WAL database on NFS"


def test_filesystem_of_picks_the_longest_mount_and_unescapes_spaces() -> None:
    mounts = (
        "/dev/a / ext4 rw 0 0\n//srv/x /mnt/my\\040share cifs rw 0 0\nfuse /mnt/f fuse.sshfs rw\n"
    )
    assert filesystem_of(Path("/mnt/my share/c/tokens.db"), mounts) == ("/mnt/my share", "cifs")
    assert filesystem_of(Path("/mnt/my/tokens.db"), mounts) == ("/", "ext4")
    assert is_network_filesystem("cifs") and is_network_filesystem("fuse.sshfs")
    assert not is_network_filesystem("ext4") and not is_network_filesystem("tmpfs")


def test_usage_errors_exit_2_and_module_entry_point_works(tmp_path: Path) -> None:
    assert run_cli(env=base_env()).returncode == 2
    assert run_cli("no-such-command", env=base_env()).returncode == 2
    assert run_cli("demo", "--workers", "0", env=base_env()).returncode == 2
    module = run([sys.executable, "-m", "agw_persist_cache", "--help"], env=base_env())
    assert module.returncode == 0
    for command in ("stats", "list", "clear", "prune", "rotate-key", "doctor", "demo"):
        assert command in module.stdout


def test_cli_leaves_a_database_that_passes_integrity_check(seeded: Seeded) -> None:
    for args in (("stats",), ("list",), ("prune",), ("doctor",), ("clear",)):
        assert seeded.cli(*args).returncode == 0
    with sqlite3.connect(seeded.path) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


READER = """
import json, pathlib, sys
from agw_persist_cache import PersistentTokenCache
cache, stop = PersistentTokenCache(), pathlib.Path(sys.argv[1])
errors = reads = fetched = 0
def fetch():
    global fetched
    fetched += 1
    return {"access_token": "refetched-during-rotation", "expires_in": 600}
print("ready", flush=True)
while not stop.exists() or reads < 50:
    try:
        cache.system_token(sys.argv[2], fetch)
        reads += 1
    except Exception:
        errors += 1
cache.system_token(sys.argv[2], fetch)  # at least one read after the rotation finished
print(json.dumps({"errors": errors, "reads": reads, "fetched": fetched}))
"""


def test_rotate_key_is_safe_while_a_worker_with_the_old_key_keeps_reading(
    seeded: Seeded, tmp_path: Path
) -> None:
    stop = tmp_path / "stop"
    reader = subprocess.Popen(
        [sys.executable, "-c", READER, str(stop), seeded.scopes[0]],
        env=seeded.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert reader.stdout is not None and reader.stdout.readline().strip() == "ready"
        new = new_key()
        seeded.secrets.append(new)
        result = seeded.cli("rotate-key", "--force", env={**seeded.env, "AGW_CACHE_NEW_KEY": new})
        assert result.returncode == 0, result.stderr
    finally:
        stop.touch()
        out, err = reader.communicate(timeout=60)
    assert reader.returncode == 0, err
    facts = json.loads(out.splitlines()[-1])
    assert facts["errors"] == 0 and facts["reads"] >= 50
    # The old-key worker no longer finds the re-sealed row and fetches again (once, or a few
    # times if reseal catches its rewrite too): the cost of rotating before deploying
    # new,old. Nothing raises and the file stays sound.
    assert 1 <= facts["fetched"] <= 3
    with sqlite3.connect(seeded.path) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def test_a_newer_schema_makes_stats_and_doctor_exit_1_with_the_fix(seeded: Seeded) -> None:
    with sqlite3.connect(seeded.path) as conn:
        conn.execute("PRAGMA user_version = 999")
    stats = seeded.cli("stats")
    assert stats.returncode == 1
    assert "DISABLED" in stats.stdout and "upgrade" in stats.stdout
    doctor = seeded.cli("doctor")
    assert doctor.returncode == 1
    assert any(line.startswith("FAIL  schema") for line in doctor.stdout.splitlines())


def test_list_and_prune_on_a_disabled_cache_exit_1_with_the_reason(seeded: Seeded) -> None:
    with sqlite3.connect(seeded.path) as conn:
        conn.execute("PRAGMA user_version = 999")
    for args in (("list",), ("list", "--json"), ("prune",)):
        result = seeded.cli(*args)
        assert result.returncode == 1, args
        assert "disabled" in result.stderr and "upgrade" in result.stderr, args
        assert "rows" not in result.stdout and result.stdout.strip() in ("", "[]"), args


@pytest.mark.parametrize("args", [("stats", "--json"), ("list",), ("stats",)])
def test_a_reader_that_leaves_early_ends_the_command_quietly(
    seeded: Seeded, args: tuple[str, ...]
) -> None:
    proc = subprocess.Popen(
        [*cli_command(), *args],
        env=seeded.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    proc.stdout.close()  # the reader is gone before the command writes a byte
    _, err = proc.communicate(timeout=60)
    assert err == ""
    assert proc.returncode == 141


def test_a_shell_pipe_into_head_shows_no_traceback(seeded: Seeded) -> None:
    command = " ".join([*cli_command(), "stats", "--json"]) + " | head -2; exit ${PIPESTATUS[0]}"
    result = run(["bash", "-c", command], env=seeded.env)
    assert result.returncode in (0, 141), result.stderr
    assert result.stderr == ""
    assert len(result.stdout.splitlines()) == 2


@pytest.mark.parametrize(
    "args",
    [
        ("demo", "--path", "x.db"),
        ("--path", "x.db", "demo"),
        ("clear", "--json"),
        ("stats", "--key-file", "k"),
        ("list", "--mounts-file", "/proc/mounts"),
    ],
)
def test_options_a_command_does_not_use_are_refused(tmp_path: Path, args: tuple[str, ...]) -> None:
    result = run_cli(*args, env=base_env(AGW_CACHE_PATH=str(tmp_path / "t.db")))
    assert result.returncode == 2
    assert "usage:" in result.stderr
    assert not (tmp_path / "t.db").exists() and not (tmp_path / "x.db").exists()


def test_a_missing_key_file_is_a_usage_error(seeded: Seeded, tmp_path: Path) -> None:
    missing = tmp_path / "no-such.key"
    result = seeded.cli("rotate-key", "--key-file", str(missing))
    assert result.returncode == 2
    assert str(missing) in result.stderr and "No such file" in result.stderr
    assert "Traceback" not in result.stderr


def test_list_columns_line_up_whatever_the_cell_lengths(seeded: Seeded) -> None:
    now = time.time()
    long_ago = now - 12_000 * 86_400  # "expired 12000d 0h ago", "12000d 0h ago": wide cells
    with sqlite3.connect(seeded.path) as conn:
        conn.execute("UPDATE tokens SET last_used = ? WHERE kind = 'user'", (long_ago,))
        conn.execute("UPDATE tokens SET expires_at = ? WHERE expires_at < ?", (long_ago, now))
    rows = json.loads(seeded.cli("list", "--json").stdout)
    lines = seeded.cli("list").stdout.splitlines()
    header, body = lines[0], lines[1:-1]
    assert len(body) == 3
    starts = [header.index(title) for title in ("DIGEST", "EXPIRES", "LAST USED", "KEY ID")]
    for line in body:
        row = next(r for r in rows if r["digest_prefix"] in line)
        assert line.index(row["digest_prefix"]) == starts[0]
        assert line[starts[1] - 1] == " " and line[starts[1]] != " "
        assert line[starts[2] - 1] == " " and line[starts[2]] != " "
        assert line.rindex(row["key_id"]) == starts[3]
    assert sum("12000d" in line for line in body) == 2


def test_rotate_key_prints_the_one_safe_order_and_whether_step_1_is_done(seeded: Seeded) -> None:
    old = seeded.secrets[-1]
    new = new_key()
    seeded.secrets.append(new)
    before = seeded.cli("rotate-key", "--force", env={**seeded.env, "AGW_CACHE_NEW_KEY": new})
    after = seeded.cli(
        "rotate-key",
        env={**seeded.env, "AGW_CACHE_NEW_KEY": new, "AGW_CACHE_KEY": f"{new},{old}"},
    )
    for result in (before, after):
        assert result.returncode == 0, result.stderr
        text = result.stdout
        steps = [
            text.index("1. deploy AGW_CACHE_KEY=<new>,<old>"),
            text.index("2. run `agw-cache rotate-key`"),
            text.index("3. deploy AGW_CACHE_KEY=<new> alone"),
        ]
        assert steps == sorted(steps)
    assert "NOT done here" in before.stdout
    assert "[done here]" in after.stdout and "NOT done" not in after.stdout


def test_version_prints_the_package_version() -> None:
    import agw_persist_cache

    result = run_cli("--version", env=base_env())
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"agw-cache {agw_persist_cache.__version__}\n"
    assert agw_persist_cache.__version__[0].isdigit()
