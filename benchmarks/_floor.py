"""The raw floor: plain ``sqlite3`` + AES-256-GCM with the cache's row layout, and the fixtures.

This is the least work any persistent, cross-process, encrypted token store must do on a hit
(one SELECT by primary key in WAL mode, one AES-GCM open) and on a set (one seal, one
``INSERT OR REPLACE`` in its own transaction). The cache is measured against it.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import sqlite3
import time
from collections.abc import Sequence
from pathlib import Path

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

TOKEN_CHARS = 1200
KIND = "system"
KEY_ID = "bench-key-1"

MIGRATION = Path(__file__).resolve().parent.parent / "migrations" / "0001_initial.sql"


def tokens_schema() -> str:
    """The cache's own ``tokens`` table and indexes, taken from its first migration: the floor
    stores the very same row layout (digest key, kind, key id, nonce, ciphertext, expiry,
    last use, creation; LRU and expiry indexes)."""
    lines = MIGRATION.read_text(encoding="utf-8").splitlines()
    script = "\n".join(line for line in lines if not line.lstrip().startswith("--"))
    statements = [
        sql.strip() + ";"
        for sql in script.split(";")
        if sql.strip().upper().startswith("CREATE") and " tokens " in sql
    ]
    if not statements:
        raise RuntimeError(f"no CREATE ... tokens statement in {MIGRATION}")
    return "\n".join(statements)


SELECT = "SELECT kid, nonce, ct, expires_at FROM tokens WHERE k = ?"
UPSERT = (
    "INSERT OR REPLACE INTO tokens (k, kind, kid, nonce, ct, expires_at, last_used, created_at)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
)


def scope_of(i: int) -> str:
    """The scope key of benchmark row ``i``."""
    return f"urn:agw:bench:tenant-0042:scope:{i:06d}"


def digest_of(scope: str) -> bytes:
    """Full SHA-256 over an unambiguous (kind, scope) encoding: the row's primary key."""
    return hashlib.sha256(f"{KIND}\x00{scope}".encode()).digest()


def make_token() -> str:
    """A fresh JWT-shaped opaque token of exactly ``TOKEN_CHARS`` characters."""
    header = "eyJhbGciOiJSUzI1NiIsInR5cCI6IkpXVCJ9"
    body = secrets.token_urlsafe(TOKEN_CHARS)
    token = f"{header}.{body[:800]}.{body[800:]}"
    return token[:TOKEN_CHARS]


def bench_key() -> bytes:
    """A fresh AES-256 key for one run."""
    return AESGCM.generate_key(bit_length=256)


def connect(path: Path) -> sqlite3.Connection:
    """Open ``path`` as the cache does: autocommit driver, WAL, synchronous=NORMAL, busy wait."""
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute("PRAGMA busy_timeout=5000")
    return conn


class RawStore:
    """Raw sqlite3 + AES-GCM store; ``envelope=True`` seals a JSON object instead of bare text."""

    def __init__(self, path: Path, key: bytes, *, envelope: bool = False) -> None:
        self.path = path
        self.envelope = envelope
        self._aead = AESGCM(key)
        self._conn = connect(path)
        if not self._conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'tokens'").fetchone():
            self._conn.executescript(tokens_schema())

    def close(self) -> None:
        self._conn.close()

    def _seal(self, digest: bytes, token: str) -> tuple[bytes, bytes]:
        plain = json.dumps({"v": 1, "t": token, "x": {}}) if self.envelope else token
        nonce = os.urandom(12)
        aad = digest + KIND.encode() + KEY_ID.encode()
        return nonce, self._aead.encrypt(nonce, plain.encode(), aad)

    def open(self, digest: bytes, kind: str, key_id: str, nonce: bytes, sealed: bytes) -> str:
        """Open one row's ciphertext (bound to its digest, kind and key id) to the token."""
        plain = self._aead.decrypt(nonce, sealed, digest + kind.encode() + key_id.encode())
        if self.envelope:
            token: str = json.loads(plain)["t"]
            return token
        return plain.decode()

    def get(self, digest: bytes) -> str | None:
        """The floor hit: one SELECT by primary key, an expiry check, one AES-GCM open."""
        row = self._conn.execute(SELECT, (digest,)).fetchone()
        if row is None or row[3] <= time.time():
            return None
        return self.open(digest, KIND, row[0], row[1], row[2])

    def delete_expired(self) -> int:
        """The least a prune does: one DELETE over the expiry index."""
        return self._conn.execute(
            "DELETE FROM tokens WHERE expires_at <= ?", (time.time(),)
        ).rowcount

    def get_scope(self, scope: str) -> str | None:
        """A hit by scope key: the floor plus the digest (what any keyed cache must add)."""
        return self.get(digest_of(scope))

    def set(self, digest: bytes, token: str, expires_at: float) -> None:
        """The floor set: seal, then ``INSERT OR REPLACE`` in one immediate transaction."""
        nonce, sealed = self._seal(digest, token)
        now = time.time()
        conn = self._conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.execute(UPSERT, (digest, KIND, KEY_ID, nonce, sealed, expires_at, now, now))
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    def populate(self, scopes: Sequence[str], tokens: Sequence[str], expires_at: float) -> None:
        """Insert every row in one transaction (fixture set-up, not measured)."""
        now = time.time()
        rows = []
        for scope, token in zip(scopes, tokens, strict=True):
            digest = digest_of(scope)
            nonce, sealed = self._seal(digest, token)
            rows.append((digest, KIND, KEY_ID, nonce, sealed, expires_at, now, now))
        with self._conn:
            self._conn.execute("BEGIN")
            self._conn.executemany(UPSERT, rows)
