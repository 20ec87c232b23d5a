"""The Redis backend without I/O: key layout, row packing, Lua scripts, and each operation
of the contract encoded as ONE command (a ``Call``) plus the decoding of its reply.

Both drivers in ``redis.py`` (``redis.Redis`` and ``redis.asyncio.Redis``) send the same
``Call`` and decode its reply with the same function: no operation is written twice.

Layout (every key carries the ``{namespace}`` hash tag, so a Cluster keeps one cache in
one slot and its scripts stay atomic)::

    {ns}:gen            the clear() generation (an integer; absent = 0)
    {ns}:t:<hex>        one row: a packed header + nonce + key id + AES-GCM ciphertext,
                        expiring after the lifetime it was written with (PX: the server's
                        clock, not the writer's)
    {ns}:lru:system     sorted set  hex -> last_used   (LRU bound of each kind)
    {ns}:lru:user
    {ns}:exp            sorted set  hex -> expires_at  (expired rows, stats)
    {ns}:graves         hash  grave -> generation: the LRU sets a clear() set aside, whose
                        rows older than that generation are still to be deleted
    {ns}:grave:<n>      one such set (renamed from an LRU set: O(1) inside the clear)
    {ns}:b:<hex>        a back-off mark "gen|written ms|ms|status|cause" (server TIME),
                        expiring after its ms
    {ns}:l:<hex>        a key lock: a random token, SET NX PX <lease>
    {ns}:released       pub/sub channel: the hex digest of a lock just released

``<hex>`` is the HMAC digest of a cache key; nothing here holds a token, user, scope or key.
"""

from __future__ import annotations

import hashlib
import struct
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar, cast

from . import contract
from ._redis_lua import (
    CLEAR,
    DELETE,
    FACTS,
    FENCE,
    GET_BACKOFF,
    KEY_CHECKS,
    LIST,
    LOCK_TRY,
    MARK_CLOCK_SLACK_MS,
    PRUNE,
    RELEASE,
    RENEW,
    REPLACE,
    ROWS_NOT_UNDER,
    SET_BACKOFF,
    SWEEP,
    SWEEP_STEP,
    TOUCH,
    WRITE,
)

T = TypeVar("T")

LAYOUT_VERSION = 1
"""Reported as ``stats().schema_version`` for a Redis store."""

# version, kind, generation, expires_at, last_used, created_at; then nonce, kid, ciphertext.
_HEAD = struct.Struct(">BcQddd")  # the scripts read it too: see _redis_lua's offsets
_KINDS = {b"s": "system", b"u": "user"}
_KIND_BYTES = {v: k for k, v in _KINDS.items()}


class Garbage(ValueError):
    """A reply that is not what this layout writes (another program's data, a bad proxy)."""


# -- keys ----------------------------------------------------------------------------------------


class Layout:
    """The key names of one namespace."""

    def __init__(self, namespace: str) -> None:
        p = "{" + namespace + "}:"
        self.namespace = namespace
        self.gen = p + "gen"
        self.row_prefix = p + "t:"
        self.lru = {"system": p + "lru:system", "user": p + "lru:user"}
        self.exp = p + "exp"
        self.graves = p + "graves"
        self.grave_prefix = p + "grave:"
        self.backoff_prefix = p + "b:"
        self.lock_prefix = p + "l:"
        self.channel = p + "released"

    def row(self, digest: bytes) -> str:
        return self.row_prefix + digest.hex()

    def backoff(self, digest: bytes) -> str:
        return self.backoff_prefix + digest.hex()

    def lock(self, digest: bytes) -> str:
        return self.lock_prefix + digest.hex()


# -- rows --------------------------------------------------------------------------------------


def pack_row(row: contract.SealedRow) -> bytes:
    kid = row.kid.encode("ascii")
    head = _HEAD.pack(
        1,
        _KIND_BYTES[row.kind],
        row.generation,
        row.expires_at,
        row.last_used,
        row.created_at,
    )
    return b"".join((head, bytes((len(row.nonce),)), row.nonce, bytes((len(kid),)), kid, row.ct))


def unpack_row(digest: bytes, value: object) -> contract.SealedRow | None:
    """The row in ``value``, or None for anything this layout did not write."""
    if type(value) is not bytes:
        return None
    try:
        version, kind, gen, expires_at, last_used, created_at = _HEAD.unpack_from(value)
        n = value[34]
        k = value[35 + n]
        end = 36 + n + k
        kind_name = _KINDS.get(kind)
        if version != 1 or kind_name is None or len(value) <= end:
            return None
        kid = value[36 + n : end].decode("ascii")
    except (struct.error, IndexError, UnicodeDecodeError):
        return None
    if not _finite(expires_at) or not _finite(last_used) or not _finite(created_at):
        return None
    nonce = value[35 : 35 + n]
    return contract.SealedRow(
        digest, kind_name, kid, nonce, value[end:], expires_at, gen, last_used, created_at
    )


def _finite(t: float) -> bool:
    return -1e18 < t < 1e18  # also False for NaN


def _generation(value: object) -> int:
    if value is None:
        return 0
    try:
        gen: int = int(value)  # type: ignore[call-overload]  # bytes from the server, checked here
    except (TypeError, ValueError):
        raise Garbage("the generation key does not hold an integer") from None
    if gen < 0:
        raise Garbage("the generation key holds a negative number")
    return gen


def _ms(seconds: float) -> int:
    """PX milliseconds; at least 1 (no time left expires the key at once)."""
    return max(1, int(seconds * 1000))


def sha1(script: str) -> str:
    return hashlib.sha1(script.encode("utf-8"), usedforsecurity=False).hexdigest()


def _facts(reply: Any) -> contract.Facts:
    """The facts script's reply."""
    try:
        system, user, expired, lo, hi, kids = reply
        return contract.Facts(
            entries_system=_int(system),
            entries_user=_int(user),
            entries_expired=_int(expired),
            oldest_expiry=float(lo) if lo else None,
            newest_expiry=float(hi) if hi else None,
            schema_version=LAYOUT_VERSION,
            key_ids_in_use=tuple(sorted(bytes(k).decode("ascii") for k in kids)),
            file_bytes=0,
            wal_bytes=0,
        )
    except (TypeError, ValueError) as exc:
        raise Garbage(f"unexpected facts reply ({exc})") from None


# -- calls ---------------------------------------------------------------------------------------


@dataclass(slots=True)
class Call(Generic[T]):
    """One command to send and how to read its reply.

    ``script``: the Lua source when ``command`` is an EVALSHA (the driver sends it through
    redis-py's ``register_script``, which loads the source into a server that does not know
    it yet, e.g. after a restart). ``packed``: the command in wire format, kept by a call
    that is sent again and again (a key's read).
    """

    command: tuple[Any, ...]
    decode: Callable[[Any], T]
    script: str | None = None
    packed: list[bytes] | None = None
    reused: bool = False


def script_call(
    script: str, keys: list[str], args: list[Any], decode: Callable[[Any], T]
) -> Call[T]:
    return Call(("EVALSHA", _SHAS[script], len(keys), *keys, *args), decode, script)


_SHAS = {
    s: sha1(s)
    for s in (
        WRITE,
        DELETE,
        CLEAR,
        SWEEP,
        FENCE,
        PRUNE,
        TOUCH,
        SET_BACKOFF,
        GET_BACKOFF,
        FACTS,
        KEY_CHECKS,
        LIST,
        ROWS_NOT_UNDER,
        REPLACE,
        LOCK_TRY,
        RENEW,
        RELEASE,
    )
}


def _int(reply: Any) -> int:
    if isinstance(reply, bool) or not isinstance(reply, int):
        raise Garbage(f"expected an integer reply, got {type(reply).__name__}")
    return reply


def _none(reply: Any) -> None:
    return None


class Codec:
    """Encodes each operation of the contract for one namespace and its LRU limits."""

    def __init__(self, layout: Layout, limits: Mapping[str, int]) -> None:
        self.layout = layout
        self.limits = dict(limits)
        self._reads: dict[contract.Read, Call[contract.Snapshot]] = {}
        self._encoders: dict[type[contract.Op[Any]], Callable[[Any], Call[Any]]] = {
            contract.Read: self.read,
            contract.Write: self.write,
            contract.Delete: self.delete,
            contract.Clear: self.clear,
            contract.Sweep: self.sweep,
            contract.Fence: self.fence,
            contract.Prune: self.prune,
            contract.Touch: self.touch,
            contract.GetBackoff: self.get_backoff,
            contract.SetBackoff: self.set_backoff,
            contract.GetFacts: self.facts,
            contract.GetKeyChecks: self.key_checks,
            contract.ListRows: self.list_rows,
            contract.RowsNotUnder: self.rows_not_under,
            contract.Replace: self.replace,
        }

    def encode(self, op: contract.Op[T]) -> Call[T]:
        if type(op) is contract.Read:  # the hit path: a cache reuses one Read per key
            call = self._reads.get(op)
            if call is None:
                if len(self._reads) >= 4096:
                    self._reads.clear()
                call = self._reads[op] = self.read(op)
            return cast(Call[T], call)
        return self._encoders[type(op)](op)

    def _lrus(self) -> list[str]:
        return [self.layout.lru["system"], self.layout.lru["user"]]

    def read(self, op: contract.Read) -> Call[contract.Snapshot]:
        L = self.layout

        def decode(reply: Any) -> contract.Snapshot:
            if not isinstance(reply, list) or len(reply) != 1 + len(op.digests):
                raise Garbage("MGET answered with the wrong number of values")
            gen = _generation(reply[0])
            for digest, value in zip(op.digests, reply[1:], strict=True):
                row = unpack_row(digest, value)
                if row is not None and row.generation == gen:  # older: cleared since
                    return contract.Snapshot(row, gen)
            return contract.Snapshot(None, gen)

        return Call(("MGET", L.gen, *(L.row(d) for d in op.digests)), decode, reused=True)

    def write(self, op: contract.Write) -> Call[bool]:
        L, row = self.layout, op.row
        other = "user" if row.kind == "system" else "system"
        keys = [L.gen, L.row(row.digest), L.lru[row.kind], L.exp, L.lru[other]]
        keys += [L.row(d) for d in op.replaces]
        args: list[Any] = [
            row.generation,
            pack_row(row),
            _ms(row.expires_at - row.created_at),  # the lifetime it was written with
            row.digest.hex(),
            repr(row.last_used),
            repr(row.expires_at),
            self.limits.get(row.kind, 2**31),
            L.row_prefix,
            "0" if op.fence is None else "1",
            op.fence or b"",
            *(d.hex() for d in op.replaces),
        ]
        return script_call(WRITE, keys, args, lambda r: _int(r) == 1)

    def delete(self, op: contract.Delete) -> Call[int]:
        L = self.layout
        keys = [*self._lrus(), L.exp, *(L.row(d) for d in op.digests)]
        flag = "0" if op.nonce is None else "1"
        args = [flag, op.nonce or b"", *(d.hex() for d in op.digests)]
        return script_call(DELETE, keys, args, _int)

    def clear(self, op: contract.Clear) -> Call[int]:
        L = self.layout
        keys = [L.gen, *self._lrus(), L.exp, L.graves]
        return script_call(CLEAR, keys, [L.grave_prefix], _int)

    def sweep(self, op: contract.Sweep) -> Call[int]:
        L = self.layout
        return script_call(SWEEP, [L.graves], [op.limit, L.row_prefix], _int)

    def fence(self, op: contract.Fence) -> Call[int]:
        return script_call(FENCE, [self.layout.gen], [op.generation], _int)

    def prune(self, op: contract.Prune) -> Call[int]:
        L = self.layout
        limits = [op.limits.get("system", 2**31), op.limits.get("user", 2**31)]
        args = [repr(op.now), *limits, L.row_prefix, SWEEP_STEP]
        return script_call(PRUNE, [L.exp, *self._lrus(), L.graves], args, _int)

    def touch(self, op: contract.Touch) -> Call[None]:
        args = [struct.pack(">d", op.now), repr(op.now), op.digest.hex()]
        return script_call(TOUCH, [self.layout.row(op.digest), *self._lrus()], args, _none)

    def get_backoff(self, op: contract.GetBackoff) -> Call[contract.Backoff | None]:
        """The mark, honoured from when the server says it was written for its own ms and
        ``op.longest`` at most; the answer's ``until`` is on this host's clock."""
        L = self.layout

        def decode(reply: Any) -> contract.Backoff | None:
            if not isinstance(reply, list) or len(reply) != 4:
                raise Garbage("unexpected back-off reply")
            gen = _generation(reply[0])
            if not reply[1]:
                return None
            try:
                now_ms = int(reply[2]) * 1000 + int(reply[3]) // 1000
                fields = bytes(reply[1]).decode("ascii").split("|", 4)
                mark_gen, written, ms, status, cause = fields
                if int(mark_gen) != gen:
                    return None  # set before a clear()
                age = now_ms - int(written)
                left = min(int(ms), op.longest * 1000) - age
                if age < -MARK_CLOCK_SLACK_MS or left <= 0:
                    return None  # planted in the future, or over
                until = time.time() + left / 1000
                return contract.Backoff(until, cause, int(status) if status else None)
            except (ValueError, TypeError):
                return None  # not a mark of ours: no back-off (never a false one)

        return script_call(GET_BACKOFF, [L.gen, L.backoff(op.digest)], [], decode)

    def set_backoff(self, op: contract.SetBackoff) -> Call[None]:
        L, b = self.layout, op.backoff
        status = "" if b.status is None else str(int(b.status))
        cause = "".join(ch for ch in b.cause if ch.isalnum() or ch in "._")[:100]
        args = [_ms(b.until - time.time()), status, cause]
        return script_call(SET_BACKOFF, [L.gen, L.backoff(op.digest)], args, _none)

    def facts(self, op: contract.GetFacts) -> Call[contract.Facts]:
        L = self.layout
        args = [repr(op.now), L.row_prefix]
        return script_call(FACTS, [L.gen, *self._lrus(), L.exp], args, _facts)

    def key_checks(self, op: contract.GetKeyChecks) -> Call[contract.KeyChecks]:
        """No check values are kept here: the key ids of the newest rows of each kind decide
        (a bounded sample, not a scan of every row)."""

        def decode(reply: Any) -> contract.KeyChecks:
            try:
                rows, kids = reply
                names = tuple(sorted(bytes(k).decode("ascii") for k in kids))
                return contract.KeyChecks(_int(rows) > 0, (), names)
            except (TypeError, ValueError) as exc:
                raise Garbage(f"unexpected key checks reply ({exc})") from None

        return script_call(KEY_CHECKS, self._lrus(), [self.layout.row_prefix], decode)

    def list_rows(self, op: contract.ListRows) -> Call[list[contract.RowInfo]]:
        L = self.layout

        def decode(reply: Any) -> list[contract.RowInfo]:
            if not isinstance(reply, list) or not reply:
                raise Garbage("unexpected list reply")
            gen = _generation(reply[0])
            out = []
            for hexd, head in zip(reply[1::2], reply[2::2], strict=True):
                row = unpack_row(bytes.fromhex(hexd.decode("ascii")), head + b"\0")
                if row is not None and row.generation == gen:
                    out.append(
                        contract.RowInfo(
                            row.kind,
                            row.digest,
                            row.expires_at,
                            row.last_used,
                            row.created_at,
                            row.kid,
                        )
                    )
            return out

        count = -1 if op.count is None else op.count
        args = [L.row_prefix, op.start, count]
        return script_call(LIST, [L.gen, *self._lrus()], args, decode)

    def rows_not_under(self, op: contract.RowsNotUnder) -> Call[list[contract.SealedRow]]:
        L = self.layout

        def decode(reply: Any) -> list[contract.SealedRow]:
            if not isinstance(reply, list):
                raise Garbage("unexpected rows reply")
            skip = set(op.skip)
            rows = []
            for hexd, value in zip(reply[0::2], reply[1::2], strict=True):
                row = unpack_row(bytes.fromhex(hexd.decode("ascii")), value)
                if row is not None and row.digest not in skip:
                    rows.append(row)
            return rows[: op.limit]

        scan = -1 if op.scan is None else op.scan
        args = [op.kid, op.limit + len(op.skip), L.row_prefix, op.start, scan]
        return script_call(ROWS_NOT_UNDER, self._lrus(), args, decode)

    def replace(self, op: contract.Replace) -> Call[bool]:
        L, row = self.layout, op.row
        keys = [L.row(op.old), L.row(row.digest), *self._lrus(), L.exp, L.lru[row.kind]]
        args = [
            op.old.hex(),
            row.digest.hex(),
            pack_row(row),
            _ms(min(row.expires_at - time.time(), row.expires_at - row.created_at)),
            repr(row.last_used),
            repr(row.expires_at),
        ]
        return script_call(REPLACE, keys, args, lambda r: _int(r) == 1)

    # -- the key lock ------------------------------------------------------------------------

    def lock_try(self, digest: bytes, token: str, lease_ms: int) -> Call[bool]:
        keys = [self.layout.lock(digest)]
        return script_call(LOCK_TRY, keys, [token, lease_ms], lambda r: _int(r) == 1)

    def lock_renew(self, lock_key: str, token: str, lease_ms: int) -> Call[bool]:
        return script_call(RENEW, [lock_key], [token, lease_ms], lambda r: _int(r) == 1)

    def lock_release(self, lock_key: str, token: str) -> Call[bool]:
        hexd = lock_key[len(self.layout.lock_prefix) :]
        args = [token, self.layout.channel, hexd]
        return script_call(RELEASE, [lock_key], args, lambda r: _int(r) == 1)
