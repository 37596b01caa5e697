"""Running the real server in-process on a loopback port, and raw socket clients for it."""

from __future__ import annotations

import socket
from collections.abc import Iterable
from typing import Any

from twisted.internet import defer, reactor, threads

from eth_twisted.link.netstring import NetstringDecoder, encode
from eth_twisted.server.service import ServerService, build_server
from tests.support import async_wait_until


def mysql_storage(db: dict[str, Any], redis: dict[str, Any] | None = None) -> dict[str, Any]:
    """Storage settings for build_server: the test's MariaDB database, and Redis under a prefix if given."""
    storage: dict[str, Any] = {
        "migrate": True,
        "mysql": {"host": db["host"], "port": db["port"], "user": db["user"], "password": db["password"],
                  "database": db["database"], "ssl": None, "connect_timeout": 5.0, "read_timeout": 10.0},
    }
    if redis is not None:
        storage["redis"] = {"host": redis["host"], "port": redis["port"], "db": 0, "prefix": redis["prefix"],
                            "username": None, "password": None, "reply_timeout": 2.0}
    return storage


@defer.inlineCallbacks
def start_server(storage: dict[str, Any], **overrides: Any) -> Any:
    """Build and start an eth-server on 127.0.0.1:<free port>; fire with (service, port)."""
    kwargs: dict[str, Any] = dict(
        reactor=reactor, listen="tcp:0:interface=127.0.0.1", stats_listen=None, storage=storage,
    )
    kwargs.update(overrides)
    server: ServerService = build_server(**kwargs)
    server.startService()
    yield async_wait_until(lambda: server.ready and server.listening_port is not None, 30,
                           what="server sinks ready")
    return server, server.listening_port.getHost().port


def exchange(port: int, frames: Iterable[bytes], half_close: bool = True, timeout: float = 15.0,
             host: str = "127.0.0.1", raw: bytes | None = None, expect: int | None = None) -> list[bytes]:
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


def exchange_in_thread(port: int, frames: Iterable[bytes], **kw: Any) -> defer.Deferred[list[bytes]]:
    """:func:`exchange` in a thread, so the in-process server keeps running."""
    return threads.deferToThread(exchange, port, list(frames), **kw)
