"""Machine facts and the markdown of RESULTS.md."""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import platform
import re
import sqlite3
import ssl
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

from ._harness import Section, Table, timer_overhead_ns

PACKAGES = (
    "agw-persist-cache",
    "cryptography",
    "aiosqlite",
    "filelock",
    "httpx",
    "diskcache",
    "msal-extensions",
    "msal",
)
ROOT = Path(__file__).resolve().parent.parent


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


CORE = (
    "__init__",
    "_cache",
    "_config",
    "_crypto",
    "_errors",
    "_expiry",
    "_flight",
    "_locks",
    "backends/contract",
    "backends/sqlite",
    "backends/_sqlite_files",
    "backends/_sqlite_pool",
    "backends/_sqlite_schema",
    "backends/_sqlite_sql",
    "backends/_filelocks",
    "backends/_ofdlocks",
    "_fork",
    "_steps",
)


def _core_fingerprint() -> str:
    """SHA-256 prefix over the core's modules and migrations: which core this run measured."""
    digest = hashlib.sha256()
    package = ROOT / "agw_persist_cache"
    files = [package / f"{name}.py" for name in CORE] + sorted((ROOT / "migrations").glob("*.sql"))
    for path in files:
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:12]


def _git_head() -> str:
    try:
        done = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except OSError:
        return "unknown"
    return done.stdout.strip() or "unknown"


def machine_facts() -> list[tuple[str, str]]:
    """CPU, cores, load, Python, SQLite, OpenSSL and package versions, as (name, value)."""
    from cryptography.hazmat.backends.openssl.backend import backend

    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return [
        ("date (UTC)", time.strftime("%Y-%m-%d %H:%M", time.gmtime())),
        ("CPU", _cpu_model()),
        ("cores", str(os.cpu_count())),
        ("load average at start (1, 5, 15 min)", load),
        ("OS", platform.platform()),
        ("Python", f"{platform.python_implementation()} {platform.python_version()}"),
        ("SQLite (sqlite3 module)", sqlite3.sqlite_version),
        ("OpenSSL (cryptography)", backend.openssl_version_text()),
        ("OpenSSL (ssl module)", ssl.OPENSSL_VERSION),
        *((name, _version(name)) for name in PACKAGES),
        ("git HEAD (uncommitted changes not included)", _git_head()),
        ("core fingerprint (sha256 of the core modules + migrations)", _core_fingerprint()),
        ("perf_counter_ns pair overhead (in every sample)", f"{timer_overhead_ns()} ns"),
    ]


def _table(table: Table) -> list[str]:
    lines = [f"**{table.caption}**", "", "| " + " | ".join(table.columns) + " |"]
    lines.append("|" + "|".join("---" for _ in table.columns) + "|")
    lines.extend("| " + " | ".join(row) + " |" for row in table.rows)
    return [*lines, ""]


def _target_rows(sections: Sequence[Section]) -> list[str]:
    """The rows of the Targets table: every ratio that has a target."""
    return [
        f"| {r.label} | {r.value_text} | {r.spread_text} | {r.target_text} | {r.verdict} |"
        for section in sections
        for r in section.ratios
        if r.target is not None
    ]


def _section_lines(section: Section) -> list[str]:
    """One section: heading, method, tables, untargeted ratios, notes, time."""
    lines = [f"## {section.title}", "", section.method, ""]
    for table in section.tables:
        lines += _table(table)
    others = [r for r in section.ratios if r.target is None]
    if others:
        lines += ["Other ratios (median of rounds):", ""]
        lines += [f"- {r.label}: {r.value_text}" for r in others]
        lines.append("")
    if section.notes:
        lines += ["Notes:", ""]
        lines += [f"- {note}" for note in section.notes]
        lines.append("")
    lines.append(f"_Section time: {section.seconds:.0f} s._")
    return lines


def render(
    sections: Sequence[Section],
    facts: Sequence[tuple[str, str]],
    *,
    plan_name: str,
    command: str,
    seconds: float,
    skipped: Sequence[str] = (),
) -> str:
    """The whole RESULTS.md: facts, the targets summary, then every section."""
    lines = [
        "# agw-persist-cache benchmarks",
        "",
        f"Written by `{command}` ({plan_name} plan, {seconds:.0f} s). Numbers from one noisy "
        "machine mean something only as ratios within this run: every subject ran next to its "
        "baseline in interleaved rounds, and a ratio is the median of the per-round ratios of "
        "per-round medians. Latencies are per call (`time.perf_counter_ns` around each call, "
        "garbage collector off during timed loops).",
        "",
        "## Machine",
        "",
        "| fact | value |",
        "|---|---|",
        *(f"| {name} | {value} |" for name, value in facts),
        "",
        "## Targets",
        "",
        "| measure | result (median of rounds) | rounds (min - max) | target | verdict |",
        "|---|---|---|---|---|",
        *_target_rows(sections),
        "",
    ]
    for name in skipped:
        lines.append(f"- not run: {name}")
    for section in sections:
        lines += ["", *_section_lines(section)]
    return "\n".join(lines) + "\n"


MERGED_FACTS = (
    "date (UTC)",
    "load average at start (1, 5, 15 min)",
    "git HEAD (uncommitted changes not included)",
    "core fingerprint (sha256 of the core modules + migrations)",
)


def merge(
    existing: str,
    sections: Sequence[Section],
    facts: Sequence[tuple[str, str]],
    *,
    plan_name: str,
    command: str,
) -> str:
    """``existing`` RESULTS.md with ``sections`` replaced (or appended) and their target rows
    replaced in the Targets table; every other section stays as it was. Each merged section
    says which run measured it, since the Machine table describes the run that wrote the file.
    """
    blocks = re.split(r"(?m)^(?=## )", existing.rstrip("\n") + "\n")
    stamp = dict(facts)
    measured = ", ".join(f"{name} {stamp[name]}" for name in MERGED_FACTS if name in stamp)
    provenance = (
        f"_Measured by `{command}` ({plan_name} plan): {measured}. The Machine table above "
        "describes the run that wrote the rest of this file._"
    )
    labels = {r.label for section in sections for r in section.ratios}
    for i, block in enumerate(blocks):
        if block.startswith("## Targets"):
            kept = [
                line
                for line in block.rstrip("\n").split("\n")
                if not (line.startswith("| ") and line[2:].split(" | ")[0] in labels)
            ]
            end = max(j for j, line in enumerate(kept) if line.startswith("|")) + 1
            kept[end:end] = _target_rows(sections)
            blocks[i] = "\n".join(kept) + "\n\n"
    for section in sections:
        text = "\n".join([*_section_lines(section), "", provenance]) + "\n"
        heading = f"## {section.title}\n"
        at = [i for i, block in enumerate(blocks) if block.startswith(heading)]
        if at:
            blocks[at[0]] = text + "\n"
        else:
            blocks[-1] = blocks[-1].rstrip("\n") + "\n\n"
            blocks.append(text + "\n")
    return "".join(blocks).rstrip("\n") + "\n"
