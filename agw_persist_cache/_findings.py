"""What both doctors (the SQLite file's, ``_doctor``; a Redis store's, ``_doctor_redis``) say
with: one finding type, and one reading of the cache's key verdict (``check_keys()``).

It sits below both doctors, so that neither imports the other's vocabulary.
"""

from __future__ import annotations

from typing import NamedTuple

from ._config import ENV_KEY
from ._stats import KeyVerdict


class Finding(NamedTuple):
    """One doctor line: ``level`` is ``ok``, ``warn`` or ``FAIL``."""

    level: str
    name: str
    detail: str


def key_finding(
    verdict: KeyVerdict | None, key_ids: tuple[str, ...], rows: int, *, source: str = ""
) -> Finding:
    """The ``key`` line from the cache's own judgement of its keys (``check_keys()``, what a
    worker warns about at its first miss): whether the configured ``key_ids`` open the
    ``rows`` stored; ``source`` says where the keys come from."""
    mine = f"{source}key ids {', '.join(key_ids)}"
    if verdict is None:
        return Finding("ok", "key", f"{mine}; no rows to open yet")
    written = ", ".join(verdict.key_ids) or "-"
    if verdict.opens:
        return Finding(
            "ok", "key", f"{mine} open the {rows} rows (written under key ids {written})"
        )
    return Finding(
        "FAIL",
        "key",
        f"the configured key does not open this cache: {rows} rows were written under key "
        f"ids {written}, this environment has {', '.join(key_ids)}; give every process the "
        f"same {ENV_KEY}",
    )
