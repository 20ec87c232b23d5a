"""What ``agw-cache``'s commands share: exit codes, the usage error, opening the cache, and
formatting of durations, sizes and tables.

It sits below ``cli``, ``_doctor`` and ``_demo`` so that ``cli`` imports those two and
neither of them imports ``cli``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from typing import NamedTuple

from ._cache import PersistentTokenCache
from ._config import CacheConfig, resolve_path, split_location
from ._files import NotOurs
from .backends._sqlite_files import Found, examine

EXIT_OK = 0
EXIT_PROBLEMS = 1
EXIT_USAGE = 2


class UsageError(Exception):
    """A command line or environment mistake the operator must fix (exit code 2)."""


class ProblemError(Exception):
    """The command ran but found the cache unusable for what was asked (exit code 1)."""


class Where(NamedTuple):
    """The store a command works on, as the command line names it: ``--path`` or ``--url``
    (neither: what the environment names, as for the workers), and ``--namespace`` (Redis).

    Passed down as an argument: the command line never writes ``os.environ``."""

    path: str | None = None
    url: str | None = None
    namespace: str | None = None

    def split(self) -> tuple[str | None, str | None]:
        """(SQLite path, networked store URL) as the cache resolves them."""
        path, url = split_location(self.path, self.url)
        return (None if path is None else str(path)), url

    def config(self, keys: Sequence[str | bytes] | None = None) -> CacheConfig:
        """The configuration the workers would have here, with this location."""
        config = CacheConfig(path=self.path, url=self.url, keys=keys)
        if self.namespace is not None:
            config = dataclasses.replace(config, namespace=self.namespace)
        return config


def require_cache(where: Where) -> None:
    """A command that changes the cache changes one of ours or nothing: an absent path, or
    one that is not ours, raises ``ProblemError`` before anything is opened or created."""
    sqlite_path, url = where.split()
    if url is not None:
        return  # a shared store: there is nothing to create by mistake
    found_at = resolve_path(sqlite_path)
    try:
        found = examine(found_at)
    except NotOurs as exc:
        raise ProblemError(f"{exc}; nothing was changed") from None
    except OSError as exc:
        raise ProblemError(
            f"cannot look at {found_at}: {exc.strerror}; nothing was changed"
        ) from None
    if found is Found.ABSENT:
        raise ProblemError(f"no cache at {found_at}; nothing was created")


def open_cache(
    where: Where, *, keys: Sequence[str | bytes] | None = None, read_only: bool = False
) -> PersistentTokenCache:
    """The cache the workers use at ``where``, keys from the environment (or ``keys``).

    ``read_only`` (stats, list, doctor): an existing cache is read; nothing is created. The
    other commands need an existing cache of ours (:func:`require_cache`)."""
    if not read_only:
        require_cache(where)
    return PersistentTokenCache(config=where.config(keys), read_only=read_only)


def format_span(seconds: float) -> str:
    """A short human duration such as ``59m 58s`` or ``2d 3h``."""
    total = round(abs(seconds))
    days, rest = divmod(total, 86_400)
    hours, rest = divmod(rest, 3_600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes:02d}m"
    if minutes:
        return f"{minutes}m {secs:02d}s"
    return f"{secs}s"


def format_until(epoch: float | None, now: float) -> str:
    """``in 5m 00s`` for the future, ``expired 3s ago`` for the past, ``-`` for none."""
    if epoch is None:
        return "-"
    delta = epoch - now
    return f"in {format_span(delta)}" if delta > 0 else f"expired {format_span(delta)} ago"


def format_bytes(size: int) -> str:
    """A file size in B, KiB or MiB."""
    if size < 1024:
        return f"{size} B"
    if size < 1024 * 1024:
        return f"{size / 1024:.1f} KiB"
    return f"{size / (1024 * 1024):.1f} MiB"


def table_lines(header: Sequence[str], rows: Sequence[Sequence[str]]) -> Iterator[str]:
    """``header`` and ``rows`` as left-aligned columns, each as wide as its widest cell."""
    widths = [max([len(cell), *(len(row[i]) for row in rows)]) for i, cell in enumerate(header)]
    for line in (header, *rows):
        cells = [cell.ljust(width) for cell, width in zip(line, widths, strict=True)]
        yield "  ".join(cells).rstrip()
