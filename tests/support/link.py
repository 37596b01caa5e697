"""Silent connections that hold handshake slots, for the gate and link tests."""

from __future__ import annotations

import shutil
from collections.abc import Generator
from pathlib import Path
from typing import Any

import pytest
from twisted.internet import defer, interfaces, reactor
from twisted.internet.address import IPv4Address
from twisted.internet.endpoints import TCP4ClientEndpoint, wrapClientTLS
from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.protocols.basic import NetstringReceiver
from twisted.python.failure import Failure
from twisted.test import iosim
from zope.interface import directlyProvides, implementer

from eth_twisted.errors import HandshakeFailed
from eth_twisted.link.handshake import (
    AuthClientFactory,
    AuthServerFactory,
)
from eth_twisted.link.tls import (
    TLSGateFactory,
    client_tls_options,
    listen_endpoint,
    server_tls_options,
)
from eth_twisted.model import Message
from eth_twisted.server.receiver import ReceiverFactory
from tests.support.certs import PKI


@implementer(IHandshakeListener)
class Silent(Protocol):
    """Connects (completing TLS, over TLS) and never says a word: a slot holder."""

    def __init__(self) -> None:
        self.lost = False
        self.handshaken = False

    def handshakeCompleted(self) -> None:
        self.handshaken = True

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.lost = True


@defer.inlineCallbacks
def silent_connections(port: int, hosts: list[str], per_host: int, pki: PKI | None = None) -> Any:
    """``per_host`` silent connections from each loopback address in ``hosts``; TLS ones with ``pki``."""
    made: list[Silent] = []
    for host in hosts:
        for _ in range(per_host):
            endpoint: Any = TCP4ClientEndpoint(reactor, "127.0.0.1", port, bindAddress=(host, 0))
            if pki is not None:
                endpoint = wrapClientTLS(client_tls_options("127.0.0.1", pki.ca), endpoint)
            made.append((yield endpoint.connect(Factory.forProtocol(Silent))))
    return made


def abort_all(protocols: list[Any]) -> None:
    """Abort every connection still open."""
    for proto in protocols:
        if not proto.lost:
            proto.transport.abortConnection()


SECRET = b"correct horse battery staple!"


NAME = "client-1"


class Recorder(NetstringReceiver):
    """An inner protocol that records its life and every frame."""

    def __init__(self) -> None:
        self.frames: list[bytes] = []
        self.raw = b""
        self.made = False
        self.lost: Failure | None = None
        self.client_id: str | None = None
        self.transport_seen: Any = None

    def connectionMade(self) -> None:
        self.made = True
        self.transport_seen = self.transport

    def dataReceived(self, data: bytes) -> None:
        self.raw += data
        super().dataReceived(data)

    def stringReceived(self, string: bytes) -> None:
        self.frames.append(string)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.lost = reason


class RecorderFactory(Factory):
    """Builds Recorders and keeps them."""

    def __init__(self) -> None:
        self.built: list[Recorder] = []

    def buildProtocol(self, addr: Any) -> Recorder:
        proto = Recorder()
        proto.factory = self
        self.built.append(proto)
        return proto


def peer_transport(host: str, port: int = 40000) -> StringTransport:
    """A TLS-flagged StringTransport whose peer is ``host`` (IPv4 or IPv6)."""
    from twisted.internet.address import IPv6Address

    address: Any = (IPv6Address if ":" in host else IPv4Address)("TCP", host, port)
    t = StringTransport(peerAddress=address)
    directlyProvides(t, interfaces.ISSLTransport)
    return t


def connect_from(factory: Any, host: str, port: int = 40000) -> tuple[Any, StringTransport]:
    """A new gate connection from ``host`` (its handshake not begun)."""
    t = peer_transport(host, port)
    proto = factory.buildProtocol(None)
    proto.makeConnection(t)
    return proto, t


def pair(client_secret: bytes, server_secret: bytes = SECRET) -> tuple[Any, ...]:
    clock = Clock()
    got: list[Message] = []

    def submit(message: Message, reply: Any) -> None:
        got.append(message)
        reply("OK")

    receiver = ReceiverFactory(submit, clock=clock)
    server = AuthServerFactory(receiver, server_secret, clock, allow_plaintext=True)
    inner = RecorderFactory()
    client = AuthClientFactory(inner, client_secret, NAME, clock, allow_plaintext=True)
    results: list[Any] = []
    client.ready.addBoth(results.append)
    c, s, pump = iosim.connectedServerAndClient(
        lambda: server.buildProtocol(None), lambda: client.buildProtocol(None), clock=clock
    )
    return c, s, pump, got, receiver, inner, results


class CertTransport(StringTransport):
    """A StringTransport whose peer presented ``cert_file`` (a PEM certificate), as a TLS one would."""

    def __init__(self, cert_file: str) -> None:
        from OpenSSL import crypto

        super().__init__(peerAddress=IPv4Address("TCP", "192.0.2.7", 4242))
        self.cert = crypto.load_certificate(crypto.FILETYPE_PEM, Path(cert_file).read_bytes())

    def getPeerCertificate(self) -> Any:
        return self.cert


def tool(name: str, package: str) -> str:
    """The path of a command-line tool; a clear failure (never a skip) when it is missing."""
    path = shutil.which(name)
    if path is None:
        pytest.fail(
            f"{name} is not installed: scripts/test installs it (apt-get install {package})"
        )
    return path


class LinkServer:
    """A receiver behind the gates, listening on a loopback port."""

    def __init__(self) -> None:
        self.got: list[Message] = []
        self.failures: list[str] = []
        self.receiver = ReceiverFactory(self.submit, clock=reactor)
        self.port: Any = None
        self.made = 0
        self.gates: list[Any] = []

    def submit(self, message: Message, reply: Any) -> None:
        self.got.append(message)
        reply("OK")

    @defer.inlineCallbacks
    def start(
        self,
        pki: PKI,
        *,
        client_ca: str | None = None,
        cert: Any = None,
        secret: bytes | None = None,
        timeout: float = 10.0,
        **limits: int,
    ) -> Generator[Any, Any, int]:
        """Listen; ``limits`` (max_pending, max_pending_per_group) go to both gates."""
        cert = cert or pki.server
        factory: Any = self.receiver
        if secret is not None:
            factory = AuthServerFactory(
                factory, secret, reactor, timeout, on_failure=self.failures.append, **limits
            )
            self.gates.append(factory)
        factory = TLSGateFactory(
            factory, clock=reactor, timeout=timeout, on_failure=self.failures.append, **limits
        )
        self.gates.append(factory)
        tls = server_tls_options(cert.cert, cert.key, client_ca_file=client_ca)
        self.port = yield listen_endpoint(reactor, "tcp:0:interface=127.0.0.1", tls=tls).listen(
            factory
        )
        return int(self.port.getHost().port)

    @defer.inlineCallbacks
    def stop(self) -> Generator[Any, Any, None]:
        for gate in self.gates:
            for proto in list(gate.pending):
                proto.transport.abortConnection()
        self.receiver.close_all()
        if self.port is not None:
            yield self.port.stopListening()


class Client(NetstringReceiver):
    """A minimal sender: records replies and its end."""

    def __init__(self) -> None:
        self.replies: list[bytes] = []
        self.made = False
        self.lost: Failure | None = None

    def connectionMade(self) -> None:
        self.made = True

    def stringReceived(self, string: bytes) -> None:
        self.replies.append(string)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.lost = reason


class ClientFactory(Factory):
    """Builds and remembers Clients."""

    def __init__(self) -> None:
        self.built: list[Client] = []

    def buildProtocol(self, addr: Any) -> Client:
        c = Client()
        c.factory = self
        self.built.append(c)
        return c


@defer.inlineCallbacks
def connect_fails(endpoint: Any) -> Generator[Any, Any, HandshakeFailed]:
    factory = ClientFactory()
    try:
        proto = yield endpoint.connect(factory)
    except HandshakeFailed as e:
        assert factory.built == [], "the inner protocol must not exist after a failed handshake"
        return e
    proto.transport.abortConnection()
    raise AssertionError("the connection should have failed")


HOSTS = [f"127.0.0.{n}" for n in range(2, 8)]  # 6 silent addresses, 10 connections each
