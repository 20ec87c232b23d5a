"""Sealing rows with AES-256-GCM, key handling and cache-key digests.

Every configured master key yields, through HKDF-SHA256, a sealing key, a digest
key and a public key id. The first key seals new rows; every key opens rows and
is tried for lookups, so rotating keys (``new,old``) loses nothing.
"""

from __future__ import annotations

import base64
import binascii
import errno
import hashlib
import hmac
import os
import secrets
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from ._config import ENV_KEY, CacheConfig
from ._errors import CacheConfigError
from ._files import NOFOLLOW, read_private
from .backends.contract import KeyChecks, SealedRow

ENVELOPE_VERSION = 2
KEY_BYTES = 32
NONCE_BYTES = 12


class UnsealError(Exception):
    """A row did not open: unknown key id, tampered bytes or a foreign envelope."""


def _hkdf(master: bytes, info: bytes, length: int) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=None, info=info).derive(master)


def decode_key(value: str | bytes, *, what: str) -> bytes:
    """32 raw bytes, or the urlsafe base64 of 32 bytes; errors name ``what``, never the value."""
    if isinstance(value, bytes) and len(value) == KEY_BYTES:
        return value
    text = value.decode("ascii", "replace") if isinstance(value, bytes) else value
    try:
        raw = base64.urlsafe_b64decode(text.strip() + "=" * (-len(text.strip()) % 4))
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) != KEY_BYTES:
        raise CacheConfigError(
            f"{what} is not a 32-byte key or the urlsafe base64 of one; make one with "
            'python -c "import base64,os;print(base64.urlsafe_b64encode(os.urandom(32)).decode())"'
        )
    return raw


def encode_key(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode("ascii")


@dataclass(frozen=True)
class KeySource:
    keys: tuple[bytes, ...]
    source: str  # "config" | "env" | "file"
    key_file: Path | None


def keys_from_config(config: CacheConfig) -> KeySource | None:
    """Keys given explicitly (config, then ``$AGW_CACHE_KEY``); None means use the key file."""
    if config.keys is not None:
        return KeySource(
            tuple(decode_key(k, what=f"CacheConfig.keys[{i}]") for i, k in enumerate(config.keys)),
            "config",
            None,
        )
    env = os.environ.get(ENV_KEY)
    if env is not None:
        parts = [p for p in (s.strip() for s in env.split(",")) if p]
        if not parts:  # secret injection failed: never fall back to a per-host key file
            raise CacheConfigError(
                f"{ENV_KEY} is set but empty; give the key (urlsafe base64 of 32 bytes) or "
                "unset the variable to use a key file"
            )
        return KeySource(
            tuple(decode_key(p, what=f"{ENV_KEY} entry {i + 1}") for i, p in enumerate(parts)),
            "env",
            None,
        )
    return None


def load_or_create_key_file(path: Path) -> bytes:
    """Read the key file, creating it 0600 first if absent; race-free across processes.

    An existing key file must be ours (``NotOurs``, a ``ValueError`` to the caller's eyes,
    otherwise): a link or another user's file could hold a key someone else knows.

    The new key is written to a private temp file and hard-linked into place, so a
    concurrent reader sees either no file or a complete one, and exactly one key wins.
    """
    try:
        return decode_key(read_private(path), what=f"key file {path}")
    except FileNotFoundError:
        pass
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | NOFOLLOW, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="ascii") as handle:
            handle.write(encode_key(os.urandom(KEY_BYTES)) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        try:
            os.link(tmp, path)
        except OSError as exc:
            if exc.errno != errno.EEXIST:
                raise
    finally:
        tmp.unlink(missing_ok=True)
    return decode_key(read_private(path), what=f"key file {path}")


class _Key:
    __slots__ = ("aead", "check", "kid", "kid_bytes", "mac")

    def __init__(self, master: bytes) -> None:
        self.aead = AESGCM(_hkdf(master, b"agw-persist-cache/v1/seal", 32))
        self.mac = _hkdf(master, b"agw-persist-cache/v1/digest", 32)
        self.kid = _hkdf(master, b"agw-persist-cache/v1/key-id", 8).hex()
        self.kid_bytes = self.kid.encode("ascii")
        # Stored per key id, so that a wrong key is noticed (and named) instead of missing.
        self.check = hmac.digest(
            _hkdf(master, b"agw-persist-cache/v1/key-check", 32), b"key check", "sha256"
        )


def _field(value: str) -> bytes:
    raw = value.encode("utf-8", "surrogatepass")
    return _LEN.pack(len(raw)) + raw


_LEN = struct.Struct(">I")
# version, expires_at, then the byte lengths of token, scope key and user hash, and how many
# extra name/value pairs follow (each as length-prefixed strings).
_HEAD = struct.Struct(">BdIIIH")
_new = tuple.__new__


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogatepass")


def user_hash(user_jwt: str | None) -> str:
    """The user JWT enters digests and envelopes only as its SHA-256."""
    if user_jwt is None:
        return ""
    return hashlib.sha256(user_jwt.encode("utf-8", "surrogatepass")).hexdigest()


class Envelope(NamedTuple):
    """What a row seals: the token, its expiry, the identity it belongs to and its extras."""

    token: str
    expires_at: float
    scope_key: str
    uhash: str
    extra: Mapping[str, str]

    def __repr__(self) -> str:
        return "Envelope(<sealed>)"

    def pack(self) -> bytes:
        """Compact binary form: a fixed header with the lengths, then the UTF-8 strings."""
        token = self.token.encode("utf-8", "surrogatepass")
        scope = self.scope_key.encode("utf-8", "surrogatepass")
        uhash = self.uhash.encode("ascii")  # a hex digest, or empty
        extra = self.extra
        head = _HEAD.pack(
            ENVELOPE_VERSION, self.expires_at, len(token), len(scope), len(uhash), len(extra)
        )
        if not extra:  # (every set runs this: the common case in one concatenation)
            return head + token + scope + uhash
        pairs = [_field(n) + _field(v) for n, v in extra.items()]
        return b"".join((head, token, scope, uhash, *pairs))

    @classmethod
    def unpack(cls, plain: bytes) -> Envelope:
        """The inverse of :meth:`pack`; ``UnsealError`` for anything else (e.g. version 1).

        (Every first open of a row runs this: the three strings are sliced, not looped.)
        """
        try:
            version, expires_at, n_token, n_scope, n_uhash, n_extra = _HEAD.unpack_from(plain)
            if version != ENVELOPE_VERSION:
                raise UnsealError("unknown envelope version")
            at = _HEAD.size
            scope_at = at + n_token
            uhash_at = scope_at + n_scope
            end = at = uhash_at + n_uhash
            strings = []  # extra names and values, alternating
            for _ in range(n_extra * 2):
                (size,) = _LEN.unpack_from(plain, at)
                at += _LEN.size + size
                strings.append(_text(plain[at - size : at]))
            if at != len(plain):
                raise UnsealError("malformed envelope")
            return _new(  # cls(...) without the named tuple's Python-level __new__
                cls,
                (
                    plain[_HEAD.size : scope_at].decode("utf-8", "surrogatepass"),
                    expires_at,
                    plain[scope_at:uhash_at].decode("utf-8", "surrogatepass"),
                    plain[uhash_at:end].decode("ascii"),  # a hex digest, or empty
                    dict(zip(strings[::2], strings[1::2], strict=True)) if strings else {},
                ),
            )
        except (struct.error, UnicodeDecodeError) as exc:
            raise UnsealError("malformed envelope") from exc


_AAD_HEADS = {
    kind: b"agw-persist-cache\x00%d\x00%s" % (ENVELOPE_VERSION, kind.encode("ascii"))
    for kind in ("system", "user")
}


def _aad_head(kind: str) -> bytes:
    head = _AAD_HEADS.get(kind)
    return head if head is not None else _AAD_HEADS["system"] + b"?" + kind.encode("utf-8")


class Keyring:
    """The configured keys: the first seals, all open."""

    def __init__(self, masters: Sequence[bytes]) -> None:
        if not masters:
            raise CacheConfigError("at least one encryption key is needed")
        self.keys = tuple(_Key(m) for m in masters)
        self.primary = self.keys[0]
        self._by_kid = {k.kid: k for k in self.keys}
        self.kids = tuple(k.kid for k in self.keys)

    def __repr__(self) -> str:
        return f"Keyring(kids={self.kids!r})"

    def opens(self, found: KeyChecks) -> tuple[bool, tuple[str, ...]]:
        """Whether these keys open the stored rows, and the key ids that wrote them: by the
        stored check values (any configured key with one of them), or, from a store that
        keeps none, by the rows' key ids."""
        if found.checks:
            mine = {(k.kid, k.check) for k in self.keys}
            opened = any((kid, bytes(check)) in mine for kid, check in found.checks)
            return opened, tuple(kid for kid, _ in found.checks)
        return bool(set(self.kids) & set(found.kids)), found.kids

    @staticmethod
    def digest_input(kind: str, scope_key: str, uhash: str) -> bytes:
        """Unambiguous, length-prefixed encoding of what identifies a row."""
        return b"agw1" + _field(kind) + _field(scope_key) + _field(uhash)

    def digests(self, kind: str, scope_key: str, uhash: str) -> tuple[bytes, ...]:
        """Full-length HMAC-SHA-256 under every key, the sealing key's first.

        Never truncated: a collision could hand one user another user's token.
        """
        message = self.digest_input(kind, scope_key, uhash)
        return tuple(hmac.digest(key.mac, message, "sha256") for key in self.keys)

    @staticmethod
    def _aad(kind: str, kid: bytes, generation: int, digest: bytes) -> bytes:
        # Binds the ciphertext to its row and to the clear() generation it was written in:
        # moved to another row, or replayed after a clear(), it does not open.
        return b"%s\x00%s\x00%d\x00%s" % (_aad_head(kind), kid, generation, digest)

    def seal(
        self, kind: str, digest: bytes, generation: int, envelope: Envelope
    ) -> tuple[str, bytes, bytes]:
        """(key id, nonce, ciphertext) of ``envelope``, bound to its row."""
        key = self.primary
        nonce = os.urandom(NONCE_BYTES)
        aad = self._aad(kind, key.kid_bytes, generation, digest)
        return key.kid, nonce, key.aead.encrypt(nonce, envelope.pack(), aad)

    def open(self, row: SealedRow) -> Envelope:
        """The envelope of a row; ``UnsealError`` if it does not open as this very row."""
        key = self._by_kid.get(row.kid)
        if key is None:
            raise UnsealError("sealed under a key this process does not have")
        aad = self._aad(row.kind, key.kid_bytes, row.generation, row.digest)
        try:
            plain = key.aead.decrypt(row.nonce, row.ct, aad)
        except (InvalidTag, ValueError) as exc:
            raise UnsealError("ciphertext does not authenticate for this row") from exc
        return Envelope.unpack(plain)
