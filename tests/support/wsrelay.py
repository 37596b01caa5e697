"""A WebSocket-aware TCP relay for tests, in a thread of its own (it never needs the reactor).

``WSRelay(upstream_port)`` listens on a free loopback port and forwards every connection to
``127.0.0.1:upstream_port`` byte for byte. Switches, each safe to flip from any thread:

* ``drop_subscriptions = True``: server-to-client text frames holding ``eth_subscription``
  are dropped (server frames are unmasked: the relay parses the frame headers after the
  HTTP upgrade); replies, pings and pongs still pass. ``dropped`` counts them.
* ``stalled = True``: nothing is forwarded either way and connections stay open (a
  half-open path: only a heartbeat notices); ``False`` delivers what was held.
* ``cut()``: every connection is closed and the listener too (new connections are refused);
  ``heal()`` listens again on the same port.

With ``tls`` (a server ``ssl.SSLContext``) the relay terminates TLS: clients speak ``wss``
to it and it speaks plain ``ws`` to the node. ``tls_failures`` counts failed handshakes.
"""

from __future__ import annotations

import selectors
import socket
import ssl
import struct
import threading
from collections.abc import Callable
from typing import Any


def _nodelay(sock: socket.socket) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class ServerFrames:
    """Splits the server side of a WebSocket stream into the upgrade response and whole frames."""

    def __init__(self) -> None:
        self.buf = b""
        self.upgraded = False

    def feed(self, data: bytes) -> list[tuple[int | None, bytes]]:
        """(opcode, raw bytes) for each complete unit; opcode None for the HTTP response."""
        self.buf += data
        out: list[tuple[int | None, bytes]] = []
        if not self.upgraded:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return out
            out.append((None, self.buf[: end + 4]))
            self.buf = self.buf[end + 4 :]
            self.upgraded = True
        while len(self.buf) >= 2:
            b0, b1 = self.buf[0], self.buf[1]
            length = b1 & 0x7F
            at = 2
            if length == 126:
                if len(self.buf) < 4:
                    break
                (length,) = struct.unpack("!H", self.buf[2:4])
                at = 4
            elif length == 127:
                if len(self.buf) < 10:
                    break
                (length,) = struct.unpack("!Q", self.buf[2:10])
                at = 10
            if b1 & 0x80:
                at += 4
            if len(self.buf) < at + length:
                break
            out.append((b0 & 0x0F, self.buf[: at + length]))
            self.buf = self.buf[at + length :]
        return out

    @staticmethod
    def payload(frame: bytes) -> bytes:
        """The (unmasked) payload of one raw frame."""
        b1 = frame[1]
        length = b1 & 0x7F
        at = 2 + (2 if length == 126 else 8 if length == 127 else 0)
        if b1 & 0x80:
            mask, at = frame[at : at + 4], at + 4
            return bytes(c ^ mask[i % 4] for i, c in enumerate(frame[at:]))
        return frame[at:]


class _Pair:
    def __init__(self, client: socket.socket, upstream: socket.socket) -> None:
        self.client = client
        self.upstream = upstream
        self.frames = ServerFrames()

    def close(self) -> None:
        for s in (self.client, self.upstream):
            try:
                s.close()
            except OSError:
                pass


class WSRelay:
    """See the module docstring."""

    def __init__(
        self, upstream_port: int, host: str = "127.0.0.1", tls: ssl.SSLContext | None = None
    ) -> None:
        self.upstream = (host, upstream_port)
        self.tls = tls
        self.tls_failures = 0
        self.host = host
        self.port = 0
        self.drop_subscriptions = False
        self.stalled = False
        self.dropped = 0
        self.accepted = 0
        self._pairs: list[_Pair] = []
        self._listener: socket.socket | None = None
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._calls: list[Callable[[], None]] = []
        self._lock = threading.Lock()
        self._running = False
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """``ws://host:port`` of the relay (``wss://localhost:port`` with TLS)."""
        if self.tls is not None:
            return f"wss://localhost:{self.port}"
        return f"ws://{self.host}:{self.port}"

    @property
    def connections(self) -> int:
        """Relayed connections open now."""
        return len(self._pairs)

    def start(self) -> WSRelay:
        """Listen on a free port and start relaying."""
        self._listen()
        self._selector.register(self._wake_r, selectors.EVENT_READ, "wake")
        self._running = True
        self._thread = threading.Thread(target=self._loop, name="wsrelay", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Close everything and end the thread."""
        self._call(self._shutdown)
        if self._thread is not None:
            self._thread.join(5)

    def cut(self) -> None:
        """Close every connection and the listener: new connections are refused."""
        self._call(self._cut)

    def heal(self) -> None:
        """Listen again on the same port."""
        self._call(self._listen)

    # -- the thread --------------------------------------------------------------

    def _call(self, fn: Callable[[], None]) -> None:
        done = threading.Event()

        def run() -> None:
            try:
                fn()
            finally:
                done.set()

        with self._lock:
            self._calls.append(run)
        self._wake_w.send(b"x")
        if threading.current_thread() is not self._thread and self._running:
            done.wait(5)

    def _listen(self) -> None:
        if self._listener is not None:
            return
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((self.host, self.port))
        s.listen(16)
        self.port = s.getsockname()[1]
        self._listener = s
        self._selector.register(s, selectors.EVENT_READ, "accept")

    def _cut(self) -> None:
        if self._listener is not None:
            self._selector.unregister(self._listener)
            self._listener.close()
            self._listener = None
        for pair in list(self._pairs):
            self._drop(pair)

    def _shutdown(self) -> None:
        self._cut()
        self._running = False

    def _drop(self, pair: _Pair) -> None:
        if pair in self._pairs:
            self._pairs.remove(pair)
            for s in (pair.client, pair.upstream):
                try:
                    self._selector.unregister(s)
                except (KeyError, ValueError):
                    pass
            pair.close()

    def _accept(self) -> None:
        assert self._listener is not None
        client, _ = self._listener.accept()
        if self.tls is not None:
            client.settimeout(2)
            try:
                client = self.tls.wrap_socket(client, server_side=True)
            except (OSError, ssl.SSLError):
                self.tls_failures += 1
                client.close()
                return
        try:
            upstream = socket.create_connection(self.upstream, timeout=2)
        except OSError:
            client.close()  # the node is down: so is the path
            return
        for s in (client, upstream):
            _nodelay(s)
            s.settimeout(5)
        pair = _Pair(client, upstream)
        self._pairs.append(pair)
        self.accepted += 1
        self._selector.register(client, selectors.EVENT_READ, (pair, True))
        self._selector.register(upstream, selectors.EVENT_READ, (pair, False))

    def _forward(self, pair: _Pair, from_client: bool) -> None:
        src, dst = (pair.client, pair.upstream) if from_client else (pair.upstream, pair.client)
        try:
            data = src.recv(65536)
            while isinstance(src, ssl.SSLSocket) and src.pending():
                data += src.recv(src.pending())
        except OSError:
            data = b""
        if not data:
            self._drop(pair)
            return
        if not from_client:
            data = self._filter(pair, data)
        try:
            if data:
                dst.sendall(data)
        except OSError:
            self._drop(pair)

    def _filter(self, pair: _Pair, data: bytes) -> bytes:
        kept = []
        for opcode, raw in pair.frames.feed(data):
            if (
                self.drop_subscriptions
                and opcode == 1
                and raw[0] & 0x80
                and b"eth_subscription" in ServerFrames.payload(raw)
            ):
                self.dropped += 1
                continue
            kept.append(raw)
        return b"".join(kept)

    def _loop(self) -> None:
        while self._running:
            for key, _ in self._selector.select(0.05 if self.stalled else None):
                tag: Any = key.data
                if tag == "wake":
                    self._wake_r.recv(4096)
                    with self._lock:
                        calls, self._calls = self._calls, []
                    for call in calls:
                        call()
                elif tag == "accept":
                    if self._listener is not None:
                        self._accept()
                elif not self.stalled:
                    pair, from_client = tag
                    if pair in self._pairs:
                        self._forward(pair, from_client)
            if self.stalled:
                threading.Event().wait(0.01)
        self._selector.close()
        self._wake_r.close()
        self._wake_w.close()
