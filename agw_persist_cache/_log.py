"""The package logger and its rate limit: a broken cache must not flood the logs."""

from __future__ import annotations

import logging
import time

log = logging.getLogger("agw_persist_cache")

WARN_EVERY_SECONDS = 60.0


class Warnings:
    """Warnings of one cache (or store): each category at most once a minute."""

    def __init__(self) -> None:
        self._last: dict[str, float] = {}

    def once(self, category: str, message: str, *args: object) -> None:
        now = time.monotonic()
        if now - self._last.get(category, -1e18) >= WARN_EVERY_SECONDS:
            if len(self._last) > 1024:
                self._last.clear()
            self._last[category] = now
            log.warning(message, *args)


def warn_unopenable(warnings: Warnings, location: object, exc: BaseException) -> None:
    """The one warning for a store that cannot be opened at all."""
    warnings.once(
        "open",
        "cannot open token cache at %s (%s: %s); this process keeps its tokens in memory. "
        "Set AGW_CACHE_PATH to a writable local path or run `agw-cache doctor`",
        location,
        type(exc).__name__,
        exc,
    )
