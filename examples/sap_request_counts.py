"""Count IAS token requests: stock ``sap-cloud-sdk`` Agent Gateway client vs the one-import drop-in.

Run in a clone after ``pip install -e '.[sap]'`` (the stand-in lives in ``tests/support``)::

    python examples/sap_request_counts.py            # 4 processes x 20 coroutines, then a restart

Each spawned process is one agent worker: it creates one client and starts its coroutines
together (behind a cross-process barrier), each discovering tools with the system token and
with one of a few users' tokens. The identity service is a counting stand-in (the real one
cannot run here); binding discovery, the SDK's token logic and ``list_mcp_tools`` are the real
SDK. Then one more process starts, as after a restart, and does the same.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

from tests.support.sap_standin import (
    TokenRequest,
    run_agents,
    write_customer_binding,
)

FLAVOURS = {
    "stock sap-cloud-sdk": "sap_cloud_sdk.agentgateway",
    "agw_persist_cache drop-in": "agw_persist_cache.integrations.sap",
}
USERS = ("alice", "bob", "carol")


def _split(requests: Sequence[TokenRequest]) -> tuple[int, int]:
    exchanges = sum(r.is_exchange for r in requests)
    return len(requests) - exchanges, exchanges


def measure(processes: int, coroutines: int, latency: float) -> list[list[str]]:
    """Rows of the result table: one column per flavour."""
    columns: list[list[int]] = []
    for module_name in FLAVOURS.values():
        with tempfile.TemporaryDirectory(prefix="agw-counts-") as tmp:
            root = Path(tmp)
            write_customer_binding(root / "bindings", gateway_url="https://agw.invalid")
            os.environ["SERVICE_BINDING_ROOT"] = str(root / "bindings")
            os.environ["AGW_CACHE_PATH"] = str(root / "tokens.db")
            counter = root / "requests.log"
            cold, restart = (
                _split(
                    run_agents(
                        module_name,
                        counter,
                        processes=n,
                        coroutines=coroutines,
                        users=USERS,
                        latency=latency,
                    )
                )
                for n in (processes, 1)  # all workers start together, then one restarts
            )
            columns.append([*cold, *restart])
    labels = [
        f"cold start, {processes} processes x {coroutines} coroutines: system token requests",
        f"cold start: user token exchanges ({len(USERS)} users)",
        "restarted process: system token requests",
        "restarted process: user token exchanges",
    ]
    return [[label, *(str(col[i]) for col in columns)] for i, label in enumerate(labels)]


def main(argv: Sequence[str] | None = None) -> None:
    """Parse arguments, measure, print a markdown table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, default=4)
    parser.add_argument("--coroutines", type=int, default=20)
    parser.add_argument("--latency", type=float, default=0.2, help="simulated IAS round trip (s)")
    args = parser.parse_args(argv)
    rows = measure(args.processes, args.coroutines, args.latency)
    header = ["token requests to IAS", *FLAVOURS]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, ["-" * w for w in widths], *rows]:
        cells = [
            c.ljust(w) if j == 0 else c.rjust(w)
            for j, (c, w) in enumerate(zip(row, widths, strict=True))
        ]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
