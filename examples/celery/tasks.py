"""A celery app whose tasks need an Agent Gateway token; all prefork children share one.

Uses the package's Agent Gateway layer: customer credentials from the environment
(transparent mode, ``INTEGRATION_*``) or a service binding, an IAS client, and the
host-wide cache. The broker is kombu's filesystem transport and the result backend a
directory, so no server is needed. Run: see README.md here.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from celery import Celery
from fs_broker import AtomicFilesystemTransport

from agw_persist_cache import PersistentTokenCache
from agw_persist_cache.agentgateway import AgentGatewayTokens, CustomerCredentials, IasTokenClient

DATA = Path(os.environ.get("AGW_EXAMPLE_BROKER_DIR", "/tmp/agw-celery-example"))
for folder in ("queue", "control", "results"):
    (DATA / folder).mkdir(parents=True, exist_ok=True)


app = Celery("tasks", broker="filesystem://", backend=f"file://{DATA / 'results'}")
app.conf.update(
    broker_transport=AtomicFilesystemTransport,
    broker_transport_options={
        "data_folder_in": str(DATA / "queue"),
        "data_folder_out": str(DATA / "queue"),
        "control_folder": str(DATA / "control"),
        "polling_interval": 0.05,
    },
    broker_connection_retry_on_startup=True,
    worker_enable_remote_control=False,
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
)

# Built in the worker's main process; cache and IAS client reconnect in each forked child.
# Cache path and key come from AGW_CACHE_PATH / AGW_CACHE_KEY, else ~/.cache/agw-persist-cache/.
tokens = AgentGatewayTokens(PersistentTokenCache(), IasTokenClient(CustomerCredentials.detect()))


@app.task
def call_gateway(n: int) -> dict[str, Any]:
    """A task that needs the token; returns a fingerprint, never the token itself."""
    token = tokens.system_token()  # one IAS request per host while the token is valid
    # A real task sends `Authorization: Bearer <token>` to tokens.gateway_url here.
    fingerprint = hashlib.sha256(token.encode()).hexdigest()[:12]
    return {"n": n, "pid": os.getpid(), "token_sha256": fingerprint}
