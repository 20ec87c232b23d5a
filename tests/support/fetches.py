"""Counting real fetches across processes: one line per fetch, appended atomically."""

from __future__ import annotations

import os
from pathlib import Path


def count_fetch(counter: str | Path) -> None:
    """One line per real fetch, appended atomically, so the parent can count them."""
    fd = os.open(counter, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, f"{os.getpid()}\n".encode())
    finally:
        os.close(fd)


def fetches(counter: str | Path) -> int:
    """How many fetches were counted in ``counter`` (0 before the first)."""
    try:
        return len(Path(counter).read_text().splitlines())
    except FileNotFoundError:
        return 0
