"""sap-cloud-sdk's own agentgateway and ADMS unit tests, run twice against the installed SDK:
as shipped, and with our ``create_client`` substituted (plugin ``_sdk_substitution``). Every
test that passes stock must pass substituted.

The SDK's wheel has no tests; its source distribution does. It is downloaded once for the
installed version (``pip download``) into ``$AGW_SDK_SDIST_DIR`` or a temp dir and reused.
Without network the test is skipped, unless ``AGW_REQUIRE_SDK_TESTS=1`` (CI sets it).
``$AGW_SDK_TEST_REPORT`` names a JSON file that receives the counts.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import tempfile
import xml.etree.ElementTree as ET
from importlib.metadata import version
from pathlib import Path

import pytest

SUITES = ("tests/agentgateway/unit", "tests/adms/unit")
TESTS_DIR = Path(__file__).parent

pytestmark = pytest.mark.timeout(900)


def _sdist(sdk_version: str) -> Path:
    cache = Path(os.environ.get("AGW_SDK_SDIST_DIR") or tempfile.gettempdir())
    cache = cache / "agw-persist-cache-sdk-sdist"
    cache.mkdir(parents=True, exist_ok=True)
    found = sorted(cache.glob(f"sap_cloud_sdk-{sdk_version}.tar.gz"))
    if found:
        return found[0]
    done = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
         f"sap-cloud-sdk=={sdk_version}", "--dest", str(cache)],
        capture_output=True,
        text=True,
        timeout=600,
    )  # fmt: skip
    found = sorted(cache.glob(f"sap_cloud_sdk-{sdk_version}.tar.gz"))
    if done.returncode != 0 or not found:
        reason = f"cannot download the sap-cloud-sdk {sdk_version} sdist: {done.stderr[-500:]}"
        if os.environ.get("AGW_REQUIRE_SDK_TESTS") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    return found[0]


def _run(source: Path, tmp_path: Path, name: str, *plugin: str) -> dict[str, str]:
    """{test id: passed | failed | skipped} of one run of the SDK's suites."""
    report = tmp_path / f"{name}.xml"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS_DIR), str(source)]))
    env.pop("AGW_CACHE_PATH", None)
    subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *plugin,
         f"--junitxml={report}", "--rootdir", str(source), *SUITES],
        cwd=source,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )  # fmt: skip
    outcomes: dict[str, str] = {}
    for case in ET.parse(report).getroot().iter("testcase"):
        test_id = f"{case.get('classname')}::{case.get('name')}"
        kinds = {child.tag for child in case}
        failed = kinds & {"failure", "error"}
        outcomes[test_id] = "failed" if failed else "skipped" if "skipped" in kinds else "passed"
    return outcomes


def test_the_sdks_unit_tests_pass_as_often_with_our_create_client(tmp_path: Path) -> None:
    sdk_version = version("sap-cloud-sdk")
    with tarfile.open(_sdist(sdk_version)) as archive:
        archive.extractall(tmp_path, filter="data")
    source = tmp_path / f"sap_cloud_sdk-{sdk_version}"

    stock = _run(source, tmp_path, "stock")
    ours = _run(source, tmp_path, "substituted", "-p", "_sdk_substitution")

    def passed(run: dict[str, str]) -> set[str]:
        return {test for test, outcome in run.items() if outcome == "passed"}

    counts = {
        "sdk_version": sdk_version,
        "tests": len(stock),
        "stock_passed": len(passed(stock)),
        "substituted_passed": len(passed(ours)),
    }
    if os.environ.get("AGW_SDK_TEST_REPORT"):
        Path(os.environ["AGW_SDK_TEST_REPORT"]).write_text(json.dumps(counts) + "\n")
    assert len(stock) > 500, counts  # the suites really ran
    assert set(ours) == set(stock), counts
    assert sorted(passed(stock) - passed(ours)) == [], counts
