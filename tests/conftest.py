"""Shared fixtures: every test gets a private cache directory and a clean environment."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest_plugins = ["tests.support.skip_summary"]  # skips grouped by reason, after the run


@pytest.fixture(autouse=True)
def _isolated_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No test reads the developer's keys or cache, or leaves its own behind."""
    for name in list(os.environ):
        if name.startswith(("AGW_CACHE_", "INTEGRATION_")) or name == "SERVICE_BINDING_ROOT":
            monkeypatch.delenv(name)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))
    yield


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    """Where this test's cache file lives (not created yet)."""
    return tmp_path / "cache" / "tokens.db"
