"""When a token stops being usable, resolved as sap-cloud-sdk does it.

Order: ``expires_at`` (epoch or ISO 8601), ``expires_in``, the ``exp`` claim of
``access_token``, then of ``id_token`` (read unverified with pyjwt), then the
fallback TTL; always capped at ``max_token_ttl_seconds`` from now. An absent (or None)
field falls through to the next source; a present one that says no usable time
(``"abc"``, NaN, ``True``) is a :class:`CacheUsageError`, not a silent default.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any

import jwt

from ._config import CacheConfig
from ._errors import CacheUsageError

TokenData = str | Mapping[str, Any]
"""A bare access token, or a token endpoint response (``access_token`` plus optional
``expires_at``, ``expires_in``, ``id_token`` and ``extra``: a str->str mapping stored with it)."""


@dataclass(frozen=True, slots=True)
class CachedToken:
    """A token with its absolute expiry (epoch seconds) and the extra strings stored with it."""

    token: str = field(repr=False)
    expires_at: float
    extra: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))

    def __repr__(self) -> str:
        # ``extra`` is sealed on disk like the token: its keys are shown, its values never.
        keys = sorted(self.extra)
        return f"CachedToken(token=<redacted>, expires_at={self.expires_at!r}, extra_keys={keys!r})"


def _number(value: object) -> float | None:
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int | float):
        result = float(value)
    elif isinstance(value, str):
        try:
            result = float(value.strip())
        except ValueError:
            return None
    else:
        return None
    return result if math.isfinite(result) else None


def parse_expires_at(value: object) -> float | None:
    """Epoch seconds from a number, a numeric string or an ISO 8601 string (naive means UTC)."""
    number = _number(value)
    if number is not None or not isinstance(value, str) or not value.strip():
        return number
    try:
        parsed = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    except ValueError:
        return None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.timestamp()


def _present_time(
    data: Mapping[str, Any], name: str, parse: Callable[[object], float | None], want: str
) -> float | None:
    """``data[name]`` parsed; None when absent; CacheUsageError when present but unusable."""
    value = data.get(name)
    if value is None:
        return None
    parsed = parse(value)
    if parsed is None:
        raise CacheUsageError(
            f"token_data[{name!r}] must be {want}, not this {type(value).__name__} value"
        )
    return parsed


def jwt_exp(token: object) -> float | None:
    """The ``exp`` claim of a JWT, unverified; None when it is not a JWT or has none."""
    if not isinstance(token, str) or token.count(".") != 2:
        return None
    try:
        claims = jwt.decode(token, options={"verify_signature": False})
    except jwt.PyJWTError:
        return None
    return _number(claims.get("exp"))


def normalize(
    token_data: TokenData, *, now: float, expires_at: float | None, config: CacheConfig
) -> CachedToken:
    """Validate ``token_data`` and resolve its absolute expiry (epoch seconds).

    Raises :class:`CacheUsageError` (a ``TypeError`` and ``ValueError``) naming the bad
    field, never echoing its value.
    """
    if isinstance(token_data, str):
        data: Mapping[str, Any] = {"access_token": token_data}
    elif isinstance(token_data, Mapping):
        data = token_data
    else:
        raise CacheUsageError(
            f"token_data must be a token string or a token response mapping, "
            f"not {type(token_data).__name__}"
        )
    token = data.get("access_token")
    if not isinstance(token, str) or not token or token.isspace():
        raise CacheUsageError("token_data has no non-empty string 'access_token'")
    extra = data.get("extra") or {}
    if not isinstance(extra, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in extra.items()
    ):
        raise CacheUsageError("token_data['extra'] must map str to str")

    resolved: float | None
    if expires_at is not None:
        resolved = _number(expires_at)
        if resolved is None:
            raise CacheUsageError("expires_at must be epoch seconds (a finite number)")
    else:
        resolved = _present_time(
            data, "expires_at", parse_expires_at, "epoch seconds or an ISO 8601 time"
        )
        expires_in = _present_time(data, "expires_in", _number, "a finite number of seconds")
        if resolved is None and expires_in is not None:
            resolved = now + expires_in
        if resolved is None:
            resolved = jwt_exp(token)
        if resolved is None:
            resolved = jwt_exp(data.get("id_token"))
        if resolved is None:
            resolved = now + config.fallback_token_ttl_seconds
    return CachedToken(
        token, min(resolved, now + config.max_token_ttl_seconds), MappingProxyType(dict(extra))
    )
