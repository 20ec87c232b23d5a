"""``agw-cache doctor --url``: what a Redis/Valkey operator gets wrong, one finding per line.

Read-only: PING, INFO, CONFIG GET (skipped where a managed service forbids it), then the
cache itself, opened read-only: its ``stats()`` and its key verdict (``check_keys()``, the
same one the SQLite doctor shows). Every line shows the URL with its password replaced by
``***``; no finding ever holds a token, scope or key.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterator
from typing import Any

from ._cli_common import Where, open_cache
from ._errors import CacheConfigError
from ._findings import Finding, key_finding

MIN_VERSION = (5, 0)
"""What the backend's commands need: ZPOPMIN (5.0), and scripts that write after reading the
server's TIME, replicated by their effects (the default since 5.0). Any Valkey has both."""
_LOOPBACK = ("127.0.0.1", "localhost", "::1", "[::1]")


def redis_checks(url: str, where: Where) -> Iterator[Finding]:
    """Every check of the Redis store at ``url`` (named by ``where``), in the order an
    operator fixes them."""
    try:
        import redis

        from .backends.redis import client_url, redact
    except ImportError:
        yield Finding("FAIL", "client", "pip install 'agw-persist-cache[redis]'")
        return
    config = where.config()
    shown = redact(url)
    scheme, _, rest = url.partition("://")
    host = rest.rpartition("@")[2].split("/")[0].rsplit(":", 1)[0]
    if scheme.lower() in ("rediss", "valkeys"):
        yield Finding("ok", "url", f"{shown} (TLS; namespace {config.namespace})")
    elif scheme.lower() == "unix" or host in _LOOPBACK:
        yield Finding("ok", "url", f"{shown} (local; namespace {config.namespace})")
    else:
        yield Finding(
            "warn",
            "url",
            f"{shown}: not TLS; the password and sealed rows cross the network in the clear "
            "(use rediss://)",
        )
    timeout = max(2.0, config.socket_timeout_seconds)
    try:
        client = redis.Redis.from_url(
            client_url(url),
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            decode_responses=True,
        )
    except ValueError:
        yield Finding("FAIL", "url", "not a valid Redis URL")
        return
    try:
        yield from _server_checks(client)
        yield from _clear_checks(client, config.namespace)
    except redis.AuthenticationError as exc:
        yield Finding("FAIL", "auth", f"{_why(exc)}: check the user and password in the URL")
        return
    except redis.ResponseError as exc:
        if "NOAUTH" in str(exc) or "NOPERM" in str(exc):
            yield Finding("FAIL", "auth", f"{_why(exc)}: give user and password in the URL")
            return
        yield Finding("FAIL", "server", _why(exc))
        return
    except (redis.RedisError, OSError) as exc:
        hint = " (a TLS port? use rediss://)" if "Connection reset" in str(exc) else ""
        yield Finding("FAIL", "reach", f"cannot talk to {shown}: {_why(exc)}{hint}")
        return
    finally:
        client.close()
    yield from _key_checks(where, config.namespace)


def _why(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {' '.join(str(exc).split())[:160]}"


def _server_checks(client: Any) -> Iterator[Finding]:
    samples = []
    for _ in range(5):
        t0 = time.perf_counter()
        client.ping()
        samples.append((time.perf_counter() - t0) * 1000)
    latency = statistics.median(samples)
    level = "ok" if latency < 50 else "warn"
    yield Finding(level, "latency", f"PING median {latency:.2f} ms over 5")
    info = client.info()
    name = "valkey" if "valkey_version" in info else "redis"
    version = str(info.get("valkey_version") or info.get("redis_version") or "0")
    numbers = tuple(int(p) for p in version.split(".")[:2] if p.isdigit())
    if name == "redis" and numbers < MIN_VERSION:
        need = ".".join(map(str, MIN_VERSION))
        yield Finding("FAIL", "version", f"redis {version}; {need} or newer is needed (ZPOPMIN)")
    else:
        yield Finding("ok", "version", f"{name} {version}")
    role = info.get("role", "master")
    if role != "master":
        yield Finding("FAIL", "role", f"{role}: read-only; point the URL at the primary")
    else:
        yield Finding("ok", "role", "primary (writable)")
    if info.get("cluster_enabled"):
        yield Finding(
            "ok",
            "cluster",
            "cluster mode: the cache's keys share one hash tag, so one node (the slot's "
            "owner, found through MOVED) serves them all",
        )
    policy, maxmemory = _config(client, "maxmemory-policy"), _config(client, "maxmemory")
    if policy is None:
        yield Finding("warn", "eviction", "CONFIG GET not allowed: check maxmemory-policy")
    elif policy == "noeviction" or maxmemory in ("0", None):
        yield Finding("ok", "eviction", f"maxmemory-policy {policy}, maxmemory {maxmemory}")
    else:
        yield Finding(
            "warn",
            "eviction",
            f"maxmemory-policy {policy} can evict lock keys (two fetches of one token) and "
            "rows; the cache bounds itself per kind: prefer noeviction",
        )
    aof, save = _config(client, "appendonly"), _config(client, "save")
    if aof is None:
        yield Finding("warn", "persistence", "CONFIG GET not allowed: persistence unknown")
    elif aof == "yes":
        yield Finding("ok", "persistence", "AOF: a restart keeps rows and the clear generation")
    elif save:
        yield Finding(
            "warn",
            "persistence",
            f"RDB snapshots only (save '{save}'): a restart restores the last snapshot, and "
            "with it the rows a later clear() deleted; processes that saw the clear refuse "
            "them, processes started afterwards may not: repeat `agw-cache clear` after a "
            "restart. AOF avoids that",
        )
    else:
        yield Finding("ok", "persistence", "none: a restart empties the cache (tokens refetched)")


def _clear_checks(client: Any, namespace: str) -> Iterator[Finding]:
    """The clear() generation, and whether a clear left rows it has not deleted yet."""
    from .backends._redis_ops import Layout

    layout = Layout(namespace)
    generation = client.get(layout.gen) or "0"
    graves = client.hgetall(layout.graves) or {}
    left = sum(int(client.zcard(grave)) for grave in graves)
    if left:
        yield Finding(
            "warn",
            "clear",
            f"generation {generation}; a clear() left {left} old rows to delete (never "
            "served; `agw-cache prune` finishes it)",
        )
    else:
        yield Finding("ok", "clear", f"generation {generation}; no rows left by a clear()")


def _config(client: Any, name: str) -> str | None:
    import redis

    try:
        reply = client.config_get(name)
    except redis.ResponseError:  # managed services often rename or forbid CONFIG
        return None
    value = reply.get(name) if isinstance(reply, dict) else None
    return value.decode() if isinstance(value, bytes) else value


def _key_checks(where: Where, namespace: str) -> Iterator[Finding]:
    """The cache's own verdict on its key, and its rows, read as a replica would."""
    try:
        cache = open_cache(where, read_only=True)
    except CacheConfigError as exc:  # a shared store takes no per-host key file
        yield Finding("FAIL", "key", str(exc))
        return
    with cache:
        stats = cache.stats()
        verdict = None if stats.disabled_reason else cache.check_keys()
        key_ids = cache.key_ids
    if stats.disabled_reason:
        yield Finding("FAIL", "rows", f"cannot read the cache: {stats.disabled_reason}")
        return
    rows = stats.entries_system + stats.entries_user
    yield key_finding(verdict, key_ids, rows)
    yield Finding(
        "ok",
        "rows",
        f"{stats.entries_system} system, {stats.entries_user} user "
        f"({stats.entries_expired} expired); {rows} in namespace {namespace}",
    )
