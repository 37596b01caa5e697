"""NodeSocket against a real anvil on the real reactor: heads, concurrent requests, restarts, wss.

Also the tests of tests/support/wsrelay.py, the relay the watchdog tests use.
"""

from __future__ import annotations

import signal
import ssl
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from prometheus_client import CollectorRegistry
from twisted.internet import reactor, threads
from twisted.internet import ssl as tssl

from eth_twisted.client.jsonrpc import RPCFailure
from eth_twisted.client.ws import NodeSocket, SocketSettings
from eth_twisted.metrics import ClientMetrics
from tests.support import Anvil, anvil_binary, async_wait_until, wait_until
from tests.support.certs import make_pki
from tests.support.wsrelay import ServerFrames, WSRelay

pytestmark = [pytest.mark.live, pytest.mark.slow]


class StatefulAnvil(Anvil):
    """anvil without interval mining, dumping its state on exit and loading it on start."""

    def __init__(self, state: Path) -> None:
        super().__init__(block_time=None)
        self.state = state

    def start(self) -> None:
        args = [anvil_binary(), "--host", "127.0.0.1", "--port", str(self.port), "--silent"]
        args += ["--state", str(self.state)]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until(lambda: self.rpc("eth_chainId") is not None, 15, what="anvil to answer")

    def terminate(self) -> None:
        """SIGTERM (anvil writes its state) and wait for it to go."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(10)


class Watcher:
    """A NodeSocket and what its callbacks saw."""

    def __init__(self, url: str, **kwargs: Any) -> None:
        self.heads: list[dict[str, Any]] = []
        self.subscribed = 0
        self.downs: list[str] = []
        self.metrics = ClientMetrics(CollectorRegistry())
        settings = kwargs.pop("settings", SocketSettings(backoff_initial=0.2, backoff_max=1.0))
        self.socket = NodeSocket(
            url,
            settings,
            reactor=reactor,
            on_head=self.heads.append,
            on_subscribed=self._subscribed,
            on_down=self.downs.append,
            metrics=self.metrics,
            **kwargs,
        )

    def _subscribed(self) -> None:
        self.subscribed += 1

    def numbers(self) -> list[int]:
        return [int(h["number"], 16) for h in self.heads]


@pytest.fixture
def quiet_anvil() -> Iterator[Anvil]:
    """anvil mining only when asked."""
    node = Anvil(block_time=None)
    node.start()
    yield node
    node.stop()


@pytest.fixture
def watcher(quiet_anvil: Anvil) -> Iterator[Watcher]:
    w = Watcher(f"ws://127.0.0.1:{quiet_anvil.port}")
    w.socket.start()
    yield w
    pytest_twisted.blockon(w.socket.stop())


def subscribed(w: Watcher, count: int = 1, timeout: float = 10.0) -> Any:
    return async_wait_until(
        lambda: w.subscribed >= count and w.socket.state == "subscribed",
        timeout=timeout,
        what=f"subscription {count}",
    )


@pytest_twisted.inlineCallbacks
def test_heads_arrive_in_order_without_duplicates(watcher: Watcher) -> Any:
    """anvil_mine 20 over the socket: 20 pushes, consecutive, each naming the previous as parent."""
    yield subscribed(watcher)
    yield watcher.socket.request("anvil_mine", ["0x14"])
    yield async_wait_until(lambda: len(watcher.heads) >= 20, timeout=10, what="20 heads")
    assert watcher.numbers() == list(range(1, 21))
    for parent, child in zip(watcher.heads, watcher.heads[1:], strict=False):
        assert child["parentHash"] == parent["hash"]
    assert watcher.socket.invalid == 0


@pytest_twisted.inlineCallbacks
def test_concurrent_requests_matched_by_id(watcher: Watcher) -> Any:
    """300 pipelined requests (anvil answers out of order) each get their own answer."""
    yield subscribed(watcher)
    yield watcher.socket.request("anvil_mine", ["0x20"])
    ds = []
    for n in range(300):
        if n % 3 == 0:
            ds.append(watcher.socket.request("eth_getBlockByNumber", [hex(n % 33), False]))
        elif n % 3 == 1:
            ds.append(watcher.socket.request("eth_blockNumber", []))
        else:
            ds.append(watcher.socket.request("no_such_method", []))
    results = []
    for d in ds:
        try:
            results.append((yield d))
        except RPCFailure as e:
            results.append(e.kind)
    for n, result in enumerate(results):
        if n % 3 == 0:
            assert int(result["number"], 16) == n % 33
        elif n % 3 == 1:
            assert int(result, 16) >= 32
        else:
            assert result == "rpc-error"


@pytest_twisted.inlineCallbacks
def test_restart_with_state_reconnects_and_resubscribes(tmp_path: Path) -> Any:
    """anvil killed and restarted on the same port: the socket comes back, subscribed, heads continue."""
    node = StatefulAnvil(tmp_path / "state.json")
    node.start()
    w = Watcher(f"ws://127.0.0.1:{node.port}")
    w.socket.start()
    try:
        yield subscribed(w)
        yield w.socket.request("anvil_mine", ["0x3"])
        yield async_wait_until(lambda: len(w.heads) >= 3, timeout=10, what="3 heads")
        yield threads.deferToThread(node.terminate)
        yield async_wait_until(lambda: w.downs, timeout=10, what="the socket to notice")
        assert w.socket.state == "connecting"
        yield threads.deferToThread(node.start)
        yield subscribed(w, 2, timeout=15)
        assert w.socket.reconnects == 1
        yield w.socket.request("anvil_mine", ["0x1"])
        yield async_wait_until(lambda: len(w.heads) >= 4, timeout=10, what="the next head")
        assert w.numbers() == [1, 2, 3, 4]
        assert w.heads[3]["parentHash"] == w.heads[2]["hash"]
    finally:
        yield w.socket.stop()
        node.stop()


@pytest.fixture
def tls_relay(tmp_path: Path, quiet_anvil: Anvil) -> Iterator[tuple[WSRelay, Any, Any]]:
    """A TLS-terminating relay in front of anvil; its CA and another CA as trust roots."""
    pki = make_pki(tmp_path / "pki")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(pki.server.cert, pki.server.key)
    relay = WSRelay(quiet_anvil.port, tls=context).start()
    trusted = tssl.Certificate.loadPEM(Path(pki.ca).read_bytes())
    untrusted = tssl.Certificate.loadPEM(Path(pki.other_ca).read_bytes())
    yield relay, trusted, untrusted
    relay.stop()


@pytest_twisted.inlineCallbacks
def test_wss_refused_with_an_untrusted_certificate(tls_relay: Any) -> Any:
    """wss to a server whose certificate the trust root did not sign never opens; one outage line."""
    relay, _, untrusted = tls_relay
    w = Watcher(relay.url, tls_trust=untrusted)
    w.socket.start()
    try:
        yield async_wait_until(lambda: relay.tls_failures >= 2, timeout=10, what="two refusals")
        assert w.subscribed == 0 and w.socket.state == "connecting"
        assert w.socket.outage.kind == "tls"
        assert w.socket.outage.lines == 1
    finally:
        yield w.socket.stop()


@pytest_twisted.inlineCallbacks
def test_wss_accepted_with_the_trust_root_injected(tls_relay: Any) -> Any:
    """With the relay's CA as trust root, wss subscribes and heads arrive."""
    relay, trusted, _ = tls_relay
    w = Watcher(relay.url, tls_trust=trusted)
    w.socket.start()
    try:
        yield subscribed(w)
        yield w.socket.request("anvil_mine", ["0x2"])
        yield async_wait_until(lambda: len(w.heads) >= 2, timeout=10, what="2 heads")
        assert relay.tls_failures == 0
    finally:
        yield w.socket.stop()


@pytest.fixture
def relay(quiet_anvil: Anvil) -> Iterator[WSRelay]:
    r = WSRelay(quiet_anvil.port).start()
    yield r
    r.stop()


@pytest_twisted.inlineCallbacks
def test_relay_drops_only_subscription_pushes(relay: WSRelay) -> Any:
    """drop_subscriptions: pushes vanish, replies still arrive; switched off, pushes flow again."""
    w = Watcher(relay.url)
    w.socket.start()
    try:
        yield subscribed(w)
        relay.drop_subscriptions = True
        yield w.socket.request("anvil_mine", ["0x3"])
        head = yield w.socket.request("eth_blockNumber", [])
        assert int(head, 16) == 3
        yield async_wait_until(lambda: relay.dropped >= 3, timeout=5, what="3 drops")
        assert w.heads == [] and w.socket.state == "subscribed"
        relay.drop_subscriptions = False
        yield w.socket.request("anvil_mine", ["0x1"])
        yield async_wait_until(lambda: w.heads, timeout=5, what="a head")
        assert w.numbers() == [4]
    finally:
        yield w.socket.stop()


@pytest_twisted.inlineCallbacks
def test_relay_cut_and_heal(relay: WSRelay) -> Any:
    """cut(): the socket goes down and cannot connect; heal(): it reconnects and resubscribes."""
    w = Watcher(relay.url)
    w.socket.start()
    try:
        yield subscribed(w)
        yield threads.deferToThread(relay.cut)
        yield async_wait_until(lambda: w.downs, timeout=5, what="down")
        accepted = relay.accepted
        yield async_wait_until(
            lambda: w.socket.outage.failures >= 3, timeout=10, what="refused attempts"
        )
        assert relay.accepted == accepted and w.socket.state == "connecting"
        yield threads.deferToThread(relay.heal)
        yield subscribed(w, 2, timeout=10)
        assert w.socket.reconnects == 1
    finally:
        yield w.socket.stop()


@pytest_twisted.inlineCallbacks
def test_stalled_path_is_caught_by_the_heartbeat(relay: WSRelay) -> Any:
    """A path that forwards nothing (half-open) fails the heartbeat; the socket reconnects."""
    settings = SocketSettings(
        heartbeat=0.5, heartbeat_timeout=0.5, backoff_initial=0.2, backoff_max=0.5
    )
    w = Watcher(relay.url, settings=settings)
    w.socket.start()
    try:
        yield subscribed(w)
        relay.stalled = True
        yield async_wait_until(lambda: w.downs, timeout=5, what="the heartbeat to fail")
        assert "heartbeat" in w.downs[0]
        relay.stalled = False
        yield subscribed(w, 2, timeout=10)
        value = w.metrics.registry.get_sample_value(
            "eth_client_ws_heartbeat_misses_total", {"endpoint": w.socket.label}
        )
        assert value == 1
    finally:
        yield w.socket.stop()


def test_server_frames_split_and_unmask() -> None:
    """The relay's parser splits the upgrade response and frames of every length form."""
    frames = ServerFrames()
    short = b"\x81\x05hello"
    medium = b"\x81\x7e" + struct.pack("!H", 300) + b"x" * 300
    long = b"\x82\x7f" + struct.pack("!Q", 70000) + b"y" * 70000
    masked = (
        b"\x81\x83"
        + b"\x01\x02\x03\x04"
        + bytes(c ^ m for c, m in zip(b"abc", b"\x01\x02\x03", strict=True))
    )
    stream = b"HTTP/1.1 101 OK\r\n\r\n" + short + medium + long + masked
    units = []
    for i in range(0, len(stream), 7):
        units += frames.feed(stream[i : i + 7])
    assert [u[0] for u in units] == [None, 1, 1, 2, 1]
    assert ServerFrames.payload(units[1][1]) == b"hello"
    assert ServerFrames.payload(units[4][1]) == b"abc"


def test_relay_forwards_plain_tcp() -> None:
    """Bytes pass both ways unchanged; cut() refuses new connections; heal() accepts again."""
    import socket

    upstream = socket.socket()
    upstream.bind(("127.0.0.1", 0))
    upstream.listen(1)
    relay = WSRelay(upstream.getsockname()[1]).start()
    try:
        c = socket.create_connection(("127.0.0.1", relay.port), timeout=5)
        s, _ = upstream.accept()
        c.sendall(b"ping")
        assert s.recv(4) == b"ping"
        reply = b"HTTP/1.1 101 OK\r\n\r\n\x81\x04pong"
        s.sendall(reply)
        got = b""
        while len(got) < len(reply):
            got += c.recv(100)
        assert got == reply
        relay.cut()
        assert c.recv(4) == b""
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", relay.port), timeout=2)
        relay.heal()
        socket.create_connection(("127.0.0.1", relay.port), timeout=2).close()
        c.close()
        s.close()
    finally:
        relay.stop()
        upstream.close()
