"""Row sealing (AES-256-GCM), digests of cache keys, keys and the key file."""

from __future__ import annotations

import base64
import json
import os
import stat
from pathlib import Path

import pytest
from cryptography.exceptions import InvalidTag

from agw_persist_cache import CacheConfigError
from agw_persist_cache._crypto import (
    KEY_BYTES,
    NONCE_BYTES,
    Keyring,
    UnsealError,
    decode_key,
    load_or_create_key_file,
    user_hash,
)

KEY_A, KEY_B = b"A" * KEY_BYTES, b"B" * KEY_BYTES


def digest_of(ring: Keyring, kind: str, scope: str, user: str | None = None) -> bytes:
    return ring.digest(ring.primary, ring.digest_input(kind, scope, user_hash(user)))


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
    assert ring.digest(ring.primary, Keyring.digest_input(*left)) != ring.digest(
        ring.primary, Keyring.digest_input(*right)
    )


def test_digests_are_full_32_bytes_and_deterministic() -> None:
    ring = Keyring([KEY_A])
    first = digest_of(ring, "user", "scope", "jwt")
    assert len(first) == 32
    assert first == digest_of(Keyring([KEY_A]), "user", "scope", "jwt")


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


# -- sealing -------------------------------------------------------------------------------------


def test_seal_and_open_round_trip_a_json_envelope() -> None:
    ring = Keyring([KEY_A])
    digest = digest_of(ring, "system", "scope")
    payload = {"t": "token", "e": 123.0, "x": {"url": "https://gw"}}
    kid, nonce, ct = ring.seal("system", digest, payload)
    assert kid == ring.primary.kid
    assert len(nonce) == NONCE_BYTES
    opened = ring.open("system", digest, kid, nonce, ct)
    assert opened == {"v": 1, **payload}
    # No pickle: the plaintext is versioned JSON.
    plain = ring.primary.aead.decrypt(nonce, ct, Keyring._aad("system", kid.encode(), digest))
    assert json.loads(plain)["v"] == 1


def test_every_seal_uses_a_fresh_nonce() -> None:
    ring = Keyring([KEY_A])
    digest = digest_of(ring, "system", "scope")
    sealed = [ring.seal("system", digest, {"t": "same"}) for _ in range(50)]
    assert len({nonce for _, nonce, _ in sealed}) == 50
    assert len({ct for _, _, ct in sealed}) == 50


def _flip(blob: bytes, index: int) -> bytes:
    return blob[:index] + bytes([blob[index] ^ 0x80]) + blob[index + 1 :]


def test_flipping_any_byte_of_nonce_or_ciphertext_fails_to_open() -> None:
    ring = Keyring([KEY_A])
    digest = digest_of(ring, "user", "scope", "jwt")
    kid, nonce, ct = ring.seal("user", digest, {"t": "token"})
    for i in range(len(nonce)):
        with pytest.raises(UnsealError):
            ring.open("user", digest, kid, _flip(nonce, i), ct)
    for i in range(len(ct)):
        with pytest.raises(UnsealError):
            ring.open("user", digest, kid, nonce, _flip(ct, i))
    with pytest.raises(UnsealError):
        ring.open("user", digest, kid, nonce, ct[:-1])
    assert ring.open("user", digest, kid, nonce, ct)["t"] == "token"


def test_associated_data_binds_kind_and_digest() -> None:
    ring = Keyring([KEY_A])
    digest = digest_of(ring, "user", "scope", "jwt")
    other = digest_of(ring, "user", "scope", "other-jwt")
    kid, nonce, ct = ring.seal("user", digest, {"t": "token"})
    with pytest.raises(UnsealError):
        ring.open("system", digest, kid, nonce, ct)
    with pytest.raises(UnsealError):
        ring.open("user", other, kid, nonce, ct)


def test_associated_data_binds_the_key_id() -> None:
    ring = Keyring([KEY_A])
    digest = digest_of(ring, "system", "scope")
    kid, nonce, ct = ring.seal("system", digest, {"t": "token"})
    aead = ring.primary.aead
    assert aead.decrypt(nonce, ct, Keyring._aad("system", kid.encode(), digest))
    with pytest.raises(InvalidTag):
        aead.decrypt(nonce, ct, Keyring._aad("system", b"0123456789abcdef", digest))


def test_a_row_opens_only_under_a_key_that_has_its_key_id() -> None:
    old, new = Keyring([KEY_A]), Keyring([KEY_B, KEY_A])
    digest = digest_of(old, "system", "scope")
    kid, nonce, ct = old.seal("system", digest, {"t": "token"})
    assert new.open("system", digest, kid, nonce, ct)["t"] == "token"
    with pytest.raises(UnsealError, match="key"):
        Keyring([KEY_B]).open("system", digest, kid, nonce, ct)
    # Claiming another configured key's id does not help either.
    with pytest.raises(UnsealError):
        new.open("system", digest, new.primary.kid, nonce, ct)


def test_key_ids_are_public_stable_and_distinct() -> None:
    a, b = Keyring([KEY_A]), Keyring([KEY_B, KEY_A])
    assert a.kids == (a.primary.kid,)
    assert b.kids == (b.primary.kid, a.primary.kid)
    assert a.primary.kid != b.primary.kid
    assert len(a.primary.kid) == 16
    assert KEY_A.hex() not in a.primary.kid
    assert Keyring([KEY_A]).primary.kid == a.primary.kid


def test_a_keyring_needs_a_key() -> None:
    with pytest.raises(CacheConfigError):
        Keyring([])


def test_unseal_errors_carry_no_key_or_token_material() -> None:
    ring = Keyring([KEY_A])
    digest = digest_of(ring, "system", "scope")
    kid, nonce, ct = ring.seal("system", digest, {"t": "SECRET-TOKEN"})
    with pytest.raises(UnsealError) as info:
        ring.open("system", digest, kid, nonce, _flip(ct, 0))
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
