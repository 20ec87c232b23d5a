"""``with`` and ``async with`` for the classes that own connections (close / aclose)."""

from __future__ import annotations

from typing import Self


class Closing:
    """Context-manager protocol over ``close()`` and ``aclose()``, which subclasses define."""

    def close(self) -> None:
        raise NotImplementedError

    async def aclose(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()
