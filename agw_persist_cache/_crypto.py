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
import json
import os
import secrets
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from ._config import ENV_KEY, CacheConfig
from ._errors import CacheConfigError

ENVELOPE_VERSION = 1
KEY_BYTES = 32
NONCE_BYTES = 12


_JSON = json.JSONEncoder(separators=(",", ":"))


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
    env = os.environ.get(ENV_KEY, "").strip()
    if env:
        parts = [p for p in (s.strip() for s in env.split(",")) if p]
        return KeySource(
            tuple(decode_key(p, what=f"{ENV_KEY} entry {i + 1}") for i, p in enumerate(parts)),
            "env",
            None,
        )
    return None


def load_or_create_key_file(path: Path) -> bytes:
    """Read the key file, creating it 0600 first if absent; race-free across processes.

    The new key is written to a private temp file and hard-linked into place, so a
    concurrent reader sees either no file or a complete one, and exactly one key wins.
    """
    try:
        return decode_key(path.read_text("ascii"), what=f"key file {path}")
    except FileNotFoundError:
        pass
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
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
    return decode_key(path.read_text("ascii"), what=f"key file {path}")


class _Key:
    __slots__ = ("aead", "kid", "kid_bytes", "mac")

    def __init__(self, master: bytes) -> None:
        self.aead = AESGCM(_hkdf(master, b"agw-persist-cache/v1/seal", 32))
        self.mac = _hkdf(master, b"agw-persist-cache/v1/digest", 32)
        self.kid = _hkdf(master, b"agw-persist-cache/v1/key-id", 8).hex()
        self.kid_bytes = self.kid.encode("ascii")


def _field(value: str) -> bytes:
    raw = value.encode("utf-8", "surrogatepass")
    return struct.pack(">I", len(raw)) + raw


def user_hash(user_jwt: str | None) -> str:
    """The user JWT enters digests and envelopes only as its SHA-256."""
    return "" if user_jwt is None else hashlib.sha256(user_jwt.encode("utf-8")).hexdigest()


class Keyring:
    """The configured keys: the first seals, all open."""

    def __init__(self, masters: Sequence[bytes]) -> None:
        if not masters:
            raise CacheConfigError("at least one encryption key is needed")
        self.keys = tuple(_Key(m) for m in masters)
        self.primary = self.keys[0]
        self._by_kid = {k.kid: k for k in self.keys}
        self.kids = tuple(k.kid for k in self.keys)

    @staticmethod
    def digest_input(kind: str, scope_key: str, uhash: str) -> bytes:
        """Unambiguous, length-prefixed encoding of what identifies a row."""
        return b"agw1" + _field(kind) + _field(scope_key) + _field(uhash)

    @staticmethod
    def digest(key: _Key, message: bytes) -> bytes:
        """Full-length HMAC-SHA-256: a truncated digest could hand one user another's token."""
        return hmac.digest(key.mac, message, "sha256")

    @staticmethod
    def _aad(kind: str, kid: bytes, digest: bytes) -> bytes:
        return (
            b"agw-persist-cache\x00%d\x00%s\x00%s\x00"
            % (
                ENVELOPE_VERSION,
                kind.encode("ascii"),
                kid,
            )
            + digest
        )

    def seal(
        self, kind: str, digest: bytes, payload: Mapping[str, Any]
    ) -> tuple[str, bytes, bytes]:
        """(key id, nonce, ciphertext) of a JSON envelope bound to its row."""
        key = self.primary
        nonce = os.urandom(NONCE_BYTES)
        plain = _JSON.encode({"v": ENVELOPE_VERSION, **payload}).encode()
        return (
            key.kid,
            nonce,
            key.aead.encrypt(nonce, plain, self._aad(kind, key.kid_bytes, digest)),
        )

    def open(self, kind: str, digest: bytes, kid: str, nonce: bytes, ct: bytes) -> dict[str, Any]:
        """The envelope of a row; ``UnsealError`` if it does not open under this row's identity."""
        key = self._by_kid.get(kid)
        if key is None:
            raise UnsealError("sealed under a key this process does not have")
        try:
            plain = key.aead.decrypt(nonce, ct, self._aad(kind, key.kid_bytes, digest))
        except (InvalidTag, ValueError) as exc:
            raise UnsealError("ciphertext does not authenticate for this row") from exc
        try:
            payload = json.loads(plain)
        except ValueError as exc:
            raise UnsealError("envelope is not JSON") from exc
        if not isinstance(payload, dict) or payload.get("v") != ENVELOPE_VERSION:
            raise UnsealError("unknown envelope version")
        return payload
