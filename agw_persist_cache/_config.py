"""CacheConfig: every knob of the cache, validated once, with the env vars it reads.

Names shared with sap-cloud-sdk's ``ClientConfig`` keep its meaning
(``token_expiry_buffer_seconds``, ``fallback_token_ttl_seconds``,
``max_system_token_cache_size``, ``max_user_token_cache_size``).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ._errors import CacheConfigError

ENV_PATH = "AGW_CACHE_PATH"
ENV_KEY = "AGW_CACHE_KEY"
ENV_URL = "AGW_CACHE_URL"
ENV_NAMESPACE = "AGW_CACHE_NAMESPACE"
DEFAULT_FILENAME = "tokens.db"
NETWORK_SCHEMES = ("redis", "rediss", "unix", "valkey", "valkeys")
DEFAULT_NAMESPACE = "agw-persist-cache"


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/agw-persist-cache`` (default ``~/.cache/agw-persist-cache``)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "agw-persist-cache"


def resolve_path(path: str | os.PathLike[str] | None) -> Path:
    """The database path: the argument, else ``$AGW_CACHE_PATH``, else the user cache dir."""
    if path is None:
        env = os.environ.get(ENV_PATH)
        if env:
            path = env
    if path is None:
        return default_cache_dir() / DEFAULT_FILENAME
    resolved = Path(os.fspath(path)).expanduser()
    if str(resolved) in ("", ".") or resolved.name == "":
        raise CacheConfigError(f"cache path {os.fspath(path)!r} does not name a file")
    return resolved.absolute()  # one meaning for every process, whatever its directory


def split_location(
    path: str | os.PathLike[str] | None, url: str | None
) -> tuple[str | os.PathLike[str] | None, str | None]:
    """(SQLite path, networked store URL): an explicit ``url`` (or ``$AGW_CACHE_URL`` when no
    path is given) of a networked scheme selects that store; ``sqlite:///...`` and plain
    paths select the SQLite file."""
    if url is None and path is None:
        url = os.environ.get(ENV_URL) or None
    if url is None:
        return path, None
    scheme, sep, rest = url.partition("://")
    if sep and scheme.lower() == "sqlite":
        return (rest or None), None
    if sep and scheme.lower() in NETWORK_SCHEMES:
        return path, url
    raise CacheConfigError(
        f"cache URL scheme {scheme.lower()!r} is not supported; use redis://, rediss://, "
        "unix:// or sqlite:///path"
        if sep
        else "cache URL must look like redis://host:6379/0 or sqlite:///path"
    )


@dataclass(frozen=True)
class CacheConfig:
    """Settings of a :class:`PersistentTokenCache`. Invalid values raise ``CacheConfigError``
    (a ``ValueError``) naming the field."""

    path: str | os.PathLike[str] | None = None
    """Database file; default ``$AGW_CACHE_PATH`` or ``~/.cache/agw-persist-cache/tokens.db``."""
    url: str | None = field(default=None, repr=False)
    """A networked store shared by many hosts (``redis://``, ``rediss://``, ``unix://``), or
    ``sqlite:///path``; default ``$AGW_CACHE_URL``, else the SQLite file. Never logged."""
    keys: Sequence[str | bytes] | None = field(default=None, repr=False)
    """AES-256 keys (32 raw bytes or urlsafe base64 of them). The first seals new rows,
    all open old ones. Default: ``$AGW_CACHE_KEY`` (comma separated), else a key file."""
    key_file: str | os.PathLike[str] | None = None
    """Where the generated key lives when no key is given; default ``<db>.key``, mode 0600."""
    token_expiry_buffer_seconds: float = 30.0
    """A token is served only while ``now < expiry - buffer``."""
    fallback_token_ttl_seconds: float = 300.0
    """Lifetime assumed when neither the response nor the JWT says when the token expires."""
    max_token_ttl_seconds: float = 86_400.0
    """Upper bound on any lifetime, however far away the response says expiry is."""
    max_system_token_cache_size: int = 1_000
    """Rows of kind ``system`` kept by LRU pruning (host-wide)."""
    max_user_token_cache_size: int = 100_000
    """Rows of kind ``user`` kept by LRU pruning (host-wide)."""
    lock_timeout_seconds: float = 30.0
    """How long a miss waits for another process's fetch before fetching anyway."""
    busy_timeout_seconds: float = 5.0
    """SQLite busy timeout for writers waiting on each other."""
    refresh_ahead_ratio: float = 0.1
    """Refresh in the background during the last ``ratio`` of a token's lifetime; 0 disables."""
    fetch_backoff_seconds: float = 5.0
    """After a failed fetch, callers of that key fail fast for this long; 0 disables."""
    last_used_interval_seconds: float = 30.0
    """A hit rewrites ``last_used`` (for LRU) at most this often per row."""
    prune_interval_seconds: float = 300.0
    """A process prunes expired and surplus rows after a write at most this often."""
    max_db_bytes: int | None = None
    """Hard cap on the database file size (SQLite ``max_page_count``); None: no cap."""
    lock_stripes: int = 1024
    """Where OFD locks are missing (macOS, BSD, Windows): the number of lock files the per-key
    locks are striped over (made as used, never removed); two keys fetched at the same moment
    share one with a chance of 1 in this. On Linux every key has its own lock in one file."""
    namespace: str = field(
        default_factory=lambda: os.environ.get(ENV_NAMESPACE) or DEFAULT_NAMESPACE
    )
    """Redis: the prefix (and Cluster hash tag) of every key; applications sharing one
    Redis with different namespaces never see each other's rows. Default
    ``$AGW_CACHE_NAMESPACE``, else ``agw-persist-cache``."""
    socket_timeout_seconds: float = 0.5
    """Redis: the longest one command (or connecting) may take before the call fetches
    directly."""
    circuit_breaker_seconds: float = 5.0
    """Redis: after a failure, skip Redis for this long (then one call probes it)."""
    lock_lease_seconds: float = 3.0
    """Redis: lease of a key lock, renewed while its holder fetches; a holder that died
    frees the key within this long."""
    memory_tokens: int = 4096
    """Tokens each process keeps in memory (LRU) in front of the store: the memo of opened
    rows while the store is healthy, the whole cache while it cannot be used."""

    def __post_init__(self) -> None:
        positive = {
            "token_expiry_buffer_seconds": (self.token_expiry_buffer_seconds, True),
            "fallback_token_ttl_seconds": (self.fallback_token_ttl_seconds, False),
            "max_token_ttl_seconds": (self.max_token_ttl_seconds, False),
            "lock_timeout_seconds": (self.lock_timeout_seconds, True),
            "busy_timeout_seconds": (self.busy_timeout_seconds, True),
            "refresh_ahead_ratio": (self.refresh_ahead_ratio, True),
            "fetch_backoff_seconds": (self.fetch_backoff_seconds, True),
            "last_used_interval_seconds": (self.last_used_interval_seconds, True),
            "prune_interval_seconds": (self.prune_interval_seconds, True),
            "socket_timeout_seconds": (self.socket_timeout_seconds, False),
            "circuit_breaker_seconds": (self.circuit_breaker_seconds, True),
            "lock_lease_seconds": (self.lock_lease_seconds, False),
        }
        for name, (value, zero_ok) in positive.items():
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise CacheConfigError(f"CacheConfig.{name} must be a number, got {value!r}")
            if not math.isfinite(value) or value < 0 or (value == 0 and not zero_ok):
                bound = ">= 0" if zero_ok else "> 0"
                raise CacheConfigError(
                    f"CacheConfig.{name} must be finite and {bound}, got {value!r}"
                )
        if self.refresh_ahead_ratio >= 1:
            raise CacheConfigError(
                f"CacheConfig.refresh_ahead_ratio must be < 1, got {self.refresh_ahead_ratio!r}"
            )
        sizes = {
            "max_system_token_cache_size": self.max_system_token_cache_size,
            "max_user_token_cache_size": self.max_user_token_cache_size,
            "lock_stripes": self.lock_stripes,
            "memory_tokens": self.memory_tokens,
        }
        for name, size in sizes.items():
            if isinstance(size, bool) or not isinstance(size, int) or size < 1:
                raise CacheConfigError(f"CacheConfig.{name} must be an int >= 1, got {size!r}")
        if self.max_db_bytes is not None and (
            isinstance(self.max_db_bytes, bool)
            or not isinstance(self.max_db_bytes, int)
            or self.max_db_bytes < 64 * 1024
        ):
            raise CacheConfigError(
                "CacheConfig.max_db_bytes must be None or an int >= 65536, "
                f"got {self.max_db_bytes!r}"
            )
        if (
            not isinstance(self.namespace, str)
            or not 1 <= len(self.namespace) <= 64
            or not all(c.isascii() and c.isprintable() and c not in " {}" for c in self.namespace)
        ):
            raise CacheConfigError(
                "CacheConfig.namespace (default $AGW_CACHE_NAMESPACE) must be 1-64 printable ASCII "
                "characters without spaces "
                f"or braces, got {self.namespace!r}"
            )
        if self.url is not None:
            if not isinstance(self.url, str):
                raise CacheConfigError(
                    f"CacheConfig.url must be a str, not {type(self.url).__name__}"
                )
            try:
                split_location(None, self.url)
            except CacheConfigError as exc:
                raise CacheConfigError(f"CacheConfig.url: {exc}") from None
        if self.keys is not None and (isinstance(self.keys, str | bytes) or not self.keys):
            raise CacheConfigError(
                "CacheConfig.keys must be a non-empty list of keys (first seals, all open)"
            )
