"""``agw-cache``: inspect and operate the host's token cache without ever printing a secret.

Subcommands: ``stats``, ``list``, ``clear``, ``prune``, ``rotate-key``, ``doctor``, ``demo``.
Output shows metadata only (kinds, digest prefixes, expiry, key ids), never a token, JWT,
scope or key. Exit codes: 0 ok, 1 problems found, 2 usage or configuration error.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import stat
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TextIO

from . import CacheConfig, CacheConfigError, CacheError, EntryInfo, PersistentTokenCache
from . import _files as files
from ._cli_common import (
    EXIT_OK,
    EXIT_PROBLEMS,
    EXIT_USAGE,
    ProblemError,
    UsageError,
    Where,
    format_bytes,
    format_span,
    format_until,
    open_cache,
    table_lines,
)
from ._config import DEFAULT_NAMESPACE, ENV_KEY, ENV_NAMESPACE, ENV_PATH, ENV_URL
from ._crypto import decode_key, keys_from_config
from ._demo import run_demo_command
from ._doctor import run_doctor
from ._version import __version__

ENV_NEW_KEY = "AGW_CACHE_NEW_KEY"
EXIT_BROKEN_PIPE = 128 + 13  # as a shell reports a writer killed by SIGPIPE


def _entry_json(entry: EntryInfo) -> dict[str, Any]:
    return {
        "kind": entry.kind,
        "digest_prefix": entry.digest_prefix,
        "expires_at": entry.expires_at,
        "last_used": entry.last_used,
        "created_at": entry.created_at,
        "key_id": entry.key_id,
    }


ENTRY_HEADER = ("KIND", "DIGEST", "EXPIRES", "LAST USED", "KEY ID")


def _write_entries(entries: Sequence[EntryInfo], now: float, out: TextIO) -> None:
    """The entries as a table whose columns are as wide as their widest cell."""
    rows = [
        (
            entry.kind,
            entry.digest_prefix,
            format_until(entry.expires_at, now),
            f"{format_span(now - entry.last_used)} ago",
            entry.key_id,
        )
        for entry in entries
    ]
    out.writelines(line + "\n" for line in table_lines(ENTRY_HEADER, rows))


def _where(args: argparse.Namespace) -> Where:
    """The store the command line names (``--path``/``--url`` before or after the command)."""
    where = Where(args.path, getattr(args, "url", None), getattr(args, "namespace", None))
    if where.path is not None and where.url is not None:
        raise UsageError("give --path or --url, not both")
    return where


def _require_usable(cache: PersistentTokenCache) -> None:
    """Refuse to report on (or to claim a change to) a cache that is bypassed: an empty
    listing, or "cleared", would be a lie."""
    reason = cache.stats().disabled_reason
    if reason:
        raise ProblemError(f"the cache is disabled: {reason}")


def _problem(cache: PersistentTokenCache, disabled_reason: str | None) -> str | None:
    """Why ``stats`` cannot call this cache healthy: disabled, or no key to open its rows."""
    if disabled_reason or cache.key_ids:
        return disabled_reason
    return (
        f"no usable key: {ENV_KEY} is not set and there is no key file at {cache.key_file}; "
        "rows cannot be opened"
    )


def cmd_stats(args: argparse.Namespace, out: TextIO) -> int:
    """Rows by kind (valid / expired), expiry range, file sizes, schema and key ids."""
    with open_cache(_where(args), read_only=True) as cache:
        entries = cache.list_entries()
        stats = cache.stats()  # after the listing: whatever it found is in disabled_reason
        configured = cache.key_ids
        path = cache.location
        problem = _problem(cache, stats.disabled_reason)
    now = time.time()
    by_kind: dict[str, dict[str, int]] = {
        kind: {"valid": 0, "expired": 0} for kind in ("system", "user")
    }
    for entry in entries:
        counts = by_kind.setdefault(entry.kind, {"valid": 0, "expired": 0})
        counts["valid" if entry.expires_at > now else "expired"] += 1
    if args.json:
        doc: dict[str, Any] = {
            "path": str(path),
            "key_ids_configured": list(configured),
            "by_kind": by_kind,
        }
        doc.update(dataclasses.asdict(stats))
        doc["key_ids_in_use"] = list(stats.key_ids_in_use)
        doc["disabled_reason"] = problem
        doc["status"] = "disabled" if problem else "ok"
        json.dump(doc, out, indent=2, sort_keys=True)
        out.write("\n")
    else:
        rows = ", ".join(
            f"{kind} {c['valid'] + c['expired']} ({c['valid']} valid, {c['expired']} expired)"
            for kind, c in by_kind.items()
        )
        keys = f"{configured[0]} (primary)" if configured else "- (no usable key)"
        keys += "".join(f", {k}" for k in configured[1:])
        lines = [
            ("path", str(path)),
            ("rows", rows),
            ("oldest expiry", f"{format_until(stats.oldest_expiry, now)}"),
            ("newest expiry", f"{format_until(stats.newest_expiry, now)}"),
            ("file size", f"{format_bytes(stats.file_bytes)}, WAL {format_bytes(stats.wal_bytes)}"),
            ("schema version", str(stats.schema_version)),
            ("key ids in use", ", ".join(stats.key_ids_in_use) or "-"),
            ("key ids configured", keys),
            ("status", f"DISABLED: {problem}" if problem else "ok"),
        ]
        for name, value in lines:
            out.write(f"{name:<19} {value}\n")
    return EXIT_PROBLEMS if problem else EXIT_OK


def cmd_list(args: argparse.Namespace, out: TextIO) -> int:
    """One line of metadata per row, soonest expiry first."""
    with open_cache(_where(args), read_only=True) as cache:
        _require_usable(cache)
        entries = sorted(cache.list_entries(), key=lambda e: e.expires_at)
        _require_usable(cache)  # the listing itself may have found the file damaged
    now = time.time()
    if args.json:
        json.dump([_entry_json(e) for e in entries], out, indent=2)
        out.write("\n")
        return EXIT_OK
    _write_entries(entries, now, out)
    out.write(f"{len(entries)} rows\n")
    return EXIT_OK


def cmd_clear(args: argparse.Namespace, out: TextIO) -> int:
    """Empty the tokens table for every process on the host (on Redis: of one namespace)."""
    with open_cache(_where(args)) as cache:
        _require_usable(cache)
        stats = cache.stats()  # counts kept by the store: no scan of every row
        before = stats.entries_system + stats.entries_user
        cache.clear()
        _require_usable(cache)
        where = cache.location
        if stats.backend != "sqlite":
            where += f" namespace {cache.config.namespace!r}"
    out.write(f"cleared {before} rows from {where}; every process fetches fresh tokens now\n")
    return EXIT_OK


def cmd_prune(args: argparse.Namespace, out: TextIO) -> int:
    """Remove expired rows and rows over the size limits, and show which ones went."""
    with open_cache(_where(args)) as cache:
        _require_usable(cache)
        before = {e.digest_prefix: e for e in cache.list_entries()}
        removed = cache.prune()
        after = {e.digest_prefix for e in cache.list_entries()}
        _require_usable(cache)
    now = time.time()
    gone = [entry for digest, entry in before.items() if digest not in after]
    if gone:
        _write_entries(sorted(gone, key=lambda e: e.expires_at), now, out)
    out.write(f"pruned {removed} rows, {len(after)} left\n")
    return EXIT_OK


def _current_keys(cache: PersistentTokenCache) -> list[bytes]:
    """The key material the workers use now: ``$AGW_CACHE_KEY`` or the key file."""
    explicit = keys_from_config(CacheConfig())
    if explicit is not None:
        return list(explicit.keys)
    if cache.key_file is None or not cache.key_file.exists():
        raise UsageError("cannot tell which key the workers use; set AGW_CACHE_KEY")
    return [decode_key(cache.key_file.read_bytes(), what=f"key file {cache.key_file}")]


def _read_new_key_file(name: str) -> bytes:
    """The new key from ``--key-file``; a warning on stderr if others may read the file."""
    try:
        fd = os.open(name, os.O_RDONLY | files.NONBLOCK | files.CLOEXEC)
    except OSError as exc:
        raise UsageError(f"cannot read --key-file {name}: {exc.strerror}") from None
    with os.fdopen(fd, "rb") as handle:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise UsageError(f"--key-file {name} is not a regular file")
        raw = handle.read()
    if mode & 0o077:
        print(
            f"agw-cache rotate-key: warning: --key-file {name} has mode "
            f"{stat.S_IMODE(mode):04o}: others on this host can read the new key; "
            f"chmod 600 {name}, and delete it once the key is deployed",
            file=sys.stderr,
        )
    return decode_key(raw, what=f"--key-file {name}")


def cmd_rotate_key(args: argparse.Namespace, out: TextIO) -> int:
    """Re-seal every row under a new primary key while the old ones still open what is left."""
    if args.key_file is not None:
        new = _read_new_key_file(args.key_file)
    elif os.environ.get(ENV_NEW_KEY):
        new = decode_key(os.environ[ENV_NEW_KEY], what=f"${ENV_NEW_KEY}")
    else:
        raise UsageError(f"give the new key with --key-file FILE or ${ENV_NEW_KEY}")
    env_keys = keys_from_config(CacheConfig())
    step_1_done = env_keys is not None and env_keys.keys[0] == new
    if not step_1_done and not args.force:
        raise UsageError(
            f"step 1 is not done here: ${ENV_KEY} does not start with the new key. Deploy "
            f"{ENV_KEY}=<new>,<old> to every worker and restart them, then run rotate-key with "
            f"that {ENV_KEY}; re-sealing first would make every worker that knows only <old> "
            "miss every row and fetch it again (--force does it anyway). Nothing was changed"
        )
    with open_cache(_where(args)) as current:
        old = [key for key in _current_keys(current) if key != new]
        old_ids = list(current.key_ids)
        old_hint = f" (<old>: the contents of {current.key_file})" if current.key_file else ""
    with open_cache(_where(args), keys=[new, *old]) as cache:
        _require_usable(cache)
        resealed = cache.reseal()
        _require_usable(cache)
        new_id = cache.key_ids[0]
        in_use = cache.stats().key_ids_in_use
    out.write(f"re-sealed {resealed} rows under key id {new_id}; key ids in use: ")
    out.write(", ".join(in_use) + "\n" if in_use else "-\n")
    old_text = ",".join(kid for kid in old_ids if kid != new_id) or "-"
    step_1 = (
        "done here"
        if step_1_done
        else f"NOT done here (${ENV_KEY} does not start with the new key): until it is, workers "
        "that know only <old> miss every re-sealed row and fetch it again; do it, then run "
        "step 2 again"
    )
    out.write(
        "key rotation, in this order (workers keep running throughout):\n"
        f"  1. deploy {ENV_KEY}=<new>,<old> (key ids {new_id},{old_text}){old_hint} to every"
        f" worker and restart them: <new> seals, both open [{step_1}]\n"
        "  2. run `agw-cache rotate-key` to re-seal the rows still under <old> [just done]\n"
        f"  3. deploy {ENV_KEY}=<new> alone (key id {new_id}) once `agw-cache stats` shows no"
        " other key id in use\n"
    )
    return EXIT_OK


def cmd_doctor(args: argparse.Namespace, out: TextIO) -> int:
    """Run the health checks (see ``_doctor``)."""
    return run_doctor(_where(args), out, mounts_file=Path(args.mounts_file))


def cmd_demo(args: argparse.Namespace, out: TextIO) -> int:
    """Run the self-contained demo (see ``_demo``)."""
    return run_demo_command(args, out)


def build_parser() -> argparse.ArgumentParser:
    """The argparse tree; ``--path`` goes before or after a subcommand that reads the cache."""
    path_help = (
        f"cache database file (default: ${ENV_PATH} or ~/.cache/agw-persist-cache/tokens.db)"
    )
    parser = argparse.ArgumentParser(
        prog="agw-cache",
        description="Inspect and operate the host-wide SAP Agent Gateway token cache.",
        epilog=f"Keys come from ${ENV_KEY} (comma separated, first seals) or the key file "
        "beside the database. No command prints a token, JWT, scope or key.",
    )
    url_help = f"a shared store, e.g. redis://host:6379/0 (default: ${ENV_URL})"
    parser.add_argument("--version", action="version", version=f"agw-cache {__version__}")
    ns_help = (
        f"Redis: the namespace the application uses (default: ${ENV_NAMESPACE} or "
        f"{DEFAULT_NAMESPACE})"
    )
    parser.add_argument("--path", default=None, help=path_help)
    parser.add_argument("--url", default=None, help=url_help)
    parser.add_argument("--namespace", default=None, help=ns_help)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--path", default=argparse.SUPPRESS, help=path_help)
    common.add_argument("--url", default=argparse.SUPPRESS, help=url_help)
    common.add_argument("--namespace", default=argparse.SUPPRESS, help=ns_help)

    def add(
        name: str,
        func: Callable[[argparse.Namespace, TextIO], int],
        text: str,
        *,
        uses_path: bool = True,
    ) -> Any:
        parents = [common] if uses_path else []
        cmd = sub.add_parser(name, parents=parents, help=text, description=text)
        cmd.set_defaults(func=func, uses_path=uses_path)
        return cmd

    add("stats", cmd_stats, "rows by kind, expiry, sizes, schema, key ids").add_argument(
        "--json", action="store_true", help="machine-readable output"
    )
    add("list", cmd_list, "one line of metadata per cached token").add_argument(
        "--json", action="store_true", help="machine-readable output"
    )
    add("clear", cmd_clear, "remove every cached token, for every process on the host")
    add("prune", cmd_prune, "remove expired rows and rows over the size limits")
    rotate = add(
        "rotate-key",
        cmd_rotate_key,
        f"re-seal every row under a new key (from --key-file or ${ENV_NEW_KEY})",
    )
    rotate.add_argument("--key-file", help="file holding the new key (urlsafe base64)")
    rotate.add_argument(
        "--force",
        action="store_true",
        help=f"re-seal even though ${ENV_KEY} does not start with the new key (step 1 not done)",
    )
    doctor = add("doctor", cmd_doctor, "check path, modes, owner, filesystem, key, schema, locks")
    doctor.add_argument("--mounts-file", default="/proc/mounts", help=argparse.SUPPRESS)
    demo = add(
        "demo",
        cmd_demo,
        "show N worker processes sharing one token, against a local token endpoint",
        uses_path=False,
    )
    demo.add_argument("--workers", type=int, default=4, help="worker processes (default 4)")
    callers = "concurrent callers (threads) per worker (default 8)"
    demo.add_argument("--callers", type=int, default=8, help=callers)
    demo.add_argument("--requests", dest="callers", type=int, help=argparse.SUPPRESS)  # old name
    demo.add_argument("--rounds", type=int, default=5, help="calls per caller (default 5)")
    demo.add_argument(
        "--delay-ms", type=float, default=150.0, help="token endpoint latency (default 150)"
    )
    demo.add_argument("--json", action="store_true", help="print the results as JSON")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``agw-cache`` and ``python -m agw_persist_cache``."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.uses_path and args.path is not None:
        parser.error(f"{args.command} takes no --path (it uses a temporary cache of its own)")
    func: Callable[[argparse.Namespace, TextIO], int] = args.func
    try:
        if args.uses_path:
            _where(args)  # --path with --url: a usage error before anything runs
        code = func(args, sys.stdout)
        sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's exit flush
        return code
    except BrokenPipeError:
        # The reader left early (``| head``): stop quietly, and point stdout at /dev/null
        # so that the interpreter's final flush does not raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    except (UsageError, CacheConfigError) as exc:
        print(f"agw-cache {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except ProblemError as exc:
        print(f"agw-cache {args.command}: {exc}", file=sys.stderr)
        return EXIT_PROBLEMS
    except (CacheError, OSError) as exc:
        print(f"agw-cache {args.command}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_PROBLEMS
    except KeyboardInterrupt:
        return 130
