"""The fault proxy does what each mode says, in-process on the test reactor and as a subprocess."""

from __future__ import annotations

import os
import socket
import time
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure
from zope.interface import implementer

from tests.faults.proxy import FaultProxy, NetstringTap, ProxyProcess, ReplyRecorder
from tests.support import async_wait_until


@implementer(IHalfCloseableProtocol)
class Peer(Protocol):
    """Either end of a test connection: records bytes, half-close and how it ended."""

    def __init__(self, on_eof_reply: bytes | None = None) -> None:
        self.data = b""
        self.chunks: list[tuple[float, bytes]] = []
        self.eof = False
        self.lost: Failure | None = None
        self.on_eof_reply = on_eof_reply

    def dataReceived(self, data: bytes) -> None:
        self.data += data
        self.chunks.append((time.monotonic(), data))

    def readConnectionLost(self) -> None:
        self.eof = True
        if self.on_eof_reply is not None:
            self.transport.write(self.on_eof_reply)
            self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.lost = reason

    @property
    def reset(self) -> bool:
        """Lost in a non-clean way (an RST or abort), not by a FIN."""
        return self.lost is not None and not self.lost.check(ConnectionDone)


class Backend(Factory):
    """The proxy's target: keeps every accepted :class:`Peer`."""

    def __init__(self, on_eof_reply: bytes | None = None) -> None:
        self.peers: list[Peer] = []
        self.on_eof_reply = on_eof_reply

    def buildProtocol(self, addr: Any) -> Peer:
        p = Peer(self.on_eof_reply)
        self.peers.append(p)
        return p


@pytest.fixture
def rig(tmp_path: Any) -> Any:
    """A backend listener and a proxy in front of it, both on the test reactor."""
    backend = Backend()
    listening = reactor.listenTCP(0, backend, interface="127.0.0.1")
    recorder = ReplyRecorder(str(tmp_path / "replies.txt"))
    proxy = FaultProxy(reactor, "127.0.0.1", listening.getHost().port, recorder)
    front = reactor.listenTCP(0, proxy, interface="127.0.0.1")

    class Rig:
        pass

    r = Rig()
    r.backend, r.proxy, r.port, r.recorder = backend, proxy, front.getHost().port, recorder  # type: ignore[attr-defined]
    yield r
    proxy.kick()
    recorder.close()
    pytest_twisted.blockon(defer.gatherResults([listening.stopListening(), front.stopListening()]))


def connect(port: int) -> defer.Deferred[Peer]:
    """Connect a :class:`Peer` to the proxy."""
    return connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), Peer())


def quiet(seconds: float) -> defer.Deferred[None]:
    """Let the reactor run for a while (to show that something does NOT happen)."""
    from twisted.internet import task

    return task.deferLater(reactor, seconds, lambda: None)


@pytest_twisted.inlineCallbacks
def test_pass_forwards_both_ways_and_half_close(rig: Any) -> None:
    """In pass mode bytes flow both ways and a client's half-close reaches the target.

    The target's reply comes back.
    """
    rig.backend.on_eof_reply = b"3:bye,"
    client = yield connect(rig.port)
    client.transport.write(b"5:hello,")
    yield async_wait_until(
        lambda: rig.backend.peers and rig.backend.peers[0].data == b"5:hello,", 5
    )
    rig.backend.peers[0].transport.write(b"2:hi,")
    yield async_wait_until(lambda: client.data == b"2:hi,", 5)
    client.transport.loseWriteConnection()
    yield async_wait_until(lambda: client.eof, 5)
    assert client.data == b"2:hi,3:bye,"
    assert rig.backend.peers[0].eof
    assert client.lost is None or not client.reset
    yield async_wait_until(
        lambda: not rig.proxy.links, 5, what="the proxy to forget the closed link"
    )
    assert rig.proxy.status()["up_bytes"] == 8


@pytest_twisted.inlineCallbacks
def test_delay_holds_each_chunk_in_both_directions_keeping_order(rig: Any) -> None:
    """In delay mode every chunk arrives no sooner than the delay, in both directions, in order."""
    client = yield connect(rig.port)
    yield async_wait_until(lambda: rig.backend.peers, 5)
    rig.proxy.set_mode("delay", "300")
    sent = time.monotonic()
    for i in range(5):
        client.transport.write(b"%d" % i)
    yield async_wait_until(lambda: rig.backend.peers[0].data == b"01234", 5)
    assert rig.backend.peers[0].chunks[0][0] - sent >= 0.28
    sent = time.monotonic()
    rig.backend.peers[0].transport.write(b"back")
    yield async_wait_until(lambda: client.data == b"back", 5)
    assert client.chunks[0][0] - sent >= 0.28


@pytest_twisted.inlineCallbacks
def test_blackhole_discards_and_the_damaged_connection_stays_dark(rig: Any) -> None:
    """Blackhole drops bytes and new connections never reach the target.

    After healing only new connections pass.
    """
    old = yield connect(rig.port)
    yield async_wait_until(lambda: rig.backend.peers, 5)
    rig.proxy.set_mode("blackhole")
    old.transport.write(b"lost-bytes")
    new = yield connect(rig.port)
    new.transport.write(b"never")
    yield quiet(0.3)
    assert rig.backend.peers[0].data == b""
    assert len(rig.backend.peers) == 1, "a connection accepted in blackhole reached the target"
    assert new.lost is None and old.lost is None, "blackhole must not close anything"
    assert rig.proxy.status()["dropped_bytes"] == len(b"lost-bytes") + len(b"never")
    rig.proxy.set_mode("pass")
    old.transport.write(b"after")
    healed = yield connect(rig.port)
    healed.transport.write(b"fresh")
    yield async_wait_until(
        lambda: len(rig.backend.peers) == 2 and rig.backend.peers[1].data == b"fresh", 5
    )
    assert rig.backend.peers[0].data == b""


@pytest_twisted.inlineCallbacks
def test_hold_keeps_bytes_and_delivers_them_when_released(rig: Any) -> None:
    """Hold forwards nothing but keeps every byte; leaving hold delivers them intact."""
    client = yield connect(rig.port)
    yield async_wait_until(lambda: rig.backend.peers, 5)
    rig.proxy.set_mode("hold")
    client.transport.write(b"3:abc,")
    rig.backend.peers[0].transport.write(b"2:ok,")
    yield quiet(0.3)
    assert rig.backend.peers[0].data == b"" and client.data == b""
    rig.proxy.set_mode("pass")
    yield async_wait_until(
        lambda: rig.backend.peers[0].data == b"3:abc," and client.data == b"2:ok,", 5
    )


@pytest_twisted.inlineCallbacks
def test_reset_aborts_open_and_new_connections(rig: Any) -> None:
    """Reset aborts both sides of open connections with an RST and every new one, until the mode changes."""
    client = yield connect(rig.port)
    yield async_wait_until(lambda: rig.backend.peers, 5)
    rig.proxy.set_mode("reset")
    yield async_wait_until(
        lambda: client.lost is not None and rig.backend.peers[0].lost is not None, 5
    )
    assert client.reset and rig.backend.peers[0].reset
    again = yield connect(rig.port)
    yield async_wait_until(lambda: again.lost is not None, 5)
    assert again.reset
    assert len(rig.backend.peers) == 1
    rig.proxy.set_mode("pass")
    ok = yield connect(rig.port)
    ok.transport.write(b"x")
    yield async_wait_until(
        lambda: len(rig.backend.peers) == 2 and rig.backend.peers[1].data == b"x", 5
    )


@pytest_twisted.inlineCallbacks
def test_cut_forwards_a_prefix_then_resets_once(rig: Any) -> None:
    """Cut N forwards only the first N bytes of the next chunk, resets both sides, then returns to pass."""
    client = yield connect(rig.port)
    yield async_wait_until(lambda: rig.backend.peers, 5)
    rig.proxy.set_mode("cut", "5")
    client.transport.write(b"20:abcdefghijklmnopqrst,")
    yield async_wait_until(
        lambda: client.lost is not None and rig.backend.peers[0].lost is not None, 5
    )
    assert rig.backend.peers[0].data == b"20:ab"
    assert client.reset and rig.backend.peers[0].reset
    assert rig.proxy.mode == "pass" and rig.proxy.status()["cuts"] == 1


@pytest_twisted.inlineCallbacks
def test_cut_down_cuts_the_reply_direction(rig: Any) -> None:
    """``cut N down`` cuts what the target sends back, not what the client sends."""
    client = yield connect(rig.port)
    yield async_wait_until(lambda: rig.backend.peers, 5)
    rig.proxy.set_mode("cut", "3", "down")
    client.transport.write(b"1:a,")
    yield async_wait_until(lambda: rig.backend.peers[0].data == b"1:a,", 5)
    rig.backend.peers[0].transport.write(b"66:" + b"x" * 66 + b",")
    yield async_wait_until(lambda: client.lost is not None, 5)
    assert client.data == b"66:"


@pytest_twisted.inlineCallbacks
def test_recorder_logs_every_reply_netstring(rig: Any) -> None:
    """Netstrings the target sends to the client are recorded one per line, split across chunks or not."""
    client = yield connect(rig.port)
    yield async_wait_until(lambda: rig.backend.peers, 5)
    sha = "ab" * 32
    rig.backend.peers[0].transport.write(f"67:OK {sha},".encode()[:20])
    yield quiet(0.05)
    rig.backend.peers[0].transport.write(f"67:OK {sha},".encode()[20:] + b"4:DUP ,")
    yield async_wait_until(lambda: len(client.data) == 71 + 7, 5)
    with open(rig.recorder.path, "rb") as f:
        assert f.read().splitlines() == [f"OK {sha}".encode(), b"DUP "]


def test_netstring_tap_stops_at_garbage() -> None:
    """The observing parser delivers frames before garbage and nothing after it, without raising."""
    frames: list[bytes] = []
    tap = NetstringTap(frames.append)
    tap.feed(b"1:a,2:b")
    tap.feed(b"b,zz:3:ccc,")
    tap.feed(b"1:d,")
    assert frames == [b"a", b"bb"] and tap.broken


def test_control_rejects_bad_commands_without_changing_mode() -> None:
    """Unknown modes and bad arguments answer ``err`` and leave the mode alone."""
    proxy = FaultProxy(reactor, "127.0.0.1", 1)
    assert proxy.control(["mode", "explode"]).startswith("err")
    assert proxy.control(["mode", "delay"]).startswith("err")
    assert proxy.control(["mode", "cut", "3", "sideways"]).startswith("err")
    assert proxy.control(["frobnicate"]).startswith("err")
    assert proxy.mode == "pass"
    assert proxy.control(["mode", "delay", "250"]) == "ok delay"
    assert proxy.status()["delay_ms"] == 250


def test_subprocess_proxy_is_driven_over_its_control_port(tmp_path: Any) -> None:
    """As a subprocess the proxy forwards, blackholes and resets on blocking control commands."""
    backend = socket.socket()
    backend.bind(("127.0.0.1", 0))
    backend.listen(8)
    backend.settimeout(5)
    proxy = ProxyProcess(
        backend.getsockname()[1],
        record=str(tmp_path / "r.txt"),
        log_path=str(tmp_path / "proxy.log"),
    )
    proxy.start()
    try:
        c = socket.create_connection(("127.0.0.1", proxy.listen_port), timeout=5)
        server_side, _ = backend.accept()
        server_side.settimeout(5)
        c.sendall(b"ping")
        assert server_side.recv(16) == b"ping"
        server_side.sendall(b"2:OK,")
        assert c.recv(16) == b"2:OK,"
        assert proxy.mode("blackhole") == "blackhole"
        c.sendall(b"dropped")
        server_side.settimeout(0.3)
        with pytest.raises(socket.timeout):
            server_side.recv(16)
        assert proxy.status()["dropped_bytes"] == 7
        assert proxy.mode("reset") == "reset"
        c.settimeout(5)
        with pytest.raises(ConnectionResetError):
            # an RST, not a clean FIN (which would return b"")
            c.recv(16)
        with pytest.raises(RuntimeError):
            proxy.mode("nonsense")
        assert proxy.replies() == ["OK"]
        c.close()
        server_side.close()
    finally:
        proxy.stop()
        backend.close()
    assert proxy.proc is not None and proxy.proc.returncode is not None
    assert os.path.exists(tmp_path / "proxy.log")
