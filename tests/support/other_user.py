"""Run a Python child as another user (``nobody``), from any checkout.

A checkout often sits in a private directory (a 0700 home): ``nobody`` can then reach neither
the package nor the venv's site-packages nor the venv's ``python``. So the child gets a copy
of what it imports, made once per session in a directory every user may read: the package
(with ``migrations/`` where the wheel puts them) and the files of every distribution the
package depends on, found from the installed metadata. It runs on the base interpreter
(``/usr/bin/python3.11``, not the venv's link to it) with that copy on ``PYTHONPATH``.

Dropping privileges needs root and ``setpriv`` (util-linux); without them the caller skips
with the reason (CI runs as root).
"""

from __future__ import annotations

import atexit
import functools
import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import pytest
from packaging.requirements import Requirement

import agw_persist_cache

DISTRIBUTION = "agw-persist-cache"
REPO = Path(__file__).resolve().parent.parent.parent
DROP_TO_NOBODY = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]


def cannot_drop_privileges() -> str | None:
    """Why this process cannot run a child as ``nobody``, or None when it can."""
    if os.geteuid() != 0:
        return "running a child as another user needs root (CI runs as root)"
    if shutil.which("setpriv") is None:
        return "setpriv (util-linux) is not installed"
    return None


@pytest.fixture(name="public_tmp_path")
def public_tmp_path_fixture() -> Iterator[Path]:
    """A fresh directory every user may enter (0711), like ``/var/tmp``.

    Not under pytest's base temp: every pytest session that starts resets its root
    (``/tmp/pytest-of-<user>``) to 0700, and a concurrent session would lock the other
    user out mid-test.
    """
    path = Path(tempfile.mkdtemp(prefix="agw-shared-"))
    path.chmod(0o711)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def distribution_dependencies(name: str) -> set[str]:
    """``name`` and every distribution it needs without extras, by normalised name."""
    found: set[str] = set()
    todo = [name]
    while todo:
        current = todo.pop()
        key = re.sub(r"[-_.]+", "-", current).lower()
        if key in found:
            continue
        found.add(key)
        for line in importlib.metadata.distribution(current).requires or []:
            requirement = Requirement(line)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                todo.append(requirement.name)
    return found


def _copy_distribution(name: str, target: Path) -> None:
    """Copy the installed files of ``name`` that live in site-packages into ``target``."""
    dist = importlib.metadata.distribution(name)
    for entry in dist.files or []:
        if entry.parts[0] == ".." or entry.suffix == ".pyc":  # scripts; caches
            continue
        source = Path(str(dist.locate_file(entry)))
        if source.is_file():
            destination = target / entry
            destination.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, destination)


@functools.cache
def readable_site() -> Path:
    """A directory every user may read holding the package and everything it imports."""
    root = Path(tempfile.mkdtemp(prefix="agw-other-user-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    package = Path(agw_persist_cache.__file__).parent
    ignore = shutil.ignore_patterns("__pycache__")
    shutil.copytree(package, root / package.name, ignore=ignore)
    if not (root / package.name / "_migrations").exists():  # a checkout, not a wheel
        shutil.copytree(REPO / "migrations", root / package.name / "_migrations")
    for name in distribution_dependencies(DISTRIBUTION) - {DISTRIBUTION}:
        _copy_distribution(name, root)
    for directory, _dirs, files in os.walk(root):
        os.chmod(directory, 0o755)
        for file in files:
            os.chmod(os.path.join(directory, file), 0o644)
    root.chmod(0o755)
    return root


def base_python() -> str:
    """The interpreter behind this venv: reachable by every user, unlike the venv's link."""
    return os.path.realpath(getattr(sys, "_base_executable", sys.executable))


def run_python_as_nobody(
    args: Sequence[str], *, env: Mapping[str, str] | None = None, timeout: float = 60.0
) -> subprocess.CompletedProcess[str]:
    """``python ARGS`` as ``nobody`` with a readable copy of what it imports; skips (with
    the reason) where privileges cannot be dropped."""
    reason = cannot_drop_privileges()
    if reason:
        pytest.skip(reason)
    child_env = {"PATH": os.environ["PATH"], "HOME": "/nonexistent", **(env or {})}
    child_env["PYTHONPATH"] = str(readable_site())
    return subprocess.run(
        [*DROP_TO_NOBODY, base_python(), "-s", *args],
        capture_output=True,
        text=True,
        env=child_env,
        cwd="/",
        timeout=timeout,
        check=False,
    )
