"""The shared-secret handshake over real TLS sockets, with the real receiver and DeliveryService (live)."""

from __future__ import annotations

import os
from collections.abc import Generator
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure

from eth_twisted.client.outbox import Cursor, OutboxSettings, open_outbox
from eth_twisted.client.sender import DeliveryService
from eth_twisted.link.handshake import AuthClientEndpoint, AuthServerFactory
from eth_twisted.link.netstring import NetstringDecoder, encode
from eth_twisted.link.tls import (
    client_tls_endpoint,
    listen_endpoint,
    server_tls_options,
)
from eth_twisted.model import sha256_hex
from eth_twisted.server.receiver import ReceiverFactory
from tests.support import async_wait_until
from tests.support.certs import PKI
from tests.support.link import (
    HOSTS,
    NAME,
    SECRET,
    ClientFactory,
    LinkServer,
    abort_all,
    connect_fails,
    silent_connections,
)

pytestmark = pytest.mark.live


@pytest_twisted.inlineCallbacks
def test_secret_handshake_over_tls(pki: PKI, server: LinkServer) -> Generator[Any, Any, None]:
    """The right secret over TLS: the client connects only after AUTH-OK and its name is the client_id."""
    port = yield server.start(pki, secret=SECRET)
    endpoint = AuthClientEndpoint(
        client_tls_endpoint(reactor, "127.0.0.1", port, ca_file=pki.ca), SECRET, NAME, reactor
    )
    proto = yield endpoint.connect(ClientFactory())
    proto.sendString(b"authenticated payload")
    yield async_wait_until(lambda: proto.replies, timeout=5)
    assert proto.replies[0].startswith(b"OK ")
    assert [m.client_id for m in server.got] == [NAME]
    proto.transport.loseConnection()


@pytest_twisted.inlineCallbacks
def test_wrong_secret_with_pipelined_frames_live(
    pki: PKI, server: LinkServer
) -> Generator[Any, Any, None]:
    """A raw client sending a wrong AUTH and frames in one write gets ERR - auth; nothing is stored."""
    port = yield server.start(pki, secret=SECRET)

    class Raw(Protocol):
        def __init__(self) -> None:
            self.data = b""
            self.closed = False

        def dataReceived(self, data: bytes) -> None:
            self.data += data
            if self.data.startswith(b"76:HELLO") and len(self.data) == 80:
                auth = b"AUTH mallory " + b"a" * 64 + b" " + b"b" * 64
                self.transport.write(encode(auth) + encode(b"msg-1") + encode(b"msg-2"))

        def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
            self.closed = True

    raw = yield client_tls_endpoint(reactor, "127.0.0.1", port, ca_file=pki.ca).connect(
        Factory.forProtocol(Raw)
    )
    yield async_wait_until(lambda: raw.closed, timeout=5, what="the server to close")
    frames = NetstringDecoder(1024).feed(raw.data)
    assert frames[0].startswith(b"HELLO eth/1 ") and frames[1:] == [b"ERR - auth"]
    assert server.got == [] and server.failures == ["bad-proof"]


@pytest_twisted.inlineCallbacks
def test_impostor_server_never_receives_a_message(pki: PKI) -> Generator[Any, Any, None]:
    """A TLS server that does not know the secret answers a bogus AUTH-OK; the sender writes nothing more."""
    received: list[bytes] = []

    class Impostor(Protocol):
        def connectionMade(self) -> None:
            self.transport.write(encode(b"HELLO eth/1 " + os.urandom(32).hex().encode()))

        def dataReceived(self, data: bytes) -> None:
            received.append(data)
            if len(received) == 1:
                self.transport.write(encode(b"AUTH-OK " + b"0" * 64))

    tls = server_tls_options(pki.server.cert, pki.server.key)
    port = yield listen_endpoint(reactor, "tcp:0:interface=127.0.0.1", tls=tls).listen(
        Factory.forProtocol(Impostor)
    )
    try:
        endpoint = AuthClientEndpoint(
            client_tls_endpoint(reactor, "127.0.0.1", port.getHost().port, ca_file=pki.ca),
            SECRET,
            NAME,
            reactor,
        )
        error = yield connect_fails(endpoint)
        assert error.reason == "bad-proof"
        sent = b"".join(received)
        (frame,) = NetstringDecoder(1024).feed(sent)
        assert frame.startswith(b"AUTH " + NAME.encode() + b" ")
        assert encode(frame) == sent, "only the AUTH frame was sent"
    finally:
        yield port.stopListening()


@pytest_twisted.inlineCallbacks
def test_client_handshake_timeout_live(pki: PKI) -> Generator[Any, Any, None]:
    """A TLS server that never says HELLO fails the client's connect after its timeout."""
    tls = server_tls_options(pki.server.cert, pki.server.key)
    port = yield listen_endpoint(reactor, "tcp:0:interface=127.0.0.1", tls=tls).listen(
        Factory.forProtocol(Protocol)
    )
    try:
        endpoint = AuthClientEndpoint(
            client_tls_endpoint(reactor, "127.0.0.1", port.getHost().port, ca_file=pki.ca),
            SECRET,
            NAME,
            reactor,
            timeout=0.5,
        )
        error = yield connect_fails(endpoint)
        assert error.reason == "timeout"
    finally:
        yield port.stopListening()


@pytest_twisted.inlineCallbacks
def test_delivery_service_over_mtls_and_secret(
    pki: PKI, server: LinkServer
) -> Generator[Any, Any, None]:
    """The real DeliveryService through TLS + client cert + secret delivers its outbox (the lead's wiring)."""
    port = yield server.start(pki, client_ca=pki.ca, secret=SECRET)
    endpoint = AuthClientEndpoint(
        client_tls_endpoint(
            reactor,
            "127.0.0.1",
            port,
            ca_file=pki.ca,
            cert_file=pki.client.cert,
            key_file=pki.client.key,
        ),
        SECRET,
        NAME,
        reactor,
    )
    outbox = open_outbox(OutboxSettings(spool=":memory:"), clock=reactor)
    payloads = [f"block {n}".encode() for n in range(5)]
    outbox.append([(p, n) for n, p in enumerate(payloads)], Cursor(1, "0xg", 4, "0xh4"))
    delivery = DeliveryService(endpoint, outbox, clock=reactor)
    delivery.startService()
    try:
        yield async_wait_until(lambda: outbox.depth() == 0, timeout=10, what="the outbox to drain")
        assert sorted(m.payload for m in server.got) == sorted(payloads)
        assert {m.client_id for m in server.got} == {NAME}
    finally:
        yield delivery.stopService()
        outbox.close()


@pytest_twisted.inlineCallbacks
def test_delivery_service_keeps_outbox_against_wrong_secret(
    pki: PKI, server: LinkServer
) -> Generator[Any, Any, None]:
    """With the wrong secret the DeliveryService never connects; its messages stay in the outbox."""
    port = yield server.start(pki, secret=SECRET)
    endpoint = AuthClientEndpoint(
        client_tls_endpoint(reactor, "127.0.0.1", port, ca_file=pki.ca),
        b"not-the-secret-0123456789",
        NAME,
        reactor,
    )
    outbox = open_outbox(OutboxSettings(spool=":memory:"), clock=reactor)
    outbox.append([(b"kept", 1)], Cursor(1, "0xg", 1, "0xh1"))
    delivery = DeliveryService(endpoint, outbox, clock=reactor, retry_policy=lambda attempt: 0.2)
    delivery.startService()
    try:
        yield async_wait_until(
            lambda: len(server.failures) >= 2, timeout=10, what="two refused attempts"
        )
        assert not delivery.connected and outbox.depth() == 1
        assert server.got == [] and set(server.failures) == {"bad-proof"}
    finally:
        yield delivery.stopService()
        outbox.close()


@pytest_twisted.inlineCallbacks
def test_plaintext_secret_listener_refuses_without_flag() -> Generator[Any, Any, None]:
    """A shared-secret server on plain TCP aborts every connection unless allow_plaintext."""
    failures: list[str] = []
    factory = AuthServerFactory(
        ReceiverFactory(lambda m, r: r("OK"), clock=reactor),
        SECRET,
        reactor,
        on_failure=failures.append,
    )
    port = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(factory)
    try:
        proto = yield TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port).connect(
            ClientFactory()
        )
        yield async_wait_until(lambda: proto.lost is not None, timeout=5)
        assert proto.replies == [] and failures == ["plaintext"]
    finally:
        yield port.stopListening()


@pytest_twisted.inlineCallbacks
def test_silent_authenticated_tls_peers_cannot_lock_out_the_secret(
    pki: PKI, server: LinkServer
) -> Generator[Any, Any, None]:
    """Silent authenticated TLS peers cannot lock out the right secret: it gets AUTH-OK and OK.

    There are 60 TLS connections from 6 addresses that never send AUTH, and the table holds 32.
    """
    port = yield server.start(
        pki, secret=SECRET, timeout=120, max_pending=32, max_pending_per_group=8
    )
    auth_gate, tls_gate = server.gates
    silent = yield silent_connections(port, HOSTS, 10, pki=pki)
    try:
        yield async_wait_until(
            lambda: server.failures.count("evicted") >= 28,
            timeout=30,
            what="the handshake gate to evict down to its table size",
        )
        yield async_wait_until(
            lambda: len(tls_gate.pending) == 0,
            timeout=30,
            what="every silent peer's TLS handshake to finish",
        )
        assert len(auth_gate.pending) == 32
        endpoint = AuthClientEndpoint(
            client_tls_endpoint(reactor, "127.0.0.1", port, ca_file=pki.ca), SECRET, NAME, reactor
        )
        proto = yield endpoint.connect(ClientFactory())
        proto.sendString(b"the right secret")
        yield async_wait_until(lambda: proto.replies, timeout=10, what="the reply")
        assert proto.replies == [b"OK " + sha256_hex(b"the right secret").encode()]
        assert [m.client_id for m in server.got] == [NAME]
        assert set(server.failures) == {"evicted"} and len(auth_gate.pending) == 31
        proto.transport.loseConnection()
    finally:
        abort_all(silent)
