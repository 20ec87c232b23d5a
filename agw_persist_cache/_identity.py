"""What may name a cached token: the arguments of every token call, checked once at the API
boundary (inner layers trust them)."""

from __future__ import annotations

from ._errors import CacheUsageError

MAX_SCOPE_KEY_CHARS = 8 * 1024
MAX_USER_JWT_CHARS = 64 * 1024


def check_identity(kind: str, scope_key: str, user_jwt: str | None) -> None:
    """Arguments are checked once, here; messages name them and never echo their values."""
    if kind not in ("system", "user"):
        raise CacheUsageError("kind must be 'system' or 'user'")
    if not isinstance(scope_key, str):
        raise CacheUsageError(f"scope_key must be a str, not {type(scope_key).__name__}")
    if len(scope_key) > MAX_SCOPE_KEY_CHARS:
        raise CacheUsageError(f"scope_key is longer than {MAX_SCOPE_KEY_CHARS} characters")
    if kind == "system":
        if user_jwt is not None:
            raise CacheUsageError("user_jwt must be None for system tokens")
        return
    if not isinstance(user_jwt, str):
        raise CacheUsageError(
            f"user_jwt must be a str for user tokens, not {type(user_jwt).__name__}"
        )
    if not user_jwt.strip():
        raise CacheUsageError("user_jwt must not be empty or whitespace for user tokens")
    if len(user_jwt) > MAX_USER_JWT_CHARS:
        raise CacheUsageError(f"user_jwt is longer than {MAX_USER_JWT_CHARS} characters")
