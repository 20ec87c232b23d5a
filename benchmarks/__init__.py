"""Measured comparisons of agw-persist-cache against its floor and its peers (not tests).

``python -m benchmarks`` runs them all and writes ``benchmarks/RESULTS.md``;
``python -m benchmarks agent storedown --merge`` runs two and replaces only theirs:

1. sync hit vs the raw sqlite3 + AES-256-GCM floor, at 100 and 100,000 rows;
2. async hit vs the same floor;
3. set vs raw seal + INSERT OR REPLACE;
4. N processes reading (then with one writer) vs N processes of the floor;
5. a cold stampede across processes vs a per-process in-memory cache;
6. prune cost and set latency at 100,000 rows vs 100;
7. diskcache and msal-extensions doing the same hit and set;
8. distinct cold users: one fetch each, no user waiting for another;
9. many hosts on one Redis;
10. a whole agent (gunicorn + UvicornWorkers + the real SDK), stock vs drop-in;
11. token requests with the store down, against the stock SDK's per-process dict.
"""
