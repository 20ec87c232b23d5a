"""Healthy or degraded: whether this process can use its store right now, and since when.

A storage failure makes a cache *degraded* (its memory tier is the cache); a later success
makes it healthy again. A failed write (a full disk, a read-only replica) is undone only by
a write that succeeds, and an unusable key file only by the key loading: reads that still
work do not hide them, so the mode does not flap with every call. One warning per
transition, never one per call.

Lock-free: each transition is claimed by one atomic dict step under the GIL, so exactly one
thread warns, and a forked child inherits no lock.
"""

from __future__ import annotations

import time
from typing import NamedTuple

from ._log import log

HEALTHY = "healthy"
DEGRADED = "degraded"


READ, WRITE, KEY = "read", "write", "key"
_UNDONE_BY = {READ: (READ, WRITE), WRITE: (WRITE,), KEY: (KEY,)}
"""What failed -> the successes that show it works again."""


class Down(NamedTuple):
    """The current outage: since when (epoch), why, and what failed (read, write, key)."""

    since: float
    reason: str
    what: str


class Health:
    """The mode of one cache in this process; ``location`` names the store in warnings."""

    def __init__(self, location: str, memory_size: int) -> None:
        self.location = location
        self.memory_size = memory_size
        self.state: dict[str, Down] = {}
        """``{"down": Down}`` while degraded, else empty (a cheap test on every hit)."""

    @property
    def down(self) -> Down | None:
        """The current outage, or None while healthy."""
        return self.state.get("down")

    @property
    def mode(self) -> str:
        return DEGRADED if "down" in self.state else HEALTHY

    def failed(self, reason: str, what: str, *, quiet: bool = False) -> None:
        """A store operation (``what``: read, write) or the key failed (``quiet``: the store
        has warned about it itself)."""
        down = Down(time.time(), reason, what)
        current = self.state.setdefault("down", down)
        if current is down:
            if not quiet:
                log.warning(
                    "token cache at %s is unusable (%s); this process serves the tokens it "
                    "holds from memory (at most %d) and fetches each missing one once, until "
                    "the store is back",
                    self.location,
                    reason,
                    self.memory_size,
                )
        elif set(_UNDONE_BY[what]) < set(_UNDONE_BY[current.what]):
            self.state["down"] = current._replace(what=what)  # a harder failure than before

    def succeeded(self, what: str) -> None:
        """A store operation (read, write) succeeded, or the key loaded: back to healthy if
        that shows the failure gone."""
        current = self.state.get("down")
        if current is None or what not in _UNDONE_BY[current.what]:
            return
        if self.state.pop("down", None) is not None:
            log.warning(
                "token cache at %s is usable again after %.0f s; using it",
                self.location,
                max(0.0, time.time() - current.since),
            )
