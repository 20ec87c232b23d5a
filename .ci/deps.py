"""What CI needs to know about our dependencies, read from pyproject.toml (stdlib only).

names                 the runtime dependencies (and the [redis] extra), one line
sdk-minimum           the lowest sap-cloud-sdk the [sap] extra accepts (">=0.62" -> 0.62.0)
check-lowest FILE     FILE pins each runtime dependency to a release at its lower bound
check-installed FILE  this interpreter has exactly the versions FILE pins
versions              the installed versions of the runtime dependencies and the SDK
"""

from __future__ import annotations

import re
import sys
import tomllib
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"
PROJECT = tomllib.loads(PYPROJECT.read_text())["project"]


def _split(spec: str) -> tuple[str, str | None]:
    """``"redis>=5"`` -> ``("redis", "5")``: the name and its lower bound."""
    name = re.match(r"[A-Za-z0-9_.-]+", spec)
    assert name, spec
    low = re.search(r">=\s*([0-9][0-9.]*)", spec)
    return name.group(0).lower(), low.group(1) if low else None


def runtime() -> dict[str, str | None]:
    specs = [*PROJECT["dependencies"], *PROJECT["optional-dependencies"]["redis"]]
    return dict(_split(s) for s in specs)


def _release(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in text.split("."))


def pinned(path: str) -> dict[str, str]:
    lines = Path(path).read_text().splitlines()
    pairs = (line.split("==") for line in lines if line.strip() and not line.startswith("#"))
    return {name.strip().lower(): ver.strip() for name, ver in pairs}


def check_lowest(path: str) -> None:
    pins, problems = pinned(path), []
    for name, low in runtime().items():
        if name not in pins:
            problems.append(f"{name} is not in {path}")
        elif low is None:
            problems.append(f"{name} has no lower bound in pyproject.toml")
        else:
            have, want = _release(pins[name]), _release(low)
            if have < want or have[: len(want)] != want:
                problems.append(f"{path} pins {name}=={pins[name]}, pyproject says >={low}")
    if problems:
        sys.exit("lowest pins out of date:\n  " + "\n  ".join(problems))


def check_installed(path: str) -> None:
    wrong = [
        f"{name}: want {want}, have {version(name)}"
        for name, want in pinned(path).items()
        if version(name) != want
    ]
    if wrong:
        sys.exit("not the lowest versions:\n  " + "\n  ".join(wrong))


def versions() -> None:
    for name in [*runtime(), "sap-cloud-sdk"]:
        try:
            print(f"  {name} {version(name)}")
        except PackageNotFoundError:
            print(f"  {name} (not installed)")


def main(argv: list[str]) -> None:
    command, *args = argv
    if command == "names":
        print(" ".join(runtime()))
    elif command == "sdk-minimum":
        low = _split(PROJECT["optional-dependencies"]["sap"][0])[1]
        assert low, "the [sap] extra needs a lower bound"
        print(".".join([*low.split("."), "0", "0"][:3]))
    elif command == "check-lowest":
        check_lowest(*args)
    elif command == "check-installed":
        check_installed(*args)
    elif command == "versions":
        versions()
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
