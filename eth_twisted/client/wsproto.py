"""The WebSocket plumbing under :class:`eth_twisted.client.ws.NodeSocket`.

The autobahn protocol and factory (every autobahn timer off, caps set, no compression), the
``ws://``/``wss://`` URL and its endpoint (certificates verified), and the endpoint wrapper
that lets ``ClientService`` survive a failed ``prepareConnection``. docs/architecture.md
(section 1, "Node socket") says where it sits.
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import unquote, urlsplit, urlunsplit

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from automat import NoTransition
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.python.failure import Failure
from zope.interface import implementer

from eth_twisted.client.jsonrpc import endpoint_label
from eth_twisted.client.tcp import quickack, tcp_socket

if TYPE_CHECKING:
    import socket


class Owner(Protocol):
    """What a :class:`NodeProtocol` reports to (a NodeSocket)."""

    def connection_made(self, proto: NodeProtocol) -> None:
        """TCP (and TLS) is up; the WebSocket handshake starts."""

    def opened(self, proto: NodeProtocol) -> None:
        """The WebSocket handshake succeeded."""

    def message(self, proto: NodeProtocol, payload: bytes, binary: bool) -> None:
        """One whole message arrived."""

    def closing(self, proto: NodeProtocol) -> None:
        """A close frame arrived: the node should drop the TCP connection soon."""

    def lost(self, proto: NodeProtocol, reason: str, failure: Failure) -> None:
        """The connection is gone; ``reason`` says why, without secrets."""


@dataclass(frozen=True)
class WSTarget:
    """Where a node socket connects: host, port, TLS, the URL without credentials, its label."""

    url: str = field(repr=False)
    """The URL the handshake names, ``user:password@`` removed (the path may hold a key)."""
    label: str
    host: str
    port: int
    secure: bool
    authorization: str | None = field(default=None, repr=False)
    """``Basic ...`` when the URL carried credentials; never logged."""

    @classmethod
    def from_url(cls, url: str) -> WSTarget:
        """Split ``url`` (``ws://`` or ``wss://``); ValueError (never repeating it) if it is not one."""
        parts = urlsplit(url)
        if parts.scheme not in ("ws", "wss") or not parts.hostname:
            raise ValueError("expected a ws:// or wss:// URL with a host name")
        try:
            port = parts.port
        except ValueError:
            raise ValueError("the URL's port is not a number from 0 to 65535") from None
        secure = parts.scheme == "wss"
        if port is None:
            port = 443 if secure else 80
        authorization = None
        if parts.username is not None or parts.password is not None:
            token = f"{unquote(parts.username or '')}:{unquote(parts.password or '')}"
            authorization = "Basic " + base64.b64encode(token.encode()).decode("ascii")
        host = parts.hostname
        shown = f"[{host}]" if ":" in host else host
        clean = urlunsplit((parts.scheme, f"{shown}:{port}", parts.path or "/", parts.query, ""))
        return cls(clean, endpoint_label(clean), host, port, secure, authorization)


def _nothing(*args: Any, **kwargs: Any) -> None:
    """A log call that writes nothing."""


class _QuietLog:
    """autobahn's logger for node connections: every level is debug in our namespace.

    autobahn logs a TLS failure at error level on every attempt; the NodeSocket logs an
    outage once when it starts and once when it ends instead.
    """

    _log = Logger(namespace="eth_twisted.client.wsproto.autobahn")

    def __getattr__(self, level: str) -> Any:
        if level in ("info", "warn", "error", "critical", "failure"):
            return self._debug
        return _nothing  # autobahn's debug and trace: a line per frame

    def _debug(self, format: str = "", *args: Any, **kwargs: Any) -> None:
        try:
            self._log.debug(str(format), **kwargs)
        except Exception:  # noqa: BLE001 - a log line must never break a connection
            pass


class NodeProtocol(WebSocketClientProtocol):
    """One WebSocket connection to a node: frames in and out, everything else to its owner.

    TCP_NODELAY is set by autobahn (``tcpNoDelay``); on Linux TCP_QUICKACK is re-armed
    at every read, before the bytes are parsed, so the ACK of a burst of pushes leaves at
    once and the node's Nagle does not hold the next one for the delayed-ACK timer.
    """

    owner: Owner
    log = _QuietLog()
    quickack = True
    _sock: socket.socket | None = None
    lost_reason = ""

    def connectionMade(self) -> None:
        super().connectionMade()
        self._sock = tcp_socket(self.transport) if self.quickack else None
        quickack(self._sock)
        self.owner.connection_made(self)

    def dataReceived(self, data: bytes) -> None:
        quickack(self._sock)
        super().dataReceived(data)

    def onOpen(self) -> None:
        self.owner.opened(self)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self.owner.message(self, payload, isBinary)

    def onCloseFrame(self, code: int, reasonRaw: bytes) -> Any:
        result = super().onCloseFrame(code, reasonRaw)
        self.owner.closing(self)
        return result

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        if self.lost_reason or code is None or code == 1000:
            return  # our own reason (a deadline) says more
        text = str(reason or "")
        if "(" in text and text.endswith(")"):  # 'connection was closed uncleanly ("...")'
            text = text[text.index("(") + 1 : -1].strip('"')
        text = text.removeprefix("I dropped the WebSocket TCP connection: ")
        self.lost_reason = f"closed ({code}): {text[:160]}"

    def connectionLost(self, reason: Failure = Failure(ConnectionError())) -> None:  # noqa: B008
        super().connectionLost(reason)
        self._sock = None
        why = self.lost_reason or f"connection lost: {reason.type.__name__}"
        self.owner.lost(self, why, reason)

    @property
    def can_send(self) -> bool:
        """True while messages can be sent (the handshake done, no close started)."""
        return bool(self.state == self.STATE_OPEN)

    def abort(self) -> None:
        """Drop the TCP connection at once (no close handshake)."""
        transport: Any = self.transport
        if transport is not None:
            transport.abortConnection()

    def send_text(self, payload: bytes) -> None:
        """Send one text message (a JSON-RPC request)."""
        self.sendMessage(payload, isBinary=False)


def node_factory(
    owner: Owner, target: WSTarget, max_message: int, reactor: Any, quickack: bool = True
) -> WebSocketClientFactory:
    """An autobahn client factory for ``target``: caps, no compression, no autobahn timer.

    autobahn's timers are whole-second buckets on the global reactor (HEADS.md 5.2), so
    every one is off here: the open deadline, the heartbeat, the close wait and the
    request deadlines are the NodeSocket's, on its injected clock.
    """
    headers = {"Authorization": target.authorization} if target.authorization else None
    factory = WebSocketClientFactory(
        target.url, headers=headers, useragent="eth-twisted", reactor=reactor
    )
    factory.setProtocolOptions(
        maxFramePayloadSize=max_message,
        maxMessagePayloadSize=max_message,
        perMessageCompressionOffers=[],
        openHandshakeTimeout=0,
        closeHandshakeTimeout=0,
        serverConnectionDropTimeout=0,
        autoPingInterval=0,
        autoPingTimeout=0,
        tcpNoDelay=True,
        failByDrop=True,
    )
    factory.noisy = False

    class _Bound(NodeProtocol):
        pass

    _Bound.owner = owner
    _Bound.quickack = quickack
    factory.protocol = _Bound
    return factory


def tls_creator(host: str, tls_trust: Any = None) -> Any:
    """The client TLS options for ``host``: certificate and host name verified.

    ``tls_trust`` is a trust root for ``optionsForClientTLS`` (a ``Certificate``, say, in
    tests), or already an ``IOpenSSLClientConnectionCreator`` (a whole policy); None
    means the platform's trust store.
    """
    from twisted.internet import ssl
    from twisted.internet.interfaces import IOpenSSLClientConnectionCreator

    if tls_trust is not None and IOpenSSLClientConnectionCreator.providedBy(tls_trust):
        return tls_trust
    return ssl.optionsForClientTLS(host, trustRoot=tls_trust)


def node_endpoint(
    reactor: Any,
    target: WSTarget,
    timeout: float,
    on_failure: Callable[[Failure], None],
    tls_trust: Any = None,
    tcp: IStreamClientEndpoint | None = None,
) -> IStreamClientEndpoint:
    """The endpoint ClientService uses: TCP (``tcp``, or a ``HostnameEndpoint``), guarded.

    For ``wss`` the TLS layer (certificate and host name verified) goes above the guard:
    autobahn wants its transport to be the TLS protocol itself.
    """
    from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS

    if tcp is None:
        tcp = HostnameEndpoint(reactor, target.host, target.port, timeout=timeout)
    endpoint: IStreamClientEndpoint = GuardedEndpoint(tcp, on_failure)
    if target.secure:
        endpoint = wrapClientTLS(tls_creator(target.host, tls_trust), endpoint)
    return endpoint


class _Forgiving(ProtocolWrapper):
    """Passes everything through; swallows ClientService's NoTransition at connectionLost.

    A connection whose ``prepareConnection`` failed is lost while ClientService is in
    Connecting or Waiting, which have no transition for a disconnect (Twisted 26.10):
    its ``connectionLost`` raises ``NoTransition`` after the protocol has run. Nothing is
    left undone by then, so it is dropped here instead of logged as an unhandled error.
    """

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        try:
            super().connectionLost(reason)
        except NoTransition:
            pass


class _ForgivingFactory(WrappingFactory):
    protocol = _Forgiving
    noisy = False


def _unwrap(wrapper: Any) -> Any:
    return wrapper.wrappedProtocol


@implementer(IStreamClientEndpoint)
class GuardedEndpoint:
    """An endpoint for ClientService: connect failures reported, NoTransition contained."""

    def __init__(
        self, endpoint: IStreamClientEndpoint, on_failure: Callable[[Failure], None]
    ) -> None:
        self.endpoint = endpoint
        self.on_failure = on_failure

    def connect(self, factory: Any) -> Deferred[Any]:
        d: Deferred[Any] = self.endpoint.connect(_ForgivingFactory(factory))
        d.addCallbacks(_unwrap, self._failed)
        return d

    def _failed(self, failure: Failure) -> Failure:
        self.on_failure(failure)
        return failure

    def __repr__(self) -> str:
        return f"<guarded {self.endpoint!r}>"
