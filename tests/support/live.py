"""Running the real server in-process on a loopback port, and raw socket clients for it."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from twisted.internet import defer, reactor, threads

from eth_twisted.link.netstring import NetstringDecoder, encode
from eth_twisted.model import sha256_hex
from eth_twisted.server.service import ServerService, ServerSettings, build_server
from eth_twisted.sinks import StorageSettings
from eth_twisted.sinks.redis import RedisSettings
from eth_twisted.sinks.sql.sqlite import SQLiteSettings
from eth_twisted.web.app import SiteSettings
from tests.support import async_wait_until
from tests.support.mysql import settings_for


def sqlite_storage(path: Any) -> StorageSettings:
    """Storage settings for the server: the embedded SQLite record at ``path``."""
    return StorageSettings(sqlite=SQLiteSettings(sqlite=str(path)))


def mysql_storage(db: dict[str, Any], redis: dict[str, Any] | None = None) -> StorageSettings:
    """Storage settings for the server: the test's MariaDB database, and Redis under a prefix if given."""
    storage = StorageSettings(
        use_mysql=True,
        mysql=settings_for(db, mysql_read_timeout=10.0),
    )
    if redis is not None:
        storage.use_redis = True
        storage.redis = RedisSettings(
            redis_host=redis["host"],
            redis_port=redis["port"],
            redis_prefix=redis["prefix"],
            redis_timeout=2.0,
        )
    return storage


@defer.inlineCallbacks
def start_server(storage: StorageSettings, **fields: Any) -> Any:
    """Build and start an eth-server on 127.0.0.1:<free port>; fire with (service, port).

    ``fields`` are :class:`ServerSettings` fields (``limits``, ``batch``, ``site``, ``tls``, ...);
    the stats site is off unless ``site`` names one.
    """
    fields.setdefault("site", SiteSettings(stats=None))
    fields.setdefault("listen", "tcp:0:interface=127.0.0.1")
    settings = ServerSettings(storage=storage, **fields)
    server: ServerService = build_server(settings, reactor=reactor)
    server.startService()
    yield async_wait_until(
        lambda: server.ready and server.port is not None, 30, what="server sinks ready"
    )
    return server, server.port.getHost().port


def exchange(
    port: int,
    frames: Iterable[bytes],
    half_close: bool = True,
    timeout: float = 15.0,
    host: str = "127.0.0.1",
    raw: bytes | None = None,
    expect: int | None = None,
) -> list[bytes]:
    """Blocking client: send the frames (or ``raw`` bytes), read replies until EOF or ``expect``."""
    frames = list(frames)
    with socket.create_connection((host, port), timeout=timeout) as s:
        s.sendall(raw if raw is not None else b"".join(encode(f) for f in frames))
        if half_close:
            s.shutdown(socket.SHUT_WR)
        decoder = NetstringDecoder(1 << 20)
        got: list[bytes] = []
        want = expect if expect is not None else (None if half_close else len(frames))
        while want is None or len(got) < want:
            chunk = s.recv(65536)
            if not chunk:
                break
            got += decoder.feed(chunk)
        return got


def exchange_in_thread(
    port: int, frames: Iterable[bytes], **kw: Any
) -> defer.Deferred[list[bytes]]:
    """:func:`exchange` in a thread, so the in-process server keeps running."""
    return threads.deferToThread(exchange, port, list(frames), **kw)


def rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


class GoodClient(threading.Thread):
    """Sends a fresh message every 20 ms from 127.0.0.2 on one connection and checks every reply."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.stop = threading.Event()
        self.sent = 0
        self.ok = 0
        self.bad: list[bytes] = []

    def run(self) -> None:
        s = socket.socket()
        s.bind(("127.0.0.2", 0))
        s.connect(("127.0.0.1", self.port))
        s.settimeout(10)
        decoder = NetstringDecoder(1024)
        while not self.stop.is_set():
            payload = b"good %d %f" % (self.sent, time.time())
            s.sendall(encode(payload))
            self.sent += 1
            got: list[bytes] = []
            while not got:
                chunk = s.recv(4096)
                if not chunk:
                    self.bad.append(b"closed")
                    return
                got = decoder.feed(chunk)
            for reply in got:
                if reply == b"OK " + sha256_hex(payload).encode():
                    self.ok += 1
                else:
                    self.bad.append(reply)
            time.sleep(0.02)
        s.close()

    def finish(self, timeout: float = 15) -> defer.Deferred[None]:
        """Stop after the exchange in flight; fires once the thread has ended.

        It waits in a thread: the server under test runs on this process's reactor, which
        must keep turning to answer the last message.
        """
        self.stop.set()
        return threads.deferToThread(self.join, timeout)
