"""Producer for the celery deployment test: sends N tasks, waits for all, prints JSON.

Runs in its own process (cwd ``examples/celery``) so celery's imports and warnings stay
out of the pytest process.
"""

from __future__ import annotations

import json
import sys

from celery.result import ResultSet
from tasks import call_gateway

count = int(sys.argv[1])
results = ResultSet([call_gateway.delay(n) for n in range(count)])
values = results.get(timeout=90, interval=0.05)
print(json.dumps(values))
