"""The stats site of a real server (SQLite, loopback port) attacked with raw sockets.

Issue 13, items 14-19, live: every attack runs while a well-behaved client on
another loopback address keeps getting ``/healthz`` answered.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer, threads

from tests.live_helpers import start_server
from tests.support import async_wait_until, free_port

pytestmark = pytest.mark.live

TOKEN = "live-token"


def raw_request(port: int, data: bytes, source: str = "127.0.0.1", timeout: float = 10.0) -> bytes:
    """Send ``data`` on a fresh connection and read until the server closes (or the timeout)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout, source_address=(source, 0)) as s:
        s.sendall(data)
        chunks = []
        try:
            while chunk := s.recv(65536):
                chunks.append(chunk)
        except (ConnectionResetError, TimeoutError):
            pass
        return b"".join(chunks)


def status_of(answer: bytes) -> int:
    """The status code of a raw HTTP answer (0 when there is none)."""
    if not answer.startswith(b"HTTP/1."):
        return 0
    return int(answer.split(b" ", 2)[1])


def body_of(answer: bytes) -> Any:
    """The JSON body of a raw HTTP answer."""
    return json.loads(answer.partition(b"\r\n\r\n")[2])


def get(port: int, path: str, source: str = "127.0.0.2", token: str | None = None) -> int:
    """A well-behaved one-shot GET from ``source``; its status."""
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    request = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{auth}Connection: close\r\n\r\n".encode()
    return status_of(raw_request(port, request, source))


@defer.inlineCallbacks
def start_site(tmp_path: Path, **kw: Any) -> Any:
    """A real server on SQLite with its stats site (token required); fire with (server, web port)."""
    web = free_port()
    storage = {"migrate": True, "sqlite": str(tmp_path / "eth-server.sqlite3")}
    server, _port = yield start_server(storage, stats_listen=f"tcp:{web}:interface=127.0.0.1",
                                       stats_token=TOKEN, **kw)
    yield async_wait_until(lambda: threads.deferToThread(get, web, "/healthz").addCallback(lambda c: c == 200),
                           10, what="stats site to answer")
    return server, web


@pytest_twisted.inlineCallbacks
def test_non_utf8_authorization_is_a_401_live(tmp_path: Path):
    """A raw request whose Authorization is not UTF-8 gets 401; the site keeps serving."""
    server, web = yield start_site(tmp_path)
    try:
        request = (b"GET /api/stats HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer \xff\xfe\xfd\r\n"
                   b"Connection: close\r\n\r\n")
        answer = yield threads.deferToThread(raw_request, web, request)
        assert status_of(answer) == 401, answer[:200]
        assert body_of(answer)["error"] == "unauthorized"
        assert (yield threads.deferToThread(get, web, "/api/stats", token=TOKEN)) == 200
        assert (yield threads.deferToThread(get, web, "/healthz")) == 200
    finally:
        yield server.stopService()
