"""Errors raised by agw-persist-cache.

Hierarchy::

    CacheError(Exception)              root of every error this package raises
    ├── CacheConfigError(CacheError, ValueError)
    │                                  a CacheConfig value or env var is invalid
    ├── CacheUsageError(CacheError, ValueError, TypeError)
    │                                  an argument of a call is invalid (named, never echoed)
    ├── CacheStorageError(CacheError)  clear / invalidate / prune did not take effect
    └── TokenFetchError(CacheError)    the identity service did not hand out a token
        └── FetchBackoffError          a recent fetch for this key failed; failing fast

Messages never contain token material, user JWTs, scopes or keys.
Storage problems (corrupt, unwritable, locked, full or newer-schema files) never
fail a get or a get-or-fetch: the cache logs one warning, counts it and degrades to
fetching. Writes tell the truth: ``clear()``, ``invalidate_*`` and ``prune()`` take
effect or raise ``CacheStorageError``; ``set_*`` returns whether it stored.
"""

from __future__ import annotations


class CacheError(Exception):
    """Root of every error raised by agw-persist-cache."""


class CacheConfigError(CacheError, ValueError):
    """A configuration value (argument or environment variable) is invalid."""


class CacheUsageError(CacheError, ValueError, TypeError):
    """An argument of a call is invalid: wrong type, empty, or not a usable value.

    Both a ``ValueError`` and a ``TypeError``, so code written against either keeps
    working. The message names the argument and never echoes its value.
    """


class CacheStorageError(CacheError):
    """A change to the cache (clear, invalidate, prune) did not take effect.

    Raised rather than ignored: a silent no-op ``clear()`` or ``invalidate`` would leave
    a revoked token in service. Retrying later, or ``agw-cache doctor``, is the way out.
    """


class TokenFetchError(CacheError):
    """A token could not be obtained from the identity service.

    ``status`` is the HTTP status when there was a response, else ``None``.
    """

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class FetchBackoffError(TokenFetchError):
    """A fetch for this key failed moments ago (in this or another process).

    Raised instead of hitting a failing identity service again while the
    back-off window lasts; ``retry_after`` says how many seconds remain and
    ``cause_type`` names the class of the original error.
    """

    def __init__(self, *, retry_after: float, cause_type: str, status: int | None = None) -> None:
        super().__init__(
            f"token fetch failed recently ({cause_type}); not retrying for "
            f"{retry_after:.1f}s to spare the identity service (set "
            "CacheConfig.fetch_backoff_seconds=0 to disable)",
            status=status,
        )
        self.retry_after = retry_after
        self.cause_type = cause_type
