"""Helpers for the ownership tests: run ``agw-cache`` in this process, photograph a directory
tree (every entry's inode, mode, mtime and bytes), and damage a cache file of ours."""

from __future__ import annotations

import contextlib
import io
import os
import stat
import time
from dataclasses import dataclass
from pathlib import Path

from agw_persist_cache.cli import main


@dataclass(frozen=True)
class Ran:
    """What one in-process ``agw-cache`` run gave: exit code, output, and how long it took."""

    code: int
    out: str
    err: str
    seconds: float

    @property
    def text(self) -> str:
        return self.out + self.err


def agw_cache(*args: str) -> Ran:
    """``agw-cache ARGS`` in this process (the environment is the test's)."""
    out, err = io.StringIO(), io.StringIO()
    started = time.monotonic()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(args))
    return Ran(code, out.getvalue(), err.getvalue(), time.monotonic() - started)


Entry = tuple[int, int, int, bytes | None]


def photograph(root: Path) -> dict[str, Entry]:
    """Every entry under ``root`` (links not followed; FIFOs and devices never opened):
    inode, mode, mtime and, for regular files, the bytes."""
    seen: dict[str, Entry] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in (*dirnames, *filenames):
            path = Path(dirpath, name)
            st = os.lstat(path)
            data = path.read_bytes() if stat.S_ISREG(st.st_mode) else None
            seen[str(path.relative_to(root))] = (st.st_ino, st.st_mode, st.st_mtime_ns, data)
    return seen


def damage_pages(path: Path) -> None:
    """Garbage over every page of a cache file but its 100-byte header (our application_id
    stays: the file is still provably ours)."""
    data = path.read_bytes()
    path.write_bytes(data[:100] + os.urandom(max(len(data), 16384) - 100))
