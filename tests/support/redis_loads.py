"""Loads and stand-ins for the Redis resilience tests: a proxy on 127.0.0.1 that drips the
server's replies, the worker body of the many-processes-many-users stampede, counting the
connections a server sees, and the scale knob ``AGW_TEST_SCALE`` (1 = the full figures of
issue 20; the default runs a fraction of them on a small, busy machine)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import threading
import time
from typing import Any

from tests.support.fetches import count_fetch
from tests.support.procs import Worker
from tests.support.redis_hosts import become_host

SCALE_ENV = "AGW_TEST_SCALE"


def scaled(full: int, default_fraction: float) -> int:
    """``full`` times ``$AGW_TEST_SCALE`` (default ``default_fraction``), at least 1."""
    fraction = float(os.environ.get(SCALE_ENV) or default_fraction)
    return max(1, round(full * fraction))


def client_count(server: Any) -> int:
    """Connections the server has, not counting the one asking."""
    listing = server.admin("CLIENT", "LIST").decode(errors="replace")
    return sum(1 for line in listing.splitlines() if "id=" in line) - 1


class DripProxy:
    """Forwards 127.0.0.1:<port> to ``target_port``: requests at once, replies ``chunk``
    bytes every ``every`` seconds (a server that passes every socket timeout and still
    takes seconds to answer)."""

    def __init__(self, target_port: int, chunk: int = 32, every: float = 0.1) -> None:
        self.target_port, self.chunk, self.every = target_port, chunk, every
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._closing = threading.Event()
        self._socks: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def _accept(self) -> None:
        while not self._closing.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.target_port))
            self._socks += [client, server]
            for args in ((client, server, 65536, 0.0), (server, client, self.chunk, self.every)):
                threading.Thread(target=self._pump, args=args, daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, size: int, pause: float) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(size):
                dst.sendall(data)
                if pause:
                    time.sleep(pause)
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self._closing.set()
        self._listener.close()
        for s in self._socks:
            with contextlib.suppress(OSError):
                s.close()


def many_users(
    home: str, url: str, key: str, counter: str, users: int, delay: float, worker: Worker
) -> None:
    """One process of an agent asks for ``users`` user tokens at once (one event loop, a
    task each), all missing; reports the storage errors it saw."""
    become_host(home, url, key)
    from agw_persist_cache import PersistentTokenCache

    async def main() -> dict[str, Any]:
        async with PersistentTokenCache() as cache:

            def afetch_for(user: int) -> Any:
                async def afetch() -> dict[str, Any]:
                    count_fetch(counter)
                    await asyncio.sleep(delay)
                    return {"access_token": f"tok-{user}", "expires_in": 3600}

                return afetch

            worker.wait()
            tokens = await asyncio.gather(
                *(cache.auser_token(f"user-{u}", "scope", afetch_for(u)) for u in range(users))
            )
            stats = cache.stats()
            return {
                "wrong": [t for u, t in enumerate(tokens) if t != f"tok-{u}"],
                "storage_errors": stats.storage_errors,
            }

    worker.report(asyncio.run(main()))
