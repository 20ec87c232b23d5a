"""Whole-store flows: the facts for ``stats()``, the metadata for ``list_entries()``, whether
the keys open the rows, and re-sealing under the primary key. Each is a flow of storage
operations over a :class:`~._shelf.TokenShelf`, run by ``_flight``."""

from __future__ import annotations

import time

from ._crypto import UnsealError
from ._errors import CacheStorageError
from ._shelf import TokenShelf
from ._stats import CacheStats, EntryInfo, KeyVerdict, stats_of
from .backends.contract import (
    Facts,
    GetFacts,
    GetKeyChecks,
    KeyChecks,
    ListRows,
    OpFlow,
    Replace,
    RowInfo,
    RowsNotUnder,
    SealedRow,
    StorageError,
)

LIST_PAGE = 500  # rows of one ListRows step (about a millisecond or two of a Redis server)
RESEAL_PASSES = 4  # passes of a re-seal over every row


def facts(shelf: TokenShelf) -> OpFlow[CacheStats]:
    """This process's counters and mode, and the store's facts (none when it fails)."""
    shelf.ring()  # a key file that cannot be used disables the cache: say so
    try:
        facts = yield GetFacts(time.time())
    except StorageError as exc:
        shelf.storage_failed(exc)
        facts = None
    return stats_of(
        shelf.counters,
        facts,
        disabled_reason=shelf.backend.unavailable or shelf.key_problem,
        backend=shelf.backend.name,
        health=shelf.health,
        memory_tokens=len(shelf.memory),
    )


def entries(shelf: TokenShelf) -> OpFlow[list[EntryInfo]]:
    """Every row's metadata, read in pages (on Redis each page is a short script); none when
    the store fails."""
    rows: list[RowInfo] = []
    try:
        facts: Facts = yield GetFacts(time.time())
        total = facts.entries_system + facts.entries_user
        for start in range(0, total, LIST_PAGE):
            rows += yield ListRows(start, LIST_PAGE)
    except StorageError as exc:
        shelf.storage_failed(exc)
        return []
    return [
        EntryInfo(r.kind, r.digest.hex()[:12], r.expires_at, r.last_used, r.created_at, r.kid)
        for r in rows
    ]


def reseal(shelf: TokenShelf, batch: int) -> OpFlow[int]:
    """Re-seal every row not under the primary key; rows no key opens are left to expire.

    Windows of ``batch`` positions at a time (each a short step); rows written meanwhile
    shift positions, so passes repeat until one finds nothing to re-seal."""
    ring = shelf.ring()
    if ring is None:
        return 0
    done = 0
    for _pass in range(RESEAL_PASSES):
        facts: Facts = yield GetFacts(time.time())
        total = facts.entries_system + facts.entries_user
        resealed = 0
        for start in range(0, total, batch):
            rows: list[SealedRow] = yield RowsNotUnder(ring.primary.kid, batch, (), start, batch)
            for row in rows:
                try:
                    envelope = ring.open(row)
                except UnsealError:
                    continue
                (digest, *_) = ring.digests(row.kind, envelope.scope_key, envelope.uhash)
                kid, nonce, ct = ring.seal(row.kind, digest, row.generation, envelope)
                new = row._replace(digest=digest, kid=kid, nonce=nonce, ct=ct)
                yield Replace(row.digest, new, ring.primary.check)
                resealed += 1
        done += resealed
        if not resealed:
            break
    return done


def key_verdict(shelf: TokenShelf) -> OpFlow[KeyVerdict | None]:
    """Whether the configured keys open the stored rows, and the key ids that wrote them;
    None without a key or without rows. A bounded read, whatever the size."""
    ring = shelf.ring()
    found: KeyChecks = yield GetKeyChecks()
    if ring is None or not found.rows:
        return None
    return KeyVerdict(*ring.opens(found))


def checked_keys(shelf: TokenShelf) -> OpFlow[KeyVerdict | None]:
    """:func:`key_verdict` for a caller: a store that cannot answer raises
    ``CacheStorageError`` (the cache's own error, never the backend's)."""
    try:
        return (yield from key_verdict(shelf))
    except StorageError as exc:
        shelf.storage_failed(exc)
        raise CacheStorageError(
            f"cannot tell whether the keys open the stored rows: {exc} (run `agw-cache doctor`)"
        ) from None


def compare_keys(shelf: TokenShelf) -> OpFlow[None]:
    """Once per process, at the first miss: rows written under keys we do not have are
    a wrong key (digests are keyed, so they would only ever miss). Say so, and count."""
    shelf.keys_compared = True
    try:
        verdict = yield from key_verdict(shelf)
    except StorageError:
        shelf.keys_compared = False  # not compared after all: the next miss tries again
        raise
    ring = shelf.ring()
    if verdict is not None and not verdict.opens and ring is not None:
        facts: Facts = yield GetFacts(time.time())  # how many rows: for the message only
        rows = facts.entries_system + facts.entries_user
        shelf.trouble(
            "key_mismatch",
            "key-mismatch",
            "the configured key does not open the token cache at %s: %d rows were written "
            "under key ids %s, this process has %s. Deploy the same AGW_CACHE_KEY to every "
            "process (`agw-cache doctor` checks it)",
            shelf.backend.location,
            rows,
            ", ".join(verdict.key_ids) or "-",
            ", ".join(ring.kids),
        )
