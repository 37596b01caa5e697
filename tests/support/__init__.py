"""Helpers shared by the tests: free ports, polling waits, private services.

Waits poll a condition until a deadline; no test sleeps a fixed time hoping
something happened.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from twisted.internet import defer, reactor, task

ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
"""The bin directory of the Python running the tests: ``eth`` and ``twistd`` are beside it
(``.venv/bin`` on a checkout, ``/opt/eth-twisted/venv/bin`` in the test image)."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago on ``host``."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_until(
    predicate: Callable[[], Any], timeout: float = 10.0, interval: float = 0.05, what: str = ""
) -> Any:
    """Poll ``predicate`` (blocking) until it returns a truthy value; fail at the deadline."""
    deadline = time.monotonic() + timeout
    last_error: BaseException | None = None
    while True:
        try:
            value = predicate()
            if value:
                return value
        except Exception as e:  # noqa: BLE001 - reported at the deadline
            last_error = e
        if time.monotonic() > deadline:
            detail = f" (last error: {last_error!r})" if last_error else ""
            raise AssertionError(
                f"timed out after {timeout}s waiting for {what or predicate}{detail}"
            )
        time.sleep(interval)


@defer.inlineCallbacks
def async_wait_until(
    predicate: Callable[[], Any], timeout: float = 10.0, interval: float = 0.02, what: str = ""
) -> Any:
    """Like :func:`wait_until`, for tests running on the reactor.

    ``predicate`` may return a Deferred.
    """
    deadline = time.monotonic() + timeout
    last_error: BaseException | None = None
    while True:
        try:
            value = yield defer.maybeDeferred(predicate)
            if value:
                return value
        except Exception as e:  # noqa: BLE001
            last_error = e
        if time.monotonic() > deadline:
            detail = f" (last error: {last_error!r})" if last_error else ""
            raise AssertionError(
                f"timed out after {timeout}s waiting for {what or predicate}{detail}"
            )
        yield task.deferLater(reactor, interval, lambda: None)


def resp_encode(args: Any) -> bytes:
    """A Redis command as RESP: an array of bulk strings."""
    parts = [a if isinstance(a, bytes) else str(a).encode() for a in args]
    return b"*%d\r\n" % len(parts) + b"".join(b"$%d\r\n%s\r\n" % (len(p), p) for p in parts)


class RespReader:
    """Reads RESP replies from a blocking socket (bulk strings as bytes, errors raised)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""

    def _fill(self, needed: int | None = None) -> None:
        while (b"\r\n" not in self.buf) if needed is None else (len(self.buf) < needed):
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("redis closed the connection")
            self.buf += chunk

    def reply(self) -> Any:
        self._fill()
        line, _, self.buf = self.buf.partition(b"\r\n")
        kind, rest = line[:1], line[1:]
        if kind == b"+":
            return rest.decode()
        if kind == b"-":
            raise RuntimeError(rest.decode())
        if kind == b":":
            return int(rest)
        if kind in (b"$", b"*"):
            n = int(rest)
            if n < 0:
                return None
            if kind == b"*":
                return [self.reply() for _ in range(n)]
            self._fill(n + 2)
            data, self.buf = self.buf[:n], self.buf[n + 2 :]
            return data
        raise RuntimeError(f"unexpected RESP reply {line!r}")


def provision_mysql_user(socket_path: str, user: str, password: str) -> None:
    """Create (or reset) the tests' MariaDB user as root over the local socket.

    Root over TCP is not relied on. The user may create and drop databases
    named ``eth_test_*`` (the tests' and the benchmark's own) and nothing else.
    """
    import pymysql

    root = pymysql.connect(unix_socket=socket_path, user="root", connect_timeout=5, autocommit=True)
    try:
        with root.cursor() as c:
            for host in ("127.0.0.1", "localhost", "::1"):
                c.execute(
                    "CREATE USER IF NOT EXISTS %s@%s IDENTIFIED BY %s", (user, host, password)
                )
                c.execute("ALTER USER %s@%s IDENTIFIED BY %s", (user, host, password))
                c.execute("GRANT ALL PRIVILEGES ON `eth\\_test\\_%%`.* TO %s@%s", (user, host))
    finally:
        root.close()


def redis_command(host: str, port: int, *args: Any, timeout: float = 5.0) -> Any:
    """One blocking Redis command over a fresh socket, for inspecting what the code under test wrote."""
    with socket.create_connection((host, port), timeout=timeout) as s:
        s.sendall(resp_encode(args))
        return RespReader(s).reply()


def stop_process(proc: subprocess.Popen[bytes] | None, grace: float = 5.0) -> None:
    """Terminate ``proc`` if it still runs: SIGTERM, then SIGKILL after ``grace`` seconds."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


def wait_for_port(host: str, port: int, timeout: float = 10.0) -> None:
    """Block until something accepts TCP connections on ``host:port``."""

    def ready() -> bool:
        with socket.socket() as s:
            s.settimeout(0.2)
            return s.connect_ex((host, port)) == 0

    wait_until(ready, timeout, what=f"{host}:{port} to accept connections")


SHARED_REDIS_HOST = os.environ.get("ETH_TEST_REDIS_HOST", "127.0.0.1")
"""Where the shared Redis the suite was given runs (``redis`` under docker compose)."""
PRIVATE_REDIS_PORTS: set[int] = set()
"""Loopback ports of the private redis-servers this process started."""


def redis_host_for(port: int) -> str:
    """The host of the Redis on ``port``: loopback for a private one, else the shared Redis's host."""
    return "127.0.0.1" if port in PRIVATE_REDIS_PORTS else SHARED_REDIS_HOST


class PrivateRedis:
    """A redis-server of the test's own on a free port (never the machine's shared one)."""

    def __init__(self, directory: str | None = None) -> None:
        self.port = free_port()
        PRIVATE_REDIS_PORTS.add(self.port)
        self.dir = directory or tempfile.mkdtemp(prefix="eth-redis-")
        self.proc: subprocess.Popen[bytes] | None = None
        self.logfile = os.path.join(self.dir, "redis.log")

    def start(self) -> None:
        """Start (or restart) it, empty unless its directory has data, and wait for PONG."""
        exe = shutil.which("redis-server")
        if exe is None:
            raise AssertionError(
                "redis-server is not installed: run ./scripts/test, which installs it"
            )
        self.proc = subprocess.Popen(
            [
                exe,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                self.dir,
                "--logfile",
                self.logfile,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_until(self.ping, 10, what=f"private redis on {self.port}")

    def ping(self) -> bool:
        with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` and, for fatal signals, wait for the process to go."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            if sig in (signal.SIGKILL, signal.SIGTERM):
                self.proc.wait(10)

    def restart_empty(self) -> None:
        """SIGKILL it and start a fresh, empty one on the same port."""
        self.kill()
        self.start()

    def stop(self) -> None:
        self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


def anvil_binary() -> str:
    """Path of the anvil binary: $ETH_ANVIL, node_modules, or PATH."""
    candidates = [
        os.environ.get("ETH_ANVIL", ""),
        str(ROOT / "node_modules/@foundry-rs/anvil-linux-amd64/bin/anvil"),
        shutil.which("anvil") or "",
    ]
    for c in candidates:
        if c and os.access(c, os.X_OK):
            return c
    raise AssertionError(
        "anvil not found: run ./scripts/test (it runs `npm install @foundry-rs/anvil-linux-amd64`) "
        "or set ETH_ANVIL"
    )


class Anvil:
    """A real Ethereum dev node on a free loopback port."""

    def __init__(
        self,
        block_time: float | None = 1.0,
        chain_id: int | None = None,
        extra: Sequence[str] = (),
    ) -> None:
        self.block_time = block_time
        self.chain_id = chain_id
        self.extra = list(extra)
        """More anvil arguments (``--slots-in-an-epoch 1``, ``--state PATH``)."""
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self._id = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        """The same port's WebSocket (anvil serves HTTP and WS on one port)."""
        return f"ws://127.0.0.1:{self.port}"

    def start(self) -> None:
        args = [anvil_binary(), "--host", "127.0.0.1", "--port", str(self.port), "--silent"]
        if self.block_time:
            args += ["--block-time", str(self.block_time)]
        if self.chain_id is not None:
            args += ["--chain-id", str(self.chain_id)]
        args += self.extra
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until(lambda: self.rpc("eth_chainId") is not None, 15, what="anvil to answer")

    def rpc(self, method: str, *params: Any) -> Any:
        """One blocking JSON-RPC call; raises on an error object."""
        self._id += 1
        body = json.dumps(
            {"jsonrpc": "2.0", "id": self._id, "method": method, "params": list(params)}
        )
        req = urllib.request.Request(self.url, body.encode(), {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=5) as resp:
            reply = json.loads(resp.read())
        if "error" in reply:
            raise RuntimeError(f"anvil {method}: {reply['error']}")
        return reply["result"]

    def head(self) -> int:
        return int(self.rpc("eth_blockNumber"), 16)

    def mine(self, blocks: int = 1) -> None:
        self.rpc("anvil_mine", hex(blocks))

    def block(self, number: int | str) -> dict[str, Any]:
        """``eth_getBlockByNumber`` of a number or a tag."""
        tag = hex(number) if isinstance(number, int) else number
        return self.rpc("eth_getBlockByNumber", tag, False)  # type: ignore[no-any-return]

    def chain(self, first: int, last: int) -> dict[int, str]:
        """The node's canonical hashes from ``first`` to ``last``."""
        return {n: self.block(n)["hash"] for n in range(first, last + 1)}

    def stop(self) -> None:
        stop_process(self.proc)


def hash_count(sink: Any) -> Any:
    """How many hashes a Redis sink's ``hashes`` key holds (ZCARD, through the sink's own connection)."""
    return sink._redis.execute_command("ZCARD", sink.hashes_key).addCallback(int)
