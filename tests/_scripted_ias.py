"""An identity service on 127.0.0.1 that plays a script of answers and counts requests."""

from __future__ import annotations

import json
import socket
import socketserver
import struct
import threading


class ScriptedIas:
    """Answers token requests from ``script`` in order (the last answer repeats): an HTTP
    status, or ``"reset"`` (the connection is dropped with a TCP RST after the request)."""

    def __init__(self, script: list[int | str]) -> None:
        self.script = script
        self.hits = 0
        self._lock = threading.Lock()
        owner = self

        class Handler(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                length = 0
                while line := self.rfile.readline().strip():
                    name, _, value = line.partition(b":")
                    if name.lower() == b"content-length":
                        length = int(value)
                self.rfile.read(length)
                with owner._lock:
                    answer = owner.script[min(owner.hits, len(owner.script) - 1)]
                    owner.hits += 1
                if answer == "reset":
                    linger = struct.pack("ii", 1, 0)  # close() now sends RST, not FIN
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
                    return
                body = (
                    {"access_token": f"token-{owner.hits}", "expires_in": 3600}
                    if answer == 200
                    else {"error": "temporarily_unavailable" if answer != 400 else "invalid"}
                )
                raw = json.dumps(body).encode()
                self.wfile.write(
                    f"HTTP/1.1 {answer} X\r\nContent-Type: application/json\r\n"
                    f"Content-Length: {len(raw)}\r\nConnection: close\r\n\r\n".encode()
                    + raw
                )

        self._server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/oauth2/token"
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.05,), daemon=True
        )

    def __enter__(self) -> ScriptedIas:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()
