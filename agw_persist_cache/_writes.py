"""The cache's changes to the store, each a flow of storage operations (see ``_steps``):
store a token, set, invalidate, clear, prune.

A flow yields contract operations and receives their results (or has their
``StorageError`` thrown in), deciding with the :class:`~._shelf.TokenShelf` what each
means. ``_flight`` runs them; the single flight of a miss uses :func:`store` too.
"""

from __future__ import annotations

import hmac
import time

from ._expiry import CachedToken, TokenData, normalize
from ._shelf import Key, TokenShelf, raise_if
from .backends.contract import (
    Clear,
    Delete,
    Fence,
    OpFlow,
    Prune,
    Snapshot,
    StorageError,
    StorageUnavailable,
    Sweep,
)

SWEEPS_MAX = 10_000  # steps of a clear()'s sweep (Sweep.limit rows each)


def store(
    shelf: TokenShelf, key: Key, entry: CachedToken, generation: int | None, fence: bytes | None
) -> OpFlow[bool]:
    """Seal and write ``entry``. With ``generation`` (a fetch), refuse if a clear() came
    since, or (``fence``, see ``Write.fence``) if a newer row took the one read; without
    (a plain set), seal under the current generation, learning a newer one if refused."""
    if generation is not None and shelf.too_short(entry):
        return False
    gen = shelf.generation if generation is None else generation
    for _attempt in range(2):
        write = shelf.seal(key, entry, gen, fence)
        if write is None:
            return False
        if (yield write):
            shelf.stored(key, entry, write)
            return True
        if generation is not None:  # a clear() or a newer token came since: keep them
            shelf.counters.stale_writes_skipped += 1
            return False
        snap: Snapshot = yield key.read  # a clear() we had not seen: learn its generation
        gen = shelf.generation = max(shelf.generation, snap.generation)
    return False


def set_token(
    shelf: TokenShelf, key: Key, token_data: TokenData, expires_at: float | None
) -> OpFlow[tuple[CachedToken, bool]]:
    """Store a token; the flow returns it and whether it was stored."""
    entry = normalize(token_data, now=time.time(), expires_at=expires_at, config=shelf.config)
    ok = False
    if key.local:
        shelf.keep(key, entry)
    else:
        try:
            ok = yield from store(shelf, key, entry, None, None)
            yield from prune_if_due(shelf)
        except StorageError as exc:
            shelf.storage_failed(exc)
            if not ok:
                shelf.keep(key, entry)
    if not ok:  # why was warned where it happened (storage, key, clear race)
        shelf.counters.sets_not_stored += 1
    return entry, ok


def invalidate(shelf: TokenShelf, key: Key, token: str | None) -> OpFlow[bool]:
    """Forget ``key``'s token in every process; with ``token``, only while the store still
    holds that very token (a replacement another process fetched meanwhile stays)."""
    kept = shelf.memory.get(key.ident)
    if token is None or (kept is not None and hmac.compare_digest(kept.entry.token, token)):
        shelf.memory.drop(key.ident)  # this process stops serving it, whatever the store
    try:
        if key.local:
            raise StorageUnavailable("no usable key")
        if token is None:
            removed: int = yield Delete(key.digests)
            return removed > 0
        snap: Snapshot = yield key.read
        row = snap.row
        if row is None:
            return False
        entry = shelf.judge(key, snap, time.time()).entry
        if entry is not None and not hmac.compare_digest(entry.token, token):
            return False  # another process already replaced the rejected token: keep it
        shelf.memory.drop(key.ident)
        gone: int = yield Delete((row.digest,), row.nonce)
        return gone > 0
    except StorageError as exc:
        raise_if(shelf.reported(exc, "invalidate", outage=True))
    return False


def clear(shelf: TokenShelf) -> OpFlow[None]:
    """Move the generation past every one seen (old rows no longer open), then delete
    the old rows in short steps (so that losing the generation cannot revive them)."""
    shelf.memory.clear()  # this process forgets, even if the store cannot be reached
    try:
        gen = yield Clear()
        if gen <= shelf.generation:  # the store went back since we last looked
            gen = yield Fence(shelf.generation + 1)
        shelf.generation = gen
    except StorageError as exc:
        raise_if(shelf.reported(exc, "clear", outage=True))
    try:
        for _step in range(SWEEPS_MAX):
            if not (yield Sweep()):
                break
    except StorageError as exc:  # fenced already; a later prune deletes the rest
        shelf.storage_failed(exc)


def prune_if_due(shelf: TokenShelf) -> OpFlow[int]:
    """Prune after a write if this process has not for ``prune_interval_seconds``."""
    if time.time() - shelf.last_prune < shelf.config.prune_interval_seconds:
        return 0
    return (yield from _prune(shelf, compact=False))


def prune(shelf: TokenShelf) -> OpFlow[int]:
    """Expired rows, then the least recently used over the limits; raises if it failed."""
    try:
        return (yield from _prune(shelf, compact=True))
    except StorageError as exc:
        raise_if(shelf.reported(exc, "prune"))
    return 0


def _prune(shelf: TokenShelf, *, compact: bool) -> OpFlow[int]:
    now = shelf.last_prune = time.time()
    limits = {
        "system": shelf.config.max_system_token_cache_size,
        "user": shelf.config.max_user_token_cache_size,
    }
    removed: int | None = yield Prune(now, limits, compact)
    return removed or 0  # None: skipped, another process was writing
