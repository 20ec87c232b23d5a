"""The memory tier: the tokens this process has read, fetched or stored, in front of any store.

While the store is healthy it is the memo of opened rows: an entry is used only for the very
row it came from (its random nonce), so another process's write, invalidation or ``clear()``
is seen at the next get, as the store answers it. While the store cannot be used (unopenable,
breaker open, timeouts, errors, a full disk) it *is* the cache: entries are served until their
own expiry minus the buffer. Failed fetches are remembered here too (the in-memory back-off),
so that a store that cannot share a back-off does not let each caller hit a failing identity
service in turn.

Bounded LRU on an ``OrderedDict`` whose every step is one C-level call under the GIL (keys
are tuples of ``str``: no Python code runs inside them), with the one failure they can meet
(a key another thread just removed) handled: no iteration over a dict other threads change,
no lock a forked child could inherit held.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, NamedTuple

from ._expiry import CachedToken
from .backends.contract import Backoff

Ident = tuple[str, str, str]
"""(kind, scope key, user hash): what a token is for, whatever key seals it in the store."""


class Kept(NamedTuple):
    """One remembered token: the stored row it came from (``nonce``; ``None``: never stored,
    e.g. fetched while the store failed) and the ``clear()`` generation it belongs to."""

    entry: CachedToken
    nonce: bytes | None
    generation: int


class MemoryTier:
    """At most ``size`` tokens of this process, least recently used dropped first."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.kept: OrderedDict[Ident, Kept] = OrderedDict()
        """Least recently used first (read directly by the hit path of ``_shelf``)."""
        self._backoffs: OrderedDict[Ident, Backoff] = OrderedDict()

    def __len__(self) -> int:
        return len(self.kept)

    def get(self, ident: Ident) -> Kept | None:
        """The remembered token of ``ident`` (made the most recently used), or None."""
        kept = self.kept.get(ident)
        if kept is not None:
            try:  # noqa: SIM105  (every hit passes here: no context manager per call)
                self.kept.move_to_end(ident)
            except KeyError:  # dropped by another thread meanwhile: still ours to use once
                pass
        return kept

    def put(self, ident: Ident, kept: Kept) -> None:
        """Remember ``kept``; the least recently used tokens go beyond ``size``."""
        self.kept.pop(ident, None)  # (re)inserted last: the most recently used
        self.kept[ident] = kept
        _trim(self.kept, self.size)

    def drop(self, ident: Ident) -> None:
        self.kept.pop(ident, None)

    def usable(self, ident: Ident, now: float, buffer: float) -> CachedToken | None:
        """The remembered token while ``now < expiry - buffer``; an expired one is dropped."""
        kept = self.get(ident)
        if kept is None:
            return None
        if kept.entry.expires_at - buffer <= now:
            self.kept.pop(ident, None)
            return None
        return kept.entry

    def backoff(self, ident: Ident, now: float) -> Backoff | None:
        """The failed fetch this process remembers for ``ident``, while it lasts."""
        mark = self._backoffs.get(ident)
        if mark is not None and mark.until <= now:
            self._backoffs.pop(ident, None)
            return None
        return mark

    def mark(self, ident: Ident, backoff: Backoff) -> None:
        self._backoffs[ident] = backoff
        _trim(self._backoffs, self.size)

    def clear(self) -> None:
        """Forget every token and back-off of this process."""
        self.kept.clear()
        self._backoffs.clear()


def _trim(kept: OrderedDict[Ident, Any], size: int) -> None:
    while len(kept) > size:
        try:
            kept.popitem(last=False)
        except KeyError:  # emptied by another thread meanwhile
            return
