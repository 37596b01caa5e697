"""The shared-secret handshake ("eth/1"): mutual HMAC-SHA256 challenge-response before any message.

The exchange is specified in docs/protocol.md; both ends run it as a gate (:mod:`eth_twisted.link.gate`).
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets

from twisted.internet import interfaces
from twisted.internet.protocol import Factory
from zope.interface import implementer

from eth_twisted.errors import ConfigError
from eth_twisted.link.gate import (
    DEFAULT_HANDSHAKE_TIMEOUT,
    DEFAULT_MAX_PENDING,
    DEFAULT_MAX_PENDING_PER_GROUP,
    ClientGateFactory,
    GatedClientEndpoint,
    GateFactory,
    GateProtocol,
    OnFailure,
)
from eth_twisted.link.netstring import NetstringDecoder, encode
from eth_twisted.link.secret import check_secret_bytes
from eth_twisted.link.tls import is_tls

VERSION = b"eth/1"
NONCE_BYTES = 32
HANDSHAKE_MAX_LENGTH = 4096
"""Longest frame read before authentication (data frames up to this get ``ERR <sha> auth``)."""
_HEX64 = re.compile(rb"[0-9a-f]{64}\Z")
_NAME = re.compile(rb"[A-Za-z0-9][A-Za-z0-9._@:-]{0,127}\Z")


def client_proof(secret: bytes, server_nonce: bytes, client_nonce: bytes, name: bytes) -> bytes:
    """The client's HMAC proof (64 hex digits, ASCII) for one handshake."""
    return _proof(secret, b"client\0", server_nonce, client_nonce, name)


def server_proof(secret: bytes, server_nonce: bytes, client_nonce: bytes, name: bytes) -> bytes:
    """The server's HMAC proof (64 hex digits, ASCII) for one handshake."""
    return _proof(secret, b"server\0", server_nonce, client_nonce, name)


def _proof(
    secret: bytes, role: bytes, server_nonce: bytes, client_nonce: bytes, name: bytes
) -> bytes:
    mac = hmac.new(secret, role + server_nonce + client_nonce + name, hashlib.sha256)
    return mac.hexdigest().encode("ascii")


def _proof_matches(expected: bytes, given: bytes) -> bool:
    """Constant-time comparison of two proofs."""
    return hmac.compare_digest(expected, given)


def _nonce() -> bytes:
    return secrets.token_hex(NONCE_BYTES).encode("ascii")


# -- shared-secret handshake -----------------------------------------------------


class _AuthServerProtocol(GateProtocol):
    """Server side of the eth/1 handshake."""

    factory: AuthServerFactory

    def gate_started(self) -> None:
        f = self.factory
        if not f.allow_plaintext and not is_tls(self.transport):
            self._fail("plaintext", "shared-secret handshake refused over plaintext", close="abort")
            return
        self._decoder = NetstringDecoder(HANDSHAKE_MAX_LENGTH)
        self._raw = bytearray()
        self._server_nonce = _nonce()
        self.transport.write(encode(b"HELLO " + VERSION + b" " + self._server_nonce))

    def timeout_detail(self) -> str:
        return f"no AUTH within {self.factory.timeout:g} s"

    def handshake_data(self, data: bytes) -> None:
        self._raw += data
        frames = self._decoder.feed(data)
        if frames:
            first = frames[0]
            rest = bytes(self._raw[len(encode(first)) :])
            self._raw = bytearray()
            self._check(first, rest)
        elif self._decoder.error is not None:
            self._fail("bad-frame", self._decoder.error.detail, reply=b"ERR - auth")

    def _check(self, frame: bytes, rest: bytes) -> None:
        parts = frame.split(b" ")
        if parts[0] != b"AUTH":
            sha = hashlib.sha256(frame).hexdigest().encode("ascii")
            self._fail("not-auth", "first frame is not AUTH", reply=b"ERR " + sha + b" auth")
            return
        if (
            len(parts) != 4
            or not _NAME.match(parts[1])
            or not _HEX64.match(parts[2])
            or not _HEX64.match(parts[3])
        ):
            self._fail("malformed", "AUTH frame is malformed", reply=b"ERR - auth")
            return
        _, name, client_nonce, proof = parts
        secret = self.factory.secret
        expected = client_proof(secret, self._server_nonce, client_nonce, name)
        if not _proof_matches(expected, proof):
            self._fail(
                "bad-proof", f"wrong proof for client {name.decode('ascii')!r}", reply=b"ERR - auth"
            )
            return
        answer = server_proof(secret, self._server_nonce, client_nonce, name)
        self.transport.write(encode(b"AUTH-OK " + answer))
        client = name.decode("ascii")
        self.factory.log.info(
            "Client {client} authenticated from {peer}", client=client, peer=self.peer
        )
        self._open(client, rest)


class AuthServerFactory(GateFactory):
    """Server side of the shared-secret handshake, wrapping the receiver's factory.

    Each connection is greeted with ``HELLO``; the inner protocol is built
    and connected (with ``client_id`` = the client's name) only after a
    valid ``AUTH``, and receives exactly the bytes after it. A wrong or
    missing ``AUTH`` is answered (``ERR - auth`` or ``ERR <sha> auth``) and
    closed, and nothing behind it is ever read; no ``AUTH`` within
    ``timeout`` seconds aborts the connection. Over a non-TLS transport each
    connection is aborted unless ``allow_plaintext``. At most
    ``max_pending`` handshakes run at once, ``max_pending_per_group`` from
    one address group; a newcomer past either evicts (aborts) an old one
    (:class:`PendingHandshakes`) and is never refused. ``on_failure(reason)``
    is called for each refusal (reasons: ``bad-proof``, ``not-auth``,
    ``malformed``, ``bad-frame``, ``timeout``, ``closed``, ``plaintext``,
    ``evicted``).
    """

    gate_protocol = _AuthServerProtocol
    gate_name = "Handshake"

    def __init__(
        self,
        inner_factory: interfaces.IProtocolFactory,
        secret: bytes,
        clock: interfaces.IReactorTime,
        timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
        allow_plaintext: bool = False,
        *,
        on_failure: OnFailure | None = None,
        max_pending: int = DEFAULT_MAX_PENDING,
        max_pending_per_group: int = DEFAULT_MAX_PENDING_PER_GROUP,
    ) -> None:
        super().__init__(
            inner_factory,
            clock=clock,
            timeout=timeout,
            on_failure=on_failure,
            max_pending=max_pending,
            max_pending_per_group=max_pending_per_group,
        )
        check_secret_bytes(secret)
        self.secret = secret
        self.allow_plaintext = allow_plaintext


class _AuthClientProtocol(GateProtocol):
    """Client side of the eth/1 handshake."""

    factory: AuthClientFactory

    def gate_started(self) -> None:
        if not self.factory.allow_plaintext and not is_tls(self.transport):
            self._fail("plaintext", "shared-secret handshake refused over plaintext", close="abort")
            return
        self._decoder = NetstringDecoder(HANDSHAKE_MAX_LENGTH)
        self._raw = bytearray()
        self._stage = "hello"
        self._server_nonce = b""
        self._client_nonce = b""

    def timeout_detail(self) -> str:
        what = "HELLO" if self._stage == "hello" else "AUTH-OK"
        return f"no {what} from the server within {self.factory.timeout:g} s"

    def handshake_data(self, data: bytes) -> None:
        self._raw += data
        for frame in self._decoder.feed(data):
            del self._raw[: len(encode(frame))]
            if self._stage == "hello":
                self._hello(frame)
            else:
                self._auth_ok(frame, bytes(self._raw))
            if self.state != "waiting":
                return
        if self._decoder.error is not None:
            self._fail(
                "bad-frame",
                f"server sent a bad frame ({self._decoder.error.detail})",
                close="abort",
            )

    def _hello(self, frame: bytes) -> None:
        parts = frame.split(b" ")
        if len(parts) != 3 or parts[0] != b"HELLO":
            self._fail(
                "no-hello",
                f"the server did not greet us with HELLO (got {frame[:40]!r})",
                close="abort",
            )
            return
        if parts[1] != VERSION:
            self._fail(
                "version", f"the server speaks {parts[1][:20]!r}, not {VERSION!r}", close="abort"
            )
            return
        if not _HEX64.match(parts[2]):
            self._fail("no-hello", "the server's HELLO nonce is malformed", close="abort")
            return
        f = self.factory
        self._server_nonce = parts[2]
        self._client_nonce = _nonce()
        proof = client_proof(f.secret, self._server_nonce, self._client_nonce, f.name)
        self.transport.write(encode(b"AUTH " + f.name + b" " + self._client_nonce + b" " + proof))
        self._stage = "proof"

    def _auth_ok(self, frame: bytes, rest: bytes) -> None:
        f = self.factory
        parts = frame.split(b" ")
        if frame.startswith(b"ERR ") and frame.endswith(b" auth"):
            self._fail(
                "refused",
                "the server refused our credentials (wrong secret or name)",
                close="abort",
            )
            return
        if len(parts) != 2 or parts[0] != b"AUTH-OK" or not _HEX64.match(parts[1]):
            self._fail("unexpected", f"expected AUTH-OK, got {frame[:40]!r}", close="abort")
            return
        expected = server_proof(f.secret, self._server_nonce, self._client_nonce, f.name)
        if not _proof_matches(expected, parts[1]):
            self._fail(
                "bad-proof",
                "the server's proof is wrong: it does not know the secret",
                close="abort",
            )
            return
        self._raw = bytearray()
        f.log.info(
            "Authenticated to {server} as {name}", server=f.server, name=f.name.decode("ascii")
        )
        self._open(None, rest)


class AuthClientFactory(ClientGateFactory):
    """Client side of the shared-secret handshake for one connection.

    Waits for ``HELLO``, answers ``AUTH``, checks the server's proof in
    constant time, and only then builds ``inner_factory``'s protocol and
    connects it (its ``connectionMade`` runs after mutual authentication);
    ``ready`` fires with that protocol, or fails with
    :class:`~eth_twisted.errors.HandshakeFailed`. On any failure the
    connection is aborted without a message frame ever being written. For a
    reconnecting client use :class:`AuthClientEndpoint`, which makes one of
    these per attempt.
    """

    gate_protocol = _AuthClientProtocol
    gate_name = "Handshake"

    def __init__(
        self,
        inner_factory: interfaces.IProtocolFactory,
        secret: bytes,
        name: str,
        clock: interfaces.IReactorTime,
        timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
        allow_plaintext: bool = False,
        *,
        on_failure: OnFailure | None = None,
        server: str = "server",
    ) -> None:
        super().__init__(
            inner_factory, clock=clock, timeout=timeout, on_failure=on_failure, server=server
        )
        check_secret_bytes(secret)
        raw_name = name.encode("ascii", "replace")
        if not _NAME.match(raw_name):
            raise ConfigError(
                f"client name {name!r}: 1-128 characters of letters, digits and . _ @ : -, "
                "starting with a letter or digit"
            )
        self.secret = secret
        self.name = raw_name
        self.allow_plaintext = allow_plaintext


@implementer(interfaces.IStreamClientEndpoint)
class AuthClientEndpoint(GatedClientEndpoint):
    """A client endpoint that runs the shared-secret handshake on every connection.

    ``connect(factory)`` connects ``endpoint`` (usually
    :func:`client_tls_endpoint`) and fires with ``factory``'s protocol only
    after mutual authentication; a wrong secret, an impostor server, or no
    ``HELLO``/``AUTH-OK`` within ``timeout`` fails the attempt with
    :class:`~eth_twisted.errors.HandshakeFailed` (so ``ClientService`` backs
    off). Pass it to ``DeliveryService`` as its endpoint.
    """

    def __init__(
        self,
        endpoint: interfaces.IStreamClientEndpoint,
        secret: bytes,
        name: str,
        clock: interfaces.IReactorTime,
        timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
        allow_plaintext: bool = False,
        *,
        on_failure: OnFailure | None = None,
        server: str = "server",
    ) -> None:
        # Validate now (a bad name or secret is a start-up error, not a retry loop).
        AuthClientFactory(Factory(), secret, name, clock, timeout, allow_plaintext)

        def make(factory: interfaces.IProtocolFactory) -> ClientGateFactory:
            return AuthClientFactory(
                factory,
                secret,
                name,
                clock,
                timeout,
                allow_plaintext,
                on_failure=on_failure,
                server=server,
            )

        super().__init__(endpoint, make)
