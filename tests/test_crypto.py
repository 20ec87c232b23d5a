"""Row sealing (AES-256-GCM), digests of cache keys, keys and the key file."""

from __future__ import annotations

import base64
import os
import stat
from pathlib import Path

import pytest
from cryptography.exceptions import InvalidTag

from agw_persist_cache import CacheConfigError
from agw_persist_cache._crypto import (
    ENVELOPE_VERSION,
    KEY_BYTES,
    NONCE_BYTES,
    Envelope,
    Keyring,
    UnsealError,
    decode_key,
    load_or_create_key_file,
    user_hash,
)
from agw_persist_cache.backends.contract import SealedRow

KEY_A, KEY_B = b"A" * KEY_BYTES, b"B" * KEY_BYTES


def digest_of(ring: Keyring, kind: str, scope: str, user: str | None = None) -> bytes:
    return ring.digests(kind, scope, user_hash(user))[0]


def envelope(token: str = "token", scope: str = "scope", **extra: str) -> Envelope:
    return Envelope(token, 123.0, scope, "", extra)


def sealed(
    ring: Keyring, kind: str, digest: bytes, env: Envelope, generation: int = 0
) -> SealedRow:
    """A row as the cache would store it."""
    kid, nonce, ct = ring.seal(kind, digest, generation, env)
    return SealedRow(digest, kind, kid, nonce, ct, env.expires_at, generation, 1.0, 1.0)


# -- digests -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("left", "right"),
    [
        (("system", "a", "bc"), ("system", "ab", "c")),
        (("system", "ab", ""), ("system", "a", "b")),
        (("user", "s", ""), ("users", "", "")),
        (("system", "a\x00b", ""), ("system", "a", "\x00b")),
        (("system", "é", ""), ("system", "\xc3\xa9", "")),
    ],
)
def test_digest_input_is_unambiguous(
    left: tuple[str, str, str], right: tuple[str, str, str]
) -> None:
    assert Keyring.digest_input(*left) != Keyring.digest_input(*right)
    ring = Keyring([KEY_A])
    assert ring.digests(*left) != ring.digests(*right)


def test_digests_are_full_32_bytes_and_deterministic() -> None:
    ring = Keyring([KEY_A])
    first = digest_of(ring, "user", "scope", "jwt")
    assert len(first) == 32
    assert first == digest_of(Keyring([KEY_A]), "user", "scope", "jwt")


def test_every_configured_key_gives_a_digest_the_sealing_key_first() -> None:
    ring = Keyring([KEY_B, KEY_A])
    assert ring.digests("system", "scope", "") == (
        digest_of(Keyring([KEY_B]), "system", "scope"),
        digest_of(Keyring([KEY_A]), "system", "scope"),
    )


def test_digests_are_keyed_and_separate_kind_scope_and_user() -> None:
    a, b = Keyring([KEY_A]), Keyring([KEY_B])
    assert digest_of(a, "system", "scope") != digest_of(b, "system", "scope")
    variants = {
        digest_of(a, "system", "scope"),
        digest_of(a, "user", "scope", "jwt-1"),
        digest_of(a, "user", "scope", "jwt-2"),
        digest_of(a, "user", "scope2", "jwt-1"),
    }
    assert len(variants) == 4


def test_user_hash_is_sha256_hex_and_empty_for_system() -> None:
    assert user_hash(None) == ""
    assert len(user_hash("jwt")) == 64
    assert "jwt" not in user_hash("jwt")


def test_user_hash_takes_any_string_even_a_lone_surrogate() -> None:
    assert user_hash("jwt\ud800") != user_hash("jwt")
    assert len(user_hash("a\x00b")) == 64


# -- sealing -------------------------------------------------------------------------------------


def test_seal_and_open_round_trip_a_binary_envelope() -> None:
    ring = Keyring([KEY_A])
    digest = digest_of(ring, "system", "scope")
    env = Envelope("token\ud800", 123.5, "scope\x00", "ab" * 32, {"url": "https://gw", "é": ""})
    row = sealed(ring, "system", digest, env, generation=7)
    assert row.kid == ring.primary.kid
    assert len(row.nonce) == NONCE_BYTES
    assert ring.open(row) == env
    # No pickle, no JSON: a version byte, the expiry, then length-prefixed strings.
    plain = ring.primary.aead.decrypt(
        row.nonce, row.ct, Keyring._aad("system", row.kid.encode(), 7, digest)
    )
    assert plain[0] == ENVELOPE_VERSION
    assert Envelope.unpack(plain) == env
    assert "token" not in repr(env)


@pytest.mark.parametrize(
    "plain",
    [b"", b"\x01" + b"\x00" * 8, b'{"v":1,"t":"token"}', Envelope("t", 1, "s", "", {}).pack()[:-1]],
)
def test_anything_but_a_whole_current_envelope_does_not_unpack(plain: bytes) -> None:
    with pytest.raises(UnsealError):
        Envelope.unpack(plain)


def test_every_seal_uses_a_fresh_nonce() -> None:
    ring = Keyring([KEY_A])
    digest = digest_of(ring, "system", "scope")
    rows = [sealed(ring, "system", digest, envelope("same")) for _ in range(50)]
    assert len({row.nonce for row in rows}) == 50
    assert len({row.ct for row in rows}) == 50


def _flip(blob: bytes, index: int) -> bytes:
    return blob[:index] + bytes([blob[index] ^ 0x80]) + blob[index + 1 :]


def test_flipping_any_byte_of_nonce_or_ciphertext_fails_to_open() -> None:
    ring = Keyring([KEY_A])
    digest = digest_of(ring, "user", "scope", "jwt")
    row = sealed(ring, "user", digest, envelope())
    for i in range(len(row.nonce)):
        with pytest.raises(UnsealError):
            ring.open(row._replace(nonce=_flip(row.nonce, i)))
    for i in range(len(row.ct)):
        with pytest.raises(UnsealError):
            ring.open(row._replace(ct=_flip(row.ct, i)))
    with pytest.raises(UnsealError):
        ring.open(row._replace(ct=row.ct[:-1]))
    assert ring.open(row).token == "token"


def test_associated_data_binds_kind_digest_and_generation() -> None:
    ring = Keyring([KEY_A])
    digest = digest_of(ring, "user", "scope", "jwt")
    other = digest_of(ring, "user", "scope", "other-jwt")
    row = sealed(ring, "user", digest, envelope(), generation=3)
    with pytest.raises(UnsealError):
        ring.open(row._replace(kind="system"))
    with pytest.raises(UnsealError):
        ring.open(row._replace(digest=other))
    with pytest.raises(UnsealError):  # a row saved before a clear() and put back after it
        ring.open(row._replace(generation=4))
    assert ring.open(row).token == "token"


def test_associated_data_binds_the_key_id() -> None:
    ring = Keyring([KEY_A])
    digest = digest_of(ring, "system", "scope")
    row = sealed(ring, "system", digest, envelope())
    aead = ring.primary.aead
    assert aead.decrypt(row.nonce, row.ct, Keyring._aad("system", row.kid.encode(), 0, digest))
    with pytest.raises(InvalidTag):
        aead.decrypt(row.nonce, row.ct, Keyring._aad("system", b"0123456789abcdef", 0, digest))


def test_a_row_opens_only_under_a_key_that_has_its_key_id() -> None:
    old, new = Keyring([KEY_A]), Keyring([KEY_B, KEY_A])
    digest = digest_of(old, "system", "scope")
    row = sealed(old, "system", digest, envelope())
    assert new.open(row).token == "token"
    with pytest.raises(UnsealError, match="key"):
        Keyring([KEY_B]).open(row)
    # Claiming another configured key's id does not help either.
    with pytest.raises(UnsealError):
        new.open(row._replace(kid=new.primary.kid))


def test_key_ids_are_public_stable_and_distinct() -> None:
    a, b = Keyring([KEY_A]), Keyring([KEY_B, KEY_A])
    assert a.kids == (a.primary.kid,)
    assert b.kids == (b.primary.kid, a.primary.kid)
    assert a.primary.kid != b.primary.kid
    assert len(a.primary.kid) == 16
    assert KEY_A.hex() not in a.primary.kid
    assert Keyring([KEY_A]).primary.kid == a.primary.kid
    assert KEY_A.decode() not in repr(a)


def test_a_keyring_needs_a_key() -> None:
    with pytest.raises(CacheConfigError):
        Keyring([])


def test_unseal_errors_carry_no_key_or_token_material() -> None:
    ring = Keyring([KEY_A])
    digest = digest_of(ring, "system", "scope")
    row = sealed(ring, "system", digest, envelope("SECRET-TOKEN"))
    with pytest.raises(UnsealError) as info:
        ring.open(row._replace(ct=_flip(row.ct, 0)))
    text = str(info.value) + repr(info.value)
    assert "SECRET-TOKEN" not in text
    assert KEY_A.decode() not in text


# -- keys ------------------------------------------------------------------------------------------


def test_decode_key_accepts_raw_bytes_and_padded_or_unpadded_base64() -> None:
    raw = os.urandom(32)
    encoded = base64.urlsafe_b64encode(raw).decode()
    assert decode_key(raw, what="k") == raw
    assert decode_key(encoded, what="k") == raw
    assert decode_key(encoded.rstrip("="), what="k") == raw
    assert decode_key(f"  {encoded}\n", what="k") == raw
    assert decode_key(encoded.encode(), what="k") == raw


@pytest.mark.parametrize(
    "bad",
    ["", "short", "!" * 44, base64.urlsafe_b64encode(b"x" * 16).decode(), b"x" * 31],
)
def test_decode_key_rejects_anything_but_32_bytes_naming_the_source_only(bad: str | bytes) -> None:
    with pytest.raises(CacheConfigError) as info:
        decode_key(bad, what="the source")
    assert "the source" in str(info.value)
    shown = bad.decode() if isinstance(bad, bytes) else bad
    if len(shown) >= 4:
        assert shown not in str(info.value)


def test_key_file_is_created_0600_once_and_then_reused(tmp_path: Path) -> None:
    previous = os.umask(0o022)
    try:
        path = tmp_path / "tokens.db.key"
        first = load_or_create_key_file(path)
        mode = stat.S_IMODE(path.stat().st_mode)
    finally:
        os.umask(previous)
    assert mode == 0o600
    assert len(first) == 32
    assert load_or_create_key_file(path) == first
    assert [p.name for p in tmp_path.iterdir()] == ["tokens.db.key"]  # no temp files left


def test_key_file_keeps_tokens_readable_across_restarts(db_path: Path) -> None:
    from agw_persist_cache import PersistentTokenCache

    with PersistentTokenCache(db_path) as cache:
        cache.set_system_token("scope", "token")
        ids = cache.key_ids
    with PersistentTokenCache(db_path) as cache:
        assert cache.key_ids == ids
        assert cache.get_system_token("scope") == "token"
