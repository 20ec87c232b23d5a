"""A real ``redis-server`` for the tests: started in a temporary directory on a free port
(and a unix socket), no persistence, stopped at the end. Also an ACL variant (a user with a
password, the default user off) and a TLS variant (certificates made at test time).

Without the binary the Redis tests skip with a reason naming the command that installs it;
``AGW_REQUIRE_REDIS=1`` (set by CI) turns that skip into a failure.

Fixtures (import the ``*_fixture`` names into a test module to use them):
``redis_server`` (one server per session) and ``redis_url`` (its URL, flushed per test).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

REDIS_SERVER = shutil.which("redis-server")
REQUIRE_ENV = "AGW_REQUIRE_REDIS"
INSTALL_HINT = "apt-get install -y redis-server"


def require_redis_server() -> str:
    """The binary's path; else skip (or fail, when ``AGW_REQUIRE_REDIS=1``)."""
    if REDIS_SERVER is None:
        reason = f"redis-server is not installed (install it: {INSTALL_HINT})"
        if os.environ.get(REQUIRE_ENV) == "1":
            pytest.fail(f"{reason}; {REQUIRE_ENV}=1 requires the Redis tests to run")
        pytest.skip(reason)
    return REDIS_SERVER


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _send(sock: socket.socket, *args: str) -> bytes:
    parts = [f"*{len(args)}\r\n".encode()]
    for a in args:
        data = a.encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    sock.sendall(b"".join(parts))
    return sock.recv(65536)


class RedisServer:
    """One ``redis-server`` process. ``url`` is what a cache is given."""

    def __init__(
        self,
        directory: Path,
        *,
        args: Sequence[str] = (),
        scheme: str = "redis",
        userinfo: str = "",
        query: str = "",
    ) -> None:
        self.binary = require_redis_server()
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        # A short path of its own: unix socket paths are limited to 107 bytes.
        self.socket_path = Path(tempfile.mkdtemp(prefix="agw-redis-")) / "redis.sock"
        self.args = list(args)
        self.scheme = scheme
        self.userinfo = userinfo
        self.query = query
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        at = f"{self.userinfo}@" if self.userinfo else ""
        q = f"?{self.query}" if self.query else ""
        return f"{self.scheme}://{at}127.0.0.1:{self.port}/0{q}"

    @property
    def unix_url(self) -> str:
        return f"unix://{self.socket_path}?db=0"

    def _command(self) -> list[str]:
        port_args = ["--port", str(self.port)]
        if self.scheme == "rediss":
            port_args = ["--port", "0", "--tls-port", str(self.port)]
        return [
            self.binary,
            *port_args,
            "--bind",
            "127.0.0.1",
            "--unixsocket",
            str(self.socket_path),
            "--unixsocketperm",
            "700",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(self.dir),
            "--logfile",
            str(self.dir / "redis.log"),
            *self.args,
        ]

    def start(self) -> RedisServer:
        self.proc = subprocess.Popen(self._command(), stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                log = (self.dir / "redis.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"redis-server exited with {self.proc.returncode}: {log}")
            if self.ping():
                return self
            time.sleep(0.02)
        raise RuntimeError("redis-server did not answer PING within 20 s")

    def ping(self) -> bool:
        """Whether the server answers on its unix socket (any answer: it is up)."""
        try:
            with socket.socket(socket.AF_UNIX) as s:
                s.settimeout(1.0)
                s.connect(str(self.socket_path))
                return bool(_send(s, "PING"))
        except OSError:
            return False

    def admin(self, *args: str) -> bytes:
        """One raw command over the unix socket, as the default user (ACL tests: off)."""
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(5.0)
            s.connect(str(self.socket_path))
            return _send(s, *args)

    def kill(self) -> None:
        """SIGKILL: the server vanishes mid-request, as in a crash."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.kill()
            self.proc.wait(10)
        with contextlib.suppress(OSError):
            self.socket_path.unlink()

    def freeze(self) -> None:
        """SIGSTOP: connections stay open, nothing answers."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def restart(self) -> RedisServer:
        """A fresh, empty server on the same port (no persistence)."""
        self.kill()
        return self.start()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None


def acl_server(directory: Path, user: str, password: str) -> RedisServer:
    """A server whose default user is off: only ``user``/``password`` may do anything."""
    args = ["--user", user, "on", f">{password}", "~*", "&*", "+@all", "--user", "default", "off"]
    server = RedisServer(directory, args=args, userinfo=f"{user}:{password}")
    return server


def tls_server(directory: Path, names: Sequence[str] = ("127.0.0.1", "localhost")) -> RedisServer:
    """A TLS-only server with a certificate for ``names`` from a CA made now (trustme)."""
    import trustme

    ca = trustme.CA()
    leaf = ca.issue_cert(*names)
    directory.mkdir(parents=True, exist_ok=True)
    ca_file, cert_file, key_file = (directory / n for n in ("ca.pem", "cert.pem", "key.pem"))
    ca.cert_pem.write_to_path(str(ca_file))
    leaf.cert_chain_pems[0].write_to_path(str(cert_file))
    leaf.private_key_pem.write_to_path(str(key_file))
    args = [
        "--tls-cert-file",
        str(cert_file),
        "--tls-key-file",
        str(key_file),
        "--tls-ca-cert-file",
        str(ca_file),
        "--tls-auth-clients",
        "no",
    ]
    return RedisServer(directory, args=args, scheme="rediss", query=f"ssl_ca_certs={ca_file}")


def cluster_pair(directory: Path) -> tuple[RedisServer, RedisServer]:
    """A two-node Redis Cluster: slots 0-8191 on the first node, 8192-16383 on the second."""
    nodes, bus = [], []
    for name in ("node-a", "node-b"):
        bus.append(str(free_port()))  # not port + 10000, which may pass 65535
        args = ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"]
        nodes.append(RedisServer(directory / name, args=[*args, "--cluster-port", bus[-1]]).start())
    a, b = nodes
    try:
        assert a.admin("CLUSTER", "ADDSLOTSRANGE", "0", "8191").startswith(b"+OK")
        assert b.admin("CLUSTER", "ADDSLOTSRANGE", "8192", "16383").startswith(b"+OK")
        meet = a.admin("CLUSTER", "MEET", "127.0.0.1", str(b.port), bus[1])
        assert meet.startswith(b"+OK"), meet
        deadline = time.monotonic() + 30
        while not all(b"cluster_state:ok" in n.admin("CLUSTER", "INFO") for n in nodes):
            if time.monotonic() > deadline:
                raise RuntimeError("the two-node cluster did not reach cluster_state:ok")
            time.sleep(0.1)
    except BaseException:
        a.stop()
        b.stop()
        raise
    return a, b


def flush(server: RedisServer) -> None:
    reply = server.admin("FLUSHALL")
    assert reply.startswith(b"+OK"), reply


@pytest.fixture(scope="session", name="redis_server")
def redis_server_fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One ``redis-server`` for the whole session."""
    require_redis_server()
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(name="redis_url")
def redis_url_fixture(redis_server: RedisServer) -> str:
    """The session server's URL, emptied for this test."""
    flush(redis_server)
    return redis_server.url


@pytest.fixture(name="own_redis")
def own_redis_fixture(tmp_path: Path) -> Iterator[RedisServer]:
    """A server of this test's own, for faults (kill, freeze, restart)."""
    server = RedisServer(tmp_path / "own-redis").start()
    try:
        yield server
    finally:
        server.stop()


def count_commands(monkeypatch: pytest.MonkeyPatch) -> Any:
    """How many commands the Redis drivers sent from now on."""
    from agw_persist_cache.backends import redis as driver

    counts = [0]
    send, asend = driver._send, driver._asend

    def counting(*args: Any) -> Any:
        counts[0] += 1
        return send(*args)

    async def acounting(*args: Any) -> Any:
        counts[0] += 1
        return await asend(*args)

    monkeypatch.setattr(driver, "_send", counting)
    monkeypatch.setattr(driver, "_asend", acounting)
    return lambda: counts[0]
