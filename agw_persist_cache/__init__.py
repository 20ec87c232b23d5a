"""agw-persist-cache: one warm, encrypted SQLite store of SAP Agent Gateway tokens per host.

Every process on the host (gunicorn/uvicorn workers, celery children, restarted
agents) shares the tokens; per-key file locks make exactly one process fetch a
missing token while the others wait and read it.
"""

from ._cache import PersistentTokenCache
from ._config import CacheConfig
from ._errors import (
    CacheConfigError,
    CacheError,
    CacheStorageError,
    CacheUsageError,
    FetchBackoffError,
    TokenFetchError,
)
from ._expiry import CachedToken, TokenData
from ._instrument import instrument
from ._stats import CacheStats, EntryInfo, KeyVerdict
from ._version import __version__

__all__ = [
    "CacheConfig",
    "CacheConfigError",
    "CacheError",
    "CacheStats",
    "CacheStorageError",
    "CacheUsageError",
    "CachedToken",
    "EntryInfo",
    "FetchBackoffError",
    "KeyVerdict",
    "PersistentTokenCache",
    "TokenData",
    "TokenFetchError",
    "__version__",
    "instrument",
]
