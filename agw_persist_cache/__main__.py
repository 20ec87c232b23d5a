"""``python -m agw_persist_cache``: the same as the ``agw-cache`` console script."""

from __future__ import annotations

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
